//! Descriptors as the shim uses them: close-on-exec opens and pipes, and reads and writes of
//! non-blocking descriptors on the runtime (stdio copies, runc's output, the pause task's reports).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest single read: what a copy holds at most.
pub const CHUNK: usize = 32 * 1024;

pub fn open_fd(path: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: a valid C string; the descriptor returned is ours.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// (read end, write end), both close-on-exec, with `flags` (O_NONBLOCK) on both. A blocking pipe's end
/// handed to the runtime stays blocking when ours is made non-blocking (async_fd): each end is its own
/// open file description.
pub fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Registers fd with the runtime (made non-blocking first).
pub fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(fd.as_raw_fd())?;
    // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long as it is registered.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

/// One read of at most CHUNK bytes; Ok(empty) at EOF.
pub fn read_some(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    // SAFETY: reads into the vector's spare capacity, then sets the length to what was read.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), CHUNK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    unsafe { buf.set_len(n as usize) };
    Ok(buf)
}

pub fn write_some(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: writes from a valid slice.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What the descriptor holds once it is readable (at most CHUNK bytes); Ok(empty) at EOF.
pub async fn read_ready(fd: &AsyncFd<OwnedFd>) -> io::Result<Vec<u8>> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| read_some(inner.get_ref().as_raw_fd())) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// The next chunk; None at EOF, or on an error (EIO: the pty's other side is closed).
pub async fn read_chunk(fd: &AsyncFd<OwnedFd>) -> Option<Vec<u8>> {
    read_ready(fd).await.ok().filter(|data| !data.is_empty())
}

/// Writes all of buf, removing what is written; an error drops the rest (a reader gone or a tty hung
/// up must not stall the process).
pub async fn write_all(fd: &AsyncFd<OwnedFd>, buf: &mut Vec<u8>) {
    while !buf.is_empty() {
        let Ok(mut guard) = fd.writable().await else {
            buf.clear();
            return;
        };
        match guard.try_io(|inner| write_some(inner.get_ref().as_raw_fd(), buf)) {
            Ok(Ok(n)) => {
                buf.drain(..n);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => buf.clear(),
            Err(_would_block) => {}
        }
    }
}
