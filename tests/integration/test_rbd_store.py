"""RbdImageStore and QemuImgInspector against a real Ceph cluster and real qemu-img.

Contents are always read back through the `rbd` CLI, not through the adapter under test.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bmi_server.adapters.ceph import rbd_store as rbd_store_module
from bmi_server.adapters.ceph.rbd_store import GOLDEN_SNAPSHOT, RbdImageStore
from bmi_server.adapters.qemu_img import QemuImgInspector
from bmi_server.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from bmi_server.core.models import ExternalVolume
from bmi_server.core.naming import NOT_IMPORTABLE
from bmi_server.devenv.ceph_cluster import CephCluster

pytestmark = pytest.mark.ceph

MiB = 1 << 20
META = {"bmi.project": "p1", "bmi.name": "img", "bmi.kind": "golden"}


def name(prefix: str = "v") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def rbd(cluster: CephCluster, *args: str) -> bytes:
    return subprocess.run(
        ["rbd", "-c", str(cluster.conf_path), "-p", cluster.pool, *args],
        check=True, capture_output=True,
    ).stdout


def content(cluster: CephCluster, volume: str) -> bytes:
    return rbd(cluster, "export", "--no-progress", volume, "-")


def snapshots(cluster: CephCluster, volume: str) -> list[str]:
    return [s["name"] for s in snapshot_list(cluster, volume)]


def snapshot_list(cluster: CephCluster, volume: str) -> list[dict]:
    return json.loads(rbd(cluster, "snap", "ls", volume, "--format", "json"))


def expected(size: int, *writes: tuple[int, bytes]) -> bytes:
    data = bytearray(size)
    for offset, chunk in writes:
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


def make_qcow2(path: Path, size: str, *writes: tuple[int, int, int]) -> None:
    """A qcow2 file with (pattern byte, offset, length) writes done by qemu-io."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    cmds = [arg for p, off, n in writes for arg in ("-c", f"write -P {p:#x} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   capture_output=True)


# --- create / write / seal / clone --------------------------------------------------


def test_create_write_seal_clone(rbd_store: RbdImageStore, ceph_cluster: CephCluster) -> None:
    img, disk = name("img"), name("disk")
    rbd_store.create(img, 8 * MiB, META)
    assert rbd_store.get(img).complete is False
    rbd_store.write(img, 4096, b"\xab" * 5000)
    rbd_store.write(img, 5 * MiB, b"golden")
    rbd_store.seal(img)

    info = rbd_store.get(img)
    assert info.complete and info.parent is None and info.size_bytes == 8 * MiB
    assert info.metadata == META
    assert snapshots(ceph_cluster, img) == [GOLDEN_SNAPSHOT]
    assert snapshot_list(ceph_cluster, img)[0]["protected"] == "true"

    disk_meta = {"bmi.project": "p1", "bmi.kind": "disk"}  # no bmi.name, unlike the image
    rbd_store.clone(img, disk, disk_meta)
    want = expected(8 * MiB, (4096, b"\xab" * 5000), (5 * MiB, b"golden"))
    assert content(ceph_cluster, disk) == want
    disk_info = rbd_store.get(disk)
    assert disk_info.parent == img and disk_info.complete
    # librbd copies the parent's metadata into a clone; the store must not keep it.
    assert disk_info.metadata == disk_meta

    assert rbd_store.used_bytes(disk) == 0
    assert rbd_store.used_bytes(img) > 0
    rbd_store.write(disk, 0, b"node")
    assert 0 < rbd_store.used_bytes(disk) <= 4 * MiB
    assert content(ceph_cluster, disk)[:8] == b"node" + want[4:8]
    assert content(ceph_cluster, img) == want  # the image is untouched


def test_clone_of_unsealed_image_is_refused(rbd_store: RbdImageStore) -> None:
    img = name("img")
    rbd_store.create(img, MiB, META)
    with pytest.raises(FailedPrecondition):
        rbd_store.clone(img, name("disk"), {"bmi.kind": "disk"})


def test_set_metadata_replaces_given_keys(rbd_store: RbdImageStore) -> None:
    img = name("img")
    rbd_store.create(img, MiB, META)
    rbd_store.set_metadata(img, {"bmi.name": "renamed", "bmi.extra": "x"})
    assert rbd_store.get(img).metadata == {**META, "bmi.name": "renamed", "bmi.extra": "x"}
    with pytest.raises(InvalidArgument):
        rbd_store.set_metadata(img, {"bmi.complete": "1"})  # the store's own key


# --- copies -------------------------------------------------------------------------


def test_copy_flattened(rbd_store: RbdImageStore, ceph_cluster: CephCluster) -> None:
    img, disk, copy = name("img"), name("disk"), name("copy")
    rbd_store.create(img, 4 * MiB, META)
    rbd_store.write(img, 0, b"base")
    rbd_store.seal(img)
    rbd_store.clone(img, disk, {"bmi.kind": "disk"})
    rbd_store.write(disk, MiB, b"changed on the node")

    rbd_store.copy_flattened(disk, copy, {"bmi.kind": "snapshot"})
    assert content(ceph_cluster, copy) == content(ceph_cluster, disk)
    info = rbd_store.get(copy)
    assert info.parent is None and not info.complete
    assert info.metadata == {"bmi.kind": "snapshot"}
    assert snapshots(ceph_cluster, disk) == []  # temporary snapshot gone
    assert rbd_store.get(disk).temporary_snapshots == ()
    # Independent: the source chain can go away.
    rbd_store.remove(disk)
    rbd_store.remove(img)
    rbd_store.seal(copy)
    assert content(ceph_cluster, copy)[:4] == b"base"
    with pytest.raises(AlreadyExists):
        rbd_store.copy_flattened(copy, copy, {})


def test_copy_external(rbd_store: RbdImageStore, ceph_cluster: CephCluster,
                       tmp_path: Path) -> None:
    ext, vol = name("ext"), name("vol")
    data = expected(3 * MiB, (100, b"external data"), (2 * MiB, b"\x01" * 4096))
    (tmp_path / "ext.raw").write_bytes(data)
    rbd(ceph_cluster, "import", "--no-progress", str(tmp_path / "ext.raw"), ext)
    rbd(ceph_cluster, "image-meta", "set", ext, "owner", "someone else")

    assert rbd_store.external_volume(ext) == ExternalVolume(3 * MiB, from_bmi=False)
    rbd_store.copy_external(ext, vol, META)
    assert content(ceph_cluster, vol) == data
    assert rbd_store.get(vol).metadata == META
    assert rbd_store.get(ext) is None  # not BMI's
    with pytest.raises(NotFound):
        rbd_store.external_volume(name("missing"))


def test_volumes_made_from_bmis_are_marked_and_never_copied_out(
    rbd_store: RbdImageStore, ceph_cluster: CephCluster
) -> None:
    img, disk = name("img"), name("disk")
    rbd_store.create(img, 4 * MiB, META)
    rbd_store.write(img, 0, b"tenant data")
    rbd_store.seal(img)
    rbd_store.clone(img, disk, {"bmi.kind": "disk", "bmi.project": "p2"})
    # What a pool admin can make of BMI's volumes with the rbd CLI, under other names:
    copied = name("copied")  # a copy carries the disk's bmi.* keys along
    rbd(ceph_cluster, "cp", "--no-progress", disk, copied)
    stripped = name("stripped")  # a clone of the image, inherited keys removed
    rbd(ceph_cluster, "clone", f"{img}@{GOLDEN_SNAPSHOT}", stripped)
    strip_metadata(ceph_cluster, stripped)
    far = name("far")  # a clone of a stripped clone: BMI's two parents up
    rbd(ceph_cluster, "snap", "create", f"{stripped}@s")
    rbd(ceph_cluster, "snap", "protect", f"{stripped}@s")
    rbd(ceph_cluster, "clone", f"{stripped}@s", far)
    strip_metadata(ceph_cluster, far)
    named = "bmi-" + name("bare")  # a parent named as BMI names its volumes, no keys
    rbd(ceph_cluster, "create", "--size", "1M", named)
    rbd(ceph_cluster, "snap", "create", f"{named}@s")
    rbd(ceph_cluster, "snap", "protect", f"{named}@s")
    child = name("child")
    rbd(ceph_cluster, "clone", f"{named}@s", child)
    site = name("site")  # someone else's, with metadata of its own, and a clone of it
    rbd(ceph_cluster, "create", "--size", "1M", site)
    rbd(ceph_cluster, "image-meta", "set", site, "owner", "site team")
    rbd(ceph_cluster, "snap", "create", f"{site}@s")
    rbd(ceph_cluster, "snap", "protect", f"{site}@s")
    site_clone = name("site-clone")
    rbd(ceph_cluster, "clone", f"{site}@s", site_clone)

    assert image_meta(ceph_cluster, child) == {} and "bmi.kind" in image_meta(ceph_cluster, copied)
    for source in (img, disk, copied, stripped, far, child):
        assert rbd_store.external_volume(source).from_bmi, source
        target = name("vol")
        with pytest.raises(PermissionDenied) as refused:
            rbd_store.copy_external(source, target, META)
        assert refused.value.message == NOT_IMPORTABLE
        assert target not in rbd(ceph_cluster, "ls").decode().split()  # nothing made
    for source in (site, site_clone):
        assert not rbd_store.external_volume(source).from_bmi, source
    for volume in (far, f"{stripped}@s", stripped, child, f"{named}@s", named, site_clone,
                   f"{site}@s", site, copied, disk, img):  # fmt: skip
        if "@" in volume:
            rbd(ceph_cluster, "snap", "unprotect", volume)
            rbd(ceph_cluster, "snap", "rm", "--no-progress", volume)
        elif volume in (disk, img):
            rbd_store.remove(volume)
        else:
            rbd(ceph_cluster, "rm", "--no-progress", volume)


def image_meta(cluster: CephCluster, volume: str) -> dict[str, str]:
    listed = rbd(cluster, "image-meta", "list", volume, "--format", "json")
    return json.loads(listed or b"{}")  # no keys: no output at all


def strip_metadata(cluster: CephCluster, volume: str) -> None:
    for key in image_meta(cluster, volume):
        rbd(cluster, "image-meta", "remove", volume, key)
    assert image_meta(cluster, volume) == {}


# --- import and inspection ----------------------------------------------------------


def test_import_qcow2(rbd_store: RbdImageStore, ceph_cluster: CephCluster,
                      tmp_path: Path) -> None:
    qcow = tmp_path / "disk.qcow2"
    make_qcow2(qcow, "4M", (0xAB, 0, 65536), (0xCD, 3 * MiB, 4096))
    inspector = QemuImgInspector()
    info = inspector.inspect(qcow, "qcow2")
    assert (info.file_format, info.virtual_size_bytes) == ("qcow2", 4 * MiB)
    assert info.data_bytes_bound == 2 * 65536  # two clusters written

    vol = name("imp")
    rbd_store.create(vol, info.virtual_size_bytes, META)
    inspector.convert_to_raw(qcow, tmp_path / "disk.raw")
    assert (tmp_path / "disk.raw").stat().st_blocks * 512 < MiB  # sparse
    rbd_store.import_raw_file(vol, tmp_path / "disk.raw")
    want = expected(4 * MiB, (0, b"\xab" * 65536), (3 * MiB, b"\xcd" * 4096))
    assert content(ceph_cluster, vol) == want
    assert rbd_store.used_bytes(vol) <= 2 * 4 * MiB  # holes and zeros never written


def test_import_raw(rbd_store: RbdImageStore, ceph_cluster: CephCluster,
                    tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    data = expected(2 * MiB, (512, b"raw bytes"))
    raw.write_bytes(data)
    assert QemuImgInspector().inspect(raw, "raw").virtual_size_bytes == 2 * MiB
    vol = name("imp")
    rbd_store.create(vol, 2 * MiB, META)
    rbd_store.import_raw_file(vol, raw)
    assert content(ceph_cluster, vol) == data


def test_import_bad_files(rbd_store: RbdImageStore, ceph_cluster: CephCluster,
                          tmp_path: Path) -> None:
    vol = name("imp")
    rbd_store.create(vol, MiB, META)
    big = tmp_path / "big.raw"
    big.write_bytes(b"x" * (2 * MiB))
    with pytest.raises(InvalidArgument, match="larger than its volume"):
        rbd_store.import_raw_file(vol, big)
    with pytest.raises(NotFound):
        rbd_store.import_raw_file(name("missing"), big)
    rbd(ceph_cluster, "create", "--size", "1M", foreign := name("ext"))
    with pytest.raises(FailedPrecondition, match="not made by BMI"):
        rbd_store.import_raw_file(foreign, big)


def test_inspector_rejects_corrupt_qcow2(tmp_path: Path) -> None:
    good = tmp_path / "good.qcow2"
    make_qcow2(good, "4M", (0xAB, 0, 65536))
    inspector = QemuImgInspector()

    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InvalidArgument, match=r"not an acceptable qcow2 image: .*truncated"):
        inspector.inspect(truncated, "qcow2")

    garbled = bytearray(good.read_bytes())
    garbled[0:4] = b"XXXX"  # magic
    (tmp_path / "garbled.qcow2").write_bytes(garbled)
    with pytest.raises(InvalidArgument, match="not a qcow2 image"):
        inspector.inspect(tmp_path / "garbled.qcow2", "qcow2")

    # An L1 entry pointing past the end of the file: the table walk notices.
    bad_l1 = bytearray(good.read_bytes())
    l1_offset = struct.unpack(">Q", bad_l1[40:48])[0]
    bad_l1[l1_offset : l1_offset + 8] = struct.pack(">Q", (1 << 63) | 0xDEAD0000)
    (tmp_path / "bad_l1.qcow2").write_bytes(bad_l1)
    with pytest.raises(InvalidArgument, match="outside the file"):
        inspector.inspect(tmp_path / "bad_l1.qcow2", "qcow2")

    # Tables the walk accepts but refcounts that are wrong: only `qemu-img check` (in the
    # sandbox) notices.
    bad_refcount = bytearray(good.read_bytes())
    reftable = struct.unpack(">Q", bad_refcount[48:56])[0]
    block = struct.unpack(">Q", bad_refcount[reftable : reftable + 8])[0]
    bad_refcount[block : block + 2] = b"\0\0"  # the header cluster: refcount 0
    (tmp_path / "bad_refcount.qcow2").write_bytes(bad_refcount)
    with pytest.raises(InvalidArgument, match=r"not a valid qcow2 image: .*ERROR"):
        inspector.inspect(tmp_path / "bad_refcount.qcow2", "qcow2")

    # Declared raw: any bytes are a raw image (see the inspector's comment).
    assert inspector.inspect(good, "raw").virtual_size_bytes == good.stat().st_size
    with pytest.raises(InvalidArgument):
        inspector.inspect(good, "vmdk")


# --- listing ------------------------------------------------------------------------


def test_list_volumes_only_bmi(rbd_store: RbdImageStore, ceph_cluster: CephCluster) -> None:
    img, disk, foreign, foreign_clone = name("img"), name("disk"), name("ext"), name("ext")
    rbd_store.create(img, MiB, META)
    rbd_store.seal(img)
    rbd_store.clone(img, disk, {"bmi.kind": "disk"})
    rbd(ceph_cluster, "create", "--size", "1M", foreign)
    # Made outside BMI from a BMI image: carries copied bmi.* metadata, still not BMI's.
    rbd(ceph_cluster, "clone", f"{img}@{GOLDEN_SNAPSHOT}", foreign_clone)
    assert b"bmi.kind" in rbd(ceph_cluster, "image-meta", "list", foreign_clone)

    by_name = {v.name: v for v in rbd_store.list_volumes()}
    assert img in by_name and disk in by_name
    assert foreign not in by_name and foreign_clone not in by_name
    assert by_name[disk].parent == img and by_name[img].parent is None
    assert by_name[img].complete and by_name[disk].complete
    rbd(ceph_cluster, "rm", "--no-progress", foreign_clone)


def test_list_volumes_agrees_with_get(
    rbd_store: RbdImageStore, ceph_cluster: CephCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """list_volumes decodes image headers itself; it must say what librbd says."""
    img, disk, copy, plain = name("img"), name("disk"), name("copy"), name("plain")
    rbd_store.create(img, 3 * MiB, META)
    rbd_store.seal(img)
    rbd_store.clone(img, disk, {"bmi.kind": "disk", "bmi.name": "d"})
    rbd_store.copy_flattened(disk, copy, {"bmi.kind": "snapshot"})
    rbd_store.create(plain, 5 * MiB, {"bmi.kind": "golden", "bmi.note": "\u00e9t\u00e9"})
    for snap in ("bmi-tmp-b", "bmi-tmp-a", "keep"):
        rbd(ceph_cluster, "snap", "create", f"{disk}@{snap}")
    mine = {img, disk, copy, plain}

    listed = {v.name: v for v in rbd_store.list_volumes() if v.name in mine}
    assert listed == {n: rbd_store.get(n) for n in mine}
    assert listed[disk].temporary_snapshots == ("bmi-tmp-a", "bmi-tmp-b")
    assert listed[disk].parent == img and listed[copy].parent is None
    assert listed[plain].size_bytes == 5 * MiB and not listed[plain].complete

    # The librbd fallback (for headers the decoder does not know) gives the same answer.
    def unknown(*_args: object) -> None:
        raise rbd_store_module._HeaderFormatError("test")

    monkeypatch.setattr(rbd_store_module, "_header_info", unknown)
    assert {v.name: v for v in rbd_store.list_volumes() if v.name in mine} == listed


def test_temporary_snapshot_left_by_interrupted_copy(
    rbd_store: RbdImageStore, ceph_cluster: CephCluster
) -> None:
    vol = name("vol")
    rbd_store.create(vol, MiB, META)
    snap = "bmi-tmp-" + name("copy")
    rbd(ceph_cluster, "snap", "create", f"{vol}@{snap}")
    rbd(ceph_cluster, "snap", "protect", f"{vol}@{snap}")
    rbd(ceph_cluster, "snap", "create", f"{vol}@other")
    assert rbd_store.get(vol).temporary_snapshots == (snap,)
    with pytest.raises(InvalidArgument):
        rbd_store.remove_temporary_snapshot(vol, "other")
    rbd_store.remove_temporary_snapshot(vol, snap)
    assert snapshots(ceph_cluster, vol) == ["other"]
    rbd_store.remove_temporary_snapshot(vol, snap)  # idempotent
    rbd_store.remove_temporary_snapshot(name("missing"), snap)


# --- removal ------------------------------------------------------------------------


def test_remove_idempotent_and_refused_with_clones(
    rbd_store: RbdImageStore, ceph_cluster: CephCluster
) -> None:
    img, disk = name("img"), name("disk")
    rbd_store.create(img, MiB, META)
    rbd_store.seal(img)
    rbd_store.clone(img, disk, {"bmi.kind": "disk"})

    with pytest.raises(FailedPrecondition, match=disk):
        rbd_store.remove(img)
    assert rbd_store.get(img).complete  # refused before touching anything
    assert snapshots(ceph_cluster, img) == [GOLDEN_SNAPSHOT]

    rbd_store.remove(disk)
    rbd_store.remove(disk)
    rbd_store.remove(img)
    rbd_store.remove(img)
    rbd_store.remove(name("never"))
    assert rbd_store.get(img) is None and rbd_store.get(disk) is None
    listed = rbd(ceph_cluster, "ls").decode().split()
    assert img not in listed and disk not in listed


# --- errors -------------------------------------------------------------------------


def test_not_found_and_already_exists(rbd_store: RbdImageStore) -> None:
    missing = name("missing")
    assert rbd_store.get(missing) is None
    for call in (
        lambda: rbd_store.write(missing, 0, b"x"),
        lambda: rbd_store.seal(missing),
        lambda: rbd_store.set_metadata(missing, {"bmi.a": "b"}),
        lambda: rbd_store.used_bytes(missing),
        lambda: rbd_store.external_volume(missing),
        lambda: rbd_store.clone(missing, name("disk"), {}),
        lambda: rbd_store.copy_flattened(missing, name("copy"), {}),
        lambda: rbd_store.copy_external(missing, name("copy"), {}),
    ):
        with pytest.raises(NotFound, match=missing):
            call()

    img = name("img")
    rbd_store.create(img, MiB, META)
    with pytest.raises(AlreadyExists):
        rbd_store.create(img, MiB, META)
    rbd_store.seal(img)
    disk = name("disk")
    rbd_store.clone(img, disk, {})
    with pytest.raises(AlreadyExists):
        rbd_store.clone(img, disk, {})
    with pytest.raises(InvalidArgument):
        rbd_store.write(img, MiB - 1, b"xy")  # past the end


def test_unreachable_cluster_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        f"[global]\nmon host = [v2:127.0.0.1:{port}]\nauth client required = none\n"
    )
    store = RbdImageStore(str(conf), "rbd", op_timeout=1)
    with pytest.raises(Unavailable, match=r"^ceph: "):
        store.get("anything")
    with pytest.raises(Unavailable):
        store.list_volumes()
    store.close()


def test_clone_is_labelled_atomically_and_keeps_empty_values(rbd_store):
    """The clone's header gets its own labels in one write: nothing of the parent's
    labels survives, and an empty value reads back as absent (not as a crash)."""
    rbd_store.create("bmi-img-atomic", 1 << 20, {"bmi.kind": "image", "bmi.source": "x",
                                                 "bmi.only-parent": "p"})
    rbd_store.seal("bmi-img-atomic")
    rbd_store.clone("bmi-img-atomic", "bmi-dsk-atomic", {"bmi.kind": "disk", "bmi.source": ""})
    info = rbd_store.get("bmi-dsk-atomic")
    assert info is not None and info.complete
    assert info.metadata == {"bmi.kind": "disk"}
    listed = {v.name: v for v in rbd_store.list_volumes()}["bmi-dsk-atomic"]
    assert listed.metadata == info.metadata and listed.parent == "bmi-img-atomic"
    rbd_store.remove("bmi-dsk-atomic")
    rbd_store.remove("bmi-img-atomic")


def test_a_conversion_past_its_time_limit_is_stopped(tmp_path: Path) -> None:
    qcow = tmp_path / "disk.qcow2"
    make_qcow2(qcow, "64M", (0xAB, 0, 4 * MiB))
    inspector = QemuImgInspector(convert_timeout=0.01)
    inspector.inspect(qcow, "qcow2")
    with pytest.raises(InvalidArgument, match="took longer than"):
        inspector.convert_to_raw(qcow, tmp_path / "disk.raw")
    with pytest.raises(DeadlineExceeded):
        QemuImgInspector().convert_to_raw(qcow, tmp_path / "disk.raw", timeout=0.01)


def test_content_digest_hashes_holes_as_zeros_and_reads_the_sealed_snapshot(
    rbd_store: RbdImageStore, ceph_cluster: CephCluster
) -> None:
    import hashlib

    vol = name()
    size = 64 * MiB + 512  # data in the middle, holes around it, an odd tail
    rbd_store.create(vol, size, META)
    rbd_store.write(vol, 20 * MiB + 7, b"\xab" * 5000)
    content = bytearray(size)
    content[20 * MiB + 7 : 20 * MiB + 7 + 5000] = b"\xab" * 5000
    want = hashlib.sha256(content).hexdigest()
    assert rbd_store.content_digest(vol) == want
    assert not rbd_store.modified_since_sealed(vol)  # not sealed: nothing to compare with
    rbd_store.seal(vol)
    assert not rbd_store.modified_since_sealed(vol)
    subprocess.run(["rbd", "-c", str(ceph_cluster.conf_path), "-p", ceph_cluster.pool,
                    "bench", "--io-type", "write", "--io-size", "4096", "--io-total", "4096",
                    vol], check=True, capture_output=True)
    assert rbd_store.modified_since_sealed(vol)
    assert rbd_store.content_digest(vol) == want  # the snapshot clones are made from
    rbd_store.remove(vol)


def test_hashing_a_large_hole_stops_once_the_volume_is_removed(rbd_store: RbdImageStore):
    import threading

    vol = name()
    rbd_store.create(vol, 64 << 30, META)  # 64 GiB of hole: about a minute of hashing
    outcome: list[BaseException] = []

    def hash_it() -> None:
        try:
            rbd_store.content_digest(vol)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    worker = threading.Thread(target=hash_it)
    worker.start()
    time.sleep(1)
    rbd_store.remove(vol)
    worker.join(20)
    assert not worker.is_alive(), "still hashing a removed volume"
    assert outcome and isinstance(outcome[0], Unavailable)
