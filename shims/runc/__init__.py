"""The runc shim process (shimd's side of the runc handler is shimd/runtimes/runc.py)."""
