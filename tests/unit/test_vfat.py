"""The FAT12 writer, read back by independent tools: fsck.fat (dosfstools), mtools and
blkid (util-linux) must accept the image and find the label, the long names and the bytes."""

from __future__ import annotations

import os
import subprocess

import pytest

from bmi_server import vfat

FILES = [
    ("meta-data", b'{"instance-id": "i-0123456789abcdef"}\n'),
    ("user-data", b""),
    ("network-config", bytes(range(256)) * 40),  # 10 KiB: five clusters
    ("a-name-longer-than-twenty-six-characters.txt", b"two long-name entries"),
]


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "drive.img"
    path.write_bytes(vfat.build(FILES, label="cidata", seed="i-0123456789abcdef"))
    return path


def test_fsck_finds_a_clean_fat12_file_system(image):
    out = run("fsck.fat", "-n", "-v", str(image))
    # Four files and the volume label; 1 + 5 + 1 clusters; no repair proposed (exit 0).
    assert "12 bit entries" in out and "5 files, 7/1021 clusters" in out


def test_mtools_lists_the_long_names_and_reads_every_byte(image, tmp_path):
    listing = run("mdir", "-i", str(image), "-b", "::")
    assert sorted(line.removeprefix("::/") for line in listing.split()) == sorted(
        name for name, _ in FILES
    )
    for name, content in FILES:
        out = tmp_path / ("copy-" + name)
        run("mcopy", "-n", "-i", str(image), f"::{name}", str(out))
        assert out.read_bytes() == content, name


def test_blkid_sees_vfat_labelled_cidata(image):
    out = run("blkid", "-p", "-o", "export", str(image))
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["TYPE"] == "vfat" and fields["LABEL"] == "cidata"


def test_equal_inputs_give_equal_images_and_the_seed_picks_the_serial():
    a = vfat.build(FILES, label="cidata", seed="one")
    assert a == vfat.build(FILES, label="cidata", seed="one")
    b = vfat.build(FILES, label="cidata", seed="two")
    assert a != b and a[39:43] != b[39:43] and a[:39] == b[:39]


def test_files_that_do_not_fit_are_refused():
    room = vfat.capacity()
    vfat.build([("big", b"x" * room)], label="cidata")  # exactly full
    with pytest.raises(vfat.DoesNotFit):
        vfat.build([("big", b"x" * room), ("more", b"y")], label="cidata")


@pytest.mark.parametrize("files, label", [
    ([("a/b", b"")], "cidata"),
    ([("x", b""), ("X", b"")], "cidata"),
    ([("ok", b"")], "has space"),
    ([(".hidden", b"")], "cidata"),
])  # fmt: skip
def test_bad_names_and_labels_are_refused(files, label):
    with pytest.raises(ValueError):
        vfat.build(files, label=label)
