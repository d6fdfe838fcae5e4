"""Demo part 1: the image catalogue at work (import, 100 clones, snapshot, clean up)."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from bmi_client.cli import human_size
from bmi_client.client import BmiClient
from rich.console import Console
from rich.table import Table

DISKS = 100
IMAGE_MIB = 64


def make_golden_qcow2(folder: Path) -> Path:
    raw = folder / "golden.raw"
    with open(raw, "wb") as f:
        for mib in range(IMAGE_MIB):
            f.write(f"BMI demo image, MiB {mib:03d}\n".encode().ljust(1 << 20, b"\0"))
    qcow2 = folder / "golden.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    raw.unlink()
    return qcow2


def run(bmi: BmiClient, folder: Path, console: Console) -> list[tuple[str, float]]:
    """Returns (step, seconds) timings; leaves nothing behind."""
    timings: list[tuple[str, float]] = []
    golden = make_golden_qcow2(folder)
    t0 = time.monotonic()
    image = bmi.upload_image(golden, "demo-linux", project="demo")
    timings.append(
        (
            f"import {IMAGE_MIB} MiB qcow2 ({human_size(golden.stat().st_size)} on the wire)",
            time.monotonic() - t0,
        )
    )
    clone_times, disks = [], []
    for n in range(DISKS):
        t0 = time.monotonic()
        disks.append(bmi.create_disk(f"disk-{n:03d}", image.id, project="demo"))
        clone_times.append(time.monotonic() - t0)
    timings.append(
        (f"{DISKS} copy-on-write disks, median per disk", statistics.median(clone_times))
    )
    t0 = time.monotonic()
    snap = bmi.snapshot_disk(disks[0].id, "disk-000-snapshot")
    timings.append(("snapshot a disk into a new (flattened) image", time.monotonic() - t0))
    quota = bmi.get_quota("demo")
    console.print(
        f"quota of project demo (the server's defaults): "
        f"{human_size(quota.virtual_bytes.used)} of {human_size(quota.virtual_bytes.limit)} "
        f"virtual, {quota.images.used} of {quota.images.limit} images, "
        f"{quota.disks.used} of {quota.disks.limit} disks"
    )

    table = Table(title=f"Catalogue of project demo ({DISKS} disks; first 3 shown)")
    for column in ("kind", "name", "id", "size", "parent / source", "allocated"):
        table.add_column(column)
    for img in (image, snap):
        table.add_row("image", img.name, img.id, human_size(img.size_bytes), img.source, "")
    for disk in disks[:3]:
        shown = bmi.get_disk(disk.id)
        table.add_row(
            "disk",
            shown.name,
            shown.id,
            human_size(shown.size_bytes),
            shown.image_name,
            human_size(shown.used_bytes),
        )
    console.print(table)

    t0 = time.monotonic()
    for disk in disks:
        bmi.delete_disk(disk.id)
    bmi.delete_image(snap.id)
    bmi.delete_image(image.id)
    timings.append((f"delete {DISKS} disks and 2 images", time.monotonic() - t0))
    return timings
