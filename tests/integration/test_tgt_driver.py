"""TgtTargetDriver against a real tgtd and a real Ceph cluster, checked by real initiators.

Access is checked from the outside with libiscsi's tools and qemu-img's iSCSI driver, never
through the driver under test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid

import pytest
import rbd

from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver, subprocess_runner
from bmi_server.core.errors import BmiError, FailedPrecondition
from bmi_server.core.models import TargetSpec
from bmi_server.devenv.tgtd import SOCKET_DIR, Tgtd

pytestmark = pytest.mark.ceph

MiB = 1 << 20
SIZE = 64 * MiB
PREFIX = "iqn.2026-11.org.moc.bmi:"
GOLDEN = os.urandom(MiB)  # the golden image's first MiB
MARKER = b"written into the clone only" * 100
MARKER_AT = 8 * MiB


@pytest.fixture(params=["socket", "tgtadm"])
def driver(request, tgtd, ceph_cluster) -> TgtTargetDriver:
    """The driver speaking tgtd's control socket itself, and through the tgtadm command.
    tgtd opens the disks as the cluster's least-privileged client, as BMI's own throwaway
    setups do (a production tgtd should too)."""
    return new_driver(tgtd, ceph_cluster, TgtdSocketRunner() if request.param == "socket" else None)


def new_driver(tgtd: Tgtd, cluster, runner=None) -> TgtTargetDriver:
    return TgtTargetDriver(str(cluster.tgt_conf_path), cluster.pool, tgtd.portal,
                           control=tgtd.control, runner=runner, rbd_user=cluster.tgt_user)


@pytest.fixture
def make_clone(rbd_store):
    """Makes clones of a sealed golden image, each with data of its own; returns the volume."""
    made: list[str] = []

    def make() -> str:
        golden, disk = f"img-{uuid.uuid4().hex[:10]}", f"dsk-{uuid.uuid4().hex[:10]}"
        rbd_store.create(golden, SIZE, {"bmi.kind": "golden"})
        rbd_store.write(golden, 0, GOLDEN)
        rbd_store.seal(golden)
        rbd_store.clone(golden, disk, {"bmi.kind": "disk"})
        rbd_store.write(disk, MARKER_AT, MARKER)
        made.extend([disk, golden])
        return disk

    make.leave = set()  # volumes a killed tgtd held open: left in the throwaway cluster
    yield make
    for volume in made:
        if volume in make.leave:
            continue
        with contextlib.suppress(BmiError):
            rbd_store.remove(volume)


@pytest.fixture
def clone(make_clone) -> str:
    return make_clone()


def expected_content() -> bytes:
    data = bytearray(SIZE)
    data[: len(GOLDEN)] = GOLDEN
    data[MARKER_AT : MARKER_AT + len(MARKER)] = MARKER
    return bytes(data)


def make_spec(volume: str) -> TargetSpec:
    n = uuid.uuid4().hex[:10]
    return TargetSpec(iqn=f"{PREFIX}{volume}", volume=volume,
                      initiator_iqn=f"iqn.2026-11.org.moc.node:{n}", chap_user=f"u{n}",
                      chap_secret=f"S{uuid.uuid4().hex[:15]}")


@pytest.fixture
def exported(driver, clone):
    spec = make_spec(clone)
    driver.create_export(spec)
    yield spec
    driver.remove_export(spec.iqn)


def iscsi_tool(tool: str, tgtd: Tgtd, spec: TargetSpec, *, user: str | None = None,
               secret: str | None = None, initiator: str | None = None,
               lun: bool = True, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    user = spec.chap_user if user is None else user
    secret = spec.chap_secret if secret is None else secret
    cred = f"{user}%{secret}@" if user else ""
    url = f"iscsi://{cred}{tgtd.portal}" + (f"/{spec.iqn}/1" if lun else "")
    return subprocess.run([tool, "-i", initiator or spec.initiator_iqn, *extra, url],
                          capture_output=True, text=True, timeout=60, check=False)


def read_through_iscsi(tgtd: Tgtd, spec: TargetSpec, tmp_path) -> bytes:
    """The whole LUN as qemu-img's iSCSI driver reads it (the secret passed in a file)."""
    secret_file, out = tmp_path / "chap", tmp_path / "lun.raw"
    secret_file.write_text(spec.chap_secret)
    host, port = tgtd.portal.split(":")
    opts = (f"driver=iscsi,transport=tcp,portal={host}:{port},target={spec.iqn},lun=1,"
            f"user={spec.chap_user},password-secret=chap,initiator-name={spec.initiator_iqn}")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                    f"secret,id=chap,file={secret_file}", "--image-opts", opts, str(out)],
                   check=True, capture_output=True, timeout=120)
    return out.read_bytes()


def write_through_iscsi(tgtd: Tgtd, spec: TargetSpec, tmp_path, offset: int, data: bytes
                        ) -> None:
    """``data`` written at ``offset`` of the LUN by qemu-io's iSCSI driver."""
    secret_file, source = tmp_path / "chap", tmp_path / "data.raw"
    secret_file.write_text(spec.chap_secret)
    source.write_bytes(data)
    host, port = tgtd.portal.split(":")
    opts = (f"driver=iscsi,transport=tcp,portal={host}:{port},target={spec.iqn},lun=1,"
            f"user={spec.chap_user},password-secret=chap,initiator-name={spec.initiator_iqn}")
    # A pattern write: qemu-io has no "write this file"; the data is one repeated byte.
    assert data == data[:1] * len(data)
    subprocess.run(["qemu-io", "--object", f"secret,id=chap,file={secret_file}",
                    "--image-opts", opts, "-c", f"write -P {data[0]} {offset} {len(data)}"],
                   check=True, capture_output=True, timeout=120)


def show(tgtd: Tgtd, mode: str) -> str:
    return tgtd.tgtadm("--op", "show", "--mode", mode).stdout


def test_exported_clone_is_readable_with_its_chap_and_initiator(tgtd, driver, exported,
                                                                tmp_path):
    inq = iscsi_tool("iscsi-inq", tgtd, exported)
    assert inq.returncode == 0, inq.stderr
    assert "DIRECT_ACCESS" in inq.stdout
    cap = iscsi_tool("iscsi-readcapacity16", tgtd, exported, extra=("-s",))
    assert cap.returncode == 0, cap.stderr
    assert int(cap.stdout.strip()) == SIZE
    listing = iscsi_tool("iscsi-ls", tgtd, exported, lun=False, extra=("-s",))
    assert listing.returncode == 0, listing.stderr
    assert f"Target:{exported.iqn} " in listing.stdout
    assert "DIRECT_ACCESS" in listing.stdout
    assert read_through_iscsi(tgtd, exported, tmp_path) == expected_content()
    assert exported.iqn in driver.list_exports()
    assert driver.portals() == [tgtd.portal]


def test_initiator_writes_reach_the_clone_through_tgtds_ceph_client(tgtd, exported, ioctx,
                                                                    tmp_path):
    """tgtd's client (``profile rbd`` on the pool, nothing more) suffices to write."""
    data = b"\xab" * MiB
    write_through_iscsi(tgtd, exported, tmp_path, 4 * MiB, data)
    with rbd.Image(ioctx, exported.volume, read_only=True) as image:
        assert image.read(4 * MiB, MiB) == data
        assert image.read(MARKER_AT, len(MARKER)) == MARKER  # the rest untouched


def test_wrong_or_missing_chap_is_refused(tgtd, exported):
    wrong = iscsi_tool("iscsi-inq", tgtd, exported, secret="Wrong" + exported.chap_secret)
    assert wrong.returncode != 0
    assert "Authentication failure" in wrong.stderr
    other_user = iscsi_tool("iscsi-inq", tgtd, exported, user="someone")
    assert other_user.returncode != 0
    none = iscsi_tool("iscsi-inq", tgtd, exported, user="")
    assert none.returncode != 0
    assert "Authentication failure" in none.stderr


def test_another_initiator_is_refused_even_with_the_right_chap(tgtd, exported):
    other = "iqn.2026-11.org.moc.node:intruder"
    inq = iscsi_tool("iscsi-inq", tgtd, exported, initiator=other)
    assert inq.returncode != 0
    assert "Target not found" in inq.stderr
    listing = iscsi_tool("iscsi-ls", tgtd, exported, initiator=other, lun=False)
    assert exported.iqn not in listing.stdout  # discovery hides it too


def test_create_export_twice_gives_one_target(tgtd, driver, exported, ceph_cluster):
    driver.create_export(exported)
    new_driver(tgtd, ceph_cluster).create_export(exported)  # a fresh map too
    assert show(tgtd, "target").count(f": {exported.iqn}\n") == 1
    assert iscsi_tool("iscsi-inq", tgtd, exported).returncode == 0


def test_remove_export_leaves_nothing(tgtd, driver, clone):
    spec = make_spec(clone)
    driver.create_export(spec)
    assert spec.chap_user in show(tgtd, "account")
    driver.remove_export(spec.iqn)
    assert spec.iqn not in show(tgtd, "target")
    assert spec.chap_user not in show(tgtd, "account")
    assert spec.iqn not in driver.list_exports()
    driver.remove_export(spec.iqn)  # idempotent
    assert iscsi_tool("iscsi-inq", tgtd, spec).returncode != 0


def test_missing_volume_fails_cleanly(tgtd, driver):
    spec = make_spec(f"dsk-missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(FailedPrecondition) as err:
        driver.create_export(spec)
    assert spec.iqn in err.value.message and spec.chap_secret not in str(err.value)
    assert spec.iqn not in show(tgtd, "target")
    assert spec.chap_user not in show(tgtd, "account")


def test_restart_loses_targets_and_ensure_exports_brings_them_back(tgtd, driver, exported,
                                                                   make_clone, tmp_path):
    # The killed tgtd's librbd lock and watch linger (removal would stall ~10 s): keep it.
    make_clone.leave.add(exported.volume)
    pid = tgtd.pid
    tgtd.restart()
    assert tgtd.pid != pid
    assert exported.iqn not in driver.list_exports()
    assert iscsi_tool("iscsi-inq", tgtd, exported).returncode != 0
    assert driver.ensure_exports([exported]) == []
    assert iscsi_tool("iscsi-inq", tgtd, exported).returncode == 0
    assert read_through_iscsi(tgtd, exported, tmp_path) == expected_content()
    # Nothing missing the second time: the live target is left alone.
    assert driver.ensure_exports([exported]) == []
    assert show(tgtd, "target").count(f": {exported.iqn}\n") == 1


def test_stray_target_is_reported_not_removed(tgtd, driver, exported):
    stray = f"{PREFIX}stray-{uuid.uuid4().hex[:8]}"
    foreign = f"iqn.2000-01.org.example:{uuid.uuid4().hex[:8]}"
    tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "9000", "--targetname", stray)
    tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "9001", "--targetname", foreign)
    try:
        assert driver.ensure_exports([exported]) == [stray]
        assert stray in show(tgtd, "target")
        assert driver.list_exports() == sorted([exported.iqn, stray])
    finally:
        for tid in ("9000", "9001"):
            tgtd.tgtadm("--op", "delete", "--mode", "target", "--tid", tid)


def test_two_servers_sharing_tgtd_skip_each_others_tids(tgtd, ceph_cluster, make_clone):
    # Both read the same targets, so both pick the same next tid; the second must move on.
    a, b = (TgtTargetDriver(str(ceph_cluster.conf_path), ceph_cluster.pool, tgtd.portal,
                            control=tgtd.control) for _ in range(2))
    spec_a, spec_b = make_spec(make_clone()), make_spec(make_clone())
    a.create_export(spec_a)
    b.create_export(spec_b)
    try:
        listing = show(tgtd, "target")
        assert f": {spec_a.iqn}\n" in listing and f": {spec_b.iqn}\n" in listing
        assert iscsi_tool("iscsi-inq", tgtd, spec_a).returncode == 0
        assert iscsi_tool("iscsi-inq", tgtd, spec_b).returncode == 0
    finally:
        a.remove_export(spec_a.iqn)
        b.remove_export(spec_b.iqn)
    assert spec_a.iqn not in show(tgtd, "target") and spec_b.iqn not in show(tgtd, "target")


def test_tgtd_stop_kills_only_its_daemon_and_cleans_up(tgtd):
    other = Tgtd()
    other.start()
    pid, control = other.pid, other.control
    assert (SOCKET_DIR / f"socket.{control}").exists()
    other.stop()
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
    assert not (SOCKET_DIR / f"socket.{control}").exists()
    assert tgtd.tgtadm("--op", "show", "--mode", "sys").returncode == 0  # ours still runs


def test_socket_runner_answers_every_command_as_tgtadm_does(tgtd, ceph_cluster, clone):
    """The same command lines, one after the other through each runner against the same
    tgtd: identical exit codes, output and messages (successes, refusals, listings)."""
    base = ["tgtadm", "--lld", "iscsi", "-C", str(tgtd.control)]
    user, tid = f"u{uuid.uuid4().hex[:8]}", "8100"
    pool, bsopts = ceph_cluster.pool, f"conf={ceph_cluster.conf_path}"
    steps = [
        ["--op", "new", "--mode", "target", "--tid", tid, "--targetname", f"{PREFIX}{clone}"],
        ["--op", "new", "--mode", "target", "--tid", tid, "--targetname", f"{PREFIX}{clone}"],
        ["--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "--bstype", "rbd",
         "--backing-store", f"{pool}/{clone}", "--bsopts", bsopts],
        ["--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "2", "--bstype", "rbd",
         "--backing-store", f"{pool}/dsk-missing", "--bsopts", bsopts],
        ["--op", "new", "--mode", "account", "--user", user, "--password", "Secret12345678"],
        ["--op", "bind", "--mode", "account", "--tid", tid, "--user", user],
        ["--op", "bind", "--mode", "target", "--tid", tid, "--initiator-name", "iqn.x:y"],
        ["--op", "show", "--mode", "target"],
        ["--op", "show", "--mode", "conn", "--tid", tid],
        ["--op", "show", "--mode", "account"],
        ["--op", "delete", "--mode", "target", "--force", "--tid", tid],
        ["--op", "delete", "--mode", "target", "--force", "--tid", tid],
        ["--op", "delete", "--mode", "account", "--user", user],
        ["--op", "delete", "--mode", "account", "--user", user],
    ]
    answers = {}
    for name, run in (("tgtadm", subprocess_runner()), ("socket", TgtdSocketRunner())):
        answers[name] = [run([*base, *step]) for step in steps]
    assert answers["socket"] == answers["tgtadm"]
    codes = [rc for rc, _, _ in answers["socket"]]
    assert codes == [0, 22, 0, 22, 0, 0, 0, 0, 0, 0, 0, 22, 0, 22]  # both refusals seen
    assert f"{PREFIX}{clone}" in answers["socket"][7][1]
