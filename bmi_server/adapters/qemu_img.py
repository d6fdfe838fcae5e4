"""ImageFileInspector using ``qemu-img info`` and ``qemu-img check``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bmi_server.core.errors import InvalidArgument
from bmi_server.core.models import ImageFormatInfo

SUPPORTED_FORMATS = ("raw", "qcow2")


class QemuImgInspector:
    def __init__(self, qemu_img: str = "qemu-img", timeout: float = 120) -> None:
        self.qemu_img = qemu_img
        self.timeout = timeout

    def inspect(self, path: Path, declared_format: str) -> ImageFormatInfo:
        if declared_format not in SUPPORTED_FORMATS:
            raise InvalidArgument(
                f"unsupported image format {declared_format!r} (use raw or qcow2)"
            )
        if not path.is_file():
            raise InvalidArgument(f"no such image file: {path.name}")
        if declared_format == "raw":
            # Any byte string is a valid raw image, its size is the file's size. A file
            # declared raw that is really qcow2 is accepted as raw (the caller said so);
            # -f is always given, so qemu-img never guesses a format from the content.
            return ImageFormatInfo("raw", path.stat().st_size)
        proc = self._run("info", "--output=json", "-f", "qcow2", str(path))
        if proc.returncode != 0:
            raise InvalidArgument(f"not a valid qcow2 image: {_message(proc)}")
        try:
            info = json.loads(proc.stdout)
            size = int(info["virtual-size"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("not a valid qcow2 image: unreadable qemu-img info") from None
        if info.get("backing-filename") or info.get("full-backing-filename"):
            # A backing file would be read from the server's file system.
            raise InvalidArgument("not a valid qcow2 image: it names a backing file")
        # `info` only reads the header; `check` walks the metadata tables, so corrupt
        # refcounts or L1/L2 tables are caught before any byte is imported.
        # Exit 0 = clean, 3 = only leaked clusters (harmless), 1/2 = unreadable or corrupt.
        proc = self._run("check", "-f", "qcow2", str(path))
        if proc.returncode not in (0, 3):
            raise InvalidArgument(f"not a valid qcow2 image: {_message(proc)}")
        return ImageFormatInfo("qcow2", size)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.qemu_img, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise InvalidArgument(f"qemu-img {args[0]} took longer than {self.timeout} s") from None


def _message(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}")
    lines = [line for line in text.splitlines() if line.strip()]
    return "; ".join(lines[:3])  # the first lines say what is wrong; the rest is detail
