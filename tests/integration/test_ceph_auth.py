"""The throwaway Ceph cluster authenticates its clients (cephx), as a real one does: its
monitor's port is open to every local user, so a client without one of the cluster's keys
must get nothing; the keys are readable by their owner only; tgtd's client may use the
pool's images but not the cluster's keys or configuration; and the caps the operator guide
gives BMI's own user on a production cluster are enough for everything the server does."""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import rados

from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.devenv.ceph_cluster import CephCluster

pytestmark = pytest.mark.ceph

QUICK = {"client_mount_timeout": "10", "rados_mon_op_timeout": "10"}


@pytest.fixture
def keyless_conf(ceph_cluster: CephCluster, tmp_path: Path) -> Path:
    """The cluster's ceph.conf without the line that leads clients to its keys."""
    lines = ceph_cluster.conf_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("keyring")]
    assert len(kept) == len(lines) - 1
    path = tmp_path / "keyless.conf"
    path.write_text("".join(kept))
    return path


def connect(conf: Path, name: str = "client.admin", **options: str) -> rados.Rados:
    client = rados.Rados(conffile=str(conf), name=name, conf={**QUICK, **options})
    try:
        client.connect(timeout=10)
    except BaseException:
        client.shutdown()
        raise
    return client


def test_the_cluster_keys_work(ceph_cluster, keyless_conf):
    """The control for the refusals below: the same conf with the admin key gets in."""
    client = connect(keyless_conf, keyring=str(ceph_cluster.keyring_path("client.admin")))
    try:
        assert ceph_cluster.pool in client.list_pools()
    finally:
        client.shutdown()


def test_a_client_without_a_key_is_refused(keyless_conf, tmp_path):
    with pytest.raises(rados.Error):  # no key to offer: nothing to authenticate with
        connect(keyless_conf, keyring=str(tmp_path / "none"))
    # Asking for no authentication at all, as any local user could before cephx.
    with pytest.raises(rados.PermissionDeniedError):
        connect(keyless_conf, keyring=str(tmp_path / "none"), auth_client_required="none")
    forged = tmp_path / "forged.keyring"  # the right name, a key the cluster never issued
    subprocess.run(["ceph-authtool", "--create-keyring", str(forged), "--gen-key",
                    "-n", "client.admin"], check=True, capture_output=True, timeout=30)
    with pytest.raises(rados.PermissionDeniedError):
        connect(keyless_conf, keyring=str(forged))
    listed = subprocess.run(["rados", "-c", str(keyless_conf), "--keyring", str(tmp_path / "none"),
                             "--client-mount-timeout", "10", "lspools"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode != 0 and "rbd" not in listed.stdout


def test_keys_are_private_to_their_owner(ceph_cluster):
    base = ceph_cluster.conf_path.parent
    keys = ceph_cluster.keyring_path("client.admin").parent
    assert sorted(p.name for p in keys.iterdir()) == [
        "client.admin.keyring", "client.bmi-tgt.keyring", "osd.0.keyring"]  # fmt: skip
    for directory in (base, keys):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for keyring in [*keys.iterdir(), base / "mon.a" / "keyring"]:
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600, keyring


def test_tgtds_client_uses_the_pool_but_not_the_cluster(ceph_cluster):
    client = connect(ceph_cluster.tgt_conf_path, name=f"client.{ceph_cluster.tgt_user}")
    try:
        with client.open_ioctx(ceph_cluster.pool) as ioctx:
            ioctx.write_full("bmi-tgt-probe", b"ok")
            assert ioctx.read("bmi-tgt-probe") == b"ok"
            ioctx.remove_object("bmi-tgt-probe")
        for command in ({"prefix": "auth get", "entity": "client.admin"},
                        {"prefix": "osd pool create", "pool": "not-for-tgtd", "pg_num": 1}):
            ret, _, _ = client.mon_command(json.dumps(command), b"", timeout=10)
            assert ret == -13, command  # EACCES
    finally:
        client.shutdown()


def test_the_servers_documented_caps_suffice(ceph_cluster, keyless_conf, tmp_path):
    """docs/operator-guide.md, "The server's Ceph user": `profile rbd` for mon and osd."""
    name = f"client.bmi-doc-{uuid.uuid4().hex[:8]}"
    admin = connect(ceph_cluster.conf_path)
    try:
        ret, keyring, err = admin.mon_command(json.dumps({
            "prefix": "auth get-or-create", "entity": name,
            "caps": ["mon", "profile rbd", "osd", f"profile rbd pool={ceph_cluster.pool}"],
        }), b"", timeout=10)  # fmt: skip
        assert ret == 0, err
        (tmp_path / "bmi.keyring").write_bytes(keyring)
        conf = tmp_path / "ceph.conf"
        conf.write_text(keyless_conf.read_text().replace(
            "[global]\n", f"[global]\nkeyring = {tmp_path / 'bmi.keyring'}\n", 1))
        image, disk, copy = (f"bmi-caps-{n}-{uuid.uuid4().hex[:8]}" for n in "idc")
        record = tmp_path / "ceph-client"
        previous = RbdImageStore(str(conf), ceph_cluster.pool, name)
        assert previous.fence_previous_instance(record) is None
        previous.close()
        store = RbdImageStore(str(conf), ceph_cluster.pool, name)
        try:
            assert store.fence_previous_instance(record)  # blocklisting included
            raw = tmp_path / "golden.raw"
            raw.write_bytes(b"golden" * 100_000)
            store.create(image, 1 << 20, {"bmi.kind": "image"})
            store.import_raw_file(image, raw)  # as an upload copies its spool file in
            store.seal(image)
            store.clone(image, disk, {"bmi.kind": "disk"})
            store.write(disk, 0, b"disk")
            store.copy_flattened(disk, copy, {"bmi.kind": "image"})
            store.set_metadata(copy, {"bmi.name": "copied"})
            assert store.get(copy).metadata["bmi.name"] == "copied"
            assert {image, disk, copy} <= {v.name for v in store.list_volumes()}
            for volume in (copy, disk, image):
                store.remove(volume)
        finally:
            store.close()
    finally:
        admin.mon_command(json.dumps({"prefix": "auth del", "entity": name}), b"", timeout=10)
        admin.shutdown()
