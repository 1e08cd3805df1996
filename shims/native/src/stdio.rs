//! Process stdio for the shim: opening the URIs the task API passes and copying bytes; port of
//! shims/common/stdio.py.
//!
//! URIs: "" = /dev/null; a plain path = a FIFO (copied through the shim so a vanished reader never
//! hurts the process) or a regular file (handed to the process as is); file:///abs = append raw output
//! (handed to the process directly; a terminal's output is appended by the writer thread);
//! crilog:///abs = CRI log format, written by the writer thread. Copies are tokio tasks on
//! non-blocking descriptors and hold at most one chunk each: when a destination cannot keep up, the
//! source is not read (back-pressure) instead of buffering without bound.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::fd::{async_fd, open_fd, pipe, read_chunk, read_some, set_nonblocking, write_all};
use crate::writer::FileWriter;

/// Longest content of one CRI log record; longer lines are split into P records.
pub const CRI_LINE_MAX: usize = 16 * 1024;
/// An attached client this far behind is disconnected (see AttachFanout).
pub const ATTACH_BACKLOG_MAX: usize = 1 << 20;
pub const ATTACH_STDOUT: u8 = 1;
pub const ATTACH_STDERR: u8 = 2;

/// Copy control levels (see ProcessIo::ctl).
const COPYING: u8 = 0;
const OUTPUT_STOPPED: u8 = 1;
const CLOSED: u8 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
    fn attach_code(self) -> u8 {
        match self {
            Stream::Stdout => ATTACH_STDOUT,
            Stream::Stderr => ATTACH_STDERR,
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Resolves once CloseIO happened (or the ProcessIo was dropped).
async fn stdin_closed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}

/// Resolves once the copy control reaches level (or its sender is gone: the ProcessIo was dropped).
async fn reached(ctl: &mut watch::Receiver<u8>, level: u8) {
    let _ = ctl.wait_for(|l| *l >= level).await;
}

// -- URIs -------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Null,
    Fifo(&'a str),
    File(&'a str),
    Crilog(&'a str),
}

fn is_fifo(path: &str) -> bool {
    std::fs::metadata(path).map(|m| m.file_type().is_fifo()).unwrap_or(false)
}

fn output_target(uri: &str) -> io::Result<Target<'_>> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    if let Some(path) = uri.strip_prefix("crilog://") {
        return Ok(Target::Crilog(path));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Target::File(path));
    }
    if uri.contains("://") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unsupported stdio URI scheme in {uri:?}")));
    }
    Ok(if is_fifo(uri) { Target::Fifo(uri) } else { Target::File(uri) })
}

/// An error that names the stream and URI it came from.
fn named<'a>(what: &str, uri: &'a str) -> impl FnOnce(io::Error) -> io::Error + 'a {
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {uri:?}: {e}"))
}

// -- CRI log format ---------------------------------------------------------------------------------

/// Formats output as `<RFC3339Nano UTC> <stream> <F|P> <content>\n` into one log file; shared by the
/// copies of both streams.
struct CriLogSink {
    writer: FileWriter,
    path: String,
    /// The unterminated last line of each stream (at most CRI_LINE_MAX bytes between feeds).
    partial: [Vec<u8>; 2],
    closed: bool,
}

impl CriLogSink {
    fn new(writer: FileWriter, path: &str) -> Self {
        CriLogSink { writer, path: path.to_string(), partial: [Vec::new(), Vec::new()], closed: false }
    }

    fn record(out: &mut Vec<u8>, ts: &str, stream: Stream, tag: u8, content: &[u8]) {
        out.extend_from_slice(ts.as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.name().as_bytes());
        out.extend_from_slice(&[b' ', tag, b' ']);
        out.extend_from_slice(content);
        out.push(b'\n');
    }

    /// A complete line: P records of CRI_LINE_MAX bytes, then the F record of the rest.
    fn emit(out: &mut Vec<u8>, ts: &str, stream: Stream, mut line: &[u8]) {
        while line.len() > CRI_LINE_MAX {
            Self::record(out, ts, stream, b'P', &line[..CRI_LINE_MAX]);
            line = &line[CRI_LINE_MAX..];
        }
        Self::record(out, ts, stream, b'F', line);
    }

    /// false: the writer is backed up (the caller pauses its source until it has drained).
    fn feed(&mut self, stream: Stream, data: &[u8]) -> bool {
        if self.closed {
            return true;
        }
        let ts = crate::log::timestamp(crate::reaper::now_ns(), 9);
        let partial = &mut self.partial[stream.index()];
        let mut out = Vec::with_capacity(partial.len() + data.len() + 64);
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if partial.is_empty() {
                Self::emit(&mut out, &ts, stream, &rest[..nl]);
            } else {
                partial.extend_from_slice(&rest[..nl]);
                Self::emit(&mut out, &ts, stream, partial);
                partial.clear();
            }
            rest = &rest[nl + 1..];
        }
        partial.extend_from_slice(rest);
        if partial.len() > CRI_LINE_MAX {
            let mut start = 0;
            while partial.len() - start > CRI_LINE_MAX {
                Self::record(&mut out, &ts, stream, b'P', &partial[start..start + CRI_LINE_MAX]);
                start += CRI_LINE_MAX;
            }
            partial.drain(..start);
        }
        // Keep no buffer between lines; a held partial line needs at most CRI_LINE_MAX.
        if partial.is_empty() {
            *partial = Vec::new();
        } else if partial.capacity() > 2 * CRI_LINE_MAX {
            partial.shrink_to(CRI_LINE_MAX);
        }
        out.is_empty() || self.writer.append(&self.path, out)
    }

    /// At EOF an unterminated last line is complete: written as F.
    fn flush(&mut self, stream: Stream) {
        if self.closed {
            return;
        }
        let partial = std::mem::take(&mut self.partial[stream.index()]);
        if !partial.is_empty() {
            let mut out = Vec::with_capacity(partial.len() + 48);
            Self::emit(&mut out, &crate::log::timestamp(crate::reaper::now_ns(), 9), stream, &partial);
            self.writer.append(&self.path, out);
        }
    }

    /// Flushes both streams; nothing is written after this (the file is being closed).
    fn close(&mut self) {
        self.flush(Stream::Stdout);
        self.flush(Stream::Stderr);
        self.closed = true;
    }
}

// -- attach -----------------------------------------------------------------------------------------

/// A container's attach socket: frames of one stream byte, a 4-byte big-endian length, the bytes.
///
/// A process's output, as it comes, goes to every connected client (shimd's Attach), independent of
/// any log file. Output nobody is connected for is dropped; a client that falls ATTACH_BACKLOG_MAX
/// behind is disconnected rather than slowing the process down or growing the shim.
pub struct AttachFanout {
    shared: Arc<Fanout>,
}

struct Fanout {
    path: String,
    st: Mutex<FanoutState>,
}

struct FanoutState {
    listening: bool,
    accept: Option<JoinHandle<()>>,
    closing: bool,
    clients: Vec<Client>,
    next_id: u64,
}

struct Client {
    id: u64,
    sock: Arc<UnixStream>,
    /// What the socket did not take yet (empty: frames are written directly).
    backlog: Vec<u8>,
    /// Wakes the client's task: backlog to flush, or dropped.
    wake: Arc<Notify>,
}

impl AttachFanout {
    /// Binds and listens at path (must be called inside the runtime).
    pub fn new(path: &str) -> io::Result<Self> {
        // A socket left by an earlier task of the same id.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let std_listener = std::os::unix::net::UnixListener::bind(path)?;
        // Container output: for root (shimd) only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        std_listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std_listener)?;
        let shared = Arc::new(Fanout {
            path: path.to_string(),
            st: Mutex::new(FanoutState {
                listening: true,
                accept: None,
                closing: false,
                clients: Vec::new(),
                next_id: 0,
            }),
        });
        let handle = tokio::spawn(accept_loop(listener, Arc::downgrade(&shared)));
        lock(&shared.st).accept = Some(handle);
        Ok(AttachFanout { shared })
    }

    /// Sends one frame of output to every client (stream: ATTACH_STDOUT or ATTACH_STDERR); never waits.
    #[allow(dead_code)] // API: the copies send through the shared state directly
    pub fn send(&self, stream: u8, data: &[u8]) {
        self.shared.send(stream, data);
    }

    /// The output reached EOF: clients are disconnected once they have what was sent; no new ones.
    pub fn finish(&self) {
        let mut st = lock(&self.shared.st);
        st.closing = true;
        self.shared.stop_listening(&mut st, true);
        st.clients.retain(|c| {
            let keep = !c.backlog.is_empty();
            if !keep {
                c.wake.notify_one();
            }
            keep
        });
    }

    /// Stops listening (the socket file is removed) and disconnects every client.
    pub fn close(&self) {
        let mut st = lock(&self.shared.st);
        self.shared.stop_listening(&mut st, true);
        Fanout::drop_all(&mut st);
    }

    /// Connected clients.
    #[allow(dead_code)] // API (and tests)
    pub fn clients(&self) -> usize {
        lock(&self.shared.st).clients.len()
    }
}

impl Drop for AttachFanout {
    /// Never closed: stop serving, but leave the path alone (a newer task may own it by now).
    fn drop(&mut self) {
        let mut st = lock(&self.shared.st);
        self.shared.stop_listening(&mut st, false);
        Fanout::drop_all(&mut st);
    }
}

impl Fanout {
    fn stop_listening(&self, st: &mut FanoutState, unlink: bool) {
        if !st.listening {
            return;
        }
        st.listening = false;
        if let Some(h) = st.accept.take() {
            h.abort();
        }
        if unlink {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn drop_all(st: &mut FanoutState) {
        for c in st.clients.drain(..) {
            c.wake.notify_one();
        }
    }

    fn remove(st: &mut FanoutState, id: u64) {
        if let Some(i) = st.clients.iter().position(|c| c.id == id) {
            st.clients.swap_remove(i).wake.notify_one();
        }
    }

    fn add(self: &Arc<Self>, sock: UnixStream) {
        let mut st = lock(&self.st);
        if !st.listening {
            return;
        }
        st.next_id += 1;
        let id = st.next_id;
        let sock = Arc::new(sock);
        let wake = Arc::new(Notify::new());
        st.clients.push(Client { id, sock: sock.clone(), backlog: Vec::new(), wake: wake.clone() });
        tokio::spawn(client_loop(id, sock, wake, Arc::downgrade(self)));
    }

    fn send(&self, stream: u8, data: &[u8]) {
        let mut st = lock(&self.st);
        if st.clients.is_empty() || data.is_empty() {
            return;
        }
        let header = {
            let mut h = [stream, 0, 0, 0, 0];
            h[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
            h
        };
        let mut gone = Vec::new();
        for c in st.clients.iter_mut() {
            if !c.backlog.is_empty() {
                c.backlog.extend_from_slice(&header);
                c.backlog.extend_from_slice(data);
                if c.backlog.len() > ATTACH_BACKLOG_MAX {
                    gone.push(c.id);
                }
                continue;
            }
            let n = match c.sock.try_write_vectored(&[IoSlice::new(&header), IoSlice::new(data)]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    gone.push(c.id);
                    continue;
                }
            };
            if n < header.len() + data.len() {
                if n < header.len() {
                    c.backlog.extend_from_slice(&header[n..]);
                    c.backlog.extend_from_slice(data);
                } else {
                    c.backlog.extend_from_slice(&data[n - header.len()..]);
                }
                c.wake.notify_one();
            }
        }
        for id in gone {
            Self::remove(&mut st, id);
        }
    }

    /// The client's socket is writable: write its backlog; false: the client is gone.
    fn flush(&self, id: u64) -> bool {
        let mut st = lock(&self.st);
        let closing = st.closing;
        let Some(c) = st.clients.iter_mut().find(|c| c.id == id) else { return false };
        match c.sock.try_write(&c.backlog) {
            Ok(n) => {
                c.backlog.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => {
                Self::remove(&mut st, id);
                return false;
            }
        }
        if c.backlog.is_empty() {
            c.backlog = Vec::new(); // up to ATTACH_BACKLOG_MAX: give it back
            if closing {
                Self::remove(&mut st, id);
                return false;
            }
        }
        true
    }

    /// Some(whether it has a backlog), None once the client was dropped.
    fn backlogged(&self, id: u64) -> Option<bool> {
        lock(&self.st).clients.iter().find(|c| c.id == id).map(|c| !c.backlog.is_empty())
    }
}

async fn accept_loop(listener: UnixListener, fanout: Weak<Fanout>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => match fanout.upgrade() {
                Some(f) => f.add(sock),
                None => return,
            },
            // EMFILE and the like: try again later rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Serves one client: flushes its backlog when the socket takes more, and notices it hanging up
/// (clients send nothing, so readable means gone).
async fn client_loop(id: u64, sock: Arc<UnixStream>, wake: Arc<Notify>, fanout: Weak<Fanout>) {
    let mut buf = [0u8; 64];
    loop {
        let Some(backlogged) = fanout.upgrade().and_then(|f| f.backlogged(id)) else { return };
        tokio::select! {
            r = sock.readable() => {
                let gone = match r {
                    Err(_) => true,
                    Ok(()) => match sock.try_read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                    },
                };
                if gone {
                    if let Some(f) = fanout.upgrade() {
                        Fanout::remove(&mut lock(&f.st), id);
                    }
                    return;
                }
            }
            _ = sock.writable(), if backlogged => {
                match fanout.upgrade() {
                    Some(f) if f.flush(id) => {}
                    _ => return,
                }
            }
            _ = wake.notified() => {}
        }
    }
}

// -- copies -----------------------------------------------------------------------------------------

enum OutSink {
    /// Output nobody logs: still read so the process never blocks (and attach sees it).
    Null,
    Cri(Arc<Mutex<CriLogSink>>),
    /// A terminal's output to a file: the writer thread appends it.
    File(String),
    Fifo(AsyncFd<OwnedFd>),
}

/// A destination decided by prepare, before the copy exists.
enum SinkPlan {
    Null,
    Cri(String),
    File(String),
    /// A FIFO, opened read-write: the open never blocks and a missing reader never means EPIPE.
    Fifo(OwnedFd),
}

struct OutPlan {
    /// The pipe's read end; None: the console (terminal), known once the process exists.
    src: Option<OwnedFd>,
    stream: Stream,
    sink: SinkPlan,
}

struct CopyOut {
    src: AsyncFd<OwnedFd>,
    stream: Stream,
    sink: OutSink,
    writer: FileWriter,
    attach: Option<Arc<Fanout>>,
    ctl: watch::Receiver<u8>,
    done: oneshot::Sender<()>,
}

impl CopyOut {
    /// Copies until EOF, or until the output is stopped; `done` is sent once reading has ended (and a
    /// partial CRI line is flushed). A FIFO still gets the chunk in hand unless the io is closed.
    async fn run(self) {
        let CopyOut { src, stream, sink, writer, attach, mut ctl, done } = self;
        let mut pending = Vec::new();
        {
            let reading = async {
                while let Some(data) = read_chunk(&src).await {
                    if let Some(a) = &attach {
                        a.send(stream.attach_code(), &data);
                    }
                    match &sink {
                        OutSink::Null => {}
                        OutSink::Cri(cri) => {
                            let ok = lock(cri).feed(stream, &data);
                            if !ok {
                                writer.drained().await;
                            }
                        }
                        OutSink::File(path) => {
                            if !writer.append(path, data) {
                                writer.drained().await;
                            }
                        }
                        OutSink::Fifo(fd) => {
                            pending = data;
                            write_all(fd, &mut pending).await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = reading => {}
                _ = reached(&mut ctl, OUTPUT_STOPPED) => {}
            }
        }
        drop(src);
        if let OutSink::Cri(cri) = &sink {
            lock(cri).flush(stream);
        }
        let _ = done.send(());
        if let OutSink::Fifo(fd) = &sink {
            if !pending.is_empty() {
                tokio::select! {
                    _ = write_all(fd, &mut pending) => {}
                    _ = reached(&mut ctl, CLOSED) => {}
                }
            }
        }
    }
}

/// Copies a stdin FIFO to the process (a pipe, or the pty master) until EOF or CloseIO; at CloseIO
/// what is in the FIFO then still goes to the process, then the destination is closed (EOF).
async fn copy_in(
    src: AsyncFd<OwnedFd>,
    dst: AsyncFd<OwnedFd>,
    mut ctl: watch::Receiver<u8>,
    mut closing: watch::Receiver<bool>,
) {
    let mut pending = Vec::new();
    let run = async {
        loop {
            tokio::select! {
                biased;
                _ = stdin_closed(&mut closing) => break,
                data = read_chunk(&src) => match data {
                    None => return,
                    Some(d) => {
                        pending = d;
                        write_all(&dst, &mut pending).await;
                    }
                },
            }
        }
        // Our keeper writer is gone, but a client may still hold the FIFO open: read what is there now.
        loop {
            match read_some(src.get_ref().as_raw_fd()) {
                Ok(d) if !d.is_empty() => {
                    pending = d;
                    write_all(&dst, &mut pending).await;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    };
    tokio::select! {
        _ = run => {}
        _ = reached(&mut ctl, CLOSED) => {}
    }
}

// -- ProcessIo --------------------------------------------------------------------------------------

/// The stdio of one process: descriptors to hand to runc, and the copies the shim runs. Cheap to clone.
#[derive(Clone)]
pub struct ProcessIo {
    inner: Arc<Inner>,
}

struct Inner {
    writer: FileWriter,
    uris: (String, String, String),
    terminal: bool,
    /// Gets the output too (a container's init).
    attach: Option<AttachFanout>,
    /// COPYING, OUTPUT_STOPPED (drain: output copies stop reading) or CLOSED (everything stops).
    ctl: watch::Sender<u8>,
    /// CloseIO happened.
    stdin_closed: watch::Sender<bool>,
    st: Mutex<State>,
}

struct State {
    /// Given to runc, closed in the shim once runc has them.
    child_fds: Vec<OwnedFd>,
    stdio: [RawFd; 3],
    outputs: Vec<OutPlan>,
    stdin_fifo: Option<OwnedFd>,
    /// Our own writer of the stdin FIFO: it never reads EOF while no client is attached (or shimd
    /// is down); CloseIO drops it.
    stdin_keeper: Option<OwnedFd>,
    /// The shim's end of the process's stdin pipe (not a terminal).
    stdin_w: Option<OwnedFd>,
    console: Option<OwnedFd>,
    cri: Option<Arc<Mutex<CriLogSink>>>,
    /// Sent by each output copy once it has stopped reading.
    copies_done: Vec<oneshot::Receiver<()>>,
}

impl ProcessIo {
    pub fn new(
        writer: FileWriter,
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
        attach: Option<AttachFanout>,
    ) -> Self {
        ProcessIo {
            inner: Arc::new(Inner {
                writer,
                uris: (stdin.to_string(), stdout.to_string(), stderr.to_string()),
                terminal,
                attach,
                ctl: watch::channel(COPYING).0,
                stdin_closed: watch::channel(false).0,
                st: Mutex::new(State {
                    child_fds: Vec::new(),
                    stdio: [-1; 3],
                    outputs: Vec::new(),
                    stdin_fifo: None,
                    stdin_keeper: None,
                    stdin_w: None,
                    console: None,
                    cri: None,
                    copies_done: Vec::new(),
                }),
            }),
        }
    }

    /// Opens every descriptor (errors name the URI); on error everything opened so far is closed.
    pub fn prepare(&self) -> io::Result<()> {
        let result = {
            let mut st = lock(&self.inner.st);
            self.open_all(&mut st)
        };
        if result.is_err() {
            self.close();
        }
        result
    }

    fn open_all(&self, st: &mut State) -> io::Result<()> {
        let (stdin, stdout, stderr) = &self.inner.uris;
        let terminal = self.inner.terminal;
        let mut fds = [-1; 3];
        fds[0] = keep(st, open_fd("/dev/null", libc::O_RDONLY, 0).map_err(named("stdin", "/dev/null"))?);
        if !stdin.is_empty() {
            let err = named("stdin", stdin);
            match output_target(stdin).map_err(named("stdin", stdin))? {
                Target::Fifo(path) => {
                    // O_NONBLOCK: the open never waits for a writer; nothing is readable until one writes.
                    st.stdin_fifo = Some(open_fd(path, libc::O_RDONLY | libc::O_NONBLOCK, 0).map_err(err)?);
                    st.stdin_keeper =
                        Some(open_fd(path, libc::O_WRONLY | libc::O_NONBLOCK, 0).map_err(named("stdin", stdin))?);
                    if !terminal {
                        let (r, w) = pipe(0)?;
                        fds[0] = keep(st, r);
                        st.stdin_w = Some(w);
                    }
                }
                Target::File(path) => fds[0] = keep(st, open_fd(path, libc::O_RDONLY, 0).map_err(err)?),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("stdin {stdin:?}: only a FIFO or a file can be stdin"),
                    ));
                }
            }
        }
        if terminal {
            // runc hands the pty to the container; stdout/stderr of runc itself go nowhere.
            let null_out = keep(st, open_fd("/dev/null", libc::O_WRONLY, 0).map_err(named("stdout", "/dev/null"))?);
            st.stdio = [fds[0], null_out, null_out];
            let target = output_target(stdout).map_err(named("stdout", stdout))?;
            let sink = sink_plan(target).map_err(named("stdout", stdout))?;
            st.outputs.push(OutPlan { src: None, stream: Stream::Stdout, sink });
            return Ok(());
        }
        let mut files: Vec<(&str, RawFd)> = Vec::new();
        for (i, uri, stream) in [(1, stdout, Stream::Stdout), (2, stderr, Stream::Stderr)] {
            let err = named(stream.name(), uri);
            match output_target(uri).map_err(named(stream.name(), uri))? {
                Target::Null if self.inner.attach.is_none() => {
                    fds[i] = keep(st, open_fd("/dev/null", libc::O_WRONLY, 0).map_err(err)?);
                }
                Target::File(path) => {
                    fds[i] = match files.iter().find(|(p, _)| *p == path) {
                        Some((_, fd)) => *fd,
                        None => {
                            let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT;
                            let fd = keep(st, open_fd(path, flags, 0o640).map_err(err)?);
                            files.push((path, fd));
                            fd
                        }
                    };
                }
                target => {
                    let sink = sink_plan(target).map_err(err)?;
                    let (r, w) = pipe(0)?;
                    fds[i] = keep(st, w);
                    st.outputs.push(OutPlan { src: Some(r), stream, sink });
                }
            }
        }
        st.stdio = fds;
        Ok(())
    }

    /// stdin, stdout, stderr for runc once prepared.
    pub fn stdio(&self) -> [RawFd; 3] {
        lock(&self.inner.st).stdio
    }

    /// The CRI log files this process writes (one at most, whatever the streams).
    fn log_paths(&self) -> Vec<String> {
        let (_, stdout, stderr) = &self.inner.uris;
        let uris: &[&String] = if self.inner.terminal { &[stdout] } else { &[stdout, stderr] };
        let mut paths: Vec<String> = uris
            .iter()
            .filter_map(|u| match output_target(u) {
                Ok(Target::Crilog(p)) => Some(p.to_string()),
                _ => None,
            })
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }

    /// Creates the CRI log file before the process runs: readers open it as soon as the start
    /// returns, even when nothing has been written yet.
    pub async fn open_logs(&self, timeout: Duration) -> io::Result<()> {
        for path in self.log_paths() {
            match tokio::time::timeout(timeout, self.inner.writer.open(&path, false)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(io::Error::new(e.kind(), format!("log file {path}: {e}"))),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("log file {path} was not created within {}s", timeout.as_secs_f64()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Closes the child's ends (runc has passed them on) and starts copying; console: the pty master.
    pub fn start_copies(&self, console: Option<OwnedFd>) {
        let inner = &self.inner;
        let mut st = lock(&inner.st);
        st.child_fds.clear();
        let mut outputs = std::mem::take(&mut st.outputs);
        if inner.terminal {
            match console {
                Some(c) => {
                    let _ = set_nonblocking(c.as_raw_fd());
                    // The console is the single output source: a dup of it, so the copy owns its fd.
                    for o in outputs.iter_mut() {
                        o.src = c.try_clone().ok();
                    }
                    st.console = Some(c);
                }
                None => outputs.clear(),
            }
        }
        for o in outputs {
            let Some(src) = o.src.and_then(|fd| async_fd(fd, Interest::READABLE).ok()) else { continue };
            let sink = match o.sink {
                SinkPlan::Null => OutSink::Null,
                SinkPlan::Cri(path) => {
                    // One sink for the process: the first CRI log named (there is one in practice).
                    let cri = st
                        .cri
                        .get_or_insert_with(|| Arc::new(Mutex::new(CriLogSink::new(inner.writer.clone(), &path))));
                    OutSink::Cri(cri.clone())
                }
                SinkPlan::File(path) => OutSink::File(path),
                SinkPlan::Fifo(fd) => match async_fd(fd, Interest::WRITABLE) {
                    Ok(fd) => OutSink::Fifo(fd),
                    Err(_) => OutSink::Null,
                },
            };
            let (done, done_rx) = oneshot::channel();
            st.copies_done.push(done_rx);
            let copy = CopyOut {
                src,
                stream: o.stream,
                sink,
                writer: inner.writer.clone(),
                attach: inner.attach.as_ref().map(|a| a.shared.clone()),
                ctl: inner.ctl.subscribe(),
                done,
            };
            tokio::spawn(copy.run());
        }
        if let Some(fifo) = st.stdin_fifo.take() {
            let target =
                if inner.terminal { st.console.as_ref().and_then(|c| c.try_clone().ok()) } else { st.stdin_w.take() };
            if let (Some(target), Ok(src)) = (target, async_fd(fifo, Interest::READABLE)) {
                if let Ok(dst) = async_fd(target, Interest::WRITABLE) {
                    tokio::spawn(copy_in(src, dst, inner.ctl.subscribe(), inner.stdin_closed.subscribe()));
                }
            }
        }
    }

    /// Waits for the output copies to reach EOF (at most timeout), then stops them.
    pub async fn drain(&self, timeout: Duration) {
        let copies = std::mem::take(&mut lock(&self.inner.st).copies_done);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = Vec::new();
        for mut done in copies {
            if pending.is_empty() && tokio::time::timeout_at(deadline, &mut done).await.is_ok() {
                continue;
            }
            pending.push(done);
        }
        self.inner.ctl.send_if_modified(|l| raise(l, OUTPUT_STOPPED));
        // The copies still reading stop at their next turn (flushing a partial CRI line first).
        for done in pending {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
        if let Some(a) = &self.inner.attach {
            a.finish();
        }
    }

    /// CloseIO: no more input is coming; input already queued still reaches the process.
    pub fn close_stdin(&self) {
        lock(&self.inner.st).stdin_keeper = None;
        self.inner.stdin_closed.send_replace(true);
    }

    /// Whether the process logs to a CRI log file.
    pub fn has_cri_log(&self) -> bool {
        lock(&self.inner.st).cri.is_some()
    }

    /// After the client renamed the log file: a new one exists at the path when this returns.
    pub async fn reopen_log(&self, timeout: Duration) -> io::Result<()> {
        let Some(path) = lock(&self.inner.st).cri.as_ref().map(|c| lock(c).path.clone()) else { return Ok(()) };
        match tokio::time::timeout(timeout, self.inner.writer.open(&path, true)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("log file {path}: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("log file {path} was not reopened within {}s", timeout.as_secs_f64()),
            )),
        }
    }

    /// The pty master of a process with a terminal.
    pub fn console(&self) -> Option<RawFd> {
        lock(&self.inner.st).console.as_ref().map(|c| c.as_raw_fd())
    }

    pub fn uris(&self) -> (String, String, String) {
        self.inner.uris.clone()
    }

    pub fn close(&self) {
        let inner = &self.inner;
        let cri = {
            let mut st = lock(&inner.st);
            st.stdin_keeper = None;
            st.stdin_fifo = None;
            st.stdin_w = None;
            st.child_fds.clear();
            st.outputs.clear();
            st.console = None;
            st.stdio = [-1; 3];
            st.cri.clone()
        };
        inner.ctl.send_if_modified(|l| raise(l, CLOSED));
        // The copies stop at their next turn; their partial lines go out now, before the file closes.
        if let Some(cri) = cri {
            lock(&cri).close();
        }
        for path in self.log_paths() {
            inner.writer.close(&path);
        }
        if let Some(a) = &inner.attach {
            a.close();
        }
    }
}

fn raise(level: &mut u8, to: u8) -> bool {
    if *level < to {
        *level = to;
        true
    } else {
        false
    }
}

fn keep(st: &mut State, fd: OwnedFd) -> RawFd {
    let raw = fd.as_raw_fd();
    st.child_fds.push(fd);
    raw
}

fn sink_plan(target: Target<'_>) -> io::Result<SinkPlan> {
    Ok(match target {
        Target::Null => SinkPlan::Null,
        Target::Crilog(path) => SinkPlan::Cri(path.to_string()),
        Target::File(path) => SinkPlan::File(path.to_string()),
        Target::Fifo(path) => SinkPlan::Fifo(open_fd(path, libc::O_RDWR | libc::O_NONBLOCK, 0)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::{write_some, CHUNK};
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    use tokio::io::AsyncReadExt;

    fn tmpdir(name: &str) -> String {
        let dir = format!("/tmp/shim-stdio-test-{}-{name}", std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &str) {
        let c = CString::new(path).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn dup(fd: RawFd) -> OwnedFd {
        let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        assert!(d >= 0);
        unsafe { OwnedFd::from_raw_fd(d) }
    }

    fn write(fd: &OwnedFd, data: &[u8]) {
        assert_eq!(write_some(fd.as_raw_fd(), data).unwrap(), data.len());
    }

    /// Writes all of data without blocking the runtime (the copies run on this same thread).
    async fn write_async(fd: &OwnedFd, data: &[u8]) {
        set_nonblocking(fd.as_raw_fd()).unwrap();
        let mut rest = data;
        while !rest.is_empty() {
            match write_some(fd.as_raw_fd(), rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Everything readable now from a non-blocking fd; the bool: EOF was seen.
    fn read_now(fd: &OwnedFd) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        loop {
            match read_some(fd.as_raw_fd()) {
                Ok(d) if d.is_empty() => return (out, true),
                Ok(d) => out.extend_from_slice(&d),
                Err(_) => return (out, false),
            }
        }
    }

    /// Reads a non-blocking fd until EOF (at most 5 s).
    async fn read_to_eof(fd: &OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..500 {
            let (d, eof) = read_now(fd);
            out.extend_from_slice(&d);
            if eof {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no EOF; got {:?}", String::from_utf8_lossy(&out));
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// (stream, tag, content) of each record; checks the timestamp's form.
    fn parse(path: &str) -> Vec<(String, String, Vec<u8>)> {
        let data = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        for raw in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut parts = raw.splitn(4, |&b| b == b' ');
            let ts = std::str::from_utf8(parts.next().unwrap()).unwrap();
            assert_eq!(ts.len(), 30, "{ts}");
            assert!(ts.ends_with('Z') && &ts[4..5] == "-" && &ts[10..11] == "T" && &ts[19..20] == ".", "{ts}");
            assert!(ts[20..29].bytes().all(|b| b.is_ascii_digit()), "{ts}");
            let stream = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
            let tag = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
            assert!(stream == "stdout" || stream == "stderr");
            assert!(tag == "F" || tag == "P");
            out.push((stream, tag, parts.next().unwrap_or(b"").to_vec()));
        }
        out
    }

    fn rec(stream: &str, tag: &str, content: &[u8]) -> (String, String, Vec<u8>) {
        (stream.to_string(), tag.to_string(), content.to_vec())
    }

    #[test]
    fn stdio_uri_targets() {
        assert_eq!(output_target("").unwrap(), Target::Null);
        assert_eq!(output_target("crilog:///a/b.log").unwrap(), Target::Crilog("/a/b.log"));
        assert_eq!(output_target("file:///a/b").unwrap(), Target::File("/a/b"));
        assert_eq!(output_target("/nonexistent/x").unwrap(), Target::File("/nonexistent/x"));
        let e = output_target("binary:///usr/bin/logger").unwrap_err();
        assert!(e.to_string().contains("binary:///usr/bin/logger"), "{e}");
    }

    #[test]
    fn stdio_cri_sink_splits_lines_and_long_lines() {
        let dir = tmpdir("cri");
        let w = FileWriter::new();
        let log = format!("{dir}/c.log");
        let mut sink = CriLogSink::new(w.clone(), &log);
        sink.feed(Stream::Stdout, b"a\nb");
        sink.feed(Stream::Stderr, b"e1\n");
        let mut long = b"c\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', CRI_LINE_MAX * 2 + 5));
        sink.feed(Stream::Stdout, &long);
        // A held partial line is at most CRI_LINE_MAX.
        assert_eq!(sink.partial[0].len(), 5);
        sink.feed(Stream::Stderr, b"no newline");
        sink.flush(Stream::Stdout);
        sink.flush(Stream::Stderr);
        sink.flush(Stream::Stderr); // nothing left: no record
                                    // Exactly CRI_LINE_MAX stays one F record; one more byte is a P and an F.
        let mut exact = vec![b'y'; CRI_LINE_MAX];
        exact.push(b'\n');
        sink.feed(Stream::Stdout, &exact);
        let mut over = vec![b'z'; CRI_LINE_MAX + 1];
        over.push(b'\n');
        sink.feed(Stream::Stdout, &over);
        sink.feed(Stream::Stdout, b"\n"); // an empty line
        w.stop(Duration::from_secs(5));
        let lines = parse(&log);
        assert_eq!(lines[..3], [rec("stdout", "F", b"a"), rec("stderr", "F", b"e1"), rec("stdout", "F", b"bc")]);
        let parts: Vec<(String, String, usize)> =
            lines[3..].iter().map(|(s, t, c)| (s.clone(), t.clone(), c.len())).collect();
        let want = [
            ("stdout", "P", CRI_LINE_MAX),
            ("stdout", "P", CRI_LINE_MAX),
            ("stdout", "F", 5),
            ("stderr", "F", 10),
            ("stdout", "F", CRI_LINE_MAX),
            ("stdout", "P", CRI_LINE_MAX),
            ("stdout", "F", 1),
            ("stdout", "F", 0),
        ];
        let want: Vec<(String, String, usize)> =
            want.iter().map(|(s, t, n)| (s.to_string(), t.to_string(), *n)).collect();
        assert_eq!(parts, want);
        assert_eq!(lines[6].2, b"no newline");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_reopen_after_rename_creates_a_new_file() {
        let dir = tmpdir("reopen");
        let w = FileWriter::new();
        let log = format!("{dir}/c.log");
        let uri = format!("crilog://{log}");
        let io = ProcessIo::new(w.clone(), "", &uri, &uri, false, None);
        io.prepare().unwrap();
        io.open_logs(Duration::from_secs(5)).await.unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"", "the log exists before anything is written");
        let [_, out_w, err_w] = io.stdio();
        let (out_w, err_w) = (dup(out_w), dup(err_w));
        assert!(!io.has_cri_log());
        io.start_copies(None);
        assert!(io.has_cri_log());
        write(&out_w, b"one\n");
        eventually("one", || std::fs::read(&log).map(|d| !d.is_empty()).unwrap_or(false)).await;
        std::fs::rename(&log, format!("{dir}/c.log.1")).unwrap();
        write(&err_w, b"before-reopen\n");
        eventually("before-reopen", || std::fs::read(format!("{dir}/c.log.1")).unwrap().len() > 60).await;
        io.reopen_log(Duration::from_secs(5)).await.unwrap();
        assert!(std::path::Path::new(&log).exists(), "reopen returns once the new file exists");
        write(&out_w, b"two\npartial");
        drop(out_w);
        drop(err_w);
        io.drain(Duration::from_secs(5)).await;
        io.close();
        w.stop(Duration::from_secs(5));
        // Queued before the reopen: the renamed file; after it: the new one. No line lost.
        let old: Vec<Vec<u8>> = parse(&format!("{dir}/c.log.1")).into_iter().map(|r| r.2).collect();
        assert_eq!(old, [b"one".to_vec(), b"before-reopen".to_vec()]);
        assert_eq!(parse(&log), [rec("stdout", "F", b"two"), rec("stdout", "F", b"partial")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_fifo_output_is_copied_and_crilog_backpressure_resumes() {
        let dir = tmpdir("fifo");
        let w = FileWriter::with_limits(1024, 256);
        let fifo = format!("{dir}/out.fifo");
        mkfifo(&fifo);
        let reader = open_fd(&fifo, libc::O_RDONLY | libc::O_NONBLOCK, 0).unwrap();
        let log = format!("{dir}/c.log");
        let io = ProcessIo::new(w.clone(), "", &fifo, &format!("crilog://{log}"), false, None);
        io.prepare().unwrap();
        let [_, out_w, err_w] = io.stdio();
        let (out_w, err_w) = (dup(out_w), dup(err_w));
        io.start_copies(None);
        // The process's output goes through a pipe; the shim's copy keeps it moving.
        for i in 0..200 {
            write_async(&err_w, format!("line {i} {}\n", "y".repeat(100)).as_bytes()).await;
        }
        write(&out_w, b"to the fifo\n");
        drop(out_w);
        drop(err_w);
        io.drain(Duration::from_secs(5)).await;
        w.stop(Duration::from_secs(5));
        let (data, _) = read_now(&reader);
        assert_eq!(data, b"to the fifo\n");
        let lines = parse(&log);
        assert_eq!(lines.len(), 200);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| l.0 == "stderr" && l.2.starts_with(format!("line {i} ").as_bytes())));
        io.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_crilog_copy_pauses_while_the_writer_is_backed_up() {
        let dir = tmpdir("pause");
        let w = FileWriter::with_limits(1024, 256);
        // The writer thread blocks opening a FIFO nobody reads: nothing it is given gets written.
        let block = format!("{dir}/block.fifo");
        mkfifo(&block);
        w.append(&block, b"x".to_vec());
        let log = format!("{dir}/c.log");
        let io = ProcessIo::new(w.clone(), "", &format!("crilog://{log}"), "", false, None);
        io.prepare().unwrap();
        let out_w = dup(io.stdio()[1]);
        set_nonblocking(out_w.as_raw_fd()).unwrap();
        io.start_copies(None);
        let line = [vec![b'l'; 99], vec![b'\n']].concat();
        let total = 4000;
        let mut accepted = 0;
        // The process can write the pipe's capacity plus what the copy and the writer hold, then blocks.
        for _ in 0..200 {
            while accepted < total && write_some(out_w.as_raw_fd(), &line).is_ok() {
                accepted += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(accepted < total, "the copy never paused");
        assert!(accepted * line.len() < 64 * 1024 + CHUNK + 1024 + 2 * CHUNK, "{accepted} lines taken");
        let _reader = open_fd(&block, libc::O_RDONLY | libc::O_NONBLOCK, 0).unwrap();
        for _ in accepted..total {
            write_async(&out_w, &line).await;
        }
        drop(out_w);
        io.drain(Duration::from_secs(5)).await;
        io.close();
        w.stop(Duration::from_secs(5));
        let lines = parse(&log);
        assert_eq!(lines.len(), total);
        assert!(lines.iter().all(|l| l.1 == "F" && l.2.len() == 99));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_plain_files_are_handed_to_the_process() {
        let dir = tmpdir("files");
        let w = FileWriter::new();
        let out = format!("{dir}/out");
        let io = ProcessIo::new(w.clone(), "", &out, &format!("file://{out}"), false, None);
        io.prepare().unwrap();
        let [stdin, stdout, stderr] = io.stdio();
        assert_eq!(stdout, stderr, "one descriptor for one file");
        let st = std::fs::metadata(format!("/proc/self/fd/{stdin}")).unwrap();
        assert!(st.file_type().is_char_device(), "stdin is /dev/null");
        assert_eq!(unsafe { libc::fcntl(stdout, libc::F_GETFD) } & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        write(&dup(stdout), b"direct\n");
        io.start_copies(None);
        assert_eq!(unsafe { libc::fcntl(stdout, libc::F_GETFD) }, -1, "the child's ends are closed");
        assert_eq!(std::fs::read(&out).unwrap(), b"direct\n");
        io.close();
        w.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_bad_uris_fail_prepare_and_name_the_uri() {
        let dir = tmpdir("bad");
        let w = FileWriter::new();
        let io = ProcessIo::new(w.clone(), "", "binary:///x", "", false, None);
        let e = io.prepare().unwrap_err();
        assert!(e.to_string().contains("binary:///x"), "{e}");
        assert_eq!(io.stdio(), [-1; 3]);
        let io = ProcessIo::new(w.clone(), &format!("crilog://{dir}/x"), "", "", false, None);
        let e = io.prepare().unwrap_err();
        assert!(e.to_string().contains("only a FIFO or a file can be stdin"), "{e}");
        let missing = format!("{dir}/no/such/file");
        let io = ProcessIo::new(w.clone(), "", "", &missing, false, None);
        let e = io.prepare().unwrap_err();
        assert!(e.to_string().contains(&missing) && e.to_string().contains("stderr"), "{e}");
        w.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reads frames from an attach client until EOF: (stdout bytes, stderr bytes).
    async fn read_frames(client: &mut UnixStream) -> (Vec<u8>, Vec<u8>) {
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut all)).await.unwrap().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut rest = &all[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            assert!(len > 0);
            match rest[0] {
                ATTACH_STDOUT => out.extend_from_slice(&rest[5..5 + len]),
                ATTACH_STDERR => err.extend_from_slice(&rest[5..5 + len]),
                s => panic!("stream byte {s}"),
            }
            rest = &rest[5 + len..];
        }
        (out, err)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_attach_clients_get_frames_then_eof() {
        let dir = tmpdir("attach");
        let w = FileWriter::new();
        let sock = format!("{dir}/attach.sock");
        std::fs::write(&sock, b"stale").unwrap();
        let fanout = AttachFanout::new(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
        let log = format!("{dir}/c.log");
        // stdout nowhere: still copied, for attach.
        let io = ProcessIo::new(w.clone(), "", "", &format!("crilog://{log}"), false, Some(fanout));
        io.prepare().unwrap();
        let [_, out_w, err_w] = io.stdio();
        let (out_w, err_w) = (dup(out_w), dup(err_w));
        io.start_copies(None);
        let mut c1 = UnixStream::connect(&sock).await.unwrap();
        let c2 = UnixStream::connect(&sock).await.unwrap();
        let attach = io.inner.attach.as_ref().unwrap();
        eventually("two clients", || attach.clients() == 2).await;
        write(&out_w, b"prompt> ");
        write(&err_w, b"oops\n");
        write_async(&out_w, &vec![b'o'; 100_000]).await;
        drop(c2); // hangs up: dropped, the others go on
        eventually("one client", || attach.clients() == 1).await;
        write(&out_w, b"bye\n");
        drop(out_w);
        drop(err_w);
        io.drain(Duration::from_secs(5)).await;
        assert!(!std::path::Path::new(&sock).exists(), "no new clients after the output ended");
        let (out, err) = read_frames(&mut c1).await;
        let mut want = b"prompt> ".to_vec();
        want.extend(vec![b'o'; 100_000]);
        want.extend_from_slice(b"bye\n");
        assert_eq!(out.len(), want.len());
        assert!(out == want);
        assert_eq!(err, b"oops\n");
        io.close();
        w.stop(Duration::from_secs(5));
        assert_eq!(parse(&log), [rec("stderr", "F", b"oops")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_attach_slow_client_is_disconnected() {
        let dir = tmpdir("attach-slow");
        let sock = format!("{dir}/attach.sock");
        let fanout = AttachFanout::new(&sock).unwrap();
        let mut slow = UnixStream::connect(&sock).await.unwrap();
        eventually("client", || fanout.clients() == 1).await;
        let chunk = vec![b'x'; CHUNK];
        let mut sent = 0;
        // Never waits: the client not reading costs at most its backlog, then it is gone.
        while fanout.clients() == 1 {
            fanout.send(ATTACH_STDOUT, &chunk);
            sent += chunk.len();
            assert!(sent < 16 * ATTACH_BACKLOG_MAX, "slow client never dropped");
        }
        assert!(sent > ATTACH_BACKLOG_MAX);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut got)).await.unwrap().unwrap();
        assert!(got.len() < sent, "the client got EOF after part of the output");
        fanout.close();
        assert!(!std::path::Path::new(&sock).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A process's stdin from a FIFO, prepared: (dir, writer, FIFO path, io, the process's end, non-blocking).
    fn stdin_fifo_io(name: &str) -> (String, FileWriter, String, ProcessIo, OwnedFd) {
        let dir = tmpdir(name);
        let w = FileWriter::new();
        let fifo = format!("{dir}/in.fifo");
        mkfifo(&fifo);
        let io = ProcessIo::new(w.clone(), &fifo, "", "", false, None);
        io.prepare().unwrap();
        let proc_in = dup(io.stdio()[0]);
        set_nonblocking(proc_in.as_raw_fd()).unwrap();
        (dir, w, fifo, io, proc_in)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_stdin_stays_open_until_closeio_then_queued_input_then_eof() {
        let (dir, w, fifo, io, proc_in) = stdin_fifo_io("stdin");
        io.start_copies(None);
        // A client writes and goes away (shimd detaching): the process sees no EOF.
        let client = open_fd(&fifo, libc::O_WRONLY | libc::O_NONBLOCK, 0).unwrap();
        write(&client, b"hello\n");
        drop(client);
        let mut got = Vec::new();
        eventually("hello", || {
            let (d, eof) = read_now(&proc_in);
            assert!(!eof, "EOF before CloseIO");
            got.extend(d);
            got == b"hello\n"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read_now(&proc_in), (Vec::new(), false));
        // A client writes and then CloseIO comes while it still holds the FIFO: queued input, then EOF.
        let client = open_fd(&fifo, libc::O_WRONLY | libc::O_NONBLOCK, 0).unwrap();
        let big = vec![b'q'; 60_000];
        write(&client, &big);
        io.close_stdin();
        assert_eq!(read_to_eof(&proc_in).await, big);
        drop(client);
        io.close();
        w.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_closeio_before_start_still_delivers_then_eof() {
        let (dir, w, fifo, io, proc_in) = stdin_fifo_io("stdin-early");
        let client = open_fd(&fifo, libc::O_WRONLY | libc::O_NONBLOCK, 0).unwrap();
        write(&client, b"early");
        io.close_stdin();
        io.start_copies(None);
        assert_eq!(read_to_eof(&proc_in).await, b"early");
        io.close();
        w.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_terminal_console_is_output_and_stdin_target() {
        let dir = tmpdir("tty");
        let w = FileWriter::new();
        let (mut master, mut slave) = (-1, -1);
        let r =
            unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
        assert_eq!(r, 0);
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // Raw mode: no echo, no newline translation.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        unsafe {
            libc::tcgetattr(slave.as_raw_fd(), &mut tio);
            libc::cfmakeraw(&mut tio);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio);
        }
        let fifo = format!("{dir}/in.fifo");
        mkfifo(&fifo);
        let log = format!("{dir}/c.log");
        let io = ProcessIo::new(
            w.clone(),
            &fifo,
            &format!("crilog://{log}"),
            &format!("crilog://{dir}/ignored"),
            true,
            None,
        );
        io.prepare().unwrap();
        let [_, out, err] = io.stdio();
        assert_eq!(out, err);
        let st = std::fs::metadata(format!("/proc/self/fd/{out}")).unwrap();
        assert!(st.file_type().is_char_device(), "runc's own output goes to /dev/null");
        io.open_logs(Duration::from_secs(5)).await.unwrap();
        assert!(!std::path::Path::new(&format!("{dir}/ignored")).exists(), "a terminal has no stderr");
        io.start_copies(Some(master));
        assert!(io.console().is_some());
        write(&slave, b"hello\nwor");
        let client = open_fd(&fifo, libc::O_WRONLY | libc::O_NONBLOCK, 0).unwrap();
        write(&client, b"typed");
        set_nonblocking(slave.as_raw_fd()).unwrap();
        let mut got = Vec::new();
        eventually("input on the terminal", || {
            got.extend(read_now(&slave).0);
            got == b"typed"
        })
        .await;
        drop(slave); // the process is gone: EIO on the master ends the copy
        io.drain(Duration::from_secs(5)).await;
        io.close();
        assert!(io.console().is_none());
        w.stop(Duration::from_secs(5));
        assert_eq!(parse(&log), [rec("stdout", "F", b"hello"), rec("stdout", "F", b"wor")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stdio_fifo_output_never_blocks_on_a_missing_reader() {
        let dir = tmpdir("fifo-noreader");
        let w = FileWriter::new();
        let fifo = format!("{dir}/out.fifo");
        mkfifo(&fifo);
        let io = ProcessIo::new(w.clone(), "", &fifo, "", false, None);
        io.prepare().unwrap();
        let out_w = dup(io.stdio()[1]);
        io.start_copies(None);
        write(&out_w, b"nobody reads this yet\n");
        drop(out_w);
        io.drain(Duration::from_secs(5)).await;
        io.close();
        w.stop(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
