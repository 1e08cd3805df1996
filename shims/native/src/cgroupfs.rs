//! The host's cgroup mounts and cgroup removal, for the shim's own cgroup work (pause.rs, cgroup_lock.rs,
//! reaped_delete.rs, cgroup_kill.rs); port of shims/runc/cgroupfs.py.
//!
//! Also the few Python-compatible text and path helpers these ports share: the reasons they return are
//! logged and compared with the Python shim's, so they are worded as Python would print them.

use std::collections::HashSet;
use std::io;
use std::sync::Mutex;
use std::thread::sleep;
use std::time::Duration;

/// runc retries a busy cgroup 5 times, 10 ms apart and doubling; an exiting task leaves it within the first.
const BUSY_RETRIES: u32 = 4;
const BUSY_WAIT: Duration = Duration::from_millis(10);

pub type CgroupMount = (String, String, HashSet<String>);

static MOUNTS: Mutex<Vec<CgroupMount>> = Mutex::new(Vec::new());

/// (mount point, "cgroup" or "cgroup2", super options) of every cgroup mount, in mountinfo's order; empty
/// when mountinfo is unreadable (see try_mounts).
pub fn mounts() -> Vec<(String, String, HashSet<String>)> {
    try_mounts().unwrap_or_default()
}

/// mounts(), with mountinfo's read error. Read once per shim for all its users (hierarchies are mounted
/// at boot, and mountinfo lists every mount of the node, pods' included); an empty result is read again.
pub fn try_mounts() -> io::Result<Vec<CgroupMount>> {
    let mut cached = MOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    if cached.is_empty() {
        *cached = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?);
    }
    Ok(cached.clone())
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut found = Vec::new();
    for line in text.lines() {
        let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
        let fields: Vec<&str> = right.split_whitespace().collect();
        if let Some(&kind) = fields.first() {
            if kind == "cgroup" || kind == "cgroup2" {
                let options = fields.get(2).map(|o| o.split(',').map(String::from).collect()).unwrap_or_default();
                if let Some(point) = left.split_whitespace().nth(4) {
                    found.push((point.to_string(), kind.to_string(), options));
                }
            }
        }
    }
    found
}

/// Removes each cgroup with its sub-cgroups (blocking); returns the ones still there after the retries.
pub fn remove(paths: &[String]) -> Vec<String> {
    let mut left: Vec<String> = paths.to_vec();
    for attempt in 0..=BUSY_RETRIES {
        if attempt > 0 {
            sleep(BUSY_WAIT * attempt);
        }
        left.retain(|p| !remove_tree(p));
        if left.is_empty() {
            break;
        }
    }
    left
}

/// rmdir of a cgroup, after its sub-cgroups (a cgroup directory lists only control files besides).
fn remove_tree(path: &str) -> bool {
    match std::fs::remove_dir(path) {
        Ok(()) => return true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) => return false,
        Err(_) => {}
    }
    let subs: Vec<String> = match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
        Err(_) => return false,
    };
    // Every sub-cgroup is tried, even after one failed (the next retry then has less to do).
    let results: Vec<bool> = subs.iter().map(|s| remove_tree(s)).collect();
    if !results.into_iter().all(|ok| ok) {
        return false;
    }
    match std::fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

// ---- Python-compatible paths and texts ----

/// os.path.join(a, b, ...): an absolute part restarts the path; an empty last part leaves a trailing '/'.
pub fn join(parts: &[&str]) -> String {
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        if p.starts_with('/') {
            out = p.to_string();
        } else if i == 0 || out.is_empty() || out.ends_with('/') {
            out.push_str(p);
        } else {
            out.push('/');
            out.push_str(p);
        }
    }
    out
}

/// os.path.normpath (POSIX): lexical, keeping a leading "//" as POSIX allows.
pub fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let initial = if path.starts_with("//") && !path.starts_with("///") {
        2
    } else if path.starts_with('/') {
        1
    } else {
        0
    };
    let mut comps: Vec<&str> = Vec::new();
    for c in path.split('/') {
        if c.is_empty() || c == "." {
            continue;
        }
        if c != ".." || (initial == 0 && comps.is_empty()) || comps.last() == Some(&"..") {
            comps.push(c);
        } else if !comps.is_empty() {
            comps.pop();
        }
    }
    let out = "/".repeat(initial) + &comps.join("/");
    if out.is_empty() {
        ".".into()
    } else {
        out
    }
}

/// The C library's text for errno n, as os.strerror gives it.
pub fn strerror(n: i32) -> String {
    let s = io::Error::from_raw_os_error(n).to_string();
    match s.strip_suffix(&format!(" (os error {n})")) {
        Some(t) => t.to_string(),
        None => s,
    }
}

/// str() of the OSError Python raises for e (with the filename the call named, if it names one).
pub fn os_error_text(e: &io::Error, filename: Option<&str>) -> String {
    match (e.raw_os_error(), filename) {
        (Some(n), Some(f)) => format!("[Errno {n}] {}: {}", strerror(n), repr(f)),
        (Some(n), None) => format!("[Errno {n}] {}", strerror(n)),
        _ => e.to_string(),
    }
}

/// An io::Error reading as Python's OSError(errno, message) does: "[Errno N] message".
pub fn os_error(n: i32, message: &str) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(n).kind(), format!("[Errno {n}] {message}"))
}

/// repr() of a str.
pub fn repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// repr() of a list of str: "['a', 'b']".
pub fn repr_list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| repr(s)).collect::<Vec<_>>().join(", "))
}

/// repr() of what json.load made of a JSON value.
pub fn repr_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                format!("{f:.1}")
            } else {
                format!("{f:?}")
            }
        }
        Value::Number(n) => n.to_string(),
        Value::String(s) => repr(s),
        Value::Array(a) => format!("[{}]", a.iter().map(repr_json).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            format!(
                "{{{}}}",
                o.iter().map(|(k, v)| format!("{}: {}", repr(k), repr_json(v))).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// Python's truth value of what json.load made of a JSON value.
pub fn truthy(v: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().map(|f| f != 0.0).unwrap_or(true),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// bytes.strip(): ASCII whitespace, vertical tab included.
pub fn strip(b: &[u8]) -> &[u8] {
    let ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let start = b.iter().position(|c| !ws(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !ws(c)).map(|i| i + 1).unwrap_or(start);
    &b[start..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under /tmp, removed (after unmounting anything left on it) when dropped.
    pub(crate) struct TempDir(pub String);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = format!("/tmp/shimd-native-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub(crate) fn path(&self, rel: &str) -> String {
            join(&[&self.0, rel])
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Anything a failed test left mounted under it goes first: never delete through a mount.
            if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
                let mut points: Vec<String> = info
                    .lines()
                    .filter_map(|l| l.split(' ').nth(4).map(String::from))
                    .filter(|p| p == &self.0 || p.starts_with(&format!("{}/", self.0)))
                    .collect();
                points.sort_by_key(|p| std::cmp::Reverse(p.len()));
                for p in points {
                    let c = std::ffi::CString::new(p).unwrap();
                    // SAFETY: umount2 with a valid C string.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A cgroup created in a test (sub-cgroups allowed), removed when dropped.
    pub(crate) struct TestCgroup(pub String);

    impl TestCgroup {
        pub(crate) fn new(hierarchy: &str) -> Option<Self> {
            static N: AtomicU32 = AtomicU32::new(0);
            let base = format!("/sys/fs/cgroup/{hierarchy}");
            if !std::path::Path::new(&format!("{base}/cgroup.procs")).exists() {
                return None;
            }
            let p = format!("{base}/shimd-native-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
            std::fs::create_dir(&p).ok()?;
            Some(TestCgroup(p))
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::write(format!("{}/freezer.state", self.0), "THAWED");
            let _ = remove(std::slice::from_ref(&self.0));
        }
    }

    #[test]
    fn cgroupfs_mounts_are_the_cgroup_lines_of_mountinfo() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].0.as_str(), m[0].1.as_str()), ("/sys/fs/cgroup/freezer", "cgroup"));
        assert!(m[0].2.contains("freezer") && m[0].2.contains("rw"));
        assert!(m[1].2.contains("name=systemd"));
        assert_eq!((m[2].0.as_str(), m[2].1.as_str()), ("/sys/fs/cgroup/unified", "cgroup2"));
        // The host's own list: every entry is a cgroup mount.
        for (_, kind, _) in mounts() {
            assert!(kind == "cgroup" || kind == "cgroup2");
        }
    }

    #[test]
    fn cgroupfs_remove_takes_sub_cgroups_first_and_reports_what_stays() {
        let Some(cg) = TestCgroup::new("pids") else { return };
        std::fs::create_dir_all(format!("{}/a/b", cg.0)).unwrap();
        std::fs::create_dir(format!("{}/c", cg.0)).unwrap();
        assert!(remove(&[cg.0.clone(), format!("{}-missing", cg.0)]).is_empty());
        assert!(!std::path::Path::new(&cg.0).exists());
        // A plain directory with a file is neither busy nor a cgroup: it stays, reported at once.
        let t = TempDir::new("cgroupfs");
        std::fs::create_dir(t.path("d")).unwrap();
        std::fs::write(t.path("d/f"), "x").unwrap();
        assert_eq!(remove(&[t.path("d")]), vec![t.path("d")]);
    }

    #[test]
    fn cgroupfs_python_texts() {
        assert_eq!(join(&["/a", ""]), "/a/");
        assert_eq!(join(&["/a/", "b", "c"]), "/a/b/c");
        assert_eq!(join(&["/a", "/b"]), "/b");
        for (p, n) in [
            ("", "."),
            ("/a/../../b", "/b"),
            ("a/../..", ".."),
            ("//a/./b/", "//a/b"),
            ("///a", "/a"),
            ("/sys/fs/cgroup/memory/../../../tmp", "/sys/tmp"),
            ("/", "/"),
        ] {
            assert_eq!(normpath(p), n, "{p}");
        }
        assert_eq!(repr("a/b"), "'a/b'");
        assert_eq!(repr("it's"), "\"it's\"");
        assert_eq!(repr_list(&["/x".into(), "/y".into()]), "['/x', '/y']");
        assert_eq!(repr_json(&serde_json::json!(7)), "7");
        assert_eq!(repr_json(&serde_json::json!(null)), "None");
        assert_eq!(repr_json(&serde_json::json!([1.0, true, {"a": "b"}])), "[1.0, True, {'a': 'b'}]");
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_error_text(&e, Some("/x")), "[Errno 2] No such file or directory: '/x'");
        assert_eq!(os_error(libc::EBUSY, "unmount /x: boom").to_string(), "[Errno 16] unmount /x: boom");
        assert_eq!(strip(b" \x0bTHAWED\n"), b"THAWED");
        assert_eq!(strip(b"\n"), b"");
    }
}
