"""A test's child process with its own log file: stop (SIGTERM, then SIGKILL) and kill."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


class LoggedChild:
    """Subclasses set ``log_path`` and start ``proc``; ``stop_seconds`` bounds a SIGTERM."""

    log_path: Path
    proc: subprocess.Popen | None = None
    stop_seconds: float = 20

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_seconds)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
