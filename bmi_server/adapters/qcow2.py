"""Reads a qcow2 file's header and mapping tables in pure Python, before qemu-img opens it.

A qcow2 header can make qemu-img read other files (a backing file, an external data file,
``json:`` names in either) and its tables can map many guest clusters onto one host
cluster, so a few MiB expand to terabytes. Both are decided here, from the bytes alone:
nothing in the file is followed. What passes is a self-contained image whose every guest
cluster has its own data in the file, and whose conversion writes at most
``QcowLayout.data_bytes_bound`` bytes.

Format: docs/interop/qcow2.txt in QEMU's sources (big-endian, versions 2 and 3).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"QFI\xfb"
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3_TAIL = struct.Struct(">QQQII")  # 32 more bytes

# Incompatible feature bits (v3).
_DIRTY, _CORRUPT, _EXTERNAL_DATA, _COMPRESSION_TYPE, _EXTENDED_L2 = (1 << b for b in range(5))
_KNOWN_INCOMPATIBLE = _DIRTY | _CORRUPT | _EXTERNAL_DATA | _COMPRESSION_TYPE | _EXTENDED_L2
_AUTOCLEAR_RAW_DATA = 1 << 1

# Header extension types.
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_ENCRYPTION = 0x0537BE77
_EXT_DATA_FILE = 0x44415441
_MAX_EXTENSIONS = 64

_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1 and standard L2 entries
_COMPRESSED = 1 << 62
_ZERO_FLAG = 1
_SECTOR = 512
MAX_TABLE_BYTES = 256 << 20  # L1 and all L2 tables read; far above any real image's


class Qcow2Refused(ValueError):
    """The file is not a qcow2 image BMI imports; the message says why, for the uploader."""


@dataclass(frozen=True)
class QcowLayout:
    version: int
    virtual_size: int
    cluster_size: int
    data_clusters: int  # guest clusters with data of their own in the file
    compressed_clusters: int

    @property
    def data_bytes_bound(self) -> int:
        """Most bytes a conversion to raw can write: one cluster per mapped guest cluster."""
        return (self.data_clusters + self.compressed_clusters) * self.cluster_size


def read_layout(f: BinaryIO, file_size: int, max_virtual_size: int) -> QcowLayout:
    """Check the header and walk L1/L2; Qcow2Refused unless the image is self-contained,
    unencrypted, clean, within ``max_virtual_size`` and free of shared clusters."""
    head = _read(f, 0, _V2_HEADER.size, file_size, "header")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method,
     l1_size, l1_offset, _refcount_offset, _refcount_clusters, nb_snapshots,
     _snapshots_offset) = _V2_HEADER.unpack(head)
    if magic != MAGIC:
        raise Qcow2Refused(f"not a qcow2 image ({_looks_like(head)})")
    if version not in (2, 3):
        raise Qcow2Refused(f"qcow2 version {version} is not supported")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2Refused(f"cluster size 2^{cluster_bits} is out of range")
    cluster_size = 1 << cluster_bits
    incompatible = autoclear = 0
    header_length = _V2_HEADER.size
    if version == 3:
        tail = _read(f, _V2_HEADER.size, _V3_TAIL.size, file_size, "header")
        incompatible, _compatible, autoclear, _refcount_order, header_length = (
            _V3_TAIL.unpack(tail)
        )
        if not _V2_HEADER.size + _V3_TAIL.size <= header_length <= cluster_size:
            raise Qcow2Refused("header length is out of range")
    if backing_offset or backing_size:
        raise Qcow2Refused("it names a backing file; upload a self-contained image")
    if crypt_method:
        raise Qcow2Refused("it is encrypted; upload an unencrypted image")
    if incompatible & _EXTERNAL_DATA or autoclear & _AUTOCLEAR_RAW_DATA:
        raise Qcow2Refused("it names an external data file; upload a self-contained image")
    if incompatible & ~_KNOWN_INCOMPATIBLE:
        raise Qcow2Refused("it uses qcow2 features this server does not know")
    if incompatible & (_DIRTY | _CORRUPT):
        raise Qcow2Refused("it is marked dirty or corrupt; repair it (qemu-img check -r all)")
    if nb_snapshots:
        raise Qcow2Refused("it has internal snapshots; convert it without them first")
    _check_extensions(f, header_length, cluster_size, file_size)
    if size <= 0:
        raise Qcow2Refused("its virtual size is zero")
    if size > max_virtual_size:
        raise Qcow2Refused(
            f"its virtual size ({size} bytes) is above this server's limit "
            f"({max_virtual_size} bytes)"
        )
    entry_bytes = 16 if incompatible & _EXTENDED_L2 else 8
    l2_entries = cluster_size // entry_bytes
    needed_l1 = -(-size // (l2_entries * cluster_size))
    if l1_size < needed_l1 or l1_size * 8 > MAX_TABLE_BYTES:
        raise Qcow2Refused("its L1 table size does not match its virtual size")
    data, compressed = _walk_tables(
        f, file_size, cluster_bits, l1_offset, needed_l1, entry_bytes, size
    )
    return QcowLayout(version, size, cluster_size, data, compressed)


def _check_extensions(f: BinaryIO, offset: int, cluster_size: int, file_size: int) -> None:
    """Header extensions sit between the header and the end of cluster 0."""
    for _ in range(_MAX_EXTENSIONS):
        if offset + 8 > cluster_size:
            return
        kind, length = struct.unpack(">II", _read(f, offset, 8, file_size, "header extension"))
        if kind == _EXT_END:
            return
        if kind == _EXT_DATA_FILE:
            raise Qcow2Refused("it names an external data file; upload a self-contained image")
        if kind == _EXT_ENCRYPTION:
            raise Qcow2Refused("it is encrypted; upload an unencrypted image")
        if kind == _EXT_BACKING_FORMAT:
            raise Qcow2Refused("it names a backing file; upload a self-contained image")
        offset += 8 + (length + 7) // 8 * 8
        if offset > cluster_size:
            raise Qcow2Refused("a header extension runs past the first cluster")
    raise Qcow2Refused("too many header extensions")


def _walk_tables(
    f: BinaryIO,
    file_size: int,
    cluster_bits: int,
    l1_offset: int,
    l1_entries: int,
    entry_bytes: int,
    virtual_size: int,
) -> tuple[int, int]:
    """Count the guest clusters mapped to data; refuse shared or out-of-file clusters.

    Every L2 table and every standard data cluster must be used once; compressed clusters
    may share a host cluster (qemu packs them) but no two may start at the same byte.
    """
    cluster_size = 1 << cluster_bits
    l1 = _entries(_read(f, l1_offset, l1_entries * 8, file_size, "L1 table"), 1)
    l2_entries = cluster_size // entry_bytes
    guest_clusters = -(-virtual_size // cluster_size)
    # Compressed descriptor: host offset in the low (62 - (cluster_bits - 8)) bits, then
    # the count of additional 512-byte sectors.
    offset_bits = 62 - (cluster_bits - 8)
    seen_tables: set[int] = set()
    seen_clusters: set[int] = set()
    seen_compressed: set[int] = set()
    table_bytes = l1_entries * 8
    data = compressed = 0
    for index, entry in enumerate(l1):
        table = entry & _OFFSET_MASK
        if not table:
            continue
        if table % cluster_size or table in seen_tables:
            raise Qcow2Refused("its L1 table maps one L2 table twice or at a misaligned offset")
        seen_tables.add(table)
        table_bytes += cluster_size
        if table_bytes > MAX_TABLE_BYTES:
            raise Qcow2Refused("its mapping tables are larger than any real image needs")
        l2 = _entries(_read(f, table, cluster_size, file_size, "L2 table"), entry_bytes // 8)
        first_guest = index * l2_entries
        for slot, l2_entry in enumerate(l2):
            if not l2_entry:
                continue
            if first_guest + slot >= guest_clusters:
                raise Qcow2Refused("it maps clusters beyond its virtual size")
            if l2_entry & _COMPRESSED:
                host = l2_entry & ((1 << offset_bits) - 1)
                sectors = ((l2_entry & ((1 << 62) - 1)) >> offset_bits) + 1
                end = (host & ~(_SECTOR - 1)) + sectors * _SECTOR
                if not host or host in seen_compressed or end > _round_up(file_size, _SECTOR):
                    raise Qcow2Refused("a compressed cluster is shared or lies outside the file")
                seen_compressed.add(host)
                compressed += 1
                continue
            host = l2_entry & _OFFSET_MASK
            if not host:
                continue  # unallocated, or reads as zeros: writes nothing
            if host % cluster_size or host + cluster_size > _round_up(file_size, cluster_size):
                raise Qcow2Refused("a data cluster is misaligned or lies outside the file")
            if host in seen_clusters:
                raise Qcow2Refused(
                    "several guest clusters share one host cluster (a size bomb)"
                )
            seen_clusters.add(host)
            if not l2_entry & _ZERO_FLAG:
                data += 1
    return data, compressed


def _entries(raw: bytes, stride: int) -> list[int]:
    """Big-endian 64-bit words; with extended L2 (stride 2) only each entry's first word."""
    words = array("Q", raw)
    words.byteswap()  # the file is big-endian; hosts here are little-endian
    return list(words[::stride]) if stride > 1 else list(words)


def _read(f: BinaryIO, offset: int, length: int, file_size: int, what: str) -> bytes:
    if offset < 0 or length < 0 or offset + length > file_size:
        raise Qcow2Refused(f"its {what} lies outside the file (truncated?)")
    f.seek(offset)
    raw = f.read(length)
    if len(raw) != length:
        raise Qcow2Refused(f"its {what} lies outside the file (truncated?)")
    return raw


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


_SIGNATURES = (
    (b"LUKS\xba\xbe", 0, "a LUKS container"),
    (b"KDMV", 0, "a VMDK image"),
    (b"vhdxfile", 0, "a VHDX image"),
    (b"conectix", 0, "a VHD image"),
    (b"<<< ", 0, "a VirtualBox VDI image"),
    (b"QFI", 0, "a qcow image of an unsupported version"),
)


def _looks_like(head: bytes) -> str:
    for signature, offset, name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return f"it looks like {name}"
    return "unknown signature"
