"""What a zero-config bmi-server runs itself, kept in its state_dir: a one-node Ceph cluster
(``state_dir/ceph``, without ``ceph_conf``) and K tgtds (``state_dir/tgtd`` for process 0,
``state_dir/tgtd-<i>`` for the others; without ``tgt_portal``).

One process at a time runs them: the one holding ``state_dir/embedded.lock`` starts them (or
adopts those a crashed run left running) and stops them by PID when it ends. Another process
on the same state_dir while that one runs (``bmi-server admin reconcile`` next to the serving
server) uses the running daemons and leaves them alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from ..core.errors import FailedPrecondition, Unavailable
from .ceph import DEFAULT_BLOCK_BYTES, CephCluster, CephClusterError
from .tgtd import STATE_NAME, Tgtd, TgtdError, recorded

log = logging.getLogger(__name__)

LOCK_NAME = "embedded.lock"
CEPH_DIR = "ceph"
TGTD_DIR = "tgtd"
CEPH_START_SECONDS = 120  # a first start takes a few seconds; a loaded machine many more


class EmbeddedServices:
    """``with EmbeddedServices(state_dir) as embedded:`` then ``embedded.ceph(...)`` and
    ``embedded.tgtds(...)``; on leaving, the daemons this process runs are stopped."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.owner = False  # this process holds the lock: it runs (and stops) the daemons
        self._lock_fd: int | None = None
        self._cluster: CephCluster | None = None
        self._tgtds: list[Tgtd] = []

    def __enter__(self) -> EmbeddedServices:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.owner = True
        except BlockingIOError:
            self.owner = False
        self._lock_fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop what this process runs, tgtd first (its LUNs are Ceph clients)."""
        try:
            while self._tgtds:
                daemon = self._tgtds.pop()
                daemon.stop()
                log.info("embedded tgtd stopped (portal %s)", daemon.portal)
            if self._cluster is not None:
                self._cluster.stop()
                log.info("embedded Ceph cluster stopped (its data stays in %s)",
                         self._cluster.base_dir)
                self._cluster = None
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None

    def stop_left_running(self) -> list[str]:
        """Stop the daemons an earlier run left running (a crashed server's), by the PIDs
        recorded in state_dir; what was stopped. Only for the lock's holder."""
        if not self.owner:
            raise FailedPrecondition(f"a bmi-server serves from {self.state_dir}: stop it")
        stopped = []
        for directory in self._tgtd_dirs():
            daemon = Tgtd(base_dir=directory, persistent=True)
            state = recorded(directory)
            if state is not None:
                daemon.host = state["host"] or daemon.host
                if daemon._adopt(state):  # still running, as recorded: ours to stop
                    daemon.stop()
                    stopped.append(f"tgtd (pid {state['pid']})")
        cluster = CephCluster(self.state_dir / CEPH_DIR, persistent=True)
        if (self.state_dir / CEPH_DIR).exists():
            pids = {d: cluster.daemon_pid(d) for d in ("osd.0", "mon.a")}
            cluster.stop()
            stopped += [f"ceph {d} (pid {pid})" for d, pid in pids.items() if pid]
        return stopped

    # -- Ceph ------------------------------------------------------------------------------

    def ceph(self, pool: str, block_bytes: int = DEFAULT_BLOCK_BYTES) -> CephCluster:
        """The kept cluster, started (made on first use) or found running."""
        cluster = CephCluster(self.state_dir / CEPH_DIR, pool, persistent=True,
                              block_bytes=block_bytes)
        if not self.owner:
            if not all(cluster.daemon_pid(d) for d in ("mon.a", "osd.0")):
                raise FailedPrecondition(
                    f"another bmi-server process holds {self.state_dir / LOCK_NAME} but its "
                    "Ceph cluster is not running (yet); try again")
            return cluster
        started = time.monotonic()
        try:
            cluster.start(timeout=CEPH_START_SECONDS)
        except CephClusterError as exc:
            raise Unavailable(f"the Ceph cluster in {cluster.base_dir} did not start: {exc}") \
                from None
        self._cluster = cluster
        _tighten_tree(cluster.base_dir)
        took = time.monotonic() - started
        if not cluster.resumed:
            log.warning("embedded Ceph cluster made in %s in %.1f s (monitor 127.0.0.1:%d, "
                        "pool %r, OSD file up to %d GiB): images and disks are kept there",
                        cluster.base_dir, took, cluster.port, pool, cluster.block_bytes >> 30)
        else:
            adopted = (f"; adopted {', '.join(cluster.adopted)} left running by an earlier run"
                       if cluster.adopted else "")
            log.info("embedded Ceph cluster in %s started again in %.1f s (monitor "
                     "127.0.0.1:%d%s)", cluster.base_dir, took, cluster.port, adopted)
        return cluster

    # -- tgtd ------------------------------------------------------------------------------

    def tgtd_dir(self, process: int) -> Path:
        """Process 0 keeps the directory a single tgtd had, so an upgraded server finds
        its tgtd (and its nodes' portal) where it was."""
        return self.state_dir / (TGTD_DIR if process == 0 else f"{TGTD_DIR}-{process}")

    def _tgtd_dirs(self) -> list[Path]:
        dirs = []
        while (self.tgtd_dir(len(dirs)) / STATE_NAME).exists():
            dirs.append(self.tgtd_dir(len(dirs)))
        return dirs

    def tgtds(self, listen: str = "", count: int = 1) -> list[Tgtd]:
        """The kept tgtds 0..count-1, each in its own directory; process i listens on
        ``listen``'s port + i (host:port; port empty: where it listened before, or a free
        port on 127.0.0.1 the first time). Only for the lock's holder."""
        if not self.owner:
            raise FailedPrecondition(f"another bmi-server process runs the tgtd of "
                                     f"{self.state_dir}")
        host, port = split_listen(listen)
        for process in range(len(self._tgtds), count):
            daemon = Tgtd(port + process if port else None, None, self.tgtd_dir(process),
                          host=host, persistent=True)
            try:
                daemon.start()
            except TgtdError as exc:
                raise Unavailable(f"tgtd process {process} did not start: {exc}") from None
            self._tgtds.append(daemon)
            how = "adopted (left running by an earlier run)" if daemon.adopted else "started"
            log.info("embedded tgtd %s: iSCSI portal %s (process %d; tgtadm -C %d; log %s)",
                     how, daemon.portal, process, daemon.control, daemon.log_path)
        return self._tgtds[:count]

    def recorded_tgtds(self) -> list[tuple[str, int]]:
        """(portal, control) of each kept tgtd's last run, for a process that does not run
        them; empty if none ever ran."""
        endpoints = []
        for directory in self._tgtd_dirs():
            state = recorded(directory)
            if state is None:
                break
            endpoints.append((f"{state['host'] or '127.0.0.1'}:{state['port']}",
                              state["control"]))
        return endpoints


def _tighten_tree(root: Path | None) -> None:
    """Nothing of the cluster's for other users: the daemons run with the server's umask,
    but RocksDB makes the monitor's store.db 0755 whatever the umask."""
    if root is None:
        return
    for path in root.rglob("*"):
        mode = path.lstat().st_mode
        if mode & 0o077 and not path.is_symlink() and not path.is_socket():
            path.chmod(mode & 0o7700)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (either may be empty: 127.0.0.1, a free port) as (host, port)."""
    if not listen:
        return "127.0.0.1", 0
    host, sep, port = listen.rpartition(":")
    if not sep or not host or (port and not port.isdigit()):
        raise ValueError(f"{listen!r} is not host:port")
    return host, int(port or 0)
