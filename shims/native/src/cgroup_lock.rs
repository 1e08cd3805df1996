//! Takes the kernel's cgroup migration lock while runc starts, so runc does not wait for it; port of
//! shims/runc/cgroup_lock.py (see there for the measurements).
//!
//! The first cgroup move after a quiet spell waits for an RCU grace period; moves within the next one do
//! not. `runc run` moves the container's init some milliseconds after it starts, so the shim moves itself
//! into the cgroup it is already in (nothing changes, the same lock is taken) as it starts runc.

use std::io::{self, Write};
use std::sync::Mutex;

use crate::cgroupfs::{self, join};

/// cgroup.procs of the shim's own cgroup, once found ("" when there is none).
static PROCS_FILE: Mutex<Option<String>> = Mutex::new(None);

/// cgroup.procs of the process's own cgroup in one hierarchy (the unified one if mounted); "" if none.
fn find() -> io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let own: Vec<Vec<&str>> =
        text.lines().filter(|l| l.matches(':').count() >= 2).map(|l| l.splitn(3, ':').collect()).collect();
    let mounts = cgroupfs::try_mounts()?;
    for (point, kind, _) in &mounts {
        if kind == "cgroup2" {
            for f in &own {
                if f[0] == "0" && f[1].is_empty() {
                    return Ok(join(&[point, f[2].trim_start_matches('/'), "cgroup.procs"]));
                }
            }
        }
    }
    for (point, kind, options) in &mounts {
        if kind == "cgroup" {
            for f in &own {
                if !f[1].is_empty() && f[1].split(',').all(|c| options.contains(c)) {
                    return Ok(join(&[point, f[2].trim_start_matches('/'), "cgroup.procs"]));
                }
            }
        }
    }
    Ok(String::new())
}

/// Moves the shim into the cgroup it is already in (blocking; never fails: it only saves time).
pub fn take() {
    let _ = (|| -> io::Result<()> {
        let procs = {
            let mut cached = PROCS_FILE.lock().unwrap_or_else(|e| e.into_inner());
            if cached.is_none() {
                *cached = Some(find()?); // not kept when unreadable: tried again next time
            }
            cached.clone().unwrap_or_default()
        };
        if !procs.is_empty() {
            std::fs::File::create(&procs)?.write_all(std::process::id().to_string().as_bytes())?;
        }
        Ok(())
    })();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_lock_the_move_targets_the_processs_own_cgroup_and_changes_nothing() {
        let procs = find().unwrap();
        assert!(procs.ends_with("/cgroup.procs") && std::path::Path::new(&procs).is_file(), "{procs}");
        let me = std::process::id().to_string();
        let listed = || std::fs::read_to_string(&procs).unwrap();
        assert!(listed().split_whitespace().any(|p| p == me));
        let before = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        take();
        assert_eq!(std::fs::read_to_string("/proc/self/cgroup").unwrap(), before);
        assert!(listed().split_whitespace().any(|p| p == me));
        assert_eq!(PROCS_FILE.lock().unwrap().as_deref(), Some(procs.as_str()));
    }
}
