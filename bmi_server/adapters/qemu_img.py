"""ImageFileInspector: uploaded files checked in Python, then ``qemu-img`` in a sandbox.

An uploaded file is hostile until shown otherwise. qcow2 headers and tables are read by
``qcow2.read_layout`` first (no backing or data file, no encryption, no shared clusters,
a bounded virtual size); only then does qemu-img open it, and only inside a sandbox that
holds nothing but that file (``sandbox.py``), with a time limit. The conversion writes a
sparse raw file the store then copies from, so qemu-img never holds Ceph credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

from bmi_server.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from bmi_server.core.models import ImageFormatInfo

from .qcow2 import Qcow2Refused, read_layout
from .sandbox import Sandbox, SandboxResult, SandboxUnavailable

SUPPORTED_FORMATS = ("raw", "qcow2")
DEFAULT_MAX_VIRTUAL_BYTES = 2 << 40  # 2 TiB
_INSIDE_SOURCE = "/in/image.qcow2"
_INSIDE_OUTPUT = "/out/image.raw"


class QemuImgInspector:
    def __init__(
        self,
        qemu_img: str = "/usr/bin/qemu-img",
        timeout: float = 120,
        convert_timeout: float = 1800,
        max_virtual_bytes: int = DEFAULT_MAX_VIRTUAL_BYTES,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.qemu_img = qemu_img
        self.timeout = timeout
        self.convert_timeout = convert_timeout
        self.max_virtual_bytes = max_virtual_bytes
        self._sandbox = sandbox or Sandbox()

    def inspect(self, path: Path, declared_format: str) -> ImageFormatInfo:
        if declared_format not in SUPPORTED_FORMATS:
            raise InvalidArgument(
                f"unsupported image format {declared_format!r} (use raw or qcow2)"
            )
        if not path.is_file():
            raise InvalidArgument("the uploaded file is missing")
        size = path.stat().st_size
        if declared_format == "raw":
            # Any byte string is a valid raw image, its size is the file's size. A file
            # declared raw that is really qcow2 is imported as the bytes it is.
            self._check_virtual_size(size)
            return ImageFormatInfo("raw", size, size)
        try:
            with path.open("rb") as f:
                layout = read_layout(f, size, self.max_virtual_bytes)
        except Qcow2Refused as e:
            raise InvalidArgument(f"not an acceptable qcow2 image: {e}") from None
        # The walk above trusts the refcounts nowhere; `check` also verifies them, so a
        # file qemu would misread is refused before any byte is imported.
        # Exit 0 = clean, 3 = only leaked clusters (harmless), 1/2 = unreadable or corrupt.
        result = self._run(["check", "-f", "qcow2", _INSIDE_SOURCE], path, None, self.timeout)
        if result.timed_out:
            raise InvalidArgument(f"qemu-img check took longer than {self.timeout:g} s")
        if result.returncode not in (0, 3):
            raise InvalidArgument(f"not a valid qcow2 image: {_message(result)}")
        return ImageFormatInfo("qcow2", layout.virtual_size, layout.data_bytes_bound)

    def convert_to_raw(self, path: Path, output: Path, timeout: float | None = None) -> None:
        """Write ``path`` (an inspected qcow2) as a sparse raw file at ``output``."""
        limit = self.convert_timeout if timeout is None else min(timeout, self.convert_timeout)
        output.touch(mode=0o600, exist_ok=True)  # bound into the sandbox: must exist
        result = self._run(
            ["convert", "-f", "qcow2", "-O", "raw", _INSIDE_SOURCE, _INSIDE_OUTPUT],
            path, output, max(limit, 0.001),
        )
        if result.timed_out and limit < self.convert_timeout:
            raise DeadlineExceeded("converting the image: the caller's deadline passed")
        if result.timed_out:
            raise InvalidArgument(f"converting the image took longer than {limit:g} s")
        if result.returncode != 0:
            raise InvalidArgument(f"cannot convert the image: {_message(result)}")

    def virtual_size_of(self, path: Path) -> int:
        """Virtual size qemu-img reports (for tests and diagnostics)."""
        result = self._run(
            ["info", "--output=json", "-f", "qcow2", _INSIDE_SOURCE], path, None, self.timeout
        )
        if result.returncode != 0:
            raise InvalidArgument(f"not a valid qcow2 image: {_message(result)}")
        return int(json.loads(result.stdout)["virtual-size"])

    def _check_virtual_size(self, size: int) -> None:
        if size > self.max_virtual_bytes:
            raise InvalidArgument(
                f"the image's size ({size} bytes) is above this server's limit "
                f"({self.max_virtual_bytes} bytes)"
            )

    def _run(
        self, args: list[str], source: Path, output: Path | None, timeout: float
    ) -> SandboxResult:
        try:
            return self._sandbox.run(
                [self.qemu_img, *args],
                read_only={_INSIDE_SOURCE: source},
                writable={_INSIDE_OUTPUT: output} if output is not None else {},
                timeout=timeout,
            )
        except SandboxUnavailable as e:
            raise Unavailable(f"image inspection is unavailable on this server: {e}") from None


def _message(result: SandboxResult) -> str:
    text = result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}"
    lines = [line for line in text.splitlines() if line.strip()]
    # The first lines say what is wrong; names are the sandbox's, never the host's.
    return "; ".join(lines[:3]).replace(_INSIDE_SOURCE, "image")
