"""Where a pod's shim listens, as shimd and the shim both work it out."""

# Set by a direct launch (shimd's runc runtime): the descriptor number of the socket shimd already bound.
LISTEN_FD_ENV = "SHIMD_LISTEN_FD"


def _digest(text: str) -> str:
    # hashlib would load OpenSSL (~4 MB RSS) into the shim; CPython's builtin sha256 module is enough.
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # Python >= 3.12
        from _sha2 import sha256  # type: ignore[import-not-found,no-redef]
    digest: str = sha256(text.encode()).hexdigest()[:32]
    return digest


def socket_path(shim_dir: str, namespace: str, pod_id: str) -> str:
    """Where the shim of (namespace, pod) listens: short and stable, whoever launches it."""
    return f"{shim_dir}/{_digest(f'{namespace}/{pod_id}')}"


def attach_socket_path(shim_dir: str, container_id: str) -> str:
    """Where the shim serves the output of a container's process to attached clients (next to its own
    socket: a bundle path would be too long for a unix socket)."""
    return f"{shim_dir}/a-{_digest(container_id)}"
