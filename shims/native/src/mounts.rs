//! Rootfs mounts of a task: mounted by the shim at <bundle>/rootfs on Create, unmounted on Delete; port
//! of shims/runc/mounts.py.
//!
//! An overlay with the option `X-shimd.idmap-userns=<pinned user namespace>` (a pod with hostUsers:
//! false) is mounted on idmapped lower layers, so that the image appears owned by the container's root.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use crate::cgroupfs::{join, normpath, os_error, repr, strerror};
use crate::reaper::{self, CmdError, Reaper};

/// The mount option shimd adds to a rootfs overlay (value: a pinned user namespace); shimproto/idmap.py.
pub const IDMAP_OPTION: &str = "X-shimd.idmap-userns=";

/// Mount options must fit one page; long absolute lowerdir lists (many layers) do not.
pub const OPTIONS_BUDGET: usize = 3500;

/// mount(8)'s names of the flags an overlay mount takes as mount(2) flags rather than as data.
const FLAGS: &[(&str, libc::c_ulong)] = &[
    ("ro", 0x1),
    ("nosuid", 0x2),
    ("nodev", 0x4),
    ("noexec", 0x8),
    ("sync", 0x10),
    ("dirsync", 0x80),
    ("noatime", 0x400),
    ("nodiratime", 0x800),
    ("relatime", 0x200000),
    ("strictatime", 0x1000000),
];

/// One entry of CreateTaskRequest.rootfs.
#[derive(Clone, Debug, Default)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// Whether path is a mount point, as /proc/self/mountinfo spells it (octal escapes included).
#[allow(dead_code)] // the Python module's helper for its callers and tests; used by the tests here
pub fn is_mountpoint(path: &str) -> bool {
    match std::fs::read("/proc/self/mountinfo") {
        Ok(info) => info.split(|&c| c == b'\n').any(|l| l.split(|&c| c == b' ').nth(4) == Some(path.as_bytes())),
        Err(_) => false,
    }
}

/// Mounts each entry onto rootfs (+ its target); on failure undoes what was mounted. The error's
/// message reads "mounting the rootfs at {rootfs} failed: {why}".
///
/// As in Python, a mount(8) that times out is the exception: its error (kind TimedOut, the command's
/// timeout text) is returned as is, and nothing is undone.
pub async fn mount_all(reaper: &Reaper, mounts: &[Mount], rootfs: &str, timeout: Duration) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(rootfs)?;
    let mut done: Vec<String> = Vec::new();
    let mut failure: Option<String> = None;
    for mnt in mounts {
        let target = if mnt.target.is_empty() {
            rootfs.to_string()
        } else {
            join(&[rootfs, mnt.target.trim_start_matches('/')])
        };
        let (options, userns) = split_idmap(&mnt.options);
        let result = if !userns.is_empty() {
            let (kind, t) = (mnt.kind.clone(), target.clone());
            blocking(move || mount_idmapped_overlay(&kind, &options, &t, &userns)).await.map_err(|e| e.to_string())
        } else {
            match mount_one(reaper, mnt, options, &target, timeout).await {
                Ok(()) => Ok(()),
                Err(CmdError::TimedOut(what)) => return Err(io::Error::new(io::ErrorKind::TimedOut, what)),
                Err(CmdError::Failed { stderr, .. }) => Err(stderr.trim().to_string()),
                Err(CmdError::Io(e)) => Err(e.to_string()),
            }
        };
        match result {
            Ok(()) => done.push(target),
            Err(why) => {
                failure = Some(why);
                break;
            }
        }
    }
    match failure {
        None => Ok(()),
        Some(why) => {
            for target in done.iter().rev() {
                let _ = unmount(target);
            }
            Err(io::Error::other(format!("mounting the rootfs at {rootfs} failed: {why}")))
        }
    }
}

/// A quick blocking call off the runtime's threads (as Python's to_thread).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// (flags, data) for mount(2), or None when only mount(8) knows what an option means.
pub fn overlay_syscall_args(options: &[String]) -> Option<(libc::c_ulong, String)> {
    let mut flags = 0;
    let mut data: Vec<&str> = Vec::new();
    for o in options {
        if let Some((_, f)) = FLAGS.iter().find(|(name, _)| name == o) {
            flags |= f;
        } else if o == "rw" || o == "defaults" || o.starts_with("x-") || o.starts_with("X-") {
            continue; // mount(8) drops these too
        } else if o.contains('=') || is_identifier(o) {
            data.push(o);
        } else {
            return None;
        }
    }
    Some((flags, data.join(",")))
}

/// str.isidentifier(), for the ASCII and letters an option name is made of.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_alphabetic() => chars.all(|c| c == '_' || c.is_alphanumeric()),
        _ => false,
    }
}

async fn mount_one(
    reaper: &Reaper,
    mnt: &Mount,
    options: Vec<String>,
    target: &str,
    timeout: Duration,
) -> Result<(), CmdError> {
    let overlay = mnt.kind == "overlay";
    let (options, cwd) = if overlay { shorten_lowerdirs(&options) } else { (options, String::new()) };
    let direct = if overlay && cwd.is_empty() { overlay_syscall_args(&options) } else { None };
    if let Some((flags, data)) = direct {
        // mount(2) itself: a container's rootfs is on StartContainer's path, and mount(8) is a fork+exec.
        let source = if mnt.source.is_empty() { "overlay".to_string() } else { mnt.source.clone() };
        let target = target.to_string();
        return Ok(blocking(move || mount_syscall(&source, &target, "overlay", &data, flags)).await?);
    }
    // The kernel reads relative lowerdirs from the mounting process's cwd (env -C, no shell).
    let mut argv: Vec<String> =
        if cwd.is_empty() { vec!["mount".into()] } else { vec!["env".into(), "-C".into(), cwd, "mount".into()] };
    argv.push("-t".into());
    argv.push(if mnt.kind.is_empty() { "none".into() } else { mnt.kind.clone() });
    if !options.is_empty() {
        argv.push("-o".into());
        argv.push(options.join(","));
    }
    argv.push(if mnt.source.is_empty() { "none".into() } else { mnt.source.clone() });
    argv.push(target.to_string());
    reaper::run(reaper, &argv, timeout, None, None).await.map(|_| ())
}

/// (options for the kernel, the user namespace to idmap with or "").
pub fn split_idmap(options: &[String]) -> (Vec<String>, String) {
    let userns = options.iter().rev().find_map(|o| o.strip_prefix(IDMAP_OPTION)).unwrap_or("").to_string();
    (options.iter().filter(|o| !o.starts_with(IDMAP_OPTION)).cloned().collect(), userns)
}

/// overlayfs cannot be idmapped itself (EINVAL), so its lower layers are: each becomes a detached
/// idmapped clone named by /proc/self/fd/N, which also keeps the option string short. The overlay
/// keeps its own references to them, so closing the fds leaves no mount behind.
pub fn mount_idmapped_overlay(fstype: &str, options: &[String], target: &str, userns_path: &str) -> io::Result<()> {
    let lowers: Option<Vec<&str>> =
        options.iter().find_map(|o| o.strip_prefix("lowerdir=")).map(|l| l.split(':').collect());
    let lowers = match lowers {
        Some(l) if fstype == "overlay" => l,
        _ => {
            return Err(io::Error::other(format!(
                "{IDMAP_OPTION} applies to overlay mounts with a lowerdir, not {}",
                repr(fstype)
            )))
        }
    };
    let ns = open_userns(userns_path)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for layer in lowers {
        fds.push(idmapped_clone(layer, &ns)?);
    }
    let lowerdir = format!(
        "lowerdir={}",
        fds.iter().map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd())).collect::<Vec<_>>().join(":")
    );
    let data: Vec<&str> =
        options.iter().map(|o| if o.starts_with("lowerdir=") { lowerdir.as_str() } else { o.as_str() }).collect();
    mount_syscall("overlay", target, "overlay", &data.join(","), 0)
    // fds and ns close here
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "embedded null byte"))
}

fn open_userns(path: &str) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: open with a valid C string; the result is checked before it is owned.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let n = errno();
        return Err(os_error(n, &format!("opening the user namespace {path}: {}", strerror(n))));
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// x86_64 and aarch64 share the numbers of these (recent, unified) syscalls.
const SYS_OPEN_TREE: libc::c_long = 428;
const SYS_MOUNT_SETATTR: libc::c_long = 442;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn machine() -> String {
    // SAFETY: uname fills a zeroed struct; machine is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.machine.as_ptr()).to_string_lossy().into_owned()
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// A detached, idmapped clone of the mount tree at path.
fn idmapped_clone(path: &str, userns: &OwnedFd) -> io::Result<OwnedFd> {
    let m = machine();
    if m != "x86_64" && m != "aarch64" {
        return Err(io::Error::other(format!("idmapped mounts are not implemented for {m}")));
    }
    let c = cstring(path)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree with a valid C string; the result is checked before it is owned.
    let fd = unsafe { libc::syscall(SYS_OPEN_TREE, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        let n = errno();
        return Err(os_error(n, &format!("open_tree {path}: {}", strerror(n))));
    }
    // SAFETY: fd is a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr =
        MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    let empty = c"";
    // SAFETY: mount_setattr on our fd with a live struct of the size passed.
    let r = unsafe {
        libc::syscall(
            SYS_MOUNT_SETATTR,
            fd.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let n = errno();
        return Err(os_error(
            n,
            &format!(
                "idmapping {path} (mount_setattr): {}; its filesystem may not support idmapped mounts",
                strerror(n)
            ),
        ));
    }
    Ok(fd)
}

fn mount_syscall(source: &str, target: &str, fstype: &str, data: &str, flags: libc::c_ulong) -> io::Result<()> {
    let (s, t, f, d) = (cstring(source)?, cstring(target)?, cstring(fstype)?, cstring(data)?);
    // SAFETY: mount(2) with valid C strings.
    if unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) } != 0 {
        let n = errno();
        return Err(os_error(n, &format!("mount {fstype} on {target}: {}", strerror(n))));
    }
    Ok(())
}

/// Relative lowerdirs under their common parent (the mount's cwd) when the absolute list would not fit.
pub fn shorten_lowerdirs(options: &[String]) -> (Vec<String>, String) {
    // Python counts characters, not bytes.
    if options.join(",").chars().count() <= OPTIONS_BUDGET {
        return (options.to_vec(), String::new());
    }
    let Some(idx) = options.iter().position(|o| o.starts_with("lowerdir=")) else {
        return (options.to_vec(), String::new());
    };
    let lowers: Vec<&str> = options[idx]["lowerdir=".len()..].split(':').collect();
    if lowers.len() < 2 || !lowers.iter().all(|p| p.starts_with('/')) {
        return (options.to_vec(), String::new());
    }
    let common = commonpath(&lowers);
    let mut out = options.to_vec();
    out[idx] = format!("lowerdir={}", lowers.iter().map(|p| relpath(p, &common)).collect::<Vec<_>>().join(":"));
    (out, common)
}

/// os.path.commonpath of absolute paths: the longest common run of components ("" and "." skipped).
fn commonpath(paths: &[&str]) -> String {
    let split: Vec<Vec<&str>> =
        paths.iter().map(|p| p.split('/').filter(|c| !c.is_empty() && *c != ".").collect()).collect();
    let mut n = 0;
    while split.iter().all(|s| s.len() > n && s[n] == split[0][n]) {
        n += 1;
    }
    format!("/{}", split[0][..n].join("/"))
}

/// os.path.relpath of absolute paths (both normalised first, as Python does).
fn relpath(path: &str, start: &str) -> String {
    let (p, s) = (normpath(path), normpath(start));
    let pl: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    let sl: Vec<&str> = s.split('/').filter(|c| !c.is_empty()).collect();
    let i = pl.iter().zip(&sl).take_while(|(a, b)| a == b).count();
    let rel: Vec<&str> = std::iter::repeat_n("..", sl.len() - i).chain(pl[i..].iter().copied()).collect();
    if rel.is_empty() {
        ".".into()
    } else {
        rel.join("/")
    }
}

/// Unmounts everything stacked at target, lazily if busy; nothing mounted there is not an error.
///
/// umount2 until it says "not a mount point": reading mountinfo first would cost a read of every mount of
/// the node per layer (thousands of lines with hundreds of pods).
pub fn unmount(target: &str) -> io::Result<()> {
    let c = cstring(target)?;
    let umount2 = |flags: libc::c_int| -> i32 {
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            errno()
        } else {
            0
        }
    };
    for _ in 0..32 {
        let mut err = umount2(libc::UMOUNT_NOFOLLOW);
        if err == libc::EBUSY {
            err = umount2(libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW);
        }
        if matches!(err, libc::EINVAL | libc::ENOENT | libc::ENOTDIR) {
            return Ok(()); // not (or no longer) a mount point, or no such path
        }
        if err != 0 {
            return Err(os_error(err, &format!("unmount {target}: {}", strerror(err))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::tests::TempDir;

    fn v(opts: &[&str]) -> Vec<String> {
        opts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mounts_short_options_stay_absolute() {
        let opts = v(&["lowerdir=/a/1:/a/2", "upperdir=/u", "workdir=/w"]);
        assert_eq!(shorten_lowerdirs(&opts), (opts.clone(), String::new()));
    }

    #[test]
    fn mounts_long_lowerdir_lists_become_relative_to_their_common_parent() {
        let base = format!("/var/lib/shimd/images/snapshots/{}", "x".repeat(40));
        let lowers: Vec<String> = (0..60).map(|i| format!("{base}/{i:064}/fs")).collect();
        let opts = vec![format!("lowerdir={}", lowers.join(":")), "upperdir=/u".into(), "workdir=/w".into()];
        let (out, cwd) = shorten_lowerdirs(&opts);
        assert_eq!(cwd, base);
        assert_eq!(
            out[0],
            format!("lowerdir={}", (0..60).map(|i| format!("{i:064}/fs")).collect::<Vec<_>>().join(":"))
        );
        assert_eq!(out[1..], v(&["upperdir=/u", "workdir=/w"])[..]);
        assert!(out.join(",").len() < opts.join(",").len());
        assert!(opts.join(",").len() > OPTIONS_BUDGET);
        // Too few or relative lowerdirs, or none, are left alone.
        let relative = vec![format!("lowerdir=a:{}", lowers.join(":"))];
        assert_eq!(shorten_lowerdirs(&relative), (relative.clone(), String::new()));
        let nolower = vec![format!("upperdir={}", "u".repeat(OPTIONS_BUDGET))];
        assert_eq!(shorten_lowerdirs(&nolower), (nolower.clone(), String::new()));
    }

    #[test]
    fn mounts_relpath_and_commonpath_as_python() {
        assert_eq!(commonpath(&["/a/b/c", "/a/b/d", "/a/bb"]), "/a");
        assert_eq!(commonpath(&["/x", "/y"]), "/");
        assert_eq!(commonpath(&["/a//b/./c", "/a/b/d"]), "/a/b");
        assert_eq!(relpath("/a/b/c", "/a"), "b/c");
        assert_eq!(relpath("/a", "/a"), ".");
        assert_eq!(relpath("/a/x", "/a/b"), "../x");
        assert_eq!(relpath("/a/../b/x", "/a/../b"), "x");
    }

    #[test]
    fn mounts_idmap_option_is_split_off_for_the_kernel() {
        let opts = v(&["lowerdir=/a:/b", "upperdir=/u", "workdir=/w", &format!("{IDMAP_OPTION}/run/shimd/ns/p/user")]);
        assert_eq!(split_idmap(&opts), (opts[..3].to_vec(), "/run/shimd/ns/p/user".to_string()));
        assert_eq!(split_idmap(&opts[..3]), (opts[..3].to_vec(), String::new()));
    }

    #[test]
    fn mounts_idmapped_mount_failures_name_the_cause() {
        let t = TempDir::new("mounts-idmap");
        let e = mount_idmapped_overlay("tmpfs", &v(&["size=1m"]), &t.0, "/proc/self/ns/user").unwrap_err();
        assert_eq!(e.to_string(), "X-shimd.idmap-userns= applies to overlay mounts with a lowerdir, not 'tmpfs'");
        let e = mount_idmapped_overlay("overlay", &v(&["lowerdir=/a"]), &t.0, "/nonexistent").unwrap_err();
        assert_eq!(e.to_string(), "[Errno 2] opening the user namespace /nonexistent: No such file or directory");
        let e = mount_idmapped_overlay("overlay", &v(&["lowerdir=/nonexistent-layer"]), &t.0, "/proc/self/ns/user")
            .unwrap_err();
        assert_eq!(e.to_string(), "[Errno 2] open_tree /nonexistent-layer: No such file or directory");
    }

    #[test]
    fn mounts_overlay_syscall_args() {
        type Case = (Vec<String>, Option<(libc::c_ulong, &'static str)>);
        let cases: Vec<Case> = vec![
            (v(&["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]), Some((0, "lowerdir=/a:/b,upperdir=/u,workdir=/w"))),
            (v(&["ro", "nodev", "lowerdir=/a:/b"]), Some((0x1 | 0x4, "lowerdir=/a:/b"))),
            (v(&["rw", "index=off", "X-mount.mkdir", "x-systemd.foo", "volatile"]), Some((0, "index=off,volatile"))),
            (vec![], Some((0, ""))),
            (v(&["lowerdir=/a", "bad option"]), None), // only mount(8) would know
            (v(&["1x"]), None),
        ];
        for (options, expected) in cases {
            assert_eq!(overlay_syscall_args(&options), expected.map(|(f, d)| (f, d.to_string())), "{options:?}");
        }
    }

    /// A current-thread runtime with the shim's reaper answering SIGCHLD, as the shim runs.
    fn with_reaper<F: std::future::Future>(f: impl FnOnce(Reaper) -> F) -> F::Output {
        let _one = reaper::one_reaper_at_a_time();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let reaper = Reaper::new();
            let task = reaper.start().unwrap();
            let out = f(reaper).await;
            task.abort();
            out
        })
    }

    fn overlay_dirs(t: &TempDir) -> Vec<String> {
        for d in ["l1", "l2", "u", "w", "rootfs"] {
            std::fs::create_dir_all(t.path(d)).unwrap();
        }
        std::fs::write(t.path("l1/a"), "1").unwrap();
        std::fs::write(t.path("l2/b"), "2").unwrap();
        v(&[
            &format!("lowerdir={}:{}", t.path("l1"), t.path("l2")),
            &format!("upperdir={}", t.path("u")),
            &format!("workdir={}", t.path("w")),
        ])
    }

    #[test]
    fn mounts_an_overlay_by_syscall_and_a_tmpfs_by_mount8_then_unmounts_them() {
        let t = TempDir::new("mounts");
        let rootfs = t.path("rootfs");
        let mut options = overlay_dirs(&t);
        options.push("nodev".into());
        let ms = vec![
            Mount { kind: "overlay".into(), source: "".into(), target: "".into(), options },
            Mount { kind: "tmpfs".into(), source: "shm".into(), target: "/dev/shm".into(), options: v(&["size=1m"]) },
        ];
        std::fs::create_dir_all(t.path("l1/dev/shm")).unwrap();
        with_reaper(|r| async move { mount_all(&r, &ms, &rootfs, Duration::from_secs(10)).await }).unwrap();
        let rootfs = t.path("rootfs");
        assert!(is_mountpoint(&rootfs) && is_mountpoint(&format!("{rootfs}/dev/shm")));
        assert_eq!(std::fs::read_to_string(format!("{rootfs}/a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(format!("{rootfs}/b")).unwrap(), "2");
        unmount(&format!("{rootfs}/dev/shm")).unwrap();
        unmount(&rootfs).unwrap();
        assert!(!is_mountpoint(&rootfs));
        unmount(&rootfs).unwrap(); // nothing mounted: not an error
        unmount(&t.path("missing")).unwrap();
    }

    #[test]
    fn mounts_a_failed_entry_undoes_the_earlier_ones() {
        let t = TempDir::new("mounts");
        let rootfs = t.path("rootfs");
        let ms = vec![
            Mount { kind: "overlay".into(), source: "".into(), target: "".into(), options: overlay_dirs(&t) },
            Mount { kind: "no-such-fs".into(), source: "".into(), target: "/".into(), options: vec![] },
        ];
        let e = with_reaper(|r| async move { mount_all(&r, &ms, &rootfs, Duration::from_secs(10)).await }).unwrap_err();
        let rootfs = t.path("rootfs");
        assert!(e.to_string().starts_with(&format!("mounting the rootfs at {rootfs} failed: ")), "{e}");
        assert!(!is_mountpoint(&rootfs));
        // A syscall failure reads as Python's OSError.
        let ms = vec![Mount {
            kind: "overlay".into(),
            source: "".into(),
            target: "".into(),
            options: v(&[&format!("lowerdir={}", t.path("missing")), "upperdir=/nonexistent"]),
        }];
        let e = with_reaper(|r| async move { mount_all(&r, &ms, &rootfs, Duration::from_secs(10)).await }).unwrap_err();
        let rootfs = t.path("rootfs");
        assert!(e.to_string().starts_with(&format!("mounting the rootfs at {rootfs} failed: [Errno ")), "{e}");
        assert!(e.to_string().contains(&format!(" mount overlay on {rootfs}: ")), "{e}");
    }

    #[test]
    fn mounts_an_idmapped_overlay_shows_the_image_owned_by_the_containers_root() {
        // A user namespace mapping its root to host uid 100000, pinned by a process living in it.
        let Ok(mut ns) = std::process::Command::new("unshare").args(["--user", "sleep", "1000"]).spawn() else {
            return;
        };
        struct Kill<'a>(&'a mut std::process::Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let ns_pid = ns.id();
        let _kill = Kill(&mut ns);
        let userns = format!("/proc/{ns_pid}/ns/user");
        // Mapped from here once unshare has made the namespace (its process then shows a new one).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&userns).ok() == std::fs::read_link("/proc/self/ns/user").ok() {
            assert!(std::time::Instant::now() < deadline, "the test's user namespace was not made");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(format!("/proc/{ns_pid}/uid_map"), "0 100000 65536").unwrap();
        std::fs::write(format!("/proc/{ns_pid}/gid_map"), "0 100000 65536").unwrap();
        let t = TempDir::new("mounts-idmap");
        let mut options = overlay_dirs(&t);
        options.push(format!("{IDMAP_OPTION}{userns}"));
        let ms = vec![Mount { kind: "overlay".into(), source: "".into(), target: "".into(), options }];
        let rootfs = t.path("rootfs");
        let r = with_reaper(|r| async move { mount_all(&r, &ms, &rootfs, Duration::from_secs(10)).await });
        if let Err(e) = &r {
            // A kernel or filesystem without idmapped mounts says so in the reason.
            assert!(e.to_string().contains("mount_setattr"), "{e}");
            eprintln!("skipped: no idmapped mounts here: {e}");
            return;
        }
        let rootfs = t.path("rootfs");
        assert!(is_mountpoint(&rootfs));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(format!("{rootfs}/a")).unwrap().uid(), 100000);
        assert_eq!(std::fs::metadata(format!("{rootfs}/b")).unwrap().gid(), 100000);
        // The clones were detached and their fds closed: only the overlay itself is mounted.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(info.lines().filter(|l| l.contains(&t.0)).count(), 1, "{info}");
        unmount(&rootfs).unwrap();
        assert!(!is_mountpoint(&rootfs));
    }

    #[test]
    fn mounts_long_lowerdir_lists_go_through_mount8_in_their_parent() {
        let t = TempDir::new("mounts");
        let base = t.path(&"d".repeat(200));
        let mut lowers = Vec::new();
        for i in 0..20 {
            let l = format!("{base}/{i:0100}");
            std::fs::create_dir_all(&l).unwrap();
            std::fs::write(format!("{l}/f{i}"), "x").unwrap();
            lowers.push(l);
        }
        let options = vec![format!("lowerdir={}", lowers.join(":"))]; // read-only overlay: no upperdir
        assert!(options[0].len() > OPTIONS_BUDGET);
        let ms = vec![Mount { kind: "overlay".into(), source: "overlay".into(), target: "".into(), options }];
        let rootfs = t.path("rootfs");
        with_reaper(|r| async move { mount_all(&r, &ms, &rootfs, Duration::from_secs(10)).await }).unwrap();
        let rootfs = t.path("rootfs");
        assert!(is_mountpoint(&rootfs));
        assert!(
            std::path::Path::new(&format!("{rootfs}/f0")).exists()
                && std::path::Path::new(&format!("{rootfs}/f19")).exists()
        );
        unmount(&rootfs).unwrap();
        assert!(!is_mountpoint(&rootfs));
    }
}
