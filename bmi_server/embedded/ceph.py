"""A one-node Ceph cluster (one mon, one OSD) that BMI runs itself, in one directory.

Two kinds:

- **Throwaway** (``CephCluster()``, or with an empty ``base_dir``): a memstore OSD in a new
  temporary directory, deleted on ``stop``. Tests, the demo, benchmarks and developers
  (``python -m bmi_server.devenv.ceph_cluster``) use it where a fresh cluster is wanted.
- **Kept** (``CephCluster(dir, persistent=True)``): the zero-config server's own cluster in
  ``state_dir/ceph``. Its OSD is BlueStore on a sparse file (``osd.0/block``), so the data
  survives the daemons, the server and the machine restarting; ``start`` makes the cluster
  the first time and starts it again afterwards, on the monitor port recorded in
  ``cluster.json`` (a new one, rewritten into the monitor map, if another program took
  it), adopting daemons an earlier run left running (a crashed server's) and ignoring pid
  files of daemons that are gone. ``stop`` stops the daemons and keeps everything.

Everything (config, keys, mon and OSD data, pid files, admin sockets, logs) lives in the one
directory (0700); the monitor listens on 127.0.0.1 on a port of its own, so several clusters
can run side by side, and ``stop`` kills exactly this cluster's daemons, found by their pid
files (and checked to be this cluster's by their command lines). No mgr: the pool works
without one (health then says "no active mgr", which is harmless here), and skipping it saves
seconds.

Authentication is on (cephx), as on a real cluster: the monitor's port is open to every local
user, so without it anyone on the host could read and write every volume. Each daemon and
client reads its key from ``keys/<name>.keyring`` (0600): ``client.admin`` (all caps, for
BMI's server, the tools and tests) and ``client.bmi-tgt`` (``profile rbd`` on the pool only,
for tgtd's rbd backing store, given as ``id=bmi-tgt`` in its bsopts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from bmi_server.adapters.tgt.ceph_profile import TGT_CLIENT_PROFILE

from .processes import alive, cmdline, free_port, port_free

if TYPE_CHECKING:
    import rados

log = logging.getLogger(__name__)

CONF_NAME = "ceph.conf"
TGT_CONF_NAME = "ceph-tgt.conf"  # CONF_NAME + the tgt client profile
MARKER_NAME = ".bmi-ceph-cluster"  # lets `stop --dir` know the directory is ours to delete
# A kept cluster's fsid, monitor port and OSD size, written once it is complete (a directory
# with the marker and without this record is an interrupted first start, made again).
RECORD_NAME = "cluster.json"
DEFAULT_BLOCK_BYTES = 100 << 30  # a kept cluster's OSD file: sparse, only what is written
DAEMONS = ("osd.0", "mon.a")  # stop order: the OSD first, so it need not wait for the mon
KEYS_DIR = "keys"
ADMIN_CLIENT = "client.admin"
# tgtd's rbd backing store only opens, reads and writes images: `profile rbd` on the pool,
# no other pool, no keys, no cluster changes (as a production tgtd's client; operator guide).
TGT_CLIENT = "client.bmi-tgt"


class CephClusterError(RuntimeError):
    """The cluster could not be started; the message ends with the tail of a daemon log."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class CephCluster:
    def __init__(
        self,
        base_dir: Path | None = None,
        pool: str = "rbd",
        memstore_bytes: int = 2 << 30,
        *,
        persistent: bool = False,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        """``persistent``: a kept cluster in ``base_dir`` (required): BlueStore on a sparse
        file of ``block_bytes`` (fixed when the cluster is made), started again on restart.
        Otherwise a throwaway memstore cluster of ``memstore_bytes``."""
        if persistent and base_dir is None:
            raise ValueError("a kept Ceph cluster needs a directory")
        self._given_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._owns_dir = False
        self.base_dir: Path | None = self._given_dir
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.persistent = persistent
        self.block_bytes = block_bytes
        self.port = 0
        self.fsid = ""
        # A kept cluster: whether start found it made already, and the daemons it found
        # running (left by an earlier run that did not stop them) and adopted.
        self.resumed = False
        self.adopted: list[str] = []

    # Paths inside the cluster directory.
    @property
    def conf_path(self) -> Path:
        if self.base_dir is None:
            raise CephClusterError("cluster not started")
        return self.base_dir / CONF_NAME

    @property
    def tgt_conf_path(self) -> Path:
        """The cluster's configuration with the lean client profile tgtd's rbd LUNs use."""
        return self.conf_path.with_name(TGT_CONF_NAME)

    @property
    def tgt_user(self) -> str:
        """The Ceph user tgtd's rbd backing store connects as (bsopts ``id=``)."""
        return TGT_CLIENT.removeprefix("client.")

    def keyring_path(self, name: str) -> Path:
        """Where the key of Ceph entity ``name`` (``client.admin``, ``osd.0``...) is."""
        return self._path(KEYS_DIR, f"{name}.keyring")

    def _path(self, *parts: str) -> Path:
        assert self.base_dir is not None
        return self.base_dir.joinpath(*parts)

    def log_path(self, daemon: str) -> Path:
        return self._path("log", f"{daemon}.log")

    def pid_path(self, daemon: str) -> Path:
        return self._path("run", f"{daemon}.pid")

    @classmethod
    def attach(cls, base_dir: Path) -> CephCluster:
        """A handle on a cluster another process started in ``base_dir`` (for ``stop``)."""
        cluster = cls(base_dir)
        if cluster.base_dir is not None and not cluster.base_dir.exists():
            return cluster  # already stopped and cleaned: stop is a no-op
        if not cluster._path(MARKER_NAME).exists():
            raise CephClusterError(f"{cluster.base_dir} is not a BMI throwaway Ceph cluster")
        cluster._owns_dir = True
        return cluster

    # --- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Make and start the cluster; a kept one made before is started again instead."""
        deadline = time.monotonic() + timeout
        if self.persistent and self._record_path().exists():
            self.resumed = True
            try:
                self._resume(deadline)
            except BaseException:
                self.stop()
                raise
            return
        self._make_dir()
        try:
            self.port = free_port()
            self.fsid = str(uuid.uuid4())
            self._write_conf()
            self._start_mon(deadline)
            self._start_osd_and_pool(deadline)
            if self.persistent:
                self._write_record()
        except BaseException:
            self.stop()
            raise

    def _record_path(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / RECORD_NAME

    def _write_record(self) -> None:
        record = {"fsid": self.fsid, "port": self.port, "block_bytes": self.block_bytes}
        tmp = self._record_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self._record_path())

    def _make_dir(self) -> None:
        if self._given_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="bmi-ceph-"))
            self._owns_dir = True
        else:
            self.base_dir = self._given_dir
            if self.persistent and self._path(MARKER_NAME).exists():
                # A first start that did not finish: no pool yet, so no data. Start afresh.
                log.warning("Ceph cluster in %s was never completed; making it again",
                            self.base_dir)
                self._stop_daemons()
                for child in self.base_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            if self.base_dir.exists() and any(self.base_dir.iterdir()):
                raise CephClusterError(f"{self.base_dir} is not empty")
            self._owns_dir = not self.base_dir.exists()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        # The keys and the data are the cluster's: other local users get nothing of either.
        self.base_dir.chmod(0o700)
        for sub in ("run", "log", "mon.a", "osd.0", KEYS_DIR):
            self._path(sub).mkdir(mode=0o700)
        self._path(MARKER_NAME).touch()

    def _objectstore_conf(self) -> str:
        if not self.persistent:
            return f"""\
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}"""
        return f"""\
# BlueStore on a sparse file in the OSD's directory (made by `ceph-osd --mkfs`): it keeps
# the data across restarts of the daemons and of the machine.
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {self.block_bytes}
# A file, not a disk: no fsck at mkfs or mount, and a short aio poll (each close of the file
# otherwise waits out a 250 ms poll; an OSD start closes it several times).
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bdev aio poll ms = 10
# One small OSD on a shared machine: a fixed 128 MiB cache, not 1-3 GiB auto-tuned.
bluestore cache autotune = false
bluestore cache size = 134217728"""

    def _write_conf(self) -> None:
        d = self.base_dir
        kind = "kept" if self.persistent else "throwaway"
        # memstore saves its objects only on a clean unmount, which Pacific's fast shutdown
        # skips; BlueStore is consistent on disk at every moment.
        fast_shutdown = "" if self.persistent else """\
# A SIGTERM unmounts the store, so memstore saves its objects and stop_osd/start_osd
# keep the data (Pacific's fast shutdown skips that).
osd fast shutdown = false
"""
        conf = f"""\
# BMI {kind} Ceph cluster; everything lives in {d}
[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port}]
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
# Every daemon and client finds its own key here; one without a key is refused.
keyring = {d}/{KEYS_DIR}/$name.keyring
# All clients here are Pacific's: none needs the insecure global_id reclaim.
auth allow insecure global id reclaim = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
{self._objectstore_conf()}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
# Commit map changes quickly (default 1 s per change): pool creation and OSD boot wait on them.
paxos propose interval = 0.1
mon allow pool delete = true
mon warn on pool no redundancy = false
# Without a mgr, health turns to WARN after this grace; the cluster works without one.
mon mgr mkfs grace = 31536000
# A small disk in a sandbox must not make the mon shut itself down.
mon data avail crit = 0
mon data avail warn = 0
# Clients fail instead of hanging forever when this cluster is gone.
rados osd op timeout = 30
rados mon op timeout = 30
client mount timeout = 30
# A killed client's watches (a crashed server or tgtd) block removing its images until
# they expire: 30 s by default, shortened here so tests and the demo recover quickly.
osd client watch timeout = 8

[mon]
mon data = {d}/mon.$id
log file = {d}/log/$name.log

[osd]
osd data = {d}/osd.$id
{fast_shutdown}log file = {d}/log/$name.log
"""
        self.conf_path.write_text(conf)
        self.tgt_conf_path.write_text(conf + TGT_CLIENT_PROFILE)

    # --- a kept cluster, started again ---------------------------------------------------

    def _resume(self, deadline: float) -> None:
        self.base_dir = self._given_dir
        try:
            record = json.loads(self._record_path().read_text())
            self.fsid, self.port = str(record["fsid"]), int(record["port"])
            self.block_bytes = int(record.get("block_bytes", self.block_bytes))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CephClusterError(f"{self._record_path()} is unreadable: {e}") from None
        running = {d for d in DAEMONS if self.daemon_pid(d) is not None}
        self.adopted = [d for d in reversed(DAEMONS) if d in running]
        if "mon.a" not in running:
            if not port_free("127.0.0.1", self.port):
                self._move_monitor(deadline)
            self._write_conf()  # this version's settings for daemons about to start
            self._run("mon.a", ["ceph-mon", "-c", str(self.conf_path), "-i", "a",
                                "--public-addr", f"v2:127.0.0.1:{self.port}"], deadline)
        if "osd.0" not in running:
            self._run("osd.0", ["ceph-osd", "-c", str(self.conf_path), "-i", "0"], deadline)
        client = self._connect(deadline)
        try:
            self._wait_osd_up(client, deadline)
            self._ensure_pool(client)
            self._wait_pool_usable(client, deadline)
        finally:
            client.shutdown()

    def _move_monitor(self, deadline: float) -> None:
        """The recorded port is another program's now: give the monitor a new one, in its
        monitor map (the address it binds) and in the configuration (where clients look)."""
        old, new = self.port, free_port()
        monmap = str(self._path("run", "monmap"))
        mon = ["ceph-mon", "-c", str(self.conf_path), "-i", "a"]
        self._run("mon.a", [*mon, "--extract-monmap", monmap], deadline)
        self._run("mon.a", ["monmaptool", "--rm", "a", monmap], deadline)
        self._run("mon.a", ["monmaptool", "--addv", "a", f"[v2:127.0.0.1:{new}]", monmap],
                  deadline)
        self._run("mon.a", [*mon, "--inject-monmap", monmap], deadline)
        Path(monmap).unlink()
        self.port = new
        self._write_conf()
        self._write_record()
        log.warning("Ceph monitor port %d is taken by another program: moved the monitor "
                    "to port %d (recorded in %s)", old, new, self._record_path())

    def _run(self, daemon: str, args: list[str], deadline: float) -> None:
        """Run a Ceph tool; a daemon forks and its launcher exits once it is up."""
        out = self._path("log", f"{daemon}.out")
        try:
            with out.open("ab") as f:
                proc = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=f,  # a file, not a pipe: a forked daemon must not hold our pipe
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # detached from our terminal and its signals
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise self._error(daemon, f"{args[0]} timed out") from None
        except FileNotFoundError:
            raise CephClusterError(f"{args[0]} not found: install the Ceph packages") from None
        if proc.returncode != 0:
            raise self._error(daemon, f"`{' '.join(args)}` exited with {proc.returncode}")

    def _error(self, daemon: str, what: str) -> CephClusterError:
        tail = _tail(self._path("log", f"{daemon}.out")) + "\n" + _tail(self.log_path(daemon))
        return CephClusterError(f"ceph {daemon}: {what}\n{tail.strip()}")

    def _run_together(self, daemon: str, commands: list[list[str]], deadline: float) -> None:
        """``_run`` each command at once: they are independent, and each Ceph tool spends
        most of its ~0.1 s starting up."""
        with ThreadPoolExecutor(len(commands)) as pool:
            for done in [pool.submit(self._run, daemon, args, deadline) for args in commands]:
                done.result()

    def _caps(self) -> dict[str, list[str]]:
        """The entities besides ``mon.`` the cluster starts with, and their caps."""
        return {
            ADMIN_CLIENT: ["mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"],
            "osd.0": ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"],
            TGT_CLIENT: ["mon", "profile rbd", "osd", f"profile rbd pool={self.pool}"],
        }

    def _keygen(self, name: str, keyring: Path, caps: list[str]) -> list[str]:
        args = ["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", name]
        for service, cap in zip(caps[::2], caps[1::2], strict=True):
            args += ["--cap", service, cap]
        return args

    def _start_mon(self, deadline: float) -> None:
        conf = str(self.conf_path)
        monmap = str(self._path("monmap"))
        addr = f"v2:127.0.0.1:{self.port}"
        mkfs_keyring = self._path(KEYS_DIR, "mkfs.keyring")
        self._run_together(
            "mon.a",
            [
                ["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[{addr}]", monmap],
                self._keygen("mon.", mkfs_keyring, ["mon", "allow *"]),
                *(self._keygen(n, self.keyring_path(n), c) for n, c in self._caps().items()),
            ],
            deadline,
        )
        # The keyring the monitor is made with seeds the cluster's auth database.
        with mkfs_keyring.open("a") as keyring:
            for name in self._caps():
                keyring.write(self.keyring_path(name).read_text())
        self._run(
            "mon.a",
            ["ceph-mon", "-c", conf, "-i", "a", "--mkfs", "--monmap", monmap,
             "--keyring", str(mkfs_keyring)],
            deadline,
        )  # fmt: skip
        # The monitor keeps its own key in its data dir; the others are in their own files.
        mkfs_keyring.unlink()
        self._run("mon.a", ["ceph-mon", "-c", conf, "-i", "a", "--public-addr", addr], deadline)

    def _connect(self, deadline: float) -> rados.Rados:
        import rados  # Debian's binding; imported late so `stop` works without it

        client = rados.Rados(
            conffile=str(self.conf_path),
            conf={"client_mount_timeout": str(int(max(1, deadline - time.monotonic())))},
        )
        try:
            client.connect()
        except rados.Error as e:
            client.shutdown()
            raise self._error("mon.a", f"cannot connect to the monitor: {e}") from None
        return client

    def _start_osd_and_pool(self, deadline: float) -> None:
        conf = str(self.conf_path)
        client = self._connect(deadline)
        try:
            osd_uuid = str(uuid.uuid4())
            osd_id = self._mon_command(client, {"prefix": "osd create", "uuid": osd_uuid})
            if osd_id.strip() != "0":
                raise CephClusterError(f"ceph osd create returned {osd_id!r}, expected 0")
            self._run(
                "osd.0",
                ["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid],
                deadline,
            )
            self._run("osd.0", ["ceph-osd", "-c", conf, "-i", "0"], deadline)
            self._wait_osd_up(client, deadline)
            self._ensure_pool(client)
            self._wait_pool_usable(client, deadline)
        finally:
            client.shutdown()

    def _ensure_pool(self, client: rados.Rados) -> None:
        """The pool, made once (a kept cluster has it from its first start)."""
        if client.pool_exists(self.pool):
            return
        self._mon_command(
            client, {"prefix": "osd pool create", "pool": self.pool, "pg_num": 8, "pgp_num": 8}
        )
        self._mon_command(
            client, {"prefix": "osd pool application enable", "pool": self.pool, "app": "rbd"}
        )

    def _mon_command(self, client: rados.Rados, cmd: dict[str, object]) -> str:
        ret, out, err = client.mon_command(json.dumps(cmd), b"", timeout=30)
        if ret != 0:
            raise self._error("mon.a", f"`{cmd['prefix']}` failed ({ret}): {err}")
        return out.decode()

    def _wait_osd_up(self, client: rados.Rados, deadline: float) -> None:
        while True:
            dump = json.loads(self._mon_command(client, {"prefix": "osd dump", "format": "json"}))
            if any(o["osd"] == 0 and o["up"] and o["in"] for o in dump["osds"]):
                return
            if not self._daemon_alive("osd.0") or time.monotonic() > deadline:
                raise self._error("osd.0", "OSD did not come up")
            time.sleep(0.1)

    def _wait_pool_usable(self, client: rados.Rados, deadline: float) -> None:
        """A write blocks until the PG is active; that is the readiness that matters."""
        import rados

        while True:
            try:
                with client.open_ioctx(self.pool) as ioctx:
                    completion = ioctx.aio_write_full("bmi-ceph-probe", b"ok")
                    while not completion.is_complete():
                        if time.monotonic() > deadline or not self._daemon_alive("osd.0"):
                            raise self._error("osd.0", f"pool {self.pool} not usable in time")
                        time.sleep(0.05)
                    if completion.get_return_value() == 0:
                        ioctx.remove_object("bmi-ceph-probe")
                        return
            except rados.Error as e:
                if time.monotonic() > deadline:
                    raise self._error("osd.0", f"pool {self.pool} not usable: {e}") from None
            time.sleep(0.1)

    # --- an OSD outage (fault tests) -----------------------------------------------------

    def stop_osd(self) -> None:
        """Stop the OSD cleanly: memstore saves its objects to the OSD's data dir on a
        clean shutdown and loads them on start, so ``start_osd`` brings the data back."""
        pid = self.daemon_pid("osd.0")
        if pid is not None:
            self._kill_and_wait(pid, signal.SIGTERM, grace=60)

    def start_osd(self, timeout: float = 60) -> None:
        """Start the OSD again and wait until the pool takes writes."""
        import rados

        deadline = time.monotonic() + timeout
        self._run("osd.0", ["ceph-osd", "-c", str(self.conf_path), "-i", "0"], deadline)
        client = rados.Rados(conffile=str(self.conf_path), conf={"client_mount_timeout": "30"})
        try:
            client.connect()
            self._wait_osd_up(client, deadline)
            self._wait_pool_usable(client, deadline)
        finally:
            client.shutdown()

    # --- stop ----------------------------------------------------------------------------

    def daemon_pid(self, daemon: str) -> int | None:
        """The pid in the daemon's pid file, if that process is still this cluster's daemon."""
        try:
            pid = int(self.pid_path(daemon).read_text().strip())
        except (OSError, ValueError):
            return None
        # Guard against a recycled pid: the process must name this cluster's conf.
        return pid if str(self.conf_path) in " ".join(cmdline(pid)) and alive(pid) else None

    def _daemon_alive(self, daemon: str) -> bool:
        return self.daemon_pid(daemon) is not None

    def stop(self) -> None:
        """Stop the daemons; a throwaway cluster's directory is deleted too."""
        if self.base_dir is None or not self.base_dir.exists():
            return
        self._stop_daemons()
        if self._owns_dir and not self.persistent:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _stop_daemons(self) -> None:
        for daemon in DAEMONS:
            pid = self.daemon_pid(daemon)
            if pid is None:
                continue
            if self.persistent:
                self._kill_and_wait(pid, signal.SIGTERM, grace=60)
            else:
                # A throwaway cluster: no need to let memstore dump its contents on exit.
                sig = signal.SIGKILL if daemon.startswith("osd") else signal.SIGTERM
                self._kill_and_wait(pid, sig)

    @staticmethod
    def _kill_and_wait(pid: int, sig: signal.Signals, grace: float = 10) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while alive(pid):
            if time.monotonic() > end:
                if sig == signal.SIGKILL:
                    return
                os.kill(pid, signal.SIGKILL)
                sig, end = signal.SIGKILL, time.monotonic() + grace
            time.sleep(0.02)

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

