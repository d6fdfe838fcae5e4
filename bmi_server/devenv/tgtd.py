"""A throwaway tgtd (iSCSI target daemon) on a free port and control socket, for tests and demos.

tgtd keeps its targets only in memory, so ``restart`` (kill -9 and start again on the same
portal and control number) loses every target, as a crash or reboot would.

Facts about tgt 1.0.85 this relies on:
- ``-C <n>`` (0..32767) makes tgtd use ``/var/run/tgtd/socket.<n>`` and hold an fcntl lock on
  ``socket.<n>.lock``; a second tgtd on the same number exits with "another tgtd is using".
- tgtd ignores SIGTERM; ``tgtadm --op delete --mode system`` or SIGKILL stops it.
- if the portal cannot be bound, tgtd keeps running without it, so start checks the
  portal list instead of trusting that the process is alive.

    python -m bmi_server.devenv.tgtd start [--dir D] [--port P] [--control C]  # prints D last
    python -m bmi_server.devenv.tgtd stop --dir D
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bmi_server.adapters.tgt.ceph_profile import TGT_IO_THREADS

SOCKET_DIR = Path("/var/run/tgtd")
MAX_CONTROL = 32767  # tgtd -C refuses larger numbers ("out of range")
STATE_NAME = "tgtd.json"  # pid, port, control: lets `stop --dir` find exactly this daemon
LOG_NAME = "tgtd.log"


class TgtdError(RuntimeError):
    """tgtd could not be started; the message ends with the tail of its log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lock_path(control: int) -> Path:
    return SOCKET_DIR / f"socket.{control}.lock"


def _control_in_use(control: int) -> bool:
    """True if a tgtd holds the control number's lock (the lock tgtd itself takes)."""
    try:
        fd = os.open(_lock_path(control), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock
    return False


def _free_control() -> int:
    # A random number whose files do not exist yet: leftovers of other runs stay untouched.
    for _ in range(1000):
        n = random.randint(1000, MAX_CONTROL)
        if not _lock_path(n).exists() and not (SOCKET_DIR / f"socket.{n}").exists():
            return n
    raise TgtdError("no free tgtd control number")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


class Tgtd:
    def __init__(
        self,
        port: int | None = None,
        control: int | None = None,
        base_dir: Path | None = None,
        io_threads: int | None = TGT_IO_THREADS,
    ) -> None:
        """``io_threads``: tgtd's I/O threads per LUN (``-t``; None: tgtd's default, 16)."""
        if control is not None and not 0 <= control <= MAX_CONTROL:
            raise ValueError(f"tgtd control number must be 0..{MAX_CONTROL}, not {control}")
        self._want_port = port
        self._want_control = control
        self.io_threads = io_threads
        self._given_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._owns_dir = False
        self.base_dir: Path | None = self._given_dir
        self.port = port or 0
        self.control = control or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self.base_dir is None:
            raise TgtdError("tgtd not started")
        return self.base_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        return self._pid

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``tgtadm -C <control> --lld iscsi <args>`` (a convenience for tests)."""
        return subprocess.run(
            ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    @classmethod
    def attach(cls, base_dir: Path) -> Tgtd:
        """A handle on a tgtd another process started in ``base_dir`` (for ``stop``)."""
        base_dir = Path(base_dir).resolve()
        tgtd = cls(base_dir=base_dir)
        state_file = base_dir / STATE_NAME
        if not state_file.exists():
            if base_dir.exists():
                raise TgtdError(f"{base_dir} is not a BMI throwaway tgtd directory")
            return tgtd  # already stopped and cleaned: stop is a no-op
        state = json.loads(state_file.read_text())
        tgtd.port, tgtd.control, tgtd._pid = state["port"], state["control"], state["pid"]
        tgtd._owns_dir = True
        return tgtd

    # --- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        if self._pid is not None and _alive(self._pid):
            raise TgtdError("tgtd already running")
        self._make_dir()
        try:
            both_given = self._want_port is not None and self._want_control is not None
            for _ in range(1 if both_given else 5):
                self.port = self._want_port or _free_port()
                self.control = self._want_control or _free_control()
                if self._launch(time.monotonic() + timeout):
                    return
                # Lost a race for a free port or control number: draw new ones and retry.
            raise self._error("tgtd did not start")
        except BaseException:
            self.stop()
            raise

    def _make_dir(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="bmi-tgtd-"))
            self._owns_dir = True
        elif not self.base_dir.exists():
            self.base_dir.mkdir(parents=True)
            self._owns_dir = True

    def _launch(self, deadline: float) -> bool:
        """Start tgtd; True once it answers on its control socket and serves the portal."""
        args = ["tgtd", "-f", "--iscsi", f"portal={self.portal}", "-C", str(self.control)]
        if self.io_threads:
            args += ["-t", str(self.io_threads)]
        with self.log_path.open("ab") as log:
            try:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # not killed by the terminal's Ctrl-C
                )
            except FileNotFoundError:
                raise TgtdError("tgtd not found: install Debian's tgt and tgt-rbd") from None
        self._pid = self._proc.pid
        self._write_state()
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._pid = None
                return False
            if self._ready():
                return True
            time.sleep(0.05)
        raise self._error("tgtd did not answer in time")

    def _ready(self) -> bool:
        try:
            sys_ = self.tgtadm("--op", "show", "--mode", "sys", check=False)
            if sys_.returncode != 0:
                return False
            portals = self.tgtadm("--op", "show", "--mode", "portal", check=False)
        except subprocess.TimeoutExpired:
            return False
        if f"Portal: {self.portal}," in portals.stdout:
            return True
        if "failed to create/bind to portal" in self.log_path.read_text(errors="replace"):
            # tgtd runs on without its portal; that is no use to anyone.
            self._kill_and_wait()
            return False
        return False

    def _write_state(self) -> None:
        state = {"pid": self._pid, "port": self.port, "control": self.control}
        (self.log_path.parent / STATE_NAME).write_text(json.dumps(state))

    def _error(self, what: str) -> TgtdError:
        try:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except (OSError, TgtdError):
            tail = ""
        return TgtdError(f"{what} (portal {self.portal}, control {self.control})\n{tail}".strip())

    # --- stop ----------------------------------------------------------------------------

    def _own_pid(self) -> int | None:
        """Our tgtd's pid, if that process is still our tgtd (guards against pid reuse)."""
        pid = self._pid
        if pid is None or not _alive(pid):
            return None
        cmd = _cmdline(pid)
        return pid if cmd[:1] == ["tgtd"] and f"portal={self.portal}" in cmd else None

    def _kill_and_wait(self, grace: float = 60) -> None:
        pid = self._own_pid()
        if pid is not None:
            # SIGKILL: tgtd ignores SIGTERM and a throwaway daemon has nothing to flush.
            # With hundreds of rbd LUNs (a librados client each) dying takes seconds.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + grace
            if self._proc is not None:  # our child: reap it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=grace)
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.02)
        self._proc = None
        self._pid = None
        self._remove_socket_files()

    def _remove_socket_files(self) -> None:
        """Delete our control socket and lock file, unless another tgtd took the number."""
        if not self.control:
            return
        try:
            fd = os.open(_lock_path(self.control), os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we unlink
        except OSError:
            os.close(fd)
            return
        try:
            for path in (SOCKET_DIR / f"socket.{self.control}", _lock_path(self.control)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._kill_and_wait()
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def kill(self) -> None:
        """kill -9, as a crash would (every target is lost); ``restart`` starts it again on
        the same portal and control number."""
        self._kill_and_wait()

    def restart(self, timeout: float = 15) -> None:
        """kill -9 and start again on the same portal and control number: every target is lost."""
        self._kill_and_wait()
        if not self._launch(time.monotonic() + timeout):
            raise self._error("tgtd did not restart")

    def __enter__(self) -> Tgtd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bmi_server.devenv.tgtd", description="Throwaway tgtd iSCSI target daemon."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start tgtd; print its directory last")
    p_start.add_argument("--dir", type=Path, help="state and log directory (default: temp dir)")
    p_start.add_argument("--port", type=int, help="iSCSI port on 127.0.0.1 (default: free port)")
    p_start.add_argument("--control", type=int, help="tgtd -C number (default: a free one)")
    p_stop = sub.add_parser("stop", help="stop tgtd and delete its directory")
    p_stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            tgtd = Tgtd(args.port, args.control, args.dir)
            tgtd.start()
            print(
                f"tgtd up: portal {tgtd.portal}, control {tgtd.control} "
                f"(tgtadm -C {tgtd.control}), log {tgtd.log_path}",
                file=sys.stderr,
            )
            print(tgtd.base_dir)
        else:
            Tgtd.attach(args.dir).stop()
    except TgtdError as e:
        first, _, rest = str(e).partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
