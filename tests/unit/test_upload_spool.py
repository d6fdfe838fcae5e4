"""The upload spool: private files, room checked first, leftovers swept, live ones kept."""

from __future__ import annotations

import stat

import pytest

from bmi_server.adapters.spool import LocalSpool
from bmi_server.core.errors import ResourceExhausted


def test_files_are_private_and_gone_when_discarded(tmp_path):
    spool = LocalSpool(tmp_path / "spool", reserve_bytes=0)
    spooled = spool.new_file(10, ".qcow2")
    spooled.write(b"0123456789")
    spooled.close()
    assert spooled.path.read_bytes() == b"0123456789"
    assert stat.S_IMODE(spooled.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    spooled.discard()
    assert list((tmp_path / "spool").iterdir()) == []


def test_no_file_is_made_without_room_for_it_and_the_reserve(tmp_path):
    spool = LocalSpool(tmp_path, reserve_bytes=0)
    free = spool.free_bytes()
    with pytest.raises(ResourceExhausted, match="no room for this upload"):
        spool.new_file(free + (1 << 30), ".qcow2")
    with pytest.raises(ResourceExhausted):
        LocalSpool(tmp_path, reserve_bytes=free).new_file(1 << 20, ".raw")
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_removes_what_no_live_upload_holds(tmp_path):
    spool = LocalSpool(tmp_path, reserve_bytes=0)
    live = spool.new_file(1, ".qcow2")
    crashed = tmp_path / "bmi-upload-left-by-a-crash.qcow2"
    crashed.write_bytes(b"x")
    operators = tmp_path / "not-ours.txt"
    operators.write_text("kept")
    # The sweep opens each file anew: a lock held through another open file (this
    # process's or another's) keeps the file.
    assert spool.sweep() == 1
    assert not crashed.exists()
    assert live.path.exists() and operators.exists()
    live.discard()


def test_the_sweep_at_start_makes_a_missing_spool_directory_private(tmp_path):
    """The server sweeps at start: the directory is there, 0700, before any upload, and its
    free space can be asked at once."""
    spool = LocalSpool(tmp_path / "state" / "spool", reserve_bytes=0)
    assert spool.sweep() == 0
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert spool.free_bytes() > 0
