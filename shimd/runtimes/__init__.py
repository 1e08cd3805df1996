"""Runtimes: the daemon side of each runtime handler (how its shim is started, what it is told, what it can do).

base.py      the Runtime interface, RuntimeBase, UnavailableRuntime
runc.py      runc/crun through shimd's own shim (compiled: shims/native; or shims/runc)
runsc.py     gVisor through the same shim, plus its stats sampler
shimv2.py    any containerd shim v2 binary (Kata, containerd-shim-runc-v2)
registry.py  the kind -> class mapping, and Runtimes: handler name -> Runtime, the default handler
"""
