"""shimd: a CRI v1 container runtime with per-pod shims."""

__version__ = "0.1.0"
