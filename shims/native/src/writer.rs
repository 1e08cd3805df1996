//! One background thread that does every file append of the shim (CRI logs, shim log); port of
//! shims/common/writer.py.
//!
//! One thread rather than blocking writes on the runtime: a slow disk must never stall the ttrpc
//! server or the copies. Files stay open between writes, keyed by path. `open` creates a file before
//! anything is written to it (kubelet opens a container's log at once) and with `fresh` closes the old
//! descriptor first (log rotation: the client renamed the file); items keep their queue order, so what
//! was queued before a reopen lands in the old file and nothing is lost.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

/// Queued bytes above which producers are asked to pause (a slow disk must not grow the shim's
/// memory), and below which they are resumed.
pub const HIGH_WATER: usize = 1 << 20;
pub const LOW_WATER: usize = 256 << 10;

/// The thread only runs writes and the error handler: a small stack is plenty.
const STACK_SIZE: usize = 256 << 10;

type ErrorHandler = Arc<dyn Fn(&str, &io::Error) + Send + Sync>;

enum Op {
    Append(Vec<u8>),
    Open { fresh: bool, done: oneshot::Sender<io::Result<()>> },
    Close,
}

enum Msg {
    Item(String, Op),
    Stop,
}

/// What the thread and the producers share.
struct Shared {
    queued: AtomicUsize,
    high: usize,
    low: usize,
    /// Woken when `queued` falls to `low`, and when the thread ends.
    drained: Notify,
    running: AtomicBool,
    on_error: Mutex<Option<ErrorHandler>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    /// Disconnected once the thread has ended (its sender is dropped then).
    ended: Mutex<mpsc::Receiver<()>>,
    stopping: AtomicBool,
}

#[derive(Clone)]
pub struct FileWriter {
    inner: Arc<Inner>,
}

impl Default for FileWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FileWriter {
    /// Starts the writer thread.
    pub fn new() -> Self {
        Self::with_limits(HIGH_WATER, LOW_WATER)
    }

    /// A writer whose back-pressure marks are `high` and `low` queued bytes (tests use small ones).
    pub fn with_limits(high: usize, low: usize) -> Self {
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            high,
            low,
            drained: Notify::new(),
            running: AtomicBool::new(true),
            on_error: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let (ended_tx, ended_rx) = mpsc::channel::<()>();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("file-writer".into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                run(rx, &thread_shared);
                thread_shared.running.store(false, Ordering::SeqCst);
                thread_shared.drained.notify_waiters();
                drop(ended_tx);
            })
            .expect("cannot start the file writer thread");
        FileWriter {
            inner: Arc::new(Inner { tx, shared, ended: Mutex::new(ended_rx), stopping: AtomicBool::new(false) }),
        }
    }

    /// Queues data for the end of the file at path (opened on first use, O_APPEND|O_CREAT, 0640).
    /// false: the queue is above its high-water mark; the producer should pause until `drained`.
    pub fn append(&self, path: &str, data: Vec<u8>) -> bool {
        if data.is_empty() {
            return true;
        }
        if self.inner.stopping.load(Ordering::SeqCst) {
            return true; // the shim is going away: nothing would write it, so do not keep it
        }
        let shared = &self.inner.shared;
        let len = data.len();
        let queued = shared.queued.fetch_add(len, Ordering::SeqCst) + len;
        if self.inner.tx.send(Msg::Item(path.to_string(), Op::Append(data))).is_err() {
            shared.queued.fetch_sub(len, Ordering::SeqCst);
            return true;
        }
        queued <= shared.high
    }

    /// Bytes queued and not yet written.
    #[allow(dead_code)] // API (and tests)
    pub fn queued(&self) -> usize {
        self.inner.shared.queued.load(Ordering::SeqCst)
    }

    /// Resolves once the queue is below its low-water mark.
    pub async fn drained(&self) {
        let shared = &self.inner.shared;
        loop {
            let notified = shared.drained.notified();
            tokio::pin!(notified);
            // Registered before the check: a wake-up between the check and the await is not lost.
            notified.as_mut().enable();
            if shared.queued.load(Ordering::SeqCst) <= shared.low || !shared.running.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Opens (creates) path now, after what is queued; `fresh` closes an open descriptor first (rotation).
    pub async fn open(&self, path: &str, fresh: bool) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.inner.tx.send(Msg::Item(path.to_string(), Op::Open { fresh, done })).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Closes path's descriptor after what is queued for it.
    pub fn close(&self, path: &str) {
        let _ = self.inner.tx.send(Msg::Item(path.to_string(), Op::Close));
    }

    /// Called (on the writer thread) with the path and error of a failed write: the first failure of
    /// a run of failures for a path, never for shim.log (the report itself goes there).
    #[allow(clippy::type_complexity)] // the signature other modules call
    pub fn set_error_handler(&self, f: Box<dyn Fn(&str, &io::Error) + Send + Sync>) {
        *lock(&self.inner.shared.on_error) = Some(Arc::from(f));
    }

    /// Writes what is queued (at most `timeout`), then ends the thread.
    pub fn stop(&self, timeout: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.tx.send(Msg::Stop);
        let _ = lock(&self.inner.ended).recv_timeout(timeout);
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the file writer has stopped")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_append(path: &str) -> io::Result<File> {
    // std adds O_CLOEXEC.
    OpenOptions::new().append(true).create(true).mode(0o640).open(path)
}

/// The thread: runs until Stop, or until every FileWriter is gone; open files are closed at the end.
fn run(rx: mpsc::Receiver<Msg>, shared: &Shared) {
    let mut files: HashMap<String, File> = HashMap::new();
    // Paths whose last write failed: only the first failure of a run is reported.
    let mut failed: HashSet<String> = HashSet::new();
    while let Ok(msg) = rx.recv() {
        let (path, op) = match msg {
            Msg::Stop => break,
            Msg::Item(path, op) => (path, op),
        };
        match op {
            Op::Close => {
                files.remove(&path);
            }
            Op::Open { fresh, done } => {
                if fresh {
                    files.remove(&path);
                }
                let result = if files.contains_key(&path) {
                    Ok(())
                } else {
                    open_append(&path).map(|f| {
                        files.insert(path.clone(), f);
                    })
                };
                if result.is_ok() {
                    failed.remove(&path);
                }
                let _ = done.send(result);
            }
            Op::Append(data) => {
                let result = match files.get_mut(&path) {
                    Some(f) => f.write_all(&data),
                    None => open_append(&path).and_then(|mut f| {
                        let r = f.write_all(&data);
                        files.insert(path.clone(), f);
                        r
                    }),
                };
                match result {
                    Ok(()) => {
                        if !failed.is_empty() {
                            failed.remove(&path);
                        }
                    }
                    Err(e) => {
                        // A full disk or a vanished directory must not take the shim down: the data
                        // is dropped and the file reopened by the next write.
                        files.remove(&path);
                        if !failed.contains(&path) && !path.ends_with("shim.log") {
                            let handler = lock(&shared.on_error).clone();
                            if let Some(h) = handler {
                                h(&path, &e);
                            }
                        }
                        failed.insert(path);
                    }
                }
                let len = data.len();
                drop(data);
                let before = shared.queued.fetch_sub(len, Ordering::SeqCst);
                if before > shared.low && before - len <= shared.low {
                    shared.drained.notify_waiters();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn tmpdir(name: &str) -> String {
        let dir = format!("/tmp/shim-writer-test-{}-{name}", std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writer_appends_in_order_and_creates_on_open() {
        let dir = tmpdir("order");
        let w = FileWriter::new();
        let a = format!("{dir}/a.log");
        w.open(&a, false).await.unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o137, 0, "at most 0640");
        for i in 0..100 {
            assert!(w.append(&a, format!("{i}\n").into_bytes()));
        }
        w.close(&a);
        w.append(&a, b"after close\n".to_vec());
        w.stop(Duration::from_secs(5));
        let text = String::from_utf8(std::fs::read(&a).unwrap()).unwrap();
        let want: String = (0..100).map(|i| format!("{i}\n")).collect::<String>() + "after close\n";
        assert_eq!(text, want);
        // After stop nothing is queued any more.
        assert!(w.append(&a, b"x".to_vec()));
        assert!(w.open(&a, false).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writer_reopen_after_rename_keeps_queue_order() {
        let dir = tmpdir("rename");
        let w = FileWriter::new();
        let log = format!("{dir}/c.log");
        w.append(&log, b"one\n".to_vec());
        w.open(&log, false).await.unwrap();
        std::fs::rename(&log, format!("{dir}/c.log.1")).unwrap();
        w.append(&log, b"before-reopen\n".to_vec());
        w.open(&log, true).await.unwrap();
        assert!(std::path::Path::new(&log).exists());
        w.append(&log, b"two\n".to_vec());
        w.stop(Duration::from_secs(5));
        assert_eq!(std::fs::read(format!("{dir}/c.log.1")).unwrap(), b"one\nbefore-reopen\n");
        assert_eq!(std::fs::read(&log).unwrap(), b"two\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writer_backpressure_pauses_and_resumes() {
        let dir = tmpdir("pressure");
        let w = FileWriter::with_limits(1024, 256);
        // Opening a FIFO for writing blocks until it has a reader: the thread is stuck until we open one.
        let fifo = format!("{dir}/block.fifo");
        let c = CString::new(fifo.clone()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(w.append(&fifo, b"unblock\n".to_vec()));
        let log = format!("{dir}/c.log");
        let mut accepted = 0;
        while w.append(&log, vec![b'x'; 100]) {
            accepted += 1;
            assert!(accepted < 100, "append never reported back-pressure");
        }
        assert!(w.queued() > 1024);
        // Not drained while the thread is blocked.
        assert!(tokio::time::timeout(Duration::from_millis(100), w.drained()).await.is_err());
        let reader = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert!(reader >= 0);
        let reader = unsafe { OwnedFd::from_raw_fd(reader) };
        tokio::time::timeout(Duration::from_secs(5), w.drained()).await.expect("drained never resolved");
        assert!(w.queued() <= 256);
        w.stop(Duration::from_secs(5));
        assert_eq!(std::fs::read(&log).unwrap().len(), (accepted + 1) * 100);
        let mut buf = [0u8; 64];
        let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&reader), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(&buf[..n as usize], b"unblock\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writer_errors_go_to_the_handler_once_and_the_thread_goes_on() {
        let dir = tmpdir("errors");
        let w = FileWriter::new();
        let seen = Arc::new(Mutex::new(Vec::<(String, i32)>::new()));
        let s = seen.clone();
        w.set_error_handler(Box::new(move |p, e| {
            s.lock().unwrap().push((p.to_string(), e.raw_os_error().unwrap_or(0)))
        }));
        let bad = format!("{dir}/missing/c.log");
        w.append(&bad, b"lost\n".to_vec());
        w.append(&bad, b"lost too\n".to_vec());
        w.append(&format!("{dir}/missing/shim.log"), b"never reported\n".to_vec());
        assert!(w.open(&bad, false).await.is_err());
        let good = format!("{dir}/ok.log");
        w.append(&good, b"fine\n".to_vec());
        w.stop(Duration::from_secs(5));
        assert_eq!(*seen.lock().unwrap(), vec![(bad, libc::ENOENT)]);
        assert_eq!(std::fs::read(&good).unwrap(), b"fine\n");
        assert_eq!(w.queued(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
