import time
from tests.bench.bench_sandboxed import _children, _pss_kb, _shim_of
from tests.support.runtime import Runtime

def test_scratch(rt: Runtime) -> None:
    pod_id, cfg = rt.run_pod("gvm", handler="runsc")
    cid = rt.create(pod_id, cfg, "main", ["sleep", "1000"])
    rt.start(cid)
    time.sleep(2)
    kids = _children()
    todo = [_shim_of(pod_id)]
    while todo:
        p = todo.pop()
        print(p, _pss_kb(p), open(f"/proc/{p}/cmdline","rb").read().replace(b"\0",b" ")[:90])
        todo += kids.get(p, [])
    t = rt.create(pod_id, cfg, "tty", ["sh", "-c", "tty; sleep 100"], tty=True)
    t0 = time.monotonic()
    try:
        rt.start(t)
        print("TTY start ok", time.monotonic() - t0)
        time.sleep(1)
        print(open(rt.log_dir / "gvm" / "tty" / "0.log").read())
    except Exception as e:
        print("TTY FAIL", time.monotonic() - t0, e)
