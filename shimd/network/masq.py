"""Removing a pod's ipMasq NAT rules when its network namespace is already gone.

bridge and ptp (containernetworking-plugins 1.1) find the rules to delete from the addresses on
the pod's interface; with the namespace gone their DEL frees the IP but leaves the rules (and a
per-pod chain) in the nat table forever. Those rules carry the comment
`name: "<network>" id: "<container id>"`, which is what this module matches, exactly.
"""

from __future__ import annotations

import shlex

from shimd import log
from shimd.network import proc

TIME_LIMIT = 30.0
_log = log.get("network.masq")


def stale_rules(save_output: str, network: str, container_id: str) -> tuple[list[list[str]], list[str]]:
    """(rules to delete as iptables argument lists, per-pod chains to flush and delete)."""
    marker = f'--comment "name: \\"{network}\\" id: \\"{container_id}\\""'
    rules, chains = [], []
    for line in save_output.splitlines():
        if not line.startswith("-A ") or marker not in line:
            continue
        args = shlex.split(line)
        if "-j" in args:
            target = args[args.index("-j") + 1]
            if target.startswith("CNI-") and not target.startswith("CNI-HOSTPORT-") and target not in chains:
                chains.append(target)
        rules.append(args[1:])
    # Rules inside the per-pod chains go away with the chain.
    return [r for r in rules if r[0] not in chains], chains


async def remove_stale_masquerade(network: str, container_id: str) -> int:
    """Best effort: returns how many rules and chains were removed; failures are only logged."""
    removed = 0
    for tool in ("iptables", "ip6tables"):
        try:
            save = await proc.run([proc.which(f"{tool}-save"), "-t", "nat"], time_limit=TIME_LIMIT)
            rules, chains = stale_rules(save.stdout.decode(errors="replace"), network, container_id)
            binary = proc.which(tool)
            for rule in rules:
                done = await proc.run([binary, "-w", "-t", "nat", "-D", *rule], time_limit=TIME_LIMIT)
                removed += done.returncode == 0
            for chain in chains:
                await proc.run([binary, "-w", "-t", "nat", "-F", chain], time_limit=TIME_LIMIT)
                done = await proc.run([binary, "-w", "-t", "nat", "-X", chain], time_limit=TIME_LIMIT)
                removed += done.returncode == 0
        except Exception as e:
            _log.warning("could not remove stale masquerade rules", tool=tool, network=network,
                         container_id=container_id, error=str(e))
    if removed:
        _log.info("removed masquerade rules left by DEL without a namespace", network=network,
                  container_id=container_id, removed=removed)
    return removed
