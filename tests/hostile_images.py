"""A corpus of hostile disk-image files, each built inside a test's own temporary directory.

Some are made with qemu-img and then patched; the size bombs are written byte by byte by
``write_qcow2`` with consistent refcounts, so that ``qemu-img check`` passes them and only
BMI's own table walk can tell. Careful: ``qemu-img create -o data_file=PATH`` creates and
TRUNCATES PATH, so it is only ever pointed at a decoy in the temporary directory, and the
header is patched to name the real target afterwards.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_L2_ENTRIES = CLUSTER // 8
_COPIED = 1 << 63


def write_qcow2(
    path: Path,
    virtual_size: int,
    data: dict[int, bytes],
    aliases: dict[int, int] | None = None,
    share_l2_tables: bool = False,
) -> Path:
    """A qcow2 v3 file: ``data`` maps guest clusters to their content (one host cluster
    each); ``aliases`` maps more guest clusters onto another guest cluster's host cluster
    (a size bomb); ``share_l2_tables`` points every L1 entry at the first L2 table."""
    aliases = aliases or {}
    guests = sorted({*data, *aliases})
    l1_size = -(-virtual_size // (CLUSTER * _L2_ENTRIES))
    l1_clusters = -(-l1_size * 8 // CLUSTER)
    tables = sorted({g // _L2_ENTRIES for g in guests})
    if share_l2_tables:
        tables = tables[:1]
    next_cluster = 3 + l1_clusters  # 0 header, 1 refcount table, 2 refcount block
    l2_host = {t: (next_cluster + i) * CLUSTER for i, t in enumerate(tables)}
    next_cluster += len(tables)
    data_host = {g: (next_cluster + i) * CLUSTER for i, g in enumerate(sorted(data))}
    total_clusters = next_cluster + len(data)
    assert total_clusters <= CLUSTER // 2, "one refcount block covers the whole file"

    refcounts = [1] * total_clusters
    host_of = {**data_host, **{g: data_host[a] for g, a in aliases.items()}}
    for g, a in aliases.items():
        refcounts[data_host[a] // CLUSTER] += 1
        assert g not in data
    l1 = [0] * l1_size
    for index in range(l1_size):
        table = l2_host.get(index) or (l2_host[tables[0]] if share_l2_tables else 0)
        if table:
            l1[index] = table
    if share_l2_tables:
        refcounts[l2_host[tables[0]] // CLUSTER] = sum(1 for e in l1 if e)
    for index, table in enumerate(l1):
        if table and refcounts[table // CLUSTER] == 1:
            l1[index] = table | _COPIED

    image = bytearray(total_clusters * CLUSTER)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, virtual_size, 0, l1_size, 3 * CLUSTER,
        1 * CLUSTER, 1, 0, 0, 0, 0, 0, 4, 104,
    )
    image[: len(header)] = header
    image[104:112] = b"\0" * 8  # end of header extensions
    struct.pack_into(">Q", image, CLUSTER, 2 * CLUSTER)  # refcount table -> block
    for cluster, count in enumerate(refcounts):
        struct.pack_into(">H", image, 2 * CLUSTER + 2 * cluster, count)
    for index, entry in enumerate(l1):
        struct.pack_into(">Q", image, 3 * CLUSTER + 8 * index, entry)
    for g in guests:
        table = l2_host[tables[0]] if share_l2_tables else l2_host[g // _L2_ENTRIES]
        host = host_of[g]
        flag = _COPIED if refcounts[host // CLUSTER] == 1 else 0
        struct.pack_into(">Q", image, table + 8 * (g % _L2_ENTRIES), host | flag)
    for g, content in data.items():
        assert len(content) <= CLUSTER
        image[data_host[g] : data_host[g] + len(content)] = content
    path.write_bytes(bytes(image))
    return path


def luks1_header() -> bytes:
    """A LUKS1 partition header (magic, version, cipher, hash, payload offset, key size)."""
    return (b"LUKS\xba\xbe" + (1).to_bytes(2, "big") + b"aes".ljust(32, b"\0")
            + b"xts-plain64".ljust(32, b"\0") + b"sha256".ljust(32, b"\0")
            + (4096).to_bytes(4, "big") + (64).to_bytes(4, "big")).ljust(592, b"\0")


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def with_data_file(tmp: Path, target: Path) -> Path:
    """A qcow2 whose header names ``target`` as its raw external data file. Built against
    a decoy of the same name length in ``tmp`` (qemu-img truncates it), then patched."""
    decoy = tmp / ("d" * len(target.name))
    assert decoy.parent == target.parent == tmp, "both must live in the test's directory"
    image = tmp / "data-file.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={decoy},data_file_raw=on",
             image, "1M")
    raw = image.read_bytes()
    assert raw.count(str(decoy).encode()) == 1
    image.write_bytes(raw.replace(str(decoy).encode(), str(target).encode()))
    return image


def with_backing_file(tmp: Path, backing: str) -> Path:
    image = tmp / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", image, "1M")
    return image


def corpus(tmp: Path, secret: Path) -> dict[str, Path]:
    """name -> hostile file declared as qcow2. ``secret`` is a file in ``tmp`` that a
    broken importer would copy into the image."""
    files: dict[str, Path] = {}
    files["data-file"] = with_data_file(tmp, secret)
    files["backing-file"] = with_backing_file(tmp, str(secret))
    files["json-backing"] = with_backing_file(
        tmp, f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}'
    )
    files["shared-clusters"] = write_qcow2(
        tmp / "bomb.qcow2", 64 << 30, {0: b"\xaa" * CLUSTER},
        aliases={i: 0 for i in range(1, 2000)},
    )
    files["shared-l2-tables"] = write_qcow2(
        tmp / "l2bomb.qcow2", 64 << 30,
        {i * _L2_ENTRIES: b"\xbb" * CLUSTER for i in range(1)}, share_l2_tables=True,
    )
    files["huge-virtual-size"] = tmp / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", files["huge-virtual-size"], "100T")
    # Both made by hand: qemu-img's LUKS creation times a key derivation, which can fail
    # on a loaded machine.
    files["luks"] = tmp / "luks.img"
    files["luks"].write_bytes(luks1_header() + b"\0" * (2 << 20))
    files["qcow2-encrypted"] = tmp / "enc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", files["qcow2-encrypted"], "16M")
    raw = bytearray(files["qcow2-encrypted"].read_bytes())
    raw[32:36] = (2).to_bytes(4, "big")  # crypt_method 2: LUKS
    files["qcow2-encrypted"].write_bytes(bytes(raw))
    for fmt in ("vmdk", "vhdx"):
        files[fmt] = tmp / f"image.{fmt}"
        qemu_img("create", "-q", "-f", fmt, files[fmt], "16M")
    files["truncated"] = tmp / "truncated.qcow2"
    good = write_qcow2(tmp / "good-for-truncation.qcow2", 16 << 20,
                       {i: bytes([i + 1]) * CLUSTER for i in range(8)})
    files["truncated"].write_bytes(good.read_bytes()[: 3 * CLUSTER + 100])
    good.unlink()
    files["internal-snapshot"] = tmp / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", files["internal-snapshot"], "16M")
    qemu_img("snapshot", "-c", "s1", files["internal-snapshot"])
    files["dirty"] = tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", files["dirty"], "16M")
    raw = bytearray(files["dirty"].read_bytes())
    raw[72 + 7] |= 1  # incompatible feature bit 0: dirty
    files["dirty"].write_bytes(bytes(raw))
    return files
