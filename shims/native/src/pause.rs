//! The pod's pause task started by the shim itself, without a runc process; port of shims/runc/pause.py
//! (see its docstring for why and for what the process ends up with).
//!
//! A pod sharing one PID namespace needs catatonit as its PID 1. shimd's spec for it asks for little: a new
//! PID and mount namespace, the pod's pinned network, IPC and UTS namespaces, a read-only rootfs, an
//! unprivileged user, no capabilities, no_new_privs, a cgroup. A fork of the shim does that in a few ms
//! where `runc run` takes 50-60; any spec asking for more goes to runc (`plan` returns None).
//!
//! The child runs between fork and exec in a copy of a multi-threaded process: it only makes raw
//! system calls on data prepared before the fork (no allocation, no lock, no panic path taken).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int, c_ulong};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::log::Logger;
use crate::reaper::{Exit, Reaper};
use crate::runtime::{Caps, RtError, RtResult, RuncOptions, Runtime, Stdio};
use crate::{cgroupfs, fd};

const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// The namespaces it joins by path (pinned by shimd), in the order they are joined.
const JOINED: [&str; 3] = ["network", "ipc", "uts"];
/// What the spec may mount besides: not made here (catatonit opens no file, and a proc mount would only be
/// one more way into the pod's PID namespace).
const SPEC_MOUNTS: [&str; 2] = ["/proc", "/dev"];
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Written by the child once set up, before it joins its cgroups and execs; any text after it is a failure
/// of those two steps.
const READY: u8 = 0;
const REPORT_LIMIT: usize = 4000;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CLOSE_RANGE_CLOEXEC: c_ulong = 1 << 2;
/// How often a forced delete looks whether the killed task was reaped, when its exit is watched elsewhere.
const REAP_POLL: Duration = Duration::from_millis(5);

/// What to make, read from the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PausePlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub rootfs: String,
    /// Namespace kind ("network", "ipc", "uts") to the path joined.
    pub joined: BTreeMap<String, String>,
    pub cgroups_path: String,
}

/// The plan for a sandbox spec the shim can start itself; None: runc must do it.
pub fn plan(spec: &Value, bundle: &str, opts: &RuncOptions) -> Option<PausePlan> {
    let flavor_is_runc = std::env::var_os("SHIMD_RUNTIME_FLAVOR").is_none_or(|f| f == "runc");
    plan_for(spec, bundle, opts, flavor_is_runc)
}

/// `plan` with the runtime flavor given (tests set it without touching the process environment).
/// Where pause.py's `_plan` would raise on a JSON value of an odd type (caught there: None), this returns
/// None too.
fn plan_for(spec: &Value, bundle: &str, opts: &RuncOptions, flavor_is_runc: bool) -> Option<PausePlan> {
    if !flavor_is_runc || opts.systemd_cgroup || !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return None;
    }
    let spec = spec.as_object()?;
    if !truthy_map(spec.get("annotations"))?
        .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
        .is_some_and(|t| t == "sandbox")
    {
        return None;
    }
    let (proc_, linux, root) =
        (spec.get("process")?.as_object()?, spec.get("linux")?.as_object()?, spec.get("root")?.as_object()?);
    if !only_keys(spec, &["ociVersion", "process", "root", "mounts", "annotations", "linux", "hostname"])
        || !only_keys(linux, &["namespaces", "cgroupsPath", "resources", "maskedPaths", "readonlyPaths"])
    {
        return None;
    }
    if let Some(caps) = truthy_map(proc_.get("capabilities"))? {
        if caps.values().any(|v| cgroupfs::truthy(Some(v))) {
            return None;
        }
    }
    if cgroupfs::truthy(proc_.get("terminal"))
        || !cgroupfs::truthy(proc_.get("noNewPrivileges"))
        || !only_keys(proc_, &["terminal", "user", "args", "cwd", "env", "noNewPrivileges", "capabilities"])
    {
        return None;
    }
    let user = proc_.get("user")?.as_object()?;
    if !only_keys(user, &["uid", "gid", "additionalGids"]) {
        return None;
    }
    // isinstance(uid, int) (a bool is one); 0 is runc's business. A negative uid (Python would pass -1,
    // "unchanged", to setresuid and keep root) goes to runc too.
    let uid = match user.get("uid")? {
        Value::Bool(b) => *b as i64,
        Value::Number(n) => n.as_i64()?,
        _ => return None,
    };
    let uid = id_value(uid)?;
    if uid == 0 {
        return None;
    }
    let args: Vec<String> =
        proc_.get("args")?.as_array()?.iter().map(|a| a.as_str().map(str::to_string)).collect::<Option<_>>()?;
    if !args.first().is_some_and(|a| a.starts_with('/')) || proc_.get("cwd").and_then(Value::as_str) != Some("/") {
        return None;
    }
    if !cgroupfs::truthy(root.get("readonly")) {
        return None;
    }
    if cgroupfs::truthy(spec.get("mounts")) {
        for m in spec.get("mounts")?.as_array()? {
            let dest = m.as_object()?.get("destination")?.as_str()?;
            if !SPEC_MOUNTS.contains(&dest) {
                return None;
            }
        }
    }
    // Devices: the process has no /dev and no capability to make a node, so the deny-all rule adds nothing.
    match linux.get("resources") {
        r if !cgroupfs::truthy(r) => {}
        Some(Value::Object(m)) if only_keys(m, &["devices"]) => {}
        Some(Value::Array(a)) if a.iter().all(|k| k == "devices") => {} // set() of a list: its items
        _ => return None,
    }
    let mut joined = BTreeMap::new();
    let (mut own_pid, mut own_mount) = (false, false);
    for ns in linux.get("namespaces")?.as_array()? {
        let ns = ns.as_object()?;
        let kind = ns.get("type")?.as_str().unwrap_or("");
        let path = ns.get("path");
        if JOINED.contains(&kind) && cgroupfs::truthy(path) {
            joined.insert(kind.to_string(), path?.as_str()?.to_string());
        } else if (kind == "pid" || kind == "mount") && !cgroupfs::truthy(path) {
            if kind == "pid" {
                own_pid = true;
            } else {
                own_mount = true;
            }
        } else {
            return None; // a user or cgroup namespace, or a PID namespace to join: runc's work
        }
    }
    let cgroups_path = match linux.get("cgroupsPath") {
        None => "",
        Some(v) => v.as_str()?,
    };
    // A path naming no cgroup below the hierarchy's root ("/", "/.") goes to runc: its cgroup would be the
    // root, which delete must never remove.
    if !(own_pid && own_mount && cgroups_path.starts_with('/'))
        || cgroups_path.split('/').any(|c| c == "..")
        || cgroup_components(cgroups_path).is_empty()
    {
        return None;
    }
    let root_path = root.get("path")?.as_str()?;
    let rootfs = if root_path.starts_with('/') { root_path.to_string() } else { cgroupfs::join(&[bundle, root_path]) };
    let groups = match user.get("additionalGids") {
        g if !cgroupfs::truthy(g) => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(|g| id_value(py_int(g)?)).collect::<Option<_>>()?,
        _ => return None,
    };
    let env = match proc_.get("env") {
        e if !cgroupfs::truthy(e) => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(py_str).collect(),
        _ => return None,
    };
    let gid = id_value(py_int(user.get("gid")?)?)?;
    Some(PausePlan { args, env, uid, gid, groups, rootfs, joined, cgroups_path: cgroups_path.to_string() })
}

/// `x or {}` then a use as a dict: None (the outer Option) when x is truthy but not an object.
#[allow(clippy::option_option)]
fn truthy_map(v: Option<&Value>) -> Option<Option<&Map<String, Value>>> {
    if !cgroupfs::truthy(v) {
        return Some(None);
    }
    v?.as_object().map(Some)
}

fn only_keys(m: &Map<String, Value>, allowed: &[&str]) -> bool {
    m.keys().all(|k| allowed.contains(&k.as_str()))
}

/// A uid or gid the kernel takes as one: (uid_t)-1 means "unchanged" to setres[ug]id.
fn id_value(n: i64) -> Option<u32> {
    u32::try_from(n).ok().filter(|v| *v != u32::MAX)
}

/// int() of what json.load made of a value: a number (floats truncated), a bool, or a decimal string.
fn py_int(v: &Value) -> Option<i64> {
    match v {
        Value::Bool(b) => Some(*b as i64),
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.trunc() as i64)),
        Value::String(s) => s.trim().replace('_', "").parse().ok(),
        _ => None,
    }
}

/// str() of an env entry.
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => cgroupfs::repr_json(other),
    }
}

/// The cgroup's path components below a hierarchy's root.
fn cgroup_components(cgroups_path: &str) -> Vec<&str> {
    cgroups_path.split('/').filter(|c| !c.is_empty() && *c != ".").collect()
}

/// Host facts read once per shim: the highest capability number, the cgroup hierarchies, errno texts.
struct Host {
    last_cap: c_int,
    /// (mount point, is the cpuset hierarchy) of every cgroup v1 controller hierarchy, name=systemd and
    /// cgroup2: those shimd removes a pod's cgroups from (shimd/cgroups.py, hierarchy_roots).
    mounts: Vec<(String, bool)>,
    /// strerror() of each errno, for the child's reports (strerror itself is not async-signal-safe).
    strerror: Vec<Vec<u8>>,
}

static HOST: OnceLock<Host> = OnceLock::new();

fn read_host() -> Result<Host, String> {
    const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";
    let text = std::fs::read_to_string(CAP_LAST_CAP).map_err(|e| cgroupfs::os_error_text(&e, Some(CAP_LAST_CAP)))?;
    let last_cap = text
        .trim()
        .parse()
        .map_err(|_| format!("invalid literal for int() with base 10: {}", cgroupfs::repr(&text)))?;
    let mounts = cgroupfs::try_mounts()
        .map_err(|e| cgroupfs::os_error_text(&e, Some("/proc/self/mountinfo")))?
        .into_iter()
        .filter(|(_, _, options)| !options.iter().any(|o| o.starts_with("name=") && o != "name=systemd"))
        .map(|(point, kind, options)| {
            let is_cpuset = kind == "cgroup" && options.contains("cpuset");
            (point, is_cpuset)
        })
        .collect();
    let strerror = (0..200).map(|n| cgroupfs::strerror(n).into_bytes()).collect();
    Ok(Host { last_cap, mounts, strerror })
}

/// The cgroup's directory in one hierarchy.
struct Leaf {
    path: String,
    mount_point: String,
    is_cpuset: bool,
    /// Every directory from the first below the mount point down to the leaf.
    levels: Vec<String>,
}

fn cgroup_leaves(mounts: &[(String, bool)], cgroups_path: &str) -> Vec<Leaf> {
    let comps = cgroup_components(cgroups_path);
    mounts
        .iter()
        .map(|(point, is_cpuset)| {
            let mut levels = Vec::with_capacity(comps.len());
            let mount_point = point.trim_end_matches('/').to_string();
            let mut dir = mount_point.clone();
            for c in &comps {
                dir.push('/');
                dir.push_str(c);
                levels.push(dir.clone());
            }
            Leaf { path: dir, mount_point, is_cpuset: *is_cpuset, levels }
        })
        .collect()
}

// ---- the child ---------------------------------------------------------------------------------------

fn cstring(s: &str, step: &str) -> RtResult<CString> {
    // Where Python's child would fail on a NUL in a path or argument, with its text.
    CString::new(s).map_err(|_| RtError::Failed(format!("pause task: {step}: embedded null byte")))
}

struct Level {
    dir: CString,
    /// (parent's file, this level's file) for cpuset.cpus and cpuset.mems: an empty cpuset takes no process.
    copies: Vec<(CString, CString)>,
}

struct LeafPrep {
    levels: Vec<Level>,
    procs: CString,
}

struct Join {
    path: CString,
    step: Vec<u8>,
}

/// Everything the child reads, made before the fork.
struct Prepared<'h> {
    stdio: Stdio,
    lifeline_r: RawFd,
    lifeline_w: RawFd,
    report_w: RawFd,
    leaves: Vec<LeafPrep>,
    joins: Vec<Join>,
    rootfs: CString,
    last_cap: c_int,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    exe: CString,
    not_executable: Vec<u8>,
    /// What Python's execve would raise before running anything (a NUL byte, an empty variable name).
    exec_error: Option<&'static [u8]>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    strerror: &'h [Vec<u8>],
}

impl<'h> Prepared<'h> {
    fn new(p: &PausePlan, stdio: Stdio, leaves: &[Leaf], host: &'h Host) -> RtResult<Self> {
        let mut leaf_preps = Vec::with_capacity(leaves.len());
        for leaf in leaves {
            let mut levels = Vec::with_capacity(leaf.levels.len());
            for (i, dir) in leaf.levels.iter().enumerate() {
                let mut copies = Vec::new();
                if leaf.is_cpuset {
                    let parent = if i == 0 { &leaf.mount_point } else { &leaf.levels[i - 1] };
                    for name in ["cpuset.cpus", "cpuset.mems"] {
                        copies.push((
                            cstring(&format!("{parent}/{name}"), "cgroups")?,
                            cstring(&format!("{dir}/{name}"), "cgroups")?,
                        ));
                    }
                }
                levels.push(Level { dir: cstring(dir, "cgroups")?, copies });
            }
            leaf_preps.push(LeafPrep { levels, procs: cstring(&format!("{}/cgroup.procs", leaf.path), "cgroups")? });
        }
        let mut joins = Vec::new();
        for kind in JOINED {
            if let Some(path) = p.joined.get(kind) {
                let step = format!("join {kind} namespace {path}");
                joins.push(Join { path: cstring(path, &step)?, step: step.into_bytes() });
            }
        }
        let arg0 = p.args.first().ok_or_else(|| RtError::Failed("pause task: exec: no command".into()))?;
        let exe = cstring(arg0, "exec")?;
        let mut exec_error: Option<&'static [u8]> = None;
        let mut argv = Vec::with_capacity(p.args.len());
        for a in &p.args {
            argv.push(CString::new(a.as_str()).unwrap_or_else(|_| {
                exec_error.get_or_insert(b"embedded null byte");
                CString::default()
            }));
        }
        // dict(e.split("=", 1) for e in env if "=" in e): first position, last value.
        let mut env: Vec<(&str, &str)> = Vec::new();
        for e in &p.env {
            if let Some((k, v)) = e.split_once('=') {
                match env.iter_mut().find(|(key, _)| *key == k) {
                    Some(slot) => slot.1 = v,
                    None => env.push((k, v)),
                }
            }
        }
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in env {
            let bad: Option<&'static [u8]> = if k.contains('\0') {
                Some(b"embedded null byte")
            } else if k.is_empty() {
                Some(b"illegal environment variable name")
            } else if v.contains('\0') {
                Some(b"embedded null byte")
            } else {
                None
            };
            match bad {
                Some(text) => {
                    exec_error.get_or_insert(text);
                }
                None => envp.push(CString::new(format!("{k}={v}")).unwrap_or_default()),
            }
        }
        let argv_ptrs = argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp_ptrs = envp.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        Ok(Prepared {
            stdio,
            lifeline_r: -1,
            lifeline_w: -1,
            report_w: -1,
            leaves: leaf_preps,
            joins,
            rootfs: cstring(&p.rootfs, "pivot_root")?,
            last_cap: host.last_cap,
            groups: p.groups.clone(),
            uid: p.uid,
            gid: p.gid,
            not_executable: format!("{arg0} is not an executable file in the pause rootfs").into_bytes(),
            exe,
            exec_error,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            strerror: &host.strerror,
        })
    }
}

/// Why a step of the child failed, worded as str() of the exception pause.py's child reports.
enum Fail<'a> {
    /// "[Errno N] message"
    Os(c_int),
    /// "[Errno N] message: 'path'"
    OsPath(c_int, &'a [u8]),
    /// "[Errno N] what: message" (pause.py's _Libc.check)
    OsWhat(c_int, &'a [u8]),
    /// "[Errno N] drop capability C: message"
    Cap(c_int, c_int),
    Text(&'a [u8]),
}

/// A message built on the stack.
struct Msg {
    buf: [u8; 4096],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn num(&mut self, n: c_int) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = (n as i64).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn strerror(&mut self, table: &[Vec<u8>], errno: c_int) {
        match usize::try_from(errno).ok().and_then(|i| table.get(i)) {
            Some(text) => self.push(text),
            None => {
                self.push(b"Unknown error ");
                self.num(errno);
            }
        }
    }

    fn fail(&mut self, f: &Fail, table: &[Vec<u8>]) {
        let errno = match f {
            Fail::Text(t) => return self.push(t),
            Fail::Os(e) | Fail::OsPath(e, _) | Fail::OsWhat(e, _) | Fail::Cap(e, _) => *e,
        };
        self.push(b"[Errno ");
        self.num(errno);
        self.push(b"] ");
        match f {
            Fail::OsWhat(_, what) => {
                self.push(what);
                self.push(b": ");
            }
            Fail::Cap(_, cap) => {
                self.push(b"drop capability ");
                self.num(*cap);
                self.push(b": ");
            }
            _ => {}
        }
        self.strerror(table, errno);
        if let Fail::OsPath(_, path) = f {
            self.push(b": '");
            self.push(path);
            self.push(b"'");
        }
    }
}

fn errno() -> c_int {
    // SAFETY: the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn check<'a>(result: c_int, what: &'a [u8]) -> Result<(), Fail<'a>> {
    if result != 0 {
        return Err(Fail::OsWhat(errno(), what));
    }
    Ok(())
}

/// In the forked child: becomes the pause process or reports why not, then ends.
///
/// # Safety
/// Only in the child of a fork, with `p` prepared before it.
unsafe fn child(p: &Prepared, cgroup_fds: &mut [c_int]) -> ! {
    let mut step: &[u8] = b"start";
    let Err(fail) = child_steps(p, cgroup_fds, &mut step);
    let mut msg = Msg { buf: [0; 4096], len: 0 };
    msg.push(b"pause task: ");
    msg.push(step);
    msg.push(b": ");
    msg.fail(&fail, p.strerror);
    libc::write(p.report_w, msg.buf.as_ptr().cast(), msg.len.min(REPORT_LIMIT));
    libc::_exit(127)
}

unsafe fn child_steps<'a>(
    p: &'a Prepared,
    cgroup_fds: &mut [c_int],
    step: &mut &'a [u8],
) -> Result<Infallible, Fail<'a>> {
    // Until its exec (after Create has answered) it would show as the shim in ps and top.
    libc::prctl(libc::PR_SET_NAME, c"pause".as_ptr() as c_ulong, 0, 0, 0);
    // Its copy of the lifeline's write end would keep the pipe open, hiding the shim's death below.
    libc::close(p.lifeline_w);
    *step = b"cgroups";
    for (leaf, fd) in p.leaves.iter().zip(cgroup_fds.iter_mut()) {
        *fd = open_cgroup(leaf)?;
    }
    for join in &p.joins {
        *step = &join.step;
        let fd = libc::open(join.path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(Fail::OsPath(errno(), join.path.as_bytes()));
        }
        check(libc::setns(fd, 0), &join.step)?;
        libc::close(fd);
    }
    *step = b"mount namespace";
    check(libc::unshare(libc::CLONE_NEWNS), b"mount namespace")?;
    check(
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ),
        b"make / private",
    )?;
    let root = p.rootfs.as_ptr();
    check(libc::mount(root, root, std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()), b"bind rootfs")?;
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    check(libc::mount(std::ptr::null(), root, std::ptr::null(), ro, std::ptr::null()), b"read-only rootfs")?;
    *step = b"stdio";
    for (target, &fd) in p.stdio.iter().enumerate() {
        let target = target as c_int;
        if fd != target && libc::dup2(fd, target) < 0 {
            return Err(Fail::Os(errno()));
        }
    }
    // Nothing but stdio reaches the exec, whatever other module left inheritable (old kernels: no-op).
    libc::syscall(libc::SYS_close_range, 3 as c_ulong, c_ulong::from(u32::MAX), CLOSE_RANGE_CLOEXEC);
    *step = b"pivot_root";
    if libc::chdir(root) != 0 {
        return Err(Fail::OsPath(errno(), p.rootfs.as_bytes()));
    }
    check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as c_int, b"pivot_root")?;
    check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), b"detach the old root")?;
    if libc::chdir(c"/".as_ptr()) != 0 {
        return Err(Fail::OsPath(errno(), b"/"));
    }
    *step = b"capabilities";
    for cap in 0..=p.last_cap {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) != 0 {
            return Err(Fail::Cap(errno(), cap));
        }
    }
    *step = b"user";
    // Raw system calls: this thread is the process's only one, no need for libc's all-threads setxid.
    if libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) != 0
        || libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid) != 0
        || libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid) != 0
    {
        return Err(Fail::Os(errno()));
    }
    // The uid change cleared effective and permitted; inheritable is cleared here.
    let header: [u32; 2] = [LINUX_CAPABILITY_VERSION_3, 0];
    let data = [0u32; 6];
    check(libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) as c_int, b"clear capabilities")?;
    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), b"no_new_privs")?;
    // Armed last: a change of uid or gid disarms it.
    *step = b"parent-death signal";
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0, 0, 0), b"parent-death signal")?;
    // The shim died before the signal was armed: nothing would ever stop this process.
    let mut byte = 0u8;
    match libc::read(p.lifeline_r, (&mut byte as *mut u8).cast(), 1) {
        0 => libc::_exit(1),
        n if n < 0 && errno() != libc::EAGAIN => return Err(Fail::Os(errno())),
        _ => {}
    }
    *step = b"exec";
    // Checked before READY, as this user in this root: a missing binary fails the Create, as with runc.
    if libc::access(p.exe.as_ptr(), libc::X_OK) != 0 {
        return Err(Fail::Text(&p.not_executable));
    }
    reset_signals();
    libc::write(p.report_w, [READY].as_ptr().cast(), 1);
    // The first move into a cgroup waits for an RCU grace period (10-30 ms on cgroup v1): the shim answers
    // before it. The descriptors were opened as root; the kernel checks the opener's credentials.
    *step = b"join cgroup";
    for &fd in cgroup_fds.iter() {
        if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
            return Err(Fail::Os(errno()));
        }
    }
    *step = b"exec";
    if let Some(text) = p.exec_error {
        return Err(Fail::Text(text));
    }
    libc::execve(p.exe.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
    Err(Fail::OsPath(errno(), p.exe.as_bytes()))
}

/// Makes the leaf with its missing parents and opens its cgroup.procs (before pivot_root: host paths).
unsafe fn open_cgroup(leaf: &LeafPrep) -> Result<c_int, Fail<'_>> {
    let mut present = leaf.levels.len();
    while present > 0 && !is_dir(&leaf.levels[present - 1].dir) {
        present -= 1;
    }
    for level in leaf.levels.iter().skip(present) {
        if libc::mkdir(level.dir.as_ptr(), 0o755) != 0 {
            match errno() {
                libc::EEXIST => continue,
                e => return Err(Fail::OsPath(e, level.dir.as_bytes())),
            }
        }
        for (src, dst) in &level.copies {
            copy_value(src, dst)?;
        }
    }
    let fd = libc::open(leaf.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(Fail::OsPath(errno(), leaf.procs.as_bytes()));
    }
    Ok(fd)
}

unsafe fn is_dir(path: &CString) -> bool {
    let mut st: libc::stat = std::mem::zeroed();
    libc::stat(path.as_ptr(), &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
}

/// A cpuset file's value, stripped, from the parent level to the new one.
unsafe fn copy_value<'a>(src: &'a CString, dst: &'a CString) -> Result<(), Fail<'a>> {
    let fd = libc::open(src.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(Fail::OsPath(errno(), src.as_bytes()));
    }
    let mut buf = [0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        let n = libc::read(fd, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n < 0 {
            let e = errno();
            libc::close(fd);
            return Err(Fail::Os(e));
        }
        if n == 0 {
            break;
        }
        len += n as usize;
    }
    libc::close(fd);
    let value = cgroupfs::strip(buf.get(..len).unwrap_or(&[]));
    let out = libc::open(dst.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, 0o666);
    if out < 0 {
        return Err(Fail::OsPath(errno(), dst.as_bytes()));
    }
    if !value.is_empty() && libc::write(out, value.as_ptr().cast(), value.len()) < 0 {
        let e = errno();
        libc::close(out);
        return Err(Fail::Os(e));
    }
    libc::close(out);
    Ok(())
}

/// Default dispositions and an empty mask for the exec. Signals stay blocked from the fork until here, and
/// every handler of the shim is reset before the unblock, so none runs in this process.
unsafe fn reset_signals() {
    let mut dfl: libc::sigaction = std::mem::zeroed();
    dfl.sa_sigaction = libc::SIG_DFL;
    for sig in 1..=64 {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction != libc::SIG_DFL
            && old.sa_sigaction != libc::SIG_IGN
        {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
    }
    // Ignored ones survive exec: the shim ignores these (pause.py resets the same three).
    for sig in [libc::SIGPIPE, libc::SIGXFSZ, libc::SIGCHLD] {
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
}

// ---- the shim's side -------------------------------------------------------------------------------

fn os_failure(e: io::Error, path: Option<&str>) -> RtError {
    RtError::Failed(cgroupfs::os_error_text(&e, path))
}

/// OSError(errno, "what: strerror") as pause.py's _Libc.check raises it.
fn check_failure(what: &str) -> RtError {
    let n = errno();
    RtError::Failed(format!("[Errno {n}] {what}: {}", cgroupfs::strerror(n)))
}

/// fork() into a new PID namespace: the shim's next child is PID 1 of it; the shim's own namespace is
/// restored for every later child (the setting is per thread, and this runs on the runtime thread).
/// The pid is watched by the reaper at once (it reaps on this thread, so no exit is missed).
fn fork_pause(p: &Prepared, cgroup_fds: &mut [c_int], reaper: &Reaper) -> RtResult<(i32, oneshot::Receiver<Exit>)> {
    // SAFETY: open of a fixed path; the descriptor is owned below.
    let own = unsafe { libc::open(c"/proc/self/ns/pid".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if own < 0 {
        return Err(os_failure(io::Error::last_os_error(), Some("/proc/self/ns/pid")));
    }
    // SAFETY: a fresh descriptor.
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    // SAFETY: per-thread setting, undone below.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(check_failure("new PID namespace"));
    }
    // SAFETY: signal masks of this thread, then fork; the child only runs `child` (async-signal-safe calls
    // on data prepared before) and never returns.
    let (pid, fork_errno, exit) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // No handler of the shim may run in the child before its exec.
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::fork();
        if pid == 0 {
            child(p, cgroup_fds);
        }
        let fork_errno = errno();
        let exit = (pid > 0).then(|| reaper.watch(pid));
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, fork_errno, exit)
    };
    // SAFETY: setns with a descriptor we own.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        let err = check_failure("restore the shim's PID namespace for children");
        if pid > 0 {
            // SAFETY: our unreaped child (its exit is watched).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        return Err(err);
    }
    match exit {
        Some(exit) => Ok((pid, exit)),
        None => Err(os_failure(io::Error::from_raw_os_error(fork_errno), None)),
    }
}

#[derive(Default)]
struct State {
    pid: i32,
    leaves: Vec<String>,
    /// Held open while the process lives: its read end, in the child, tells whether the shim was alive
    /// when the parent-death signal was armed.
    lifeline: Option<OwnedFd>,
    /// What the child reports after READY (a failure to join a cgroup or to exec), read at delete.
    report: Option<OwnedFd>,
    reported: Vec<u8>,
    /// The reaper's watch made at the fork, handed to the first watch_exit of the pid (the reaper keeps
    /// one watcher per pid; until then it keeps `holds` true).
    exit: Option<oneshot::Receiver<Exit>>,
}

/// Stands in for runc for the pause task only.
pub struct PauseRuntime {
    reaper: Reaper,
    #[allow(dead_code)]
    opts: RuncOptions,
    #[allow(dead_code)]
    log_path: String,
    timeout: Duration,
    plan: PausePlan,
    log: Logger,
    state: Mutex<State>,
}

/// SIGKILLs the task when run_detached fails or its caller gives up on it (a dropped future).
struct KillOnDrop<'a>(&'a PauseRuntime);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

fn refuse(what: &str) -> RtError {
    RtError::Failed(format!("{what} is not supported for the pod's pause task"))
}

impl PauseRuntime {
    pub fn new(
        reaper: Reaper,
        opts: RuncOptions,
        log_path: String,
        timeout: Duration,
        plan: PausePlan,
        log: Logger,
    ) -> Self {
        PauseRuntime { reaper, opts, log_path, timeout, plan, log, state: Mutex::new(State::default()) }
    }

    fn pid(&self) -> i32 {
        self.state.lock().unwrap().pid
    }

    fn alive(&self) -> Option<i32> {
        let pid = self.pid();
        (pid != 0 && self.reaper.holds(pid)).then_some(pid)
    }

    /// SIGKILL while it is our unreaped child (its pid cannot be anyone else's); false: it is gone.
    fn kill_now(&self) -> bool {
        match self.alive() {
            // SAFETY: kill(2) of our unreaped child.
            Some(pid) => unsafe { libc::kill(pid, libc::SIGKILL) == 0 },
            None => false,
        }
    }

    /// What the child wrote after READY (it failed to join a cgroup or to exec), read once it has ended:
    /// the pipe then holds all of it.
    fn log_reports(&self) {
        let text = self.take_reports();
        if !text.is_empty() {
            self.log.error(
                "pause task failed after its start",
                &[("error", Value::String(String::from_utf8_lossy(&text).into_owned()))],
            );
        }
    }

    fn take_reports(&self) -> Vec<u8> {
        let mut st = self.state.lock().unwrap();
        let mut text = std::mem::take(&mut st.reported);
        if let Some(fd) = st.report.take() {
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: read into a stack buffer of its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n as usize]);
            }
        }
        text
    }

    fn close_fds(&self) {
        let mut st = self.state.lock().unwrap();
        st.report = None;
        st.lifeline = None;
    }

    /// Prepares and forks; the pid, the report pipe's read end. No await: the prepared data holds raw pointers.
    fn spawn(&self, stdio: Stdio, host: &Host) -> RtResult<(i32, OwnedFd)> {
        let leaves = cgroup_leaves(&host.mounts, &self.plan.cgroups_path);
        self.state.lock().unwrap().leaves = leaves.iter().map(|l| l.path.clone()).collect();
        let mut prep = Prepared::new(&self.plan, stdio, &leaves, host)?;
        let mut cgroup_fds = vec![-1; prep.leaves.len()];
        // Non-blocking: the child's read of the lifeline must answer at once (EAGAIN while the shim lives).
        let pipe = || fd::pipe(libc::O_NONBLOCK).map_err(|e| os_failure(e, None));
        let (life_r, life_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        prep.lifeline_r = life_r.as_raw_fd();
        prep.lifeline_w = life_w.as_raw_fd();
        prep.report_w = report_w.as_raw_fd();
        let (pid, exit) = fork_pause(&prep, &mut cgroup_fds, &self.reaper)?;
        let mut st = self.state.lock().unwrap();
        st.pid = pid;
        st.lifeline = Some(life_w);
        st.exit = Some(exit);
        Ok((pid, report_r))
    }
}

#[async_trait]
impl Runtime for PauseRuntime {
    fn label(&self) -> String {
        "shim".into() // forked by this shim, no runc container
    }
    fn caps(&self) -> Caps {
        Caps {
            // its cgroups are joined after Create has answered
            moves_into_cgroups: false,
            // its own delete never involves runc
            deletes_reaped_itself: false,
            // PID 1 of its own namespace: signalled directly
            signals_cgroup_itself: false,
            // dies with its shim; shimd removes its cgroups then
            binary_keeps_state: false,
            ..Caps::RUNC
        }
    }
    fn checkpoint_unsupported(&self) -> String {
        "checkpoint is not supported for the pod's pause task".into()
    }
    fn watch_exit(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let mut st = self.state.lock().unwrap();
        if pid == st.pid {
            if let Some(exit) = st.exit.take() {
                return exit;
            }
        }
        drop(st);
        self.reaper.watch(pid)
    }
    async fn create(&self, _cid: &str, _bundle: &str, _pid_file: &str, _stdio: Stdio, _console: &str) -> RtResult<()> {
        Err(refuse("create without start"))
    }
    async fn run_detached(
        &self,
        _cid: &str,
        _bundle: &str,
        _pid_file: &str,
        stdio: Stdio,
        console: &str,
    ) -> RtResult<()> {
        if !console.is_empty() {
            return Err(refuse("a terminal"));
        }
        let host = match HOST.get() {
            Some(h) => h,
            None => {
                let read = tokio::task::spawn_blocking(read_host)
                    .await
                    .map_err(|e| RtError::Failed(format!("pause task: {e}")))?
                    .map_err(RtError::Failed)?;
                HOST.get_or_init(|| read)
            }
        };
        let (_, report_r) = self.spawn(stdio, host)?;
        let guard = KillOnDrop(self);
        let report = fd::async_fd(report_r, Interest::READABLE).map_err(|e| os_failure(e, None))?;
        let first = match tokio::time::timeout(START_TIMEOUT, fd::read_ready(&report)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => return Err(os_failure(e, None)),
            Err(_) => {
                return Err(RtError::TimedOut(format!("pause task: not ready within {}s", START_TIMEOUT.as_secs())));
            }
        };
        if first.first() != Some(&READY) {
            let text = String::from_utf8_lossy(&first).into_owned();
            return Err(RtError::Failed(if text.is_empty() {
                "pause task: exited while starting".into()
            } else {
                text
            }));
        }
        std::mem::forget(guard);
        let mut st = self.state.lock().unwrap();
        st.report = Some(report.into_inner());
        st.reported = first[1..].to_vec();
        Ok(())
    }
    async fn started_pid(&self, _pid_file: &str) -> RtResult<i32> {
        Ok(self.pid()) // known from the fork: no pid file to write and read back
    }
    async fn start(&self, _cid: &str) -> RtResult<()> {
        Err(refuse("start after create"))
    }
    async fn exec(
        &self,
        _cid: &str,
        _process_file: &str,
        _pid_file: &str,
        _stdio: Stdio,
        _console: &str,
    ) -> RtResult<()> {
        Err(refuse("exec"))
    }
    async fn kill(&self, _cid: &str, sig: i32, _all: bool) -> RtResult<()> {
        // PID 1 of its namespace: the kernel ends every process in it when this one dies.
        let gone = || RtError::Failed("pause task: no such process".into());
        let pid = self.alive().ok_or_else(gone)?;
        // SAFETY: kill(2) of our unreaped child.
        if unsafe { libc::kill(pid, sig) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ESRCH) { gone() } else { os_failure(e, None) });
        }
        Ok(())
    }
    async fn kill_all(&self, cid: &str, sig: i32) -> RtResult<String> {
        // Never asked (signals_cgroup_itself is false); as pause.py's inherited one ends: this task's kill.
        self.kill(cid, sig, true).await.map(|_| String::new())
    }
    async fn delete(&self, _cid: &str, force: bool) -> RtResult<()> {
        if let Some(pid) = self.alive() {
            if !force {
                return Err(RtError::Failed("pause task is running: cannot delete it".into()));
            }
            self.kill_now();
            let exit = self.state.lock().unwrap().exit.take();
            let reaped = async {
                match exit {
                    Some(exit) => {
                        let _ = exit.await;
                    }
                    // Its exit goes to the service's watcher: wait for the reaper to let go of the pid.
                    None => {
                        while self.reaper.holds(pid) {
                            tokio::time::sleep(REAP_POLL).await;
                        }
                    }
                }
            };
            if tokio::time::timeout(self.timeout, reaped).await.is_err() {
                return Err(RtError::TimedOut(format!(
                    "pause task: pid {pid} not reaped within {}s of its SIGKILL",
                    self.timeout.as_secs_f64()
                )));
            }
        }
        self.log_reports();
        self.close_fds();
        let leaves = self.state.lock().unwrap().leaves.clone();
        let left = tokio::task::spawn_blocking(move || cgroupfs::remove(&leaves))
            .await
            .map_err(|e| RtError::Failed(format!("pause task: {e}")))?;
        if !left.is_empty() {
            return Err(RtError::Failed(format!("pause task: cgroups still in use: {}", cgroupfs::repr_list(&left))));
        }
        Ok(())
    }
    async fn delete_reaped(&self, cid: &str, _own_pid_ns: bool) -> RtResult<String> {
        // Never asked (deletes_reaped_itself is false); its own delete involves no runc anyway.
        self.delete(cid, true).await.map(|_| String::new())
    }
    async fn pause(&self, _cid: &str) -> RtResult<()> {
        Err(refuse("pause"))
    }
    async fn resume(&self, _cid: &str) -> RtResult<()> {
        Err(refuse("resume"))
    }
    async fn update(&self, _cid: &str, _resources_json: Vec<u8>) -> RtResult<()> {
        Err(refuse("update"))
    }
    async fn ps(&self, _cid: &str) -> RtResult<Vec<i32>> {
        Ok(self.alive().into_iter().collect())
    }
    async fn checkpoint(
        &self,
        _cid: &str,
        _image_path: &str,
        _work_path: &str,
        _leave_running: bool,
        _file_locks: bool,
    ) -> RtResult<()> {
        Err(RtError::Failed(self.checkpoint_unsupported()))
    }
    async fn restore(
        &self,
        _cid: &str,
        _bundle: &str,
        _image_path: &str,
        _work_path: &str,
        _pid_file: &str,
        _stdio: Stdio,
        _console: &str,
    ) -> RtResult<()> {
        Err(refuse("restore"))
    }
    fn close(&self) {
        self.close_fds();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    /// shimd's ocispec.pause_spec for the pod of tests/unit/test_pause_plan.py, as Python writes it.
    fn spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "user": {"uid": 65535, "gid": 65535}, "args": ["/pause", "-P"], "cwd": "/",
                        "env": ["PATH=/"], "noNewPrivileges": true,
                        "capabilities": {"bounding": [], "effective": [], "permitted": []}},
            "root": {"path": "/state/pods/p/pause/rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
            "annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "p",
                            "io.kubernetes.cri.sandbox-name": "pod", "io.kubernetes.cri.sandbox-namespace": "default",
                            "io.kubernetes.cri.sandbox-uid": "u", "io.shimd.start-on-create": "true"},
            "linux": {
                "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "network", "path": "/run/ns/net"},
                               {"type": "ipc", "path": "/run/ns/ipc"}, {"type": "uts", "path": "/run/ns/uts"}],
                "cgroupsPath": format!("/shimd/podabc/{}", "p".repeat(64)),
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "maskedPaths": ["/proc/acpi", "/proc/kcore"], "readonlyPaths": ["/proc/bus", "/proc/sys"]},
            "hostname": "pod"
        })
    }

    fn namespaces() -> BTreeMap<String, String> {
        [("network", "/run/ns/net"), ("ipc", "/run/ns/ipc"), ("uts", "/run/ns/uts")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn opts() -> RuncOptions {
        RuncOptions::new("k8s.io")
    }

    fn plan_of(spec: &Value) -> Option<PausePlan> {
        plan_for(spec, "/b", &opts(), true)
    }

    fn changed(path: &str, value: Value) -> Value {
        let mut spec = spec();
        let mut node = &mut spec;
        let keys: Vec<&str> = path.split('.').collect();
        for key in &keys[..keys.len() - 1] {
            node = node.get_mut(*key).unwrap();
        }
        node[keys[keys.len() - 1]] = value;
        spec
    }

    #[test]
    fn pause_plan_of_shimds_spec() {
        let p = plan_for(&spec(), "/state/pods/p/pause", &opts(), true).unwrap();
        assert_eq!(p.args, ["/pause", "-P"]);
        assert_eq!(p.env, ["PATH=/"]);
        assert_eq!((p.uid, p.gid, p.groups.clone()), (65535, 65535, vec![]));
        assert_eq!(p.rootfs, "/state/pods/p/pause/rootfs");
        assert_eq!(p.joined, namespaces());
        assert_eq!(p.cgroups_path, format!("/shimd/podabc/{}", "p".repeat(64)));
        // Host IPC: the pod has no IPC namespace of its own, and none is joined.
        let mut spec = spec();
        spec["linux"]["namespaces"].as_array_mut().unwrap().retain(|ns| ns["type"] != "ipc");
        let mut expected = namespaces();
        expected.remove("ipc");
        assert_eq!(plan_of(&spec).unwrap().joined, expected);
        // plan() reads the flavor from the environment (not changed here: other tests' threads read it).
        let flavor_is_runc = std::env::var_os("SHIMD_RUNTIME_FLAVOR").is_none_or(|f| f == "runc");
        assert_eq!(plan(&spec, "/b", &opts()).is_some(), flavor_is_runc);
    }

    #[test]
    fn pause_plan_anything_more_goes_to_runc() {
        let cases: Vec<(&str, Value)> = vec![
            ("process.user.uid", json!(0)), // root: runc's business, never a forked process
            ("process.noNewPrivileges", json!(false)),
            ("process.capabilities", json!({"bounding": ["CAP_SYS_ADMIN"], "effective": [], "permitted": []})),
            ("process.terminal", json!(true)),
            ("process.args", json!(["pause"])), // not an absolute path
            ("process.args", json!([])),
            ("process.cwd", json!("/tmp")),
            ("process.rlimits", json!([{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1}])),
            ("root.readonly", json!(false)),
            ("mounts", json!([{"destination": "/etc", "type": "bind", "source": "/etc", "options": ["rbind"]}])),
            ("linux.seccomp", json!({"defaultAction": "SCMP_ACT_ERRNO"})),
            ("linux.cgroupsPath", json!("system.slice:shimd:abc")), // systemd driver
            ("linux.cgroupsPath", json!("/shimd/../../etc")),
            ("linux.resources", json!({"memory": {"limit": 1 << 20}})),
            ("linux.namespaces", json!([{"type": "mount"}, {"type": "pid"}, {"type": "user", "path": "/run/ns/user"}])),
            ("linux.namespaces", json!([{"type": "mount"}, {"type": "pid", "path": "/proc/1/ns/pid"}])),
            ("linux.namespaces", json!([{"type": "mount"}])), // no PID namespace of its own
            ("hooks", json!({"prestart": [{"path": "/bin/true"}]})),
            ("annotations", json!({"io.kubernetes.cri.container-type": "container"})),
            ("process", json!("not an object")),
            // Beyond the Python test: what pause.py would raise on (None), and what this port refuses more.
            ("linux.namespaces", json!([{"type": "mount"}, {"type": "pid"}, {"type": "network"}])),
            ("linux.namespaces", json!("mount")),
            ("linux.cgroupsPath", json!("/")), // the hierarchy's root: never a pod's to remove
            ("linux.cgroupsPath", json!(5)),
            ("process.user.uid", json!(-1)), // setresuid(-1) would keep root
            ("process.user.uid", json!("65535")),
            ("process.user.gid", json!("x")),
            ("process.user", json!({"uid": 1, "gid": 1, "umask": 0})),
            ("process.user.additionalGids", json!([null])),
            ("process.args", json!(["/pause", 1])),
            ("mounts", json!([{"type": "proc"}])),
            ("annotations", json!(null)),
            ("annotations", json!(["io.kubernetes.cri.container-type"])),
            ("root", json!({"readonly": true})),
        ];
        for (path, value) in cases {
            assert!(plan_of(&changed(path, value.clone())).is_none(), "{path} = {value}");
        }
        let mut no_linux = spec();
        no_linux.as_object_mut().unwrap().remove("linux");
        assert!(plan_of(&no_linux).is_none());
    }

    #[test]
    fn pause_plan_reads_values_as_python_does() {
        let p = plan_of(&changed("root.path", json!("rootfs"))).unwrap();
        assert_eq!(p.rootfs, "/b/rootfs");
        assert_eq!(plan_for(&changed("root.path", json!("rootfs")), "/b/", &opts(), true).unwrap().rootfs, "/b/rootfs");
        let p = plan_of(&changed("process.user.additionalGids", json!([5, "6", 7.0, true]))).unwrap();
        assert_eq!(p.groups, [5, 6, 7, 1]);
        assert_eq!(plan_of(&changed("process.user.gid", json!("100"))).unwrap().gid, 100);
        // Falsy values count as absent.
        for (path, value) in [
            ("process.capabilities", json!(null)),
            ("mounts", json!([])),
            ("linux.resources", json!({})),
            ("process.env", json!(null)),
            ("process.terminal", json!(0)),
            ("annotations.x", json!(1)),
        ] {
            assert!(plan_of(&changed(path, value.clone())).is_some(), "{path} = {value}");
        }
        assert!(plan_of(&changed("linux.resources", json!(["devices"]))).is_some());
        assert_eq!(plan_of(&changed("process.env", json!(["A=1", 5, "B"]))).unwrap().env, ["A=1", "5", "B"]);
    }

    #[test]
    fn pause_plan_user_namespace_pods_go_to_runc() {
        let mut spec = spec();
        spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user", "path": "/run/ns/user"}));
        spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        assert!(plan_of(&spec).is_none());
    }

    #[test]
    fn pause_plan_other_runtimes_and_systemd_cgroups_go_to_runc() {
        let mut o = opts();
        o.systemd_cgroup = true;
        assert!(plan_for(&spec(), "/b", &o, true).is_none());
        assert!(plan_for(&spec(), "/b", &opts(), false).is_none());
    }

    #[test]
    fn pause_child_messages_read_as_pythons() {
        let table: Vec<Vec<u8>> = (0..200).map(|n| cgroupfs::strerror(n).into_bytes()).collect();
        let text = |f: Fail| {
            let mut m = Msg { buf: [0; 4096], len: 0 };
            m.fail(&f, &table);
            String::from_utf8(m.buf[..m.len].to_vec()).unwrap()
        };
        assert_eq!(text(Fail::OsPath(2, b"/x")), "[Errno 2] No such file or directory: '/x'");
        assert_eq!(text(Fail::OsWhat(1, b"pivot_root")), "[Errno 1] pivot_root: Operation not permitted");
        assert_eq!(text(Fail::Cap(22, 40)), "[Errno 22] drop capability 40: Invalid argument");
        assert_eq!(text(Fail::Os(9)), "[Errno 9] Bad file descriptor");
        assert_eq!(text(Fail::Os(4321)), "[Errno 4321] Unknown error 4321");
        let mut m = Msg { buf: [0; 4096], len: 0 };
        m.push(&[b'x'; 5000]);
        assert_eq!(m.len, 4096);
    }

    // ---- a real pause task ----

    const CATATONIT: &str = "/usr/bin/catatonit";

    struct Scratch {
        dir: String,
        cgroup_parent: String,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            // A failed assertion may leave a task running: its cgroup could not be removed.
            let procs = format!("/sys/fs/cgroup/memory{}/pod/cgroup.procs", self.cgroup_parent);
            for pid in std::fs::read_to_string(procs).unwrap_or_default().split_whitespace() {
                if let Ok(pid @ 1..) = pid.parse::<i32>() {
                    // SAFETY: kill(2) of a test's own pause task.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            let _ = std::fs::remove_dir_all(&self.dir);
            for (point, _, _) in cgroupfs::mounts() {
                let parent = format!("{point}{}", self.cgroup_parent);
                let _ = cgroupfs::remove(&[parent]);
            }
        }
    }

    fn status_field(pid: i32, name: &str) -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or("").trim().to_string()
    }

    fn pid_ns_for_children() -> (std::path::PathBuf, std::path::PathBuf) {
        (
            std::fs::read_link("/proc/thread-self/ns/pid_for_children").unwrap(),
            std::fs::read_link("/proc/self/ns/pid").unwrap(),
        )
    }

    fn signal_mask() -> Vec<i32> {
        // SAFETY: reads this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            (1..=64).filter(|s| libc::sigismember(&set, *s) == 1).collect()
        }
    }

    fn err_text<T: std::fmt::Debug>(r: RtResult<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn pause_task_forked_for_real() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0
            || !Path::new(CATATONIT).exists()
            || !Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists()
        {
            eprintln!("skipped: needs root, {CATATONIT} and the cgroup v1 hierarchies");
            return;
        }
        let _one = crate::reaper::one_reaper_at_a_time();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(real_pause_task());
    }

    async fn real_pause_task() {
        let reaper = Reaper::new();
        let _reaping = reaper.start().unwrap();
        let me = std::process::id();
        let scratch =
            Scratch { dir: format!("/tmp/shimd-pause-test-{me}"), cgroup_parent: format!("/shimd-pause-test-{me}") };
        let rootfs = format!("{}/rootfs", scratch.dir);
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::copy(CATATONIT, format!("{rootfs}/catatonit")).unwrap();
        let cgroups_path = format!("{}/pod", scratch.cgroup_parent);
        let make = |args: Value, net: &str, env: Value| {
            let mut s = spec();
            s["root"]["path"] = json!(rootfs);
            s["process"]["args"] = args;
            s["process"]["env"] = env;
            s["linux"]["cgroupsPath"] = json!(cgroups_path);
            s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "pid"}, {"type": "network", "path": net},
                                              {"type": "ipc", "path": "/proc/self/ns/ipc"},
                                              {"type": "uts", "path": "/proc/self/ns/uts"}]);
            let p = plan_for(&s, &scratch.dir, &opts(), true).unwrap();
            PauseRuntime::new(
                reaper.clone(),
                opts(),
                "/dev/null".into(),
                Duration::from_secs(5),
                p,
                Logger::new(None, "", &[]),
            )
        };
        let good = || make(json!(["/catatonit", "-P"]), "/proc/self/ns/net", json!(["PATH=/"]));
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let stdio = [null.as_raw_fd(); 3];
        let leaves: Vec<String> = cgroupfs::mounts()
            .iter()
            .filter(|(_, _, o)| !o.iter().any(|o| o.starts_with("name=") && o != "name=systemd"))
            .map(|(point, _, _)| format!("{point}{cgroups_path}"))
            .collect();

        // Started: PID 1 of its own PID namespace, nothing held, in its cgroups.
        let task = good();
        let mask = signal_mask();
        task.run_detached("pause", &scratch.dir, "", stdio, "").await.unwrap();
        assert_eq!(signal_mask(), mask, "the shim's signal mask is restored after the fork");
        let (children, own) = pid_ns_for_children();
        assert_eq!(children, own, "the shim's later children are made in its own PID namespace");
        let pid = task.started_pid("").await.unwrap();
        let exit = task.watch_exit(pid);
        for _ in 0..500 {
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() == "catatonit" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "catatonit");
        let nspid = status_field(pid, "NSpid");
        assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), [pid.to_string().as_str(), "1"], "{nspid}");
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(u64::from_str_radix(&status_field(pid, field), 16).unwrap(), 0, "{field}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Uid").split_whitespace().collect::<Vec<_>>(), ["65535"; 4]);
        assert_eq!(status_field(pid, "Gid").split_whitespace().collect::<Vec<_>>(), ["65535"; 4]);
        assert_eq!(status_field(pid, "Groups"), "");
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let lines: Vec<&str> = mountinfo.lines().collect();
        assert_eq!(lines.len(), 1, "{mountinfo}");
        let fields: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(fields[4], "/");
        assert!(fields[5].split(',').any(|o| o == "ro"), "{mountinfo}");
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for controller in [":memory:", ":cpuset:", ":name=systemd:", "0::"] {
            let line = cgroup.lines().find(|l| l.contains(controller)).unwrap();
            assert!(line.ends_with(&cgroups_path), "{controller} {cgroup}");
        }
        // Only stdio reaches the pause process (catatonit makes its own signalfd).
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).unwrap().to_string_lossy().into_owned())
            .collect();
        let nulls = fds.iter().filter(|t| *t == "/dev/null").count();
        assert!(nulls == 3 && fds.iter().all(|t| t == "/dev/null" || t == "anon_inode:[signalfd]"), "{fds:?}");
        // Each new cpuset level got its parent's cpus and mems (an empty cpuset takes no process).
        for name in ["cpuset.cpus", "cpuset.mems"] {
            let read = |dir: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/cpuset{dir}/{name}")).unwrap();
            assert_eq!(read(&cgroups_path), read(""), "{name}");
        }
        assert_eq!(task.ps("pause").await.unwrap(), [pid]);
        assert_eq!(err_text(task.delete("pause", false).await), "pause task is running: cannot delete it");
        assert_eq!(
            err_text(task.create("pause", "", "", stdio, "").await),
            "create without start is not supported for the pod's pause task"
        );
        assert_eq!(err_text(task.start("pause").await), "start after create is not supported for the pod's pause task");
        assert_eq!(
            err_text(task.exec("pause", "", "", stdio, "").await),
            "exec is not supported for the pod's pause task"
        );
        assert_eq!(err_text(task.update("pause", vec![]).await), "update is not supported for the pod's pause task");
        assert_eq!(err_text(task.checkpoint("pause", "", "", false, false).await), task.checkpoint_unsupported());
        assert_eq!(task.label(), "shim");
        // Killed through its pid; its exit reaches the watcher; delete removes its cgroups.
        task.kill("pause", libc::SIGKILL, false).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), exit).await.unwrap().unwrap().status;
        assert_eq!(status, 137);
        assert_eq!(err_text(task.kill("pause", libc::SIGTERM, false).await), "pause task: no such process");
        assert!(task.ps("pause").await.unwrap().is_empty());
        assert!(leaves.iter().all(|l| Path::new(l).is_dir()));
        task.delete("pause", false).await.unwrap();
        assert!(leaves.iter().all(|l| !Path::new(l).exists()), "cgroups left: {leaves:?}");

        // A forced delete while it runs: with its exit watched by the caller (the service), and without (the
        // cleanup of a failed Create).
        for watched in [true, false] {
            let task = good();
            task.run_detached("pause", &scratch.dir, "", stdio, "").await.unwrap();
            let pid = task.started_pid("").await.unwrap();
            let exit = watched.then(|| task.watch_exit(pid));
            tokio::time::timeout(Duration::from_secs(5), task.delete("pause", true)).await.unwrap().unwrap();
            assert!(!reaper.holds(pid));
            if let Some(exit) = exit {
                assert_eq!(exit.await.unwrap().status, 137);
            }
            assert!(leaves.iter().all(|l| !Path::new(l).exists()), "cgroups left: {leaves:?}");
        }

        // Failures before READY fail the Create, with pause.py's texts.
        let missing = make(json!(["/missing"]), "/proc/self/ns/net", json!([]));
        assert_eq!(
            err_text(missing.run_detached("pause", &scratch.dir, "", stdio, "").await),
            "pause task: exec: /missing is not an executable file in the pause rootfs"
        );
        missing.delete("pause", true).await.unwrap();
        let bad_ns = make(json!(["/catatonit", "-P"]), "/nonexistent", json!([]));
        assert_eq!(
            err_text(bad_ns.run_detached("pause", &scratch.dir, "", stdio, "").await),
            "pause task: join network namespace /nonexistent: [Errno 2] No such file or directory: '/nonexistent'"
        );
        bad_ns.delete("pause", true).await.unwrap();
        assert_eq!(
            err_text(good().run_detached("pause", &scratch.dir, "", stdio, "/run/console.sock").await),
            "a terminal is not supported for the pod's pause task"
        );

        // A failure after READY (here at exec) is the process's exit, and its text is kept for delete's log.
        let late = make(json!(["/catatonit", "-P"]), "/proc/self/ns/net", json!(["=x"]));
        late.run_detached("pause", &scratch.dir, "", stdio, "").await.unwrap();
        let pid = late.started_pid("").await.unwrap();
        let exit = late.watch_exit(pid);
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), exit).await.unwrap().unwrap().status, 127);
        assert_eq!(
            String::from_utf8_lossy(&late.take_reports()),
            "pause task: exec: illegal environment variable name"
        );
        late.delete("pause", false).await.unwrap();
        assert!(leaves.iter().all(|l| !Path::new(l).exists()), "cgroups left: {leaves:?}");

        // It dies with its shim: the parent-death signal fires when the thread that forked it ends.
        let (dir, spec_rootfs, cg, r) = (scratch.dir.clone(), rootfs.clone(), cgroups_path.clone(), reaper.clone());
        let fd = null.as_raw_fd();
        let (pid, exit) = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut s = spec();
                s["root"]["path"] = json!(spec_rootfs);
                s["process"]["args"] = json!(["/catatonit", "-P"]);
                s["linux"]["cgroupsPath"] = json!(cg);
                s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "pid"}]);
                let task = PauseRuntime::new(
                    r,
                    opts(),
                    "/dev/null".into(),
                    Duration::from_secs(5),
                    plan_for(&s, &dir, &opts(), true).unwrap(),
                    Logger::new(None, "", &[]),
                );
                task.run_detached("pause", &dir, "", [fd; 3], "").await.unwrap();
                let pid = task.started_pid("").await.unwrap();
                (pid, task.watch_exit(pid))
            })
        })
        .join()
        .unwrap();
        assert!(pid > 0);
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), exit).await.unwrap().unwrap().status, 137);
        drop(scratch);
    }
}
