"""A tgtd (iSCSI target daemon) BMI runs itself, on a portal and control socket of its own.

Two kinds:

- **Throwaway** (``Tgtd()``): a free port on 127.0.0.1, a free control number and a new
  temporary directory, deleted on stop; tests, the demo and benchmarks
  (``python -m bmi_server.devenv.tgtd``).
- **Kept** (``Tgtd(base_dir=d, persistent=True)``): the zero-config server's own tgtd, its
  portal and control number recorded in ``d/tgtd.json`` so a restart listens where nodes
  were told to log in. A tgtd an earlier run left running (a crashed server's) on the wanted
  portal is adopted, targets and sessions included; one on another portal is stopped.

tgtd keeps its targets only in memory, so ``restart`` (kill -9 and start again on the same
portal and control number) loses every target, as a crash or reboot would.

Facts about tgt 1.0.85 this relies on:
- ``-C <n>`` (0..32767) makes tgtd use ``/var/run/tgtd/socket.<n>`` and hold an fcntl lock on
  ``socket.<n>.lock``; a second tgtd on the same number exits with "another tgtd is using".
- tgtd ignores SIGTERM; ``tgtadm --op delete --mode system`` or SIGKILL stops it.
- if the portal cannot be bound, tgtd keeps running without it, so start checks the
  portal list instead of trusting that the process is alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bmi_server.adapters.tgt.ceph_profile import TGT_IO_THREADS

from .processes import alive, cmdline, free_port, port_free

SOCKET_DIR = Path("/var/run/tgtd")
MAX_CONTROL = 32767  # tgtd -C refuses larger numbers ("out of range")
STATE_NAME = "tgtd.json"  # pid, port, control: lets `stop --dir` find exactly this daemon
LOG_NAME = "tgtd.log"


class TgtdError(RuntimeError):
    """tgtd could not be started; the message ends with the tail of its log."""


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


def free_controls(count: int) -> int:
    """The first of ``count`` consecutive free control numbers (process i of a host's
    tgtds uses the first + i)."""
    for _ in range(1000):
        n = random.randint(1000, MAX_CONTROL - count)
        if not any(_lock_path(c).exists() or (SOCKET_DIR / f"socket.{c}").exists()
                   for c in range(n, n + count)):
            return n
    raise TgtdError(f"no {count} consecutive free tgtd control numbers")


def recorded(directory: Path) -> dict | None:
    """What ``directory/tgtd.json`` says of the last run of the tgtd kept there: pid, port,
    control and host ("" if not recorded); None if there is nothing usable."""
    try:
        state = json.loads((directory / STATE_NAME).read_text())
        return {"pid": int(state["pid"]), "port": int(state["port"]),
                "control": int(state["control"]), "host": str(state.get("host", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _option(cmd: list[str], flag: str) -> str | None:
    """The value after ``flag`` in a command line."""
    return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else None


class Tgtd:
    def __init__(
        self,
        port: int | None = None,
        control: int | None = None,
        base_dir: Path | None = None,
        io_threads: int | None = TGT_IO_THREADS,
        *,
        host: str = "127.0.0.1",
        persistent: bool = False,
    ) -> None:
        """``io_threads``: tgtd's I/O threads per LUN (``-t``; None: tgtd's default, 16).
        ``host``: the address the portal binds. ``persistent``: a kept tgtd in ``base_dir``
        (required): its portal and control number are recorded there and used again, unless
        ``port``/``control`` ask for others; a running one left there is adopted."""
        if persistent and base_dir is None:
            raise ValueError("a kept tgtd needs a directory")
        if control is not None and not 0 <= control <= MAX_CONTROL:
            raise ValueError(f"tgtd control number must be 0..{MAX_CONTROL}, not {control}")
        self._want_port = port
        self._want_control = control
        self.io_threads = io_threads
        self.host = host
        self.persistent = persistent
        self.adopted = False  # a kept tgtd found running (left by an earlier run) and kept
        self._given_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._owns_dir = False
        self.base_dir: Path | None = self._given_dir
        self.port = port or 0
        self.control = control or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._pid: int | None = None

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

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
        tgtd.host = state.get("host", tgtd.host)
        tgtd._owns_dir = True
        return tgtd

    # --- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        if self._pid is not None and alive(self._pid):
            raise TgtdError("tgtd already running")
        self._make_dir()
        first_port, first_control = self._want_port, self._want_control
        if self.persistent and (recorded := self._recorded()) is not None:
            if self._adopt(recorded):
                return
            # Where nodes were told to log in before, unless another program took it.
            if first_port is None and port_free(self.host, recorded["port"]):
                first_port = recorded["port"]
            if first_control is None and not _control_in_use(recorded["control"]):
                first_control = recorded["control"]
        try:
            both_given = self._want_port is not None and self._want_control is not None
            for attempt in range(1 if both_given else 5):
                port = first_port if attempt == 0 else self._want_port
                control = first_control if attempt == 0 else self._want_control
                self.port = port or free_port(self.host)
                self.control = control or _free_control()
                if self._launch(time.monotonic() + timeout):
                    return
                # Lost a race for a free port or control number: draw new ones and retry.
            raise self._error("tgtd did not start")
        except BaseException:
            self.stop()
            raise

    def _recorded(self) -> dict | None:
        """What ``tgtd.json`` says of the kept tgtd's last run (None: nothing usable)."""
        assert self.base_dir is not None
        return recorded(self.base_dir)

    def _adopt(self, recorded: dict) -> bool:
        """Keep the recorded tgtd if it still runs, as recorded, where it is wanted (True);
        stop it if it runs elsewhere or does not answer (False: start one)."""
        host = recorded["host"] or self.host
        pid, port, control = recorded["pid"], recorded["port"], recorded["control"]
        cmd = cmdline(pid)
        if not (alive(pid) and cmd[:1] == ["tgtd"] and f"portal={host}:{port}" in cmd
                and _option(cmd, "-C") == str(control)):
            return False  # gone, or its pid now another program's
        wanted_host = self.host
        self.host, self.port, self.control, self._pid = host, port, control, pid
        if (host == wanted_host and self._want_port in (None, port)
                and self._want_control in (None, control) and self._ready()):
            self.adopted = True
            return True
        self._kill_and_wait()  # ours, but wanted on another portal now (or not answering)
        self.host = wanted_host
        return False

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
            self._log_start = log.tell()  # a kept tgtd's log holds earlier runs too
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
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            this_run = log.read().decode(errors="replace")
        if "failed to create/bind to portal" in this_run:
            # tgtd runs on without its portal; that is no use to anyone.
            self._kill_and_wait()
            return False
        return False

    def _write_state(self) -> None:
        state = {"pid": self._pid, "host": self.host, "port": self.port,
                 "control": self.control}
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
        if pid is None or not alive(pid):
            return None
        cmd = cmdline(pid)
        return pid if cmd[:1] == ["tgtd"] and f"portal={self.portal}" in cmd else None

    def _kill_and_wait(self, grace: float = 60) -> None:
        pid = self._own_pid()
        if pid is not None:
            # SIGKILL: tgtd ignores SIGTERM, and keeps nothing on disk to flush.
            # With hundreds of rbd LUNs (a librados client each) dying takes seconds.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + grace
            if self._proc is not None:  # our child: reap it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=grace)
            while alive(pid) and time.monotonic() < end:
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
        """Stop tgtd; a throwaway one's directory is deleted too (a kept one's record stays,
        so the next start listens on the same portal)."""
        self._kill_and_wait()
        if self._owns_dir and not self.persistent and self.base_dir is not None:
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

