"""A throwaway one-node Ceph cluster (one mon, one memstore OSD) for tests, demo and developers.

Everything (config, keys, mon and OSD data, pid files, admin sockets, logs) lives in one
directory (0700), the monitor listens on a free port of its own, so several clusters can run
side by side and ``stop`` kills exactly its own daemons. No mgr: the pool works without one
(health then says "no active mgr", which is harmless here), and skipping it saves seconds.

Authentication is on (cephx), as on a real cluster: the monitor's port is open to every local
user, so without it anyone on the host could read and write every volume. Each daemon and
client reads its key from ``keys/<name>.keyring`` (0600): ``client.admin`` (all caps, for
BMI's server, the tools and tests) and ``client.bmi-tgt`` (``profile rbd`` on the pool only,
for tgtd's rbd backing store, given as ``id=bmi-tgt`` in its bsopts).

    python -m bmi_server.devenv.ceph_cluster start [--dir D]   # prints the conf path last
    python -m bmi_server.devenv.ceph_cluster stop --dir D      # or --conf D/ceph.conf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from bmi_server.adapters.tgt.ceph_profile import TGT_CLIENT_PROFILE

if TYPE_CHECKING:
    import rados

CONF_NAME = "ceph.conf"
TGT_CONF_NAME = "ceph-tgt.conf"  # CONF_NAME + the tgt client profile
MARKER_NAME = ".bmi-ceph-cluster"  # lets `stop --dir` know the directory is ours to delete
DAEMONS = ("osd.0", "mon.a")  # stop order: the OSD first, so it need not wait for the mon
KEYS_DIR = "keys"
ADMIN_CLIENT = "client.admin"
# tgtd's rbd backing store only opens, reads and writes images: `profile rbd` on the pool,
# no other pool, no keys, no cluster changes (as a production tgtd's client; operator guide).
TGT_CLIENT = "client.bmi-tgt"


class CephClusterError(RuntimeError):
    """The cluster could not be started; the message ends with the tail of a daemon log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class CephCluster:
    def __init__(
        self, base_dir: Path | None = None, pool: str = "rbd", memstore_bytes: int = 2 << 30
    ) -> None:
        self._given_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._owns_dir = False
        self.base_dir: Path | None = self._given_dir
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.port = 0
        self.fsid = ""

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
        deadline = time.monotonic() + timeout
        self._make_dir()
        try:
            self._write_conf()
            self._start_mon(deadline)
            self._start_osd_and_pool(deadline)
        except BaseException:
            self.stop()
            raise

    def _make_dir(self) -> None:
        if self._given_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="bmi-ceph-"))
            self._owns_dir = True
        else:
            self.base_dir = self._given_dir
            if self.base_dir.exists() and any(self.base_dir.iterdir()):
                raise CephClusterError(f"{self.base_dir} is not empty")
            self._owns_dir = not self.base_dir.exists()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        # The keys and the data are the cluster's: other local users get nothing of either.
        self.base_dir.chmod(0o700)
        for sub in ("run", "log", "mon.a", "osd.0", KEYS_DIR):
            self._path(sub).mkdir(mode=0o700)
        self._path(MARKER_NAME).touch()

    def _write_conf(self) -> None:
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        d = self.base_dir
        conf = f"""\
# BMI throwaway Ceph cluster; everything lives in {d}
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
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
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
# A SIGTERM unmounts the store, so memstore saves its objects and stop_osd/start_osd
# keep the data (Pacific's fast shutdown skips that).
osd fast shutdown = false
log file = {d}/log/$name.log
"""
        self.conf_path.write_text(conf)
        self.tgt_conf_path.write_text(conf + TGT_CLIENT_PROFILE)

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

    def _start_osd_and_pool(self, deadline: float) -> None:
        import rados  # Debian's binding; imported late so `stop` works without it

        conf = str(self.conf_path)
        client = rados.Rados(
            conffile=conf,
            conf={"client_mount_timeout": str(int(max(1, deadline - time.monotonic())))},
        )
        try:
            try:
                client.connect()
            except rados.Error as e:
                raise self._error("mon.a", f"cannot connect to the monitor: {e}") from None
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
            self._mon_command(
                client, {"prefix": "osd pool create", "pool": self.pool, "pg_num": 8, "pgp_num": 8}
            )
            self._mon_command(
                client, {"prefix": "osd pool application enable", "pool": self.pool, "app": "rbd"}
            )
            self._wait_pool_usable(client, deadline)
        finally:
            client.shutdown()

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
        return pid if str(self.conf_path) in _cmdline(pid) and _alive(pid) else None

    def _daemon_alive(self, daemon: str) -> bool:
        return self.daemon_pid(daemon) is not None

    def stop(self) -> None:
        if self.base_dir is None or not self.base_dir.exists():
            return
        for daemon in DAEMONS:
            pid = self.daemon_pid(daemon)
            if pid is None:
                continue
            # A throwaway cluster: no need to let memstore dump its contents on exit.
            sig = signal.SIGKILL if daemon.startswith("osd") else signal.SIGTERM
            self._kill_and_wait(pid, sig)
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @staticmethod
    def _kill_and_wait(pid: int, sig: signal.Signals, grace: float = 10) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while _alive(pid):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bmi_server.devenv.ceph_cluster",
        description="Throwaway one-node Ceph cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a cluster; print its conf path last")
    p_start.add_argument("--dir", type=Path, help="cluster directory (default: a new temp dir)")
    p_start.add_argument("--pool", default="rbd")
    p_start.add_argument("--timeout", type=float, default=60)
    p_stop = sub.add_parser("stop", help="stop a cluster and delete its directory")
    where = p_stop.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path)
    where.add_argument("--conf", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = CephCluster(args.dir, pool=args.pool)
            started = time.monotonic()
            cluster.start(timeout=args.timeout)
            print(
                f"ceph cluster up in {time.monotonic() - started:.1f} s, pool {cluster.pool!r}",
                file=sys.stderr,
            )
            print(cluster.conf_path)
        else:
            base = args.dir if args.dir is not None else args.conf.parent
            CephCluster.attach(base).stop()
    except CephClusterError as e:
        first, _, rest = str(e).partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
