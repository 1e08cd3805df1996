"""Resource usage of containers and pods: cgroup counters, writable layers, pod network."""
