import json, time, glob
from tests.support.runtime import Runtime

def test_scratch(rt: Runtime) -> None:
    for i in range(3):
        t = time.time()
        pod_id, cfg = rt.run_pod(f"p{i}", handler="runsc")
        print(f"total {(time.time()-t)*1000:.0f}ms start={t:.3f}")
        for f in glob.glob(str(rt.proc.state / "pods" / pod_id / "pause" / "shim.log")):
            for l in open(f):
                d = json.loads(l); print("  shim", d["timestamp"][11:23], d["event"])
        for l in open(rt.proc.log_path):
            if pod_id in l and l.startswith("{"):
                d = json.loads(l); print("  shimd", d["timestamp"][11:23], d["event"], d.get("s", ""))
