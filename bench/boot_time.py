"""Boot time: QEMU power-on -> OS marker for a node booting its clone over iSCSI, versus
the same image booted from a local file.

Any network boot also pays for the firmware's PXE and iPXE's DHCP before the first HTTP
request; that part is measured too (power-on -> boot script fetched), so the figure that
BMI controls — boot script -> OS marker over iSCSI — is shown beside the total.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC
from pathlib import Path

from bmi.v1 import images_pb2
from bmi_client.client import BmiClient

from bench.common import Figure, Results, median, scale
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.stack import DevStack
from bmi_server.devenv.test_disk import MARKER_RE, build_test_disk

RUNS = scale(3, 5)
MAC = "52:54:00:be:00:01"


def _boot(vm: QemuNode, seen: int) -> float:
    """Seconds from power-on until the marker appears for the (seen+1)-th time."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if len(MARKER_RE.findall(vm.serial_text())) > seen:
            return time.monotonic() - (vm.powered_on_at or 0)
        time.sleep(0.02)
    raise TimeoutError(f"{vm.name} did not boot")


def run(results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bmi-boot-") as tmp:
        folder = Path(tmp)
        disk = build_test_disk(folder / "os.raw")
        local = []
        for i in range(RUNS):
            work = folder / f"local-{i}"
            work.mkdir()
            with QemuNode(f"local-{i}", MAC, folder, work, disk=disk, boot="c") as vm:
                local.append(_boot(vm, 0))
        network, script = [], []
        with DevStack(extra_env={"BMI_SESSION_POLL_SECONDS": "0.2"},
                      advertise_host="10.0.2.2") as stack, \
                BmiClient(stack.address, stack.admin_token) as bmi:
            image = bmi.upload_image(disk, "os", project="bench",
                                     visibility=images_pb2.VISIBILITY_PUBLIC)
            bmi.enroll_node("bench-node", "bench", macs=[MAC])
            bmi.provision_node("bench-node", image=image.id)
            tftp = folder / "tftp"
            tftp.mkdir()
            write_chain_script(tftp, f"10.0.2.2:{stack.http_address.rpartition(':')[2]}")
            for i in range(RUNS):
                work = folder / f"net-{i}"
                work.mkdir()
                with QemuNode(f"net-{i}", MAC, tftp, work) as vm:
                    # Power-on on the wall clock, which the server's timestamps use.
                    on = time.time() - (time.monotonic() - (vm.powered_on_at or 0))
                    network.append(_boot(vm, 0))
                    fetched = [t for t in bmi.get_node("bench-node").history
                               if t.reason == "fetched its boot script"][-1]
                    script.append(fetched.time.ToDatetime(tzinfo=UTC).timestamp() - on)
    total, base = median(network), median(local)
    to_script = median(script)
    results.add(Figure("boot time", "power-on -> OS marker, iSCSI clone via BMI", total, "s",
                       base, "local file", "<= 1.1x", total <= 1.1 * base,
                       note=f"of which firmware PXE + iPXE DHCP until the script: "
                            f"{to_script:.1f} s"))
    results.add(Figure("boot time", "boot script -> OS marker over iSCSI", total - to_script,
                       "s", base, "local file (power-on -> marker)"))
