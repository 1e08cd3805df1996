"""tests/bench/cpu_by_process: samples from `perf script -F comm,pid` counted by kind of process."""

from tests.bench.cpu_by_process import kind_of, summarize

SCRIPT = """\
          python   4019
          python   4019
 tokio-rt-worker   5100
 shimd-runc-shim   5100
   runc:[2:INIT]   6001
            runc   6000
        iptables   6100
          bridge   6099
         swapper      0
         swapper      0
     kworker/0:1     31
          python   4100
            perf   4200
           pause   6200
"""


def test_samples_are_counted_by_kind_and_idle_is_left_out() -> None:
    assert summarize(SCRIPT, daemon_pid=4019, client_pid=4100) == {
        "daemon": 2, "shims": 2, "runc": 2, "CNI plugins": 2, "kernel threads": 1, "benchmark client": 1,
        "other": 1, "pause processes": 1}


def test_a_helper_forked_by_the_daemon_is_not_the_daemon() -> None:
    # Before its exec a CNI plugin's process still has the daemon's name, under a pid of its own.
    assert kind_of("python", 7000, daemon_pid=4019, client_pid=4100) == "other"
    assert kind_of("containerd", 7000, daemon_pid=7000, client_pid=4100) == "daemon"
