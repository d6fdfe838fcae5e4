"""`make demo`: BMI's main job end to end on throwaway parts.

Starts a one-node Ceph cluster and a bmi-server, imports a 64 MiB golden image,
clones 100 disks from it, snapshots one, shows what happened as a table, then deletes
everything and checks that Ceph and the catalogue are empty again.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from bmi_client.cli import human_size
from bmi_client.client import BmiClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.devenv.ceph_cluster import CephCluster

DISKS = 100
IMAGE_MIB = 64
console = Console(width=None if sys.stdout.isatty() else 120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_golden_qcow2(folder: Path) -> Path:
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


def _start_server(
    state_dir: Path, cluster: CephCluster, token: str
) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{_free_port()}"
    (state_dir / "tokens").write_text(f"{token} admin demo-operator\n")
    env = {
        **os.environ,
        "BMI_LISTEN": address,
        "BMI_STATE_DIR": str(state_dir),
        "BMI_CEPH_CONF": str(cluster.conf_path),
        "BMI_CEPH_POOL": cluster.pool,
    }
    log = open(state_dir / "server.log", "w")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "bmi_server.main", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return proc, address


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run() -> int:
    timings: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bmi-demo-") as tmp:
        folder = Path(tmp)
        t0 = time.monotonic()
        with CephCluster() as cluster:
            timings.append(("Ceph cluster up", _ms(time.monotonic() - t0)))
            token = os.urandom(16).hex()
            t0 = time.monotonic()
            server, address = _start_server(folder, cluster, token)
            timings.append(("bmi-server up (reconciled, serving)", _ms(time.monotonic() - t0)))
            try:
                return _demo(address, token, folder, cluster, timings)
            finally:
                server.terminate()
                server.wait(30)


def _demo(address, token, folder, cluster, timings) -> int:
    golden = _make_golden_qcow2(folder)
    with BmiClient(address, token, timeout=120) as bmi:
        t0 = time.monotonic()
        image = bmi.upload_image(golden, "demo-linux", project="demo")
        timings.append(
            (
                f"import {IMAGE_MIB} MiB qcow2 ({human_size(golden.stat().st_size)} on the wire)",
                _ms(time.monotonic() - t0),
            )
        )
        clone_times, disks = [], []
        for n in range(DISKS):
            t0 = time.monotonic()
            disks.append(bmi.create_disk(f"node-{n:03d}", image.id, project="demo"))
            clone_times.append(time.monotonic() - t0)
        timings.append(
            (f"{DISKS} copy-on-write disks (median per disk)", _ms(statistics.median(clone_times)))
        )
        t0 = time.monotonic()
        snap = bmi.snapshot_disk(disks[0].id, "node-000-snapshot")
        timings.append(("snapshot node-000 into a new image", _ms(time.monotonic() - t0)))

        table = Table(title=f"Catalogue of project demo ({DISKS} disks; first 5 shown)")
        for column in ("kind", "name", "id", "size", "parent / source", "allocated"):
            table.add_column(column)
        for img in (image, snap):
            table.add_row("image", img.name, img.id, human_size(img.size_bytes), img.source, "")
        for disk in disks[:5]:
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
        timings.append(("delete everything", _ms(time.monotonic() - t0)))
        left_images = list(bmi.list_images())
        left_disks = list(bmi.list_disks())
    store = RbdImageStore(str(cluster.conf_path), cluster.pool)
    left_volumes = store.list_volumes()
    store.close()

    summary = Table(title="Timings")
    summary.add_column("step")
    summary.add_column("time", justify="right")
    for step, value in timings:
        summary.add_row(step, value)
    console.print(summary)
    clean = not (left_images or left_disks or left_volumes)
    console.print(
        f"left behind: {len(left_images)} images, {len(left_disks)} disks in the catalogue, "
        f"{len(left_volumes)} BMI volumes in Ceph -> "
        + ("[green]clean[/green]" if clean else "[red]NOT clean[/red]")
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(run())
