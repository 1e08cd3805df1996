//! Every child of the shim is spawned and reaped here.
//!
//! The shim is a child subreaper, so container inits and detached exec processes are reparented to it
//! when runc exits. One task answers SIGCHLD with waitpid(-1) and hands each status to whoever watches
//! that pid; statuses nobody asked for yet (an init that died before its pid file was read) are kept for
//! a while. Nothing else in the shim waits for children (tokio::process is not used: its own reaping
//! would race with waitpid(-1)).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::fd;

const UNCLAIMED_MAX: usize = 1024;
const OUTPUT_LIMIT: usize = 1 << 20;

/// An exit as containerd reports it: the code, or 128+N for a death by signal N; and when, in ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at_ns: u64,
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn exit_status(wait_status: libc::c_int) -> u32 {
    if libc::WIFEXITED(wait_status) {
        libc::WEXITSTATUS(wait_status) as u32
    } else if libc::WIFSIGNALED(wait_status) {
        128 + libc::WTERMSIG(wait_status) as u32
    } else {
        wait_status as u32
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

/// Shared by everything that starts processes; cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper(Arc<Mutex<Inner>>);

pub fn set_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts answering SIGCHLD; call once, inside the runtime.
    pub fn start(&self) -> io::Result<tokio::task::JoinHandle<()>> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let me = self.clone();
        me.reap();
        Ok(tokio::spawn(async move {
            while sig.recv().await.is_some() {
                me.reap();
            }
        }))
    }

    /// Collects every exited child now.
    pub fn reap(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: plain waitpid on any child, no hang.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let exit = Exit { status: exit_status(status), at_ns: now_ns() };
            let mut inner = self.0.lock().unwrap();
            match inner.waiters.remove(&pid) {
                Some(txs) => {
                    for tx in txs {
                        let _ = tx.send(exit);
                    }
                }
                None => {
                    inner.unclaimed.insert(pid, exit);
                    inner.order.push_back(pid);
                    while inner.order.len() > UNCLAIMED_MAX {
                        if let Some(old) = inner.order.pop_front() {
                            inner.unclaimed.remove(&old);
                        }
                    }
                }
            }
        }
    }

    /// Whether pid is a watched child not reaped yet: until it is, no other process can take its pid.
    pub fn holds(&self, pid: i32) -> bool {
        self.0.lock().unwrap().waiters.get(&pid).map(|txs| txs.iter().any(|tx| !tx.is_closed())).unwrap_or(false)
    }

    /// The pid's exit; call right after the pid is known (an exit reaped before is kept for it). Every
    /// watcher of a pid gets its exit.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.0.lock().unwrap();
        if let Some(exit) = inner.unclaimed.remove(&pid) {
            inner.order.retain(|p| *p != pid);
            let _ = tx.send(exit);
        } else {
            inner.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    /// Spawns argv (PATH lookup for a bare name) with the given stdio; the exit is watched at once.
    pub fn spawn(
        &self,
        argv: &[String],
        stdio: [RawFd; 3],
        setsid: bool,
    ) -> io::Result<(i32, oneshot::Receiver<Exit>)> {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        if argv.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
        }
        let dup = |fd: RawFd| -> io::Result<Stdio> {
            // SAFETY: fcntl F_DUPFD_CLOEXEC returns a new descriptor we own.
            let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: n is a fresh descriptor.
            Ok(Stdio::from(unsafe { OwnedFd::from_raw_fd(n) }))
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(dup(stdio[0])?).stdout(dup(stdio[1])?).stderr(dup(stdio[2])?);
        if setsid {
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        // The reaper lock is held across the spawn: the exit cannot be reaped before it is watched.
        let mut inner = self.0.lock().unwrap();
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        drop(child); // never waited on here: the SIGCHLD task reaps it
        let (tx, rx) = oneshot::channel();
        inner.waiters.entry(pid).or_default().push(tx);
        Ok((pid, rx))
    }
}

#[derive(Debug)]
pub enum CmdError {
    /// Ran and failed: exit status and standard error.
    Failed {
        status: u32,
        stderr: String,
        what: String,
    },
    TimedOut(String),
    Io(io::Error),
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmdError::Failed { status, stderr, what } => {
                let err = stderr.trim();
                write!(f, "{what} failed (exit {status}): {}", if err.is_empty() { "no error output" } else { err })
            }
            CmdError::TimedOut(what) => write!(f, "{what}"),
            CmdError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for CmdError {
    fn from(e: io::Error) -> Self {
        CmdError::Io(e)
    }
}

pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn devnull(write: bool) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null")?;
    Ok(f.into())
}

/// Everything the pipe's read end gives until EOF; what is past `limit` is dropped.
async fn read_all(fd: OwnedFd, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(afd) = fd::async_fd(fd, Interest::READABLE) else { return out };
    while let Some(data) = fd::read_chunk(&afd).await {
        out.extend_from_slice(&data[..data.len().min(limit.saturating_sub(out.len()))]);
    }
    out
}

/// All of data to the pipe's write end, then closes it (a reader gone ends it early).
async fn write_all(fd: OwnedFd, mut data: Vec<u8>) {
    if let Ok(afd) = fd::async_fd(fd, Interest::WRITABLE) {
        fd::write_all(&afd, &mut data).await;
    }
}

/// Runs a command (never through a shell) bounded by `timeout`, SIGKILLed when late or when the caller
/// drops the future (its ttrpc deadline passed). With `stdio` the given descriptors are passed instead of
/// capture pipes (runc create/exec hand them to the container) and the output comes back empty.
pub async fn run(
    reaper: &Reaper,
    argv: &[String],
    timeout: Duration,
    stdin_data: Option<Vec<u8>>,
    stdio: Option<[RawFd; 3]>,
) -> Result<Output, CmdError> {
    let what = format!(
        "{} {}",
        std::path::Path::new(&argv[0]).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        argv.get(1).cloned().unwrap_or_default()
    );
    let mut readers = Vec::new();
    let mut feeder = None;
    let (pid, exited) = match stdio {
        Some(fds) => reaper.spawn(argv, fds, false)?,
        None => {
            let (in_r, in_w) = if stdin_data.is_some() {
                let (r, w) = fd::pipe(0)?;
                (r, Some(w))
            } else {
                (devnull(false)?, None)
            };
            // Blocking pipes: runc gets blocking ends, ours are made non-blocking when read.
            let (out_r, out_w) = fd::pipe(0)?;
            let (err_r, err_w) = fd::pipe(0)?;
            let spawned = reaper.spawn(argv, [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()], false)?;
            readers.push(out_r);
            readers.push(err_r);
            if let (Some(w), Some(data)) = (in_w, stdin_data) {
                feeder = Some(write_all(w, data));
            }
            spawned
        }
    };
    let guard = KillOnDrop(pid);
    let work = async {
        let feed = async {
            if let Some(f) = feeder {
                f.await;
            }
        };
        let mut it = readers.into_iter();
        let (out, err) = match (it.next(), it.next()) {
            (Some(o), Some(e)) => {
                let (_, out, err) = tokio::join!(feed, read_all(o, OUTPUT_LIMIT), read_all(e, OUTPUT_LIMIT));
                (out, err)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let exit = exited.await.map_err(|_| CmdError::Io(io::Error::other("exit lost")))?;
        Ok::<_, CmdError>((exit, out, err))
    };
    let result = tokio::time::timeout(timeout, work).await;
    let (exit, out, err) = match result {
        Ok(r) => r?,
        Err(_) => {
            return Err(CmdError::TimedOut(format!("{what} timed out after {}s", timeout.as_secs_f64())));
        }
    };
    guard.defuse();
    if exit.status != 0 {
        return Err(CmdError::Failed { status: exit.status, stderr: String::from_utf8_lossy(&err).into_owned(), what });
    }
    Ok(Output { stdout: out, stderr: err })
}

/// SIGKILLs a command whose caller gave up on it (timeout or cancelled call); the reaper collects it.
struct KillOnDrop(i32);

impl KillOnDrop {
    fn defuse(self) {
        std::mem::forget(self);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: the pid is our unreaped child (its exit has not been consumed), so it cannot be reused.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// Test support: cargo runs tests as threads of one process, and a reaper's waitpid(-1) takes every child
/// of that process, so two tests with reapers would collect each other's children (each then waits for an
/// exit it never sees). Every test that starts a Reaper holds this for as long as the reaper runs.
#[cfg(test)]
pub fn one_reaper_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}
