"""Small FAT12 file system images, written in Python: a node's config drive.

cloud-init's NoCloud datasource reads its seed from a vfat (or iso9660) file system
labelled ``cidata``. Its files (``meta-data``, ``user-data``, ``network-config``) have
names longer than 8.3, so each gets VFAT long-name entries before its short entry. The
image is built in memory: no mkfs, no mount, no loop device. The same inputs always give
the same bytes (fixed dates, a serial derived from the caller's seed), so an image can be
rebuilt from its record and compared.

Layout (one flat root directory, no sub-directories): boot sector, two FATs, a 64-entry
root directory, then each file in consecutive clusters. Linux's vfat driver, blkid,
mtools and fsck.fat read it (tests/unit/test_vfat.py checks the last two).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Sequence

SECTOR = 512
SECTORS_PER_CLUSTER = 4
CLUSTER = SECTOR * SECTORS_PER_CLUSTER
RESERVED_SECTORS = 1
FATS = 2
ROOT_ENTRIES = 64
DIR_ENTRY = 32
MEDIA = 0xF8  # fixed disk
FAT12_MAX_CLUSTERS = 4084
DEFAULT_SIZE = 2 << 20
# 2000-01-01 00:00: fixed, so equal inputs give equal images.
_DATE = ((2000 - 1980) << 9) | (1 << 5) | 1
_TIME = 0
_ATTR_ARCHIVE = 0x20
_ATTR_VOLUME = 0x08
_ATTR_LFN = 0x0F
_LFN_CHARS = 13
_SHORT_OK = re.compile(r"[A-Z0-9!#$%&'()\-@^_`{}~]")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,11}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class DoesNotFit(ValueError):
    """The files need more room than the image has."""


def capacity(size_bytes: int = DEFAULT_SIZE) -> int:
    """Bytes of file data an image of ``size_bytes`` holds (whole clusters)."""
    return _geometry(size_bytes)[2] * CLUSTER


def build(
    files: Sequence[tuple[str, bytes]],
    *,
    label: str,
    seed: str = "",
    size_bytes: int = DEFAULT_SIZE,
) -> bytes:
    """A FAT12 image of ``size_bytes`` holding ``files`` (name, content) in its root
    directory, labelled ``label``; ``seed`` picks the volume serial number."""
    if not _LABEL.fullmatch(label):
        raise ValueError(f"bad volume label {label!r}")
    names = [name for name, _ in files]
    if len(set(n.lower() for n in names)) != len(names):
        raise ValueError("file names must be unique")
    for name in names:
        if not _NAME.fullmatch(name) or name.strip(".") != name:
            raise ValueError(f"bad file name {name!r}")
    fat_sectors, root_sectors, clusters = _geometry(size_bytes)
    total_sectors = size_bytes // SECTOR
    serial = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "little")

    image = bytearray(size_bytes)
    image[:SECTOR] = _boot_sector(total_sectors, fat_sectors, label, serial)
    fat = [MEDIA | 0xF00, 0xFFF] + [0] * clusters
    data_start = RESERVED_SECTORS + FATS * fat_sectors + root_sectors
    entries = [_short_entry(label.ljust(11).encode(), _ATTR_VOLUME, 0, 0)]
    taken: set[bytes] = set()
    next_cluster = 2
    for name, content in files:
        count = math.ceil(len(content) / CLUSTER)
        if next_cluster - 2 + count > clusters:
            raise DoesNotFit(f"the files need more than the {clusters * CLUSTER} bytes "
                             "the image holds")
        first = next_cluster if count else 0
        for i in range(count):
            cluster = next_cluster + i
            fat[cluster] = cluster + 1 if i < count - 1 else 0xFFF
            at = (data_start + (cluster - 2) * SECTORS_PER_CLUSTER) * SECTOR
            piece = content[i * CLUSTER : (i + 1) * CLUSTER]
            image[at : at + len(piece)] = piece
        next_cluster += count
        short = _short_name(name, taken)
        entries += _long_entries(name, short)
        entries.append(_short_entry(short, _ATTR_ARCHIVE, first, len(content)))
    if len(entries) > ROOT_ENTRIES:
        raise DoesNotFit(f"at most {ROOT_ENTRIES} directory entries")
    packed = _pack_fat12(fat, fat_sectors * SECTOR)
    for copy in range(FATS):
        at = (RESERVED_SECTORS + copy * fat_sectors) * SECTOR
        image[at : at + len(packed)] = packed
    root = (RESERVED_SECTORS + FATS * fat_sectors) * SECTOR
    directory = b"".join(entries)
    image[root : root + len(directory)] = directory
    return bytes(image)


def _geometry(size_bytes: int) -> tuple[int, int, int]:
    """(sectors per FAT, root directory sectors, data clusters) for an image size."""
    if size_bytes % SECTOR or size_bytes < 64 * SECTOR:
        raise ValueError(f"image size {size_bytes} is not a whole number of sectors >= 64")
    total = size_bytes // SECTOR
    root_sectors = ROOT_ENTRIES * DIR_ENTRY // SECTOR
    fat_sectors = 1
    while True:
        clusters = (total - RESERVED_SECTORS - FATS * fat_sectors - root_sectors) // (
            SECTORS_PER_CLUSTER
        )
        needed = math.ceil((clusters + 2) * 3 / 2 / SECTOR)
        if needed <= fat_sectors:
            break
        fat_sectors = needed
    if clusters > FAT12_MAX_CLUSTERS:
        raise ValueError(f"image size {size_bytes} is too large for FAT12")
    return fat_sectors, root_sectors, clusters


def _boot_sector(total_sectors: int, fat_sectors: int, label: str, serial: int) -> bytes:
    bpb = struct.pack(
        "<3s8sHBHBHHBHHHII",
        b"\xeb\x3c\x90",  # jump over the BPB
        b"BMI     ",
        SECTOR,
        SECTORS_PER_CLUSTER,
        RESERVED_SECTORS,
        FATS,
        ROOT_ENTRIES,
        total_sectors if total_sectors < 0x10000 else 0,
        MEDIA,
        fat_sectors,
        32,  # sectors per track and heads: nominal, nothing reads them
        64,
        0,  # hidden sectors (no partition table)
        total_sectors if total_sectors >= 0x10000 else 0,
    )
    ebpb = struct.pack("<BBBI11s8s", 0x80, 0, 0x29, serial, label.ljust(11).encode(), b"FAT12   ")
    # Not bootable: the code halts (a BIOS that boots it anyway stops there).
    code = b"\xfa\xf4\xeb\xfd"
    sector = bpb + ebpb + code
    return sector.ljust(SECTOR - 2, b"\0") + b"\x55\xaa"


def _pack_fat12(entries: list[int], size: int) -> bytes:
    out = bytearray(size)
    for n, value in enumerate(entries):
        at = n + n // 2
        if n % 2 == 0:
            out[at] = value & 0xFF
            out[at + 1] = (out[at + 1] & 0xF0) | (value >> 8)
        else:
            out[at] = (out[at] & 0x0F) | ((value & 0x0F) << 4)
            out[at + 1] = value >> 4
    return bytes(out)


def _short_name(name: str, taken: set[bytes]) -> bytes:
    """An 8.3 alias (``BASENA~1.EXT``) unique in the directory."""
    stem, dot, ext = name.upper().rpartition(".")
    if not dot:
        stem, ext = ext, ""
    stem = "".join(c for c in stem if _SHORT_OK.fullmatch(c)) or "FILE"
    ext = "".join(c for c in ext if _SHORT_OK.fullmatch(c))[:3]
    for n in range(1, 100):
        tail = f"~{n}"
        short = (stem[: 8 - len(tail)] + tail).ljust(8).encode() + ext.ljust(3).encode()
        if short not in taken:
            taken.add(short)
            return short
    raise DoesNotFit("too many similar file names")


def _checksum(short: bytes) -> int:
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _long_entries(name: str, short: bytes) -> list[bytes]:
    """The VFAT long-name entries for ``name``, in on-disk order (last part first)."""
    units = name.encode("utf-16-le")
    chars = [units[i : i + 2] for i in range(0, len(units), 2)]
    parts = math.ceil(len(chars) / _LFN_CHARS)
    padded = chars + [b"\0\0"] + [b"\xff\xff"] * (parts * _LFN_CHARS)
    checksum = _checksum(short)
    entries = []
    for seq in range(1, parts + 1):
        piece = b"".join(padded[(seq - 1) * _LFN_CHARS : seq * _LFN_CHARS])
        order = seq | (0x40 if seq == parts else 0)
        entries.append(
            bytes([order]) + piece[:10] + bytes([_ATTR_LFN, 0, checksum]) + piece[10:22]
            + b"\0\0" + piece[22:26]
        )  # fmt: skip
    return list(reversed(entries))


def _short_entry(short: bytes, attr: int, cluster: int, size: int) -> bytes:
    return struct.pack(
        "<11sBBBHHHHHHHI",
        short,
        attr,
        0,  # case flags
        0,  # creation time, tenths of a second
        _TIME,
        _DATE,
        _DATE,  # last access
        0,  # high word of the first cluster (FAT32 only)
        _TIME,
        _DATE,
        cluster,
        size,
    )
