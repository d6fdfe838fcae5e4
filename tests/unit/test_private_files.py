"""prepare_state_dir: what BMI made in its state directory becomes private; what the
operator keeps elsewhere is reported and left alone; shared directories and symlinks are
not changed."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from bmi_server.private_files import prepare_state_dir, restrict_umask, warn_if_shared


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def made(path: Path, file_mode: int, data: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    path.chmod(file_mode)
    return path


def test_a_new_state_dir_is_private(tmp_path):
    state = tmp_path / "a" / "state"
    prepare_state_dir(state, [state / "spool"])
    assert mode(state) == 0o700


def test_loose_files_bmi_made_are_tightened(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    record = made(state / "ceph-client", 0o644)
    spool = state / "spool"
    leftover = made(spool / "bmi-upload-1.qcow2", 0o664)
    spool.chmod(0o775)
    db = made(state / "bmi.sqlite3", 0o644)
    wal = made(state / "bmi.sqlite3-wal", 0o666)
    private = made(state / "tokens", 0o600)
    with caplog.at_level(logging.WARNING):
        prepare_state_dir(state, [record, spool],
                          [("database", db), ("database", wal), ("token_file", private),
                           ("database", state / "bmi.sqlite3-shm")])  # fmt: skip
    assert {p.name: mode(p) for p in (state, record, spool, leftover, db, wal, private)} == {
        "state": 0o700, "ceph-client": 0o600, "spool": 0o700, "bmi-upload-1.qcow2": 0o600,
        "bmi.sqlite3": 0o600, "bmi.sqlite3-wal": 0o600, "tokens": 0o600}  # fmt: skip
    assert not (state / "bmi.sqlite3-shm").exists()  # a missing file is not created
    assert f"{db} was mode 0644" in caplog.text
    assert str(private) not in caplog.text  # already private: nothing to say


def test_operator_files_outside_are_reported_not_changed(tmp_path, caplog):
    state = tmp_path / "state"
    shared_key = made(tmp_path / "etc" / "server.key", 0o640)
    readable_tokens = made(tmp_path / "etc" / "tokens", 0o644)
    private_password = made(tmp_path / "etc" / "hil-password", 0o600)
    with caplog.at_level(logging.WARNING):
        prepare_state_dir(state, [], [("tls_key_file", shared_key),
                                      ("token_file", readable_tokens),
                                      ("hil_password_file", private_password),
                                      ("gateway_token_file", tmp_path / "absent")])
    assert (mode(shared_key), mode(readable_tokens)) == (0o640, 0o644)
    assert f"tls_key_file {shared_key} is mode 0640" in caplog.text
    assert f"token_file {readable_tokens} is mode 0644" in caplog.text
    assert "hil_password_file" not in caplog.text and "absent" not in caplog.text


def test_a_shared_state_dir_is_left_shared_but_its_files_are_tightened(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others' files live here too
    record = made(shared / "ceph-client", 0o644)
    with caplog.at_level(logging.WARNING):
        prepare_state_dir(shared, [record])
    assert mode(shared) == 0o1777
    assert mode(record) == 0o600
    assert "is a shared directory" in caplog.text


def test_a_symlink_is_not_followed(tmp_path):
    state = tmp_path / "state"
    elsewhere = made(tmp_path / "elsewhere", 0o644)
    state.mkdir()
    (state / "ceph-client").symlink_to(elsewhere)
    prepare_state_dir(state, [state / "ceph-client"])
    assert mode(elsewhere) == 0o644


def test_a_symlinked_state_dir_is_made_private_where_it_leads(tmp_path, caplog):
    real = tmp_path / "srv-bmi"
    real.mkdir()
    real.chmod(0o755)
    (tmp_path / "state").symlink_to(real)
    with caplog.at_level(logging.WARNING):
        prepare_state_dir(tmp_path / "state", [])
    assert mode(real) == 0o700
    assert "shared directory" not in caplog.text  # the link's own 0777 is no sign of that


def test_warn_if_shared_only_for_group_or_other_access(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert not warn_if_shared("token_file", made(tmp_path / "own", 0o600))
        assert not warn_if_shared("token_file", made(tmp_path / "readonly", 0o400))
        assert warn_if_shared("token_file", made(tmp_path / "group-writable", 0o620))
        assert warn_if_shared("token_file", made(tmp_path / "world", 0o604))
        assert not warn_if_shared("token_file", tmp_path / "missing")


@pytest.fixture
def saved_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_restrict_umask_makes_new_files_private(tmp_path, saved_umask):
    restrict_umask()
    (tmp_path / "new").write_text("secret")
    (tmp_path / "newdir").mkdir()
    assert (mode(tmp_path / "new"), mode(tmp_path / "newdir")) == (0o600, 0o700)
