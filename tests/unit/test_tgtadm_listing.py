"""What bmi-gateway reads from `tgtadm --op show`: backing stores, sessions, ACL kinds
(the text as tgt 1.0.85 prints it)."""

from __future__ import annotations

from bmi_server.adapters.tgt.tgtadm import is_initiator_name, parse_sessions, parse_targets

SHOW = """\
Target 1: iqn.2026-11.org.moc.bmi:dsk-1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2026-11.org.moc.bmi.node:n1 alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Backing store type: null
            Backing store path: None
        LUN: 1
            Type: disk
            Backing store type: rbd
            Backing store path: rbd/bmi-dsk-1
            Backing store flags:
    Account information:
        bmi-dsk-1
    ACL information:
        ALL
        iqn.2026-11.org.moc.bmi.node:n1
Target 2: iqn.2001-04.com.example:other
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
"""


def test_backing_stores_sessions_and_acl_are_read():
    targets = parse_targets(SHOW)
    mine = targets["iqn.2026-11.org.moc.bmi:dsk-1"]
    assert mine.luns == {0, 1} and mine.backing == {0: "None", 1: "rbd/bmi-dsk-1"}
    assert mine.sessions == 1
    assert mine.accounts == {"bmi-dsk-1"}
    assert mine.acl == {"ALL", "iqn.2026-11.org.moc.bmi.node:n1"}
    other = targets["iqn.2001-04.com.example:other"]
    assert other.sessions == 0 and other.backing == {} and other.luns == {0}


def test_acl_entries_are_told_apart():
    assert is_initiator_name("iqn.2026-11.org.moc.bmi.node:n1")
    assert is_initiator_name("eui.02004567A425678D")
    assert not is_initiator_name("ALL")
    assert not is_initiator_name("192.0.2.7")


def test_the_session_scan_agrees_with_the_full_parse():
    """parse_sessions (the session sweep's fast scan) finds exactly the targets that
    parse_targets counts sessions on, also with a third target logged in twice."""
    third = SHOW.replace("Target 1: iqn.2026-11.org.moc.bmi:dsk-1", "Target 3: iqn.x:three")
    third = third[: third.index("Target 2:")].replace(
        "        I_T nexus: 2\n", "        I_T nexus: 2\n        I_T nexus: 5\n")
    show = SHOW + third
    assert parse_sessions(show) == {"iqn.2026-11.org.moc.bmi:dsk-1", "iqn.x:three"}
    assert parse_sessions(show) == {iqn for iqn, t in parse_targets(show).items() if t.sessions}
    assert parse_sessions("") == set()
