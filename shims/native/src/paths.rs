//! Where a pod's shim listens, as shimd and the shim both work it out (shimproto/paths.py).

use sha2::{Digest, Sha256};

/// Set by a direct launch (shimd's runc runtime): the descriptor of the socket shimd already bound.
pub const LISTEN_FD_ENV: &str = "SHIMD_LISTEN_FD";

fn digest(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect::<String>()[..32].to_string()
}

/// Where the shim of (namespace, pod) listens: short and stable, whoever launches it.
pub fn socket_path(shim_dir: &str, namespace: &str, pod_id: &str) -> String {
    format!("{shim_dir}/{}", digest(&format!("{namespace}/{pod_id}")))
}

/// Where the shim serves the output of a container's process to attached clients.
pub fn attach_socket_path(shim_dir: &str, container_id: &str) -> String {
    format!("{shim_dir}/a-{}", digest(container_id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_digest_as_python() {
        // python3 -c 'import hashlib;print(hashlib.sha256(b"k8s.io/pod1").hexdigest()[:32])'
        assert_eq!(super::socket_path("/s", "k8s.io", "pod1"), "/s/1e4e6c40b399bb3553fa8561e5b46e79");
    }
}
