//! `runc delete --force` of a container whose init this shim has reaped, done without a runc process;
//! port of shims/runc/reaped_delete.py (see there for why and the measurements).
//!
//! Taken only where the outcome is runc's: no poststop hook, runc's cgroupfs driver and state layout, and
//! no process left in the cgroup. Anything else, or a cgroup that stays busy, returns the reason and the
//! caller runs `runc delete --force` after all.

use std::collections::BTreeSet;
use std::io;

use crate::cgroupfs::{self, join, os_error_text, repr_list, truthy};
use crate::runc_state;

/// Whether a container of this spec, run by this runtime binary, may be deleted here once reaped.
pub fn spec_allows(spec: &serde_json::Value, binary: &str, systemd_cgroup: bool) -> bool {
    if !runc_state::plain_runc(binary, systemd_cgroup) {
        return false;
    }
    // (x or {}).get(k): a present but non-object section is not a spec this knows; runc decides.
    let member = |section: &str, key: &str| -> Option<bool> {
        match spec.get(section) {
            Some(v) if !truthy(Some(v)) => Some(false),
            Some(serde_json::Value::Object(o)) => Some(truthy(o.get(key))),
            Some(_) => None,
            None => Some(false),
        }
    };
    matches!((member("hooks", "poststop"), member("linux", "intelRdt")), (Some(false), Some(false)))
}

/// Removes the container's cgroups and runc state; "" when done, else why runc must do it.
///
/// own_pid_ns: the init was PID 1 of a PID namespace of its own, so nothing of the container outlived it.
pub fn remove(root: &str, cid: &str, own_pid_ns: bool) -> String {
    let (paths, why) = runc_state::cgroup_paths(root, cid);
    if !why.is_empty() {
        return why;
    }
    let unique: BTreeSet<String> = paths.into_values().collect();
    if !own_pid_ns && unique.iter().any(|p| has_processes(p)) {
        return "processes are left in its cgroup".into();
    }
    let left = cgroupfs::remove(&unique.into_iter().collect::<Vec<_>>());
    if !left.is_empty() {
        return format!("cgroups still busy: {}", repr_list(&left));
    }
    remove_state_dir(&join(&[root, cid]))
}

/// runc keeps plain files there (state.json, a fifo before start); a directory is not runc 1.1's.
fn remove_state_dir(state_dir: &str) -> String {
    let result = (|| -> Result<(), (io::Error, Option<String>)> {
        let entries = std::fs::read_dir(state_dir).map_err(|e| (e, Some(state_dir.to_string())))?;
        for e in entries {
            let e = e.map_err(|e| (e, Some(state_dir.to_string())))?;
            let path = e.path().to_string_lossy().into_owned();
            std::fs::remove_file(&path).map_err(|err| (err, Some(path)))?; // a directory: EISDIR
        }
        std::fs::remove_dir(state_dir).map_err(|e| (e, Some(state_dir.to_string())))
    })();
    match result {
        Ok(()) => String::new(),
        Err((e, _)) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err((e, file)) => {
            format!("runc state {state_dir} could not be removed: {}", os_error_text(&e, file.as_deref()))
        }
    }
}

fn has_processes(path: &str) -> bool {
    use std::io::Read;
    match std::fs::File::open(join(&[path, "cgroup.procs"])) {
        Ok(mut f) => {
            let mut b = [0u8; 1];
            match f.read(&mut b) {
                Ok(n) => n > 0,
                Err(_) => true, // unknown: runc decides
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::tests::{TempDir, TestCgroup};
    use serde_json::{json, Value};

    fn plain() -> Value {
        json!({
            "process": {"args": ["sleep", "1"]},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                                     {"type": "network"}],
                      "cgroupsPath": "/kubepods/pod1/c1"},
        })
    }

    fn variant(change: &str) -> Value {
        let mut spec = plain();
        match change {
            "pid joined" => spec["linux"]["namespaces"][0]["path"] = json!("/proc/1/ns/pid"),
            "no pid" => {
                let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
                ns.retain(|n| n["type"] != "pid");
            }
            "poststop" => spec["hooks"] = json!({"poststop": [{"path": "/bin/true"}]}),
            "intelRdt" => spec["linux"]["intelRdt"] = json!({"closID": "x"}),
            _ => {}
        }
        spec
    }

    #[test]
    fn reaped_a_plain_spec_for_runc_is_taken() {
        for change in ["none", "pid joined", "no pid"] {
            assert!(spec_allows(&variant(change), "runc", false), "{change}");
            assert!(spec_allows(&variant(change), "/usr/local/sbin/runc", false), "{change}");
            // hooks runc runs before or while the container lives are no concern of its delete
            let mut spec = plain();
            spec["hooks"] = json!({"prestart": [{"path": "/bin/true"}]});
            assert!(spec_allows(&spec, "runc", false));
        }
        let mut spec = plain();
        spec["hooks"] = json!({"poststop": []}); // an empty list is no hook
        assert!(spec_allows(&spec, "runc", false));
    }

    #[test]
    fn reaped_specs_whose_delete_does_more_go_to_runc() {
        for change in ["poststop", "intelRdt"] {
            assert!(!spec_allows(&variant(change), "runc", false), "{change}");
        }
    }

    #[test]
    fn reaped_other_runtimes_and_systemd_cgroups_go_to_runc() {
        for (binary, systemd) in [("crun", false), ("/usr/bin/runsc", false), ("runc", true)] {
            assert!(!spec_allows(&plain(), binary, systemd), "{binary}");
        }
    }

    fn write_state(root: &TempDir, cid: &str, state: &str) -> String {
        let d = root.path(cid);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(format!("{d}/state.json"), state).unwrap();
        d
    }

    #[test]
    fn reaped_state_it_does_not_know_is_left_to_runc() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "unreadable"),
            (Some("{"), "unreadable"),
            (Some("[1, 2]"), "plain cgroupfs layout"),
            (Some(r#"{"cgroup_paths": "x"}"#), "plain cgroupfs layout"),
            (Some(r#"{"cgroup_paths": {}, "intel_rdt_path": "/sys/fs/resctrl/c1"}"#), "plain cgroupfs layout"),
            (Some(r#"{"cgroup_paths": {}, "rootless": true}"#), "plain cgroupfs layout"),
            (Some(r#"{"cgroup_paths": {"memory": "/tmp/not-a-cgroup"}}"#), "not under a cgroup mount"),
            (Some(r#"{"cgroup_paths": {"memory": "/sys/fs/cgroup/memory/../../../tmp"}}"#), "not under a cgroup mount"),
            (Some(r#"{"cgroup_paths": {"memory": 7}}"#), "cgroup path 7 is not under a cgroup mount"),
        ];
        for (state, reason) in cases {
            let root = TempDir::new("reaped");
            let d = match state {
                None => {
                    std::fs::create_dir(root.path("c1")).unwrap(); // without state.json: runc's delete explains it
                    root.path("c1")
                }
                Some(s) => write_state(&root, "c1", s),
            };
            let why = remove(&root.0, "c1", true);
            assert!(why.contains(reason), "{state:?}: {why}");
            assert!(std::path::Path::new(&d).exists()); // nothing removed: runc gets to see what it made
        }
    }

    #[test]
    fn reaped_ids_that_are_not_a_plain_name_are_refused() {
        let root = TempDir::new("reaped");
        for cid in ["", ".", "..", "a/b"] {
            assert!(remove(&root.0, cid, true).contains("not a plain name"), "{cid}");
        }
    }

    #[test]
    fn reaped_state_without_cgroups_is_removed() {
        let root = TempDir::new("reaped");
        let d = write_state(&root, "c1", r#"{"cgroup_paths": {}, "intel_rdt_path": ""}"#);
        assert_eq!(remove(&root.0, "c1", true), "");
        assert!(!std::path::Path::new(&d).exists());
    }

    #[test]
    fn reaped_a_state_directory_with_more_than_runc_keeps_is_reported() {
        let root = TempDir::new("reaped");
        let d = write_state(&root, "c1", r#"{"cgroup_paths": {}}"#);
        std::fs::create_dir(format!("{d}/sub")).unwrap();
        let why = remove(&root.0, "c1", true);
        assert!(why.contains("could not be removed"), "{why}");
        assert!(why.contains("[Errno 21] Is a directory: "), "{why}");
    }

    #[test]
    fn reaped_real_cgroups_are_removed_unless_processes_are_left() {
        let (Some(pids), Some(mem)) = (TestCgroup::new("pids"), TestCgroup::new("memory")) else { return };
        std::fs::create_dir(format!("{}/sub", pids.0)).unwrap();
        let root = TempDir::new("reaped");
        let state = json!({"cgroup_paths": {"pids": pids.0, "memory": mem.0}}).to_string();
        let d = write_state(&root, "c1", &state);
        // A process in the cgroup: without its own PID namespace it may outlive the init.
        let _one = crate::reaper::one_reaper_at_a_time();
        let mut child = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        let joined = std::fs::write(format!("{}/cgroup.procs", pids.0), child.id().to_string());
        let why = remove(&root.0, "c1", false);
        let _ = child.kill();
        let _ = child.wait();
        joined.unwrap();
        assert_eq!(why, "processes are left in its cgroup");
        assert!(std::path::Path::new(&pids.0).exists() && std::path::Path::new(&d).exists());
        assert_eq!(remove(&root.0, "c1", false), "");
        assert!(!std::path::Path::new(&pids.0).exists() && !std::path::Path::new(&mem.0).exists());
        assert!(!std::path::Path::new(&d).exists());
    }
}
