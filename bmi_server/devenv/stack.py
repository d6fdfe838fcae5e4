"""A whole throwaway BMI installation on this machine: Ceph, tgtd and a bmi-server.

Used by the demo and the benchmarks; tests build the same from pytest fixtures.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.tgtd import Tgtd, TgtdGroup
from bmi_server.embedded.processes import free_port


class DevStack:
    """Start with ``with DevStack() as stack:``; everything is stopped and deleted after."""

    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        advertise_host: str | None = None,
        tgtd_processes: int = 1,
        projects: tuple[str, ...] = (),
    ) -> None:
        """``advertise_host``: the address nodes reach tgtd at (QEMU's user networking
        reaches the host's 127.0.0.1 as 10.0.2.2). ``tgtd_processes``: how many tgtds
        export the targets (``tgtd`` is the first). ``projects``: tenants to make a token
        for (``project_tokens[project]``), beside the admin's."""
        self.tgtd_processes = tgtd_processes
        self.tgtds: TgtdGroup | None = None
        self._advertise_host = advertise_host
        self.admin_token = secrets.token_urlsafe(24)
        self.project_tokens = {project: secrets.token_urlsafe(24) for project in projects}
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self._extra_env = extra_env or {}
        self._stack = contextlib.ExitStack()
        self.dir = Path(tempfile.mkdtemp(prefix="bmi-stack-"))
        self.cluster: CephCluster | None = None
        self.tgtd: Tgtd | None = None
        self.server: subprocess.Popen | None = None

    @property
    def tgt_port(self) -> str:
        assert self.tgtd is not None
        return self.tgtd.portal.rpartition(":")[2]

    def start(self) -> DevStack:
        try:
            self.cluster = self._stack.enter_context(CephCluster())
            self.tgtds = TgtdGroup(self.tgtd_processes)
            self._stack.callback(self.tgtds.stop)
            self.tgtds.start()
            self.tgtd = self.tgtds[0]
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self) -> None:
        assert self.cluster is not None and self.tgtds is not None
        state = self.dir / "server"
        state.mkdir()
        (state / "tokens").write_text(
            f"{self.admin_token} admin operator\n"
            + "".join(f"{token} project:{p}\n" for p, token in self.project_tokens.items())
        )
        env = {
            **os.environ,
            "BMI_LISTEN": self.address,
            "BMI_HTTP_LISTEN": self.http_address,
            "BMI_STATE_DIR": str(state),
            "BMI_CEPH_CONF": str(self.cluster.conf_path),
            "BMI_CEPH_POOL": self.cluster.pool,
            "BMI_TGT_CEPH_CONF": str(self.cluster.tgt_conf_path),
            "BMI_TGT_RBD_USER": self.cluster.tgt_user,
            **self.tgtds.server_env(self._advertise_host),
            **self._extra_env,
        }
        log = open(state / "server.log", "w")  # noqa: SIM115 - the child owns it
        self.server = subprocess.Popen(
            [sys.executable, "-m", "bmi_server.main", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._stack.callback(self._stop_server)
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    def server_log(self) -> str:
        path = self.dir / "server" / "server.log"
        return path.read_text() if path.exists() else ""

    def _stop_server(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)

    def stop(self) -> None:
        self._stack.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
