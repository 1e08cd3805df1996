//! `runc kill --all` of a container that shares a PID namespace, done without a runc process; port of
//! shims/runc/cgroup_kill.py (see there for why and the measurements).
//!
//! As runc does: freeze the cgroup (nothing forks, exits or recycles a pid while it is read), signal
//! every pid in it and its sub-cgroups, thaw. Taken only for runc with its cgroupfs driver and state
//! layout, on a cgroup v1 freezer; anything else returns the reason and the caller runs runc.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::cgroupfs::{self, join, os_error_text, repr, strip};
use crate::runc_state;

const FREEZE_TIME_LIMIT: Duration = Duration::from_secs(1); // runc gives up on a freezer after about as long
const FREEZE_POLL: Duration = Duration::from_micros(500);

/// Signals every process of the container's cgroup (blocking); "" when done, else why runc must.
pub fn signal_all(root: &str, cid: &str, sig: i32) -> String {
    let (paths, why) = runc_state::cgroup_paths(root, cid);
    if !why.is_empty() {
        return why;
    }
    let freezer = paths.get("freezer").cloned().unwrap_or_default();
    if !cgroupfs::mounts().iter().any(|(point, kind, options)| {
        freezer.starts_with(&format!("{point}/")) && kind == "cgroup" && options.contains("freezer")
    }) {
        return format!("freezer cgroup {} is not under a cgroup v1 freezer mount", repr(&freezer));
    }
    let state = join(&[&freezer, "freezer.state"]);
    match std::fs::read(&state) {
        Ok(s) if strip(&s) != b"THAWED" => return "its freezer is not thawed (paused, or being paused)".into(),
        Ok(_) => {}
        Err(e) => return format!("freezer state unreadable: {}", os_error_text(&e, Some(&state))),
    }
    let mut why = match freeze(&state).and_then(|why| {
        if why.is_empty() {
            signal_pids(&freezer, sig)?;
        }
        Ok(why)
    }) {
        Ok(why) => why,
        Err(e) => format!("freezer: {e}"),
    };
    if let Err(e) = write(&state, b"THAWED") {
        if why.is_empty() {
            why = format!("thawing failed: {e}");
        }
    }
    why
}

/// An OSError's text as Python prints it, carried as the error.
type PyResult<T> = Result<T, String>;

/// FROZEN written until the freezer reports it (the kernel answers FREEZING while tasks settle).
fn freeze(state: &str) -> PyResult<String> {
    let deadline = Instant::now() + FREEZE_TIME_LIMIT;
    loop {
        write(state, b"FROZEN")?;
        let now = std::fs::read(state).map_err(|e| os_error_text(&e, Some(state)))?;
        if strip(&now) == b"FROZEN" {
            return Ok(String::new());
        }
        if Instant::now() > deadline {
            return Ok(format!("freezer did not report FROZEN within {}s", FREEZE_TIME_LIMIT.as_secs()));
        }
        std::thread::sleep(FREEZE_POLL);
    }
}

fn write(path: &str, data: &[u8]) -> PyResult<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| os_error_text(&e, Some(path)))?;
    // One write(2), as os.write: the kernel takes the state from it.
    f.write(data).map(|_| ()).map_err(|e| os_error_text(&e, None))
}

/// Signals every pid of the (frozen) cgroup and its sub-cgroups, top-down as os.walk lists them.
fn signal_pids(cgroup: &str, sig: i32) -> PyResult<()> {
    let mut stack = vec![cgroup.to_string()];
    while let Some(dir) = stack.pop() {
        let procs = join(&[&dir, "cgroup.procs"]);
        match std::fs::read(&procs) {
            Ok(listed) => {
                for p in String::from_utf8_lossy(&listed).split_whitespace() {
                    let Ok(pid) = p.parse::<i32>() else { continue };
                    // SAFETY: kill with integer arguments; the frozen pid cannot be recycled meanwhile.
                    if unsafe { libc::kill(pid, sig) } != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::ESRCH) {
                            return Err(os_error_text(&e, None));
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(os_error_text(&e, Some(&procs))),
        }
        // os.walk ignores a directory it cannot list; sub-directories are visited in listing order.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let subs: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path().to_string_lossy().into_owned())
                .collect();
            stack.extend(subs.into_iter().rev());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::tests::{TempDir, TestCgroup};
    use std::process::{Child, Command};

    fn state_for(root: &TempDir, cid: &str, freezer: &str) {
        std::fs::create_dir_all(root.path(cid)).unwrap();
        std::fs::write(
            root.path(&format!("{cid}/state.json")),
            serde_json::json!({"cgroup_paths": {"freezer": freezer}}).to_string(),
        )
        .unwrap();
    }

    /// Sleepers killed and collected whatever the test's outcome (their cgroups thawed first: a frozen
    /// task does not die of SIGKILL until thawed). No other test's reaper runs meanwhile to take them.
    struct Sleepers(Vec<Child>, Vec<String>, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

    impl Sleepers {
        fn new() -> Self {
            Sleepers(Vec::new(), Vec::new(), crate::reaper::one_reaper_at_a_time())
        }

        fn start(&mut self, cgroup: Option<&str>) -> usize {
            let c = Command::new("sleep").arg("1000").spawn().unwrap();
            if let Some(cg) = cgroup {
                self.1.push(cg.to_string());
                std::fs::write(format!("{cg}/cgroup.procs"), c.id().to_string()).unwrap();
            }
            self.0.push(c);
            self.0.len() - 1
        }

        /// The child's death signal, None while it lives.
        fn wait_signal(&mut self, i: usize, timeout: Duration) -> Option<i32> {
            use std::os::unix::process::ExitStatusExt;
            let deadline = Instant::now() + timeout;
            loop {
                match self.0[i].try_wait() {
                    Ok(Some(st)) => return Some(st.signal().unwrap_or(-1)),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                    Ok(None) => return None,
                    Err(e) => panic!("waiting for the test's sleeper: {e}"),
                }
            }
        }
    }

    impl Drop for Sleepers {
        fn drop(&mut self) {
            for cg in &self.1 {
                let _ = std::fs::write(format!("{cg}/freezer.state"), "THAWED");
            }
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    #[test]
    fn cgroup_kill_every_process_of_the_cgroup_and_its_sub_cgroups_gets_the_signal_and_it_is_thawed() {
        let Some(cg) = TestCgroup::new("freezer") else { return };
        let root = TempDir::new("cgroup-kill");
        std::fs::create_dir(format!("{}/sub", cg.0)).unwrap();
        let mut s = Sleepers::new();
        let a = s.start(Some(&cg.0));
        let b = s.start(Some(&format!("{}/sub", cg.0)));
        let outsider = s.start(None);
        state_for(&root, "c1", &cg.0);
        assert_eq!(signal_all(&root.0, "c1", libc::SIGTERM), "");
        for i in [a, b] {
            let sig = s.wait_signal(i, Duration::from_secs(10));
            assert_eq!(sig, Some(libc::SIGTERM));
        }
        assert_eq!(s.wait_signal(outsider, Duration::ZERO), None);
        assert_eq!(strip(&std::fs::read(format!("{}/freezer.state", cg.0)).unwrap()), b"THAWED");
    }

    #[test]
    fn cgroup_kill_a_frozen_cgroup_is_left_to_runc_untouched() {
        let Some(cg) = TestCgroup::new("freezer") else { return };
        let root = TempDir::new("cgroup-kill");
        let mut s = Sleepers::new();
        let p = s.start(Some(&cg.0));
        let state = format!("{}/freezer.state", cg.0);
        std::fs::write(&state, "FROZEN").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while strip(&std::fs::read(&state).unwrap()) != b"FROZEN" {
            assert!(Instant::now() < deadline, "the test's cgroup did not freeze");
            std::thread::sleep(Duration::from_millis(10));
        }
        state_for(&root, "c1", &cg.0);
        assert!(signal_all(&root.0, "c1", libc::SIGKILL).contains("not thawed"));
        assert_eq!(strip(&std::fs::read(&state).unwrap()), b"FROZEN"); // still paused
        std::fs::write(&state, "THAWED").unwrap();
        assert_eq!(s.wait_signal(p, Duration::ZERO), None);
    }

    #[test]
    fn cgroup_kill_without_a_v1_freezer_path_or_with_unknown_state_runc_does_it() {
        let root = TempDir::new("cgroup-kill");
        std::fs::create_dir(root.path("a")).unwrap();
        std::fs::write(root.path("a/state.json"), r#"{"cgroup_paths": {"memory": "/sys/fs/cgroup/memory/x"}}"#)
            .unwrap();
        assert_eq!(signal_all(&root.0, "a", libc::SIGKILL), "freezer cgroup '' is not under a cgroup v1 freezer mount");
        std::fs::create_dir(root.path("b")).unwrap();
        std::fs::write(root.path("b/state.json"), r#"{"cgroup_paths": {"freezer": "/tmp/x"}}"#).unwrap();
        assert_eq!(signal_all(&root.0, "b", libc::SIGKILL), "cgroup path '/tmp/x' is not under a cgroup mount");
        assert!(signal_all(&root.0, "missing", libc::SIGKILL).contains("unreadable"));
    }
}
