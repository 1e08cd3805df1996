//! What runc's own state says of a container, for the shortcuts that do runc's work without a runc
//! process (reaped_delete.rs, cgroup_kill.rs); port of shims/runc/runc_state.py. Each is taken only for
//! runc itself, with its cgroupfs driver and the state layout runc 1.1 writes; otherwise runc does it.

use std::collections::BTreeMap;

use crate::cgroupfs::{self, join, normpath, os_error_text, repr, repr_json, truthy};

/// Whether binary is plain runc (not runsc or another OCI runtime) with its cgroupfs driver.
pub fn plain_runc(binary: &str, systemd_cgroup: bool) -> bool {
    binary.rsplit('/').next() == Some("runc") && !systemd_cgroup
}

/// The container's cgroup by controller from runc's state.json, and "" or why it cannot be used: only
/// runc's plain cgroupfs layout (no Intel RDT, not rootless), every path under a cgroup mount.
///
/// The paths come in key order: runc (Go's encoding/json) writes the map sorted, as Python then reads it.
pub fn cgroup_paths(root: &str, cid: &str) -> (BTreeMap<String, String>, String) {
    let none = BTreeMap::new();
    if cid.is_empty() || cid.contains('/') || cid == "." || cid == ".." {
        return (none, format!("container id {} is not a plain name", repr(cid)));
    }
    let file = join(&[root, cid, "state.json"]);
    let state: serde_json::Value = match std::fs::read(&file) {
        Err(e) => return (none, format!("runc state unreadable: {}", os_error_text(&e, Some(&file)))),
        Ok(data) => match serde_json::from_slice(&data) {
            Ok(v) => v,
            Err(e) => return (none, format!("runc state unreadable: {e}")),
        },
    };
    let obj = state.as_object();
    let paths = match obj.and_then(|o| o.get("cgroup_paths")).and_then(|p| p.as_object()) {
        Some(p)
            if !truthy(obj.and_then(|o| o.get("intel_rdt_path"))) && !truthy(obj.and_then(|o| o.get("rootless"))) =>
        {
            p
        }
        _ => return (none, "runc state is not the plain cgroupfs layout".into()),
    };
    // Unreadable mountinfo (Python raises there): no path is under a known mount, runc does it.
    let points: Vec<String> = cgroupfs::mounts().into_iter().map(|(point, _, _)| point).collect();
    let mut out = BTreeMap::new();
    for (controller, p) in paths {
        match p.as_str() {
            Some(s) if normpath(s) == s && points.iter().any(|m| s.starts_with(&format!("{m}/"))) => {
                out.insert(controller.clone(), s.to_string());
            }
            _ => return (none, format!("cgroup path {} is not under a cgroup mount", repr_json(p))),
        }
    }
    (out, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroupfs::tests::TempDir;

    #[test]
    fn runc_state_plain_runc_is_runc_by_name_with_cgroupfs() {
        assert!(plain_runc("runc", false));
        assert!(plain_runc("/usr/local/sbin/runc", false));
        assert!(!plain_runc("runc", true));
        assert!(!plain_runc("/usr/bin/runsc", false));
        assert!(!plain_runc("crun", false));
        assert!(!plain_runc("runc/", false));
    }

    #[test]
    fn runc_state_cgroup_paths_of_a_plain_state() {
        let t = TempDir::new("runc-state");
        std::fs::create_dir(t.path("c1")).unwrap();
        std::fs::write(t.path("c1/state.json"),
                       r#"{"cgroup_paths": {"memory": "/sys/fs/cgroup/memory/k/c1", "pids": "/sys/fs/cgroup/pids/k/c1"}, "intel_rdt_path": "", "rootless": false}"#).unwrap();
        let (paths, why) = cgroup_paths(&t.0, "c1");
        assert_eq!(why, "");
        assert_eq!(paths.get("memory").map(String::as_str), Some("/sys/fs/cgroup/memory/k/c1"));
        assert_eq!(paths.len(), 2);
        let (_, why) = cgroup_paths(&t.0, "missing");
        assert_eq!(
            why,
            format!("runc state unreadable: [Errno 2] No such file or directory: '{}/missing/state.json'", t.0)
        );
        assert_eq!(cgroup_paths(&t.0, "a/b").1, "container id 'a/b' is not a plain name");
    }
}
