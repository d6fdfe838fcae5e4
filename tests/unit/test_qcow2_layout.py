"""The qcow2 header and table checks that run before qemu-img ever opens an upload."""

from __future__ import annotations

import subprocess

import pytest
from hostile_images import CLUSTER, corpus, qemu_img, write_qcow2

from bmi_server.adapters.qcow2 import Qcow2Refused, read_layout

MAX = 2 << 40


def layout(path, max_virtual=MAX):
    with path.open("rb") as f:
        return read_layout(f, path.stat().st_size, max_virtual)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    secret = tmp / "secret"
    secret.write_bytes(b"root:$6$not-for-tenants\n" * 100)
    return corpus(tmp, secret)


EXPECTED = {
    "data-file": "external data file",
    "backing-file": "backing file",
    "json-backing": "backing file",
    "shared-clusters": "share one host cluster",
    "shared-l2-tables": "one L2 table twice",
    "huge-virtual-size": "above this server's limit",
    "luks": "looks like a LUKS container",
    "qcow2-encrypted": "encrypted",
    "vmdk": "looks like a VMDK image",
    "vhdx": "looks like a VHDX image",
    "truncated": "outside the file",
    "internal-snapshot": "internal snapshots",
    "dirty": "dirty",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_hostile_file_is_refused_with_its_reason(hostile, name):
    with pytest.raises(Qcow2Refused, match=EXPECTED[name]):
        layout(hostile[name])


def test_the_size_bomb_passes_qemu_img_check_so_only_the_walk_catches_it(hostile):
    # The bomb is consistent qcow2: qemu would expand 2000 guest clusters from one.
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", hostile["shared-clusters"]],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert hostile["shared-clusters"].stat().st_size < 1 << 20


def test_a_well_formed_image_reports_its_size_and_data_bound(tmp_path):
    image = write_qcow2(tmp_path / "ok.qcow2", 1 << 30, {0: b"a" * CLUSTER, 9: b"b" * 10})
    found = layout(image)
    assert (found.virtual_size, found.cluster_size, found.data_clusters) == (1 << 30, CLUSTER, 2)
    assert found.data_bytes_bound == 2 * CLUSTER


def test_images_qemu_img_writes_are_accepted_compressed_or_not(tmp_path):
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        for i in range(64):
            f.seek(i * 3 * CLUSTER)
            f.write(bytes([i + 1]) * 5000 + b"text " * 2000)
        f.truncate(64 * 3 * CLUSTER)
    for options in ([], ["-c"]):
        out = tmp_path / f"disk{len(options)}.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, raw, out)
        found = layout(out)
        assert found.virtual_size == raw.stat().st_size
        assert found.data_clusters + found.compressed_clusters == 64
        assert (found.compressed_clusters > 0) == bool(options)


def test_the_virtual_size_limit_is_the_servers_setting(tmp_path):
    image = write_qcow2(tmp_path / "ok.qcow2", 1 << 30, {0: b"a"})
    assert layout(image, max_virtual=1 << 30).virtual_size == 1 << 30
    with pytest.raises(Qcow2Refused, match="above this server's limit"):
        layout(image, max_virtual=(1 << 30) - 1)


def test_mapping_beyond_the_virtual_size_or_outside_the_file_is_refused(tmp_path):
    image = write_qcow2(tmp_path / "ok.qcow2", 1 << 30, {0: b"a", 1: b"b"})
    beyond = bytearray(image.read_bytes())
    beyond[24:32] = CLUSTER.to_bytes(8, "big")  # virtual size: one cluster, two mapped
    (tmp_path / "beyond.qcow2").write_bytes(bytes(beyond))
    with pytest.raises(Qcow2Refused, match="beyond its virtual size"):
        layout(tmp_path / "beyond.qcow2")
    (tmp_path / "short.qcow2").write_bytes(image.read_bytes()[:-CLUSTER])  # data cut off
    with pytest.raises(Qcow2Refused, match="outside the file"):
        layout(tmp_path / "short.qcow2")
