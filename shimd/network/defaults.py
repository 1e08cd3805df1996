"""The ready-to-use CNI network `shimd config cni-default` prints (and `make run` installs when
the CNI config directory is empty): a NAT'ed bridge with host-local IPAM, host ports, bandwidth
annotations and loopback.

cniVersion 1.0.0: Debian 12's containernetworking-plugins (1.1.x) implement spec 0.1.0..1.0.0.
"""

from __future__ import annotations

import json
from typing import Any

CNI_VERSION = "1.0.0"
NETWORK_NAME = "shimd"
BRIDGE = "shimd0"
SUBNET = "10.88.0.0/16"
FILE_NAME = "10-shimd.conflist"


def conflist(name: str = NETWORK_NAME, bridge: str = BRIDGE, subnet: str = SUBNET,
             data_dir: str = "") -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
    if data_dir:
        ipam["dataDir"] = data_dir
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            {"type": "loopback"},
        ],
    }


def render(**kwargs: str) -> str:
    return json.dumps(conflist(**kwargs), indent=2) + "\n"
