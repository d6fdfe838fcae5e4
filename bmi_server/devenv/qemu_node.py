"""One emulated bare-metal node: QEMU (TCG) with a PXE-booting NIC, SMBIOS identity and COM1.

QEMU's user networking is the node's "datacenter": its DHCP hands out ``chain.ipxe`` from
``tftp_dir`` and the host's 127.0.0.1 is reachable at 10.0.2.2, so a BMI server bound on
loopback serves the node. The NIC's option ROM (Debian ipxe-qemu) is the PXE firmware.
iPXE prints only to VGA (read it with ``screendump``); boot sectors print to COM1, which
lands in ``<work_dir>/serial.log``.

``firmware="uefi"`` boots OVMF (Debian ``ovmf``) instead of SeaBIOS: the same NIC's option
ROM (``efi-virtio.rom`` from ipxe-qemu holds both builds) then runs iPXE's EFI build, whose
output, with OVMF's and the OS loader's, also reaches COM1. ``drives`` adds disks (e.g. a
cloud-init seed) and ``forwards`` maps host ports on 127.0.0.1 to guest TCP ports (QEMU's
``hostfwd``), e.g. ``{2222: 22}`` to reach the guest's sshd. ``local_disk`` gives the node a
writable local virtio disk (raw or qcow2) that it boots from first, on either firmware:
a machine with the OS installed on its own disk, to compare a network boot with.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from bmi_server.adapters.qcow2 import MAGIC as QCOW2_MAGIC

CHAIN_TEMPLATE = Path(__file__).resolve().parents[2] / "ipxe" / "chain.ipxe"
CHAIN_NAME = "chain.ipxe"
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user networking's alias for the host's loopback
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")  # copied: each node has its own NVRAM
FIRMWARES = ("bios", "uefi")


class QemuNodeError(RuntimeError):
    """QEMU failed to start or to answer; the message ends with its stderr."""


def write_chain_script(tftp_dir: Path, server_http: str, template: Path = CHAIN_TEMPLATE) -> Path:
    """Render ``ipxe/chain.ipxe`` into ``tftp_dir`` with ``{{server}}`` = ``server_http``.

    ``server_http`` is ``host[:port]`` as the node sees it, e.g. ``10.0.2.2:8080``.
    """
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", server_http):
        raise ValueError(f"not a host[:port]: {server_http!r}")
    tftp_dir.mkdir(parents=True, exist_ok=True)
    target = tftp_dir / CHAIN_NAME
    target.write_text(template.read_text().replace("{{server}}", server_http))
    return target


class _Qmp:
    """Just enough QMP: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise QemuNodeError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: object) -> object:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise QemuNodeError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class QemuNode:
    """A QEMU guest standing in for one bare-metal node.

    By default it PXE-boots (``-boot n``); pass ``disk`` and ``boot="c"`` to boot a raw
    disk image as a local IDE drive instead.
    """

    def __init__(
        self,
        name: str,
        mac: str,
        tftp_dir: Path,
        work_dir: Path,
        *,
        serial: str | None = None,
        uuid: str | None = None,
        manufacturer: str = "BMI Test",
        product: str = "QEMU Node",
        memory_mib: int = 256,
        cpus: int = 1,
        disk: Path | None = None,
        boot: str = "n",
        qemu: str = "qemu-system-x86_64",
        firmware: str = "bios",
        drives: Sequence[Path] = (),
        forwards: Mapping[int, int] | None = None,
        local_disk: Path | None = None,
    ) -> None:
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise ValueError(f"MAC must be lowercase colon form: {mac!r}")
        if firmware not in FIRMWARES:
            raise ValueError(f"firmware must be one of {FIRMWARES}: {firmware!r}")
        self.name = name
        self.mac = mac
        self.tftp_dir = tftp_dir
        self.work_dir = work_dir
        self.serial = serial or f"SN-{name}"
        self.uuid = uuid or str(uuid_mod.uuid4())
        self.manufacturer = manufacturer
        self.product = product
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.disk = disk
        self.boot = boot
        self.qemu = qemu
        self.firmware = firmware
        self.drives = list(drives)
        self.forwards = dict(forwards or {})
        self.local_disk = local_disk
        self.nvram = work_dir / "OVMF_VARS.fd"
        self.serial_log = work_dir / "serial.log"
        self.qmp_path = work_dir / "qmp.sock"
        # A unix socket path must fit in 108 bytes; deep pytest tmp dirs may not.
        self._short_qmp_dir = len(str(self.qmp_path)) > 100
        self.stderr_path = work_dir / "qemu.stderr"
        self._process: subprocess.Popen[bytes] | None = None
        self._qmp: _Qmp | None = None
        self.powered_on_at: float | None = None

    def command(self) -> list[str]:
        """The QEMU command line (no KVM: TCG is the reliable accelerator here)."""
        smbios = ",".join(
            f"{key}={_smbios_escape(value)}"
            for key, value in (
                ("serial", self.serial),
                ("uuid", self.uuid),
                ("manufacturer", self.manufacturer),
                ("product", self.product),
            )
        )
        netdev = f"user,id=n0,tftp={self.tftp_dir},bootfile={CHAIN_NAME}" + "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.forwards.items()
        )
        # OVMF ignores -boot: the NIC gets the first boot slot itself.
        nic_boot = ",bootindex=0" if self.firmware == "uefi" and self.boot == "n" else ""
        cmd = [
            self.qemu, "-name", self.name, "-accel", "tcg", "-m", str(self.memory_mib),
            "-display", "none", "-no-user-config", "-nodefaults", "-vga", "std",
            "-smbios", f"type=1,{smbios}",
            "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}{nic_boot}",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-boot", self.boot,
        ]  # fmt: skip
        if self.cpus != 1:
            cmd += ["-smp", str(self.cpus)]
        if self.firmware == "uefi":
            cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={self.nvram}"]  # fmt: skip
        if self.disk is not None:
            cmd += ["-drive", f"file={self.disk},format=raw,if=ide"]
        if self.local_disk is not None:
            # bootindex: first in the firmware's boot order, before the NIC.
            cmd += ["-drive", f"file={self.local_disk},format={_disk_format(self.local_disk)},"
                              "if=none,id=local0",
                    "-device", "virtio-blk-pci,drive=local0,bootindex=0"]  # fmt: skip
        for drive in self.drives:
            cmd += ["-drive", f"file={drive},format=raw,if=virtio,readonly=on"]
        return cmd

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def power_on(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log.unlink(missing_ok=True)
        if self._short_qmp_dir:
            self.qmp_path = Path(tempfile.mkdtemp(prefix="bmi-qmp-")) / "qmp.sock"
        self.qmp_path.unlink(missing_ok=True)
        if shutil.which(self.qemu) is None:
            raise QemuNodeError(f"{self.qemu} not found")
        if self.firmware == "uefi" and not self.nvram.exists():
            if not OVMF_CODE.exists():
                raise QemuNodeError(f"no {OVMF_CODE} (Debian package ovmf)")
            shutil.copyfile(OVMF_VARS, self.nvram)
        with open(self.stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self.powered_on_at = time.monotonic()
        self._qmp = self._connect_qmp(timeout)

    def _connect_qmp(self, timeout: float) -> _Qmp:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise QemuNodeError(f"QEMU exited at start:\n{self._stderr_tail()}")
            try:
                return _Qmp(self.qmp_path, timeout)
            except OSError:
                if time.monotonic() > deadline:
                    raise QemuNodeError(f"no QMP socket:\n{self._stderr_tail()}") from None
                time.sleep(0.05)

    def power_off(self, timeout: float = 10.0) -> None:
        """Pull the plug: kill QEMU and wait for it (no guest shutdown)."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout)
        self._process = None
        if self._short_qmp_dir:
            shutil.rmtree(self.qmp_path.parent, ignore_errors=True)

    def wait_exit(self, timeout: float) -> float:
        """Wait for QEMU to exit by itself (the guest powered off); return the seconds
        waited. Raises TimeoutError if it is still running then (it is left running)."""
        if self._process is None:
            raise QemuNodeError(f"{self.name} was not powered on")
        started = time.monotonic()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.name}: still running {timeout} s later; serial:\n"
                f"{self.serial_text()[-2000:]}"
            ) from None
        waited = time.monotonic() - started
        self.power_off()
        return waited

    def reset(self) -> None:
        """Press the reset button; the serial log keeps what was printed before."""
        self._monitor().execute("system_reset")

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_serial(self, pattern: str, timeout: float) -> str:
        """Wait until the serial log matches the regex ``pattern``; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.serial_text())
            if match:
                return match.group(0)
            if not self.running:
                raise QemuNodeError(
                    f"QEMU exited before {pattern!r}; serial:\n{self.serial_text()[-2000:]}\n"
                    f"stderr:\n{self._stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {pattern!r} on serial within {timeout} s; "
                    f"serial:\n{self.serial_text()[-2000:]}"
                )
            time.sleep(0.1)

    def screendump(self, path: Path) -> Path:
        """Save the VGA screen (where iPXE prints). PNG when QEMU can, else PPM.

        Returns the path written, whose suffix says which format it is.
        """
        monitor = self._monitor()
        png = path.with_suffix(".png")
        try:
            # QEMU >= 7.1 writes PNG itself when built with libpng.
            monitor.execute("screendump", filename=str(png), format="png")
            return png
        except QemuNodeError:
            ppm = path.with_suffix(".ppm")
            monitor.execute("screendump", filename=str(ppm))
            return ppm

    def _monitor(self) -> _Qmp:
        if self._qmp is None or not self.running:
            raise QemuNodeError(f"{self.name} is not powered on")
        return self._qmp

    def _stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> QemuNode:
        self.power_on()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.power_off()


def _disk_format(path: Path) -> str:
    """qcow2 if the file starts with the qcow2 magic, else raw."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC else "raw"


def _smbios_escape(value: str) -> str:
    # QEMU option values escape a comma by doubling it.
    return value.replace(",", ",,")
