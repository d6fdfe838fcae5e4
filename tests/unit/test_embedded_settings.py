"""Settings of the zero-config server's own tgtd and Ceph cluster: which tgtd is meant is
never guessed, and a portal nodes cannot use is refused at start."""

from __future__ import annotations

import pytest

from bmi_server.config import load_settings
from bmi_server.core.errors import InvalidArgument
from bmi_server.embedded import split_listen


def test_tgt_portal_and_tgt_listen_are_one_or_the_other():
    assert load_settings(env={"BMI_TGT_LISTEN": "127.0.0.1:3260"}).tgt_listen == "127.0.0.1:3260"
    assert load_settings(env={"BMI_TGT_PORTAL": "192.0.2.1:3260"}).tgt_portal
    with pytest.raises(InvalidArgument, match="set one of them, not both"):
        load_settings(env={"BMI_TGT_PORTAL": "192.0.2.1:3260",
                           "BMI_TGT_LISTEN": "127.0.0.1:3260"})


@pytest.mark.parametrize("name", ["BMI_TGT_LISTEN", "BMI_TGT_PORTAL"])
def test_a_wildcard_portal_needs_advertised_portals(name):
    with pytest.raises(InvalidArgument, match="advertised_portals"):
        load_settings(env={name: "0.0.0.0:3260"})
    settings = load_settings(env={name: "0.0.0.0:3260",
                                  "BMI_ADVERTISED_PORTALS": "192.0.2.1:3260"})
    assert settings.portals == ["192.0.2.1:3260"]


@pytest.mark.parametrize("bad", ["3260", "host", ":3260", "host:port"])
def test_a_portal_must_be_host_and_port(bad):
    with pytest.raises(InvalidArgument, match="host:port"):
        load_settings(env={"BMI_TGT_LISTEN": bad})


def test_embedded_sizes_and_listen_addresses():
    assert load_settings(env={}).embedded_ceph_bytes == 100 << 30
    assert load_settings(env={"BMI_EMBEDDED_CEPH_BYTES": "20G"}).embedded_ceph_bytes == 20 << 30
    with pytest.raises(InvalidArgument, match="at least 1G"):
        load_settings(env={"BMI_EMBEDDED_CEPH_BYTES": "100M"})
    assert split_listen("") == ("127.0.0.1", 0)
    assert split_listen("10.0.0.5:3260") == ("10.0.0.5", 3260)
    assert split_listen("127.0.0.1:0") == ("127.0.0.1", 0)


@pytest.mark.parametrize("contents", [
    "{not json", "[1, 2]", '"text"', "{}", '{"pid": 1, "port": "x", "control": 5}',
    '{"pid": 1, "port": 3260}', '{"pid": null, "port": 3260, "control": 5}',
])
def test_an_unusable_tgtd_record_is_no_record(tmp_path, contents):
    """What a process that does not run the tgtds reads of them: the processes before an
    unusable tgtd.json, nothing of it or after it, and no traceback."""
    import json

    from bmi_server.embedded import EmbeddedServices
    from bmi_server.embedded.tgtd import STATE_NAME, recorded

    good = {"pid": 10, "host": "", "port": 3260, "control": 7}
    with EmbeddedServices(tmp_path) as embedded:
        for process, text in enumerate([json.dumps(good), contents, json.dumps(good)]):
            embedded.tgtd_dir(process).mkdir()
            (embedded.tgtd_dir(process) / STATE_NAME).write_text(text)
        assert recorded(embedded.tgtd_dir(1)) is None
        assert recorded(embedded.tgtd_dir(0)) == good
        assert embedded.recorded_tgtds() == [("127.0.0.1:3260", 7)]
