"""A tiny bootable raw disk for boot tests: it says who it is and how often it booted.

The boot sector (``ipxe/test_disk/bootsect.S``) reads its label (LBA 1) and counter
(LBA 2), writes the counter back incremented, and prints to COM1::

    BMI-BOOT-MARKER id=<label> boot=<n>

so a test learns which disk a node booted (the label, written per disk) and whether
writes reach that disk (the counter goes up on the next boot).

    python -m bmi_server.devenv.test_disk OUT.raw [--size-mib 4] [--label GOLDEN]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

SECTOR = 512
LABEL_LBA = 1
COUNTER_LBA = 2
LABEL_LEN = 16
SOURCE = Path(__file__).resolve().parents[2] / "ipxe" / "test_disk" / "bootsect.S"
MARKER_RE = re.compile(r"BMI-BOOT-MARKER id=(?P<label>\S*) boot=(?P<boot>\d+)")


def _default_build_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bmi" / "test-disk"


def build_boot_sector(build_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """Assemble the boot sector; cached by the source's hash, so rebuilt only on change."""
    text = source.read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:16]
    out_dir = (build_dir or _default_build_dir()) / digest
    binary = out_dir / "bootsect.bin"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, raw = Path(tmp) / "bootsect.o", Path(tmp) / "bootsect.bin"
        subprocess.run(["as", "--32", "-o", str(obj), str(source)], check=True)
        subprocess.run(
            ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
             "-o", str(raw), str(obj)],
            check=True,
        )  # fmt: skip
        code = raw.read_bytes()
        if len(code) != SECTOR or code[-2:] != b"\x55\xaa":
            raise RuntimeError(f"{source}: boot sector is {len(code)} bytes, not a valid MBR")
        raw.replace(binary)  # atomic: parallel builders never see half a file
    return binary


def _check_label(label: str) -> bytes:
    data = label.encode("ascii", errors="strict")
    if not 0 < len(data) <= LABEL_LEN or not re.fullmatch(rb"[!-~]+", data):
        # No spaces: the marker line must parse back unambiguously.
        raise ValueError(f"label must be 1-{LABEL_LEN} printable ASCII chars, no spaces: {label!r}")
    return data


def write_label(path: Path, label: str, reset_counter: bool = True) -> None:
    """Set the identity label of a raw test disk (file) in place; zero its boot counter."""
    data = _check_label(label)
    with open(path, "r+b") as f:
        f.seek(LABEL_LBA * SECTOR)
        f.write(data.ljust(SECTOR, b"\0"))
        if reset_counter:
            f.seek(COUNTER_LBA * SECTOR)
            f.write(bytes(SECTOR))


def read_boot_count(path: Path) -> int:
    """The counter as the disk holds it: how many times it has booted (and written)."""
    with open(path, "rb") as f:
        f.seek(COUNTER_LBA * SECTOR)
        return int.from_bytes(f.read(2), "little")


def _partition_table(sectors: int) -> bytes:
    """One MBR entry (type 0xda, "non-FS data") from LBA 63 to the end of the disk.

    It is there for its CHS end values: iPXE's sanboot guesses the drive geometry from
    them, and without a partition table guesses 255 heads x 63 sectors, which gives a
    disk under 7.8 MiB zero cylinders, so iPXE's own CHS read of the MBR fails (EIO).
    """
    heads, per_track, start = 16, 63, 63
    end = sectors - 1

    def chs(lba: int) -> bytes:
        cylinder = min(lba // (heads * per_track), 1023)
        head = (lba // per_track) % heads
        sector = lba % per_track + 1
        return bytes([head, sector | (cylinder >> 8) << 6, cylinder & 0xFF])

    entry = (
        b"\x00" + chs(start) + b"\xda" + chs(end)
        + start.to_bytes(4, "little") + (end - start + 1).to_bytes(4, "little")
    )  # fmt: skip
    return entry.ljust(64, b"\0")


def build_test_disk(
    path: Path, size_mib: int = 4, label: str = "GOLDEN", build_dir: Path | None = None
) -> Path:
    """Write a raw disk image of ``size_mib`` MiB: boot sector, label, counter 0."""
    if size_mib < 1:
        raise ValueError("size_mib must be >= 1")
    _check_label(label)
    boot = build_boot_sector(build_dir).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(boot[:446] + _partition_table(size_mib << 11) + boot[510:])
        f.truncate(size_mib << 20)  # sparse; the rest reads as zeros
    write_label(path, label)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--size-mib", type=int, default=4)
    parser.add_argument("--label", default="GOLDEN")
    args = parser.parse_args()
    print(build_test_disk(args.path, args.size_mib, args.label))


if __name__ == "__main__":
    main()
