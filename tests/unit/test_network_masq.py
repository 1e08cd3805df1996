"""Matching the NAT rules a bridge DEL without a namespace leaves behind."""

from __future__ import annotations

from shimd.network.masq import stale_rules

SAVE = r'''*nat
:POSTROUTING ACCEPT [0:0]
:CNI-aaa - [0:0]
:CNI-bbb - [0:0]
-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
-A POSTROUTING -s 10.1.0.2/32 -m comment --comment "name: \"net\" id: \"pod1\"" -j CNI-aaa
-A POSTROUTING -s 10.1.0.3/32 -m comment --comment "name: \"net\" id: \"pod10\"" -j CNI-bbb
-A CNI-aaa -d 10.1.0.0/24 -m comment --comment "name: \"net\" id: \"pod1\"" -j ACCEPT
-A CNI-aaa ! -d 224.0.0.0/4 -m comment --comment "name: \"net\" id: \"pod1\"" -j MASQUERADE
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"pod1\"" -j CNI-DN-x
COMMIT
'''


def test_stale_rules_match_exactly_one_pod() -> None:
    rules, chains = stale_rules(SAVE, "net", "pod1")
    assert chains == ["CNI-aaa"]
    assert rules == [["POSTROUTING", "-s", "10.1.0.2/32", "-m", "comment", "--comment",
                      'name: "net" id: "pod1"', "-j", "CNI-aaa"]]
    assert stale_rules(SAVE, "other", "pod1") == ([], [])
