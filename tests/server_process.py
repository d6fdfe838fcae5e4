"""Runs a real `bmi-server` process for integration tests (killable, restartable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from child_process import LoggedChild
from grpc_health.v1 import health_pb2, health_pb2_grpc

ADMIN_TOKEN = "admin-token-for-tests"
TENANT_TOKENS = {"alice": "alice-token", "bob": "bob-token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokens(path: Path) -> None:
    lines = [f"{ADMIN_TOKEN} admin test-admin"]
    lines += [f"{token} project:{project}" for project, token in TENANT_TOKENS.items()]
    path.write_text("\n".join(lines) + "\n")


class ServerProcess(LoggedChild):
    def __init__(
        self,
        state_dir: Path,
        ceph_conf: str,
        pool: str,
        database_url: str = "",
        *,
        tgtd=None,
        extra_env: dict[str, str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        log_level: str = "INFO",
        log_path: Path | None = None,
        test_tokens: bool = True,
    ) -> None:
        """``channel_credentials``: how to reach a server configured for TLS. Without
        ``test_tokens`` the server makes its own token file (and state_dir, unless the log
        is in it)."""
        self.state_dir = state_dir
        self.log_level = log_level
        self.channel_credentials = channel_credentials
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self.log_path = log_path or state_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if test_tokens:
            state_dir.mkdir(parents=True, exist_ok=True)
            write_tokens(state_dir / "tokens")
        self.env = {
            **os.environ,
            "BMI_LISTEN": self.address,
            "BMI_STATE_DIR": str(state_dir),
            "BMI_CEPH_CONF": ceph_conf,
            "BMI_CEPH_POOL": pool,
            "BMI_DATABASE_URL": database_url,
            "BMI_HTTP_LISTEN": self.http_address,
            **(
                {"BMI_TGT_PORTAL": tgtd.portal, "BMI_TGT_CONTROL": str(tgtd.control)}
                if tgtd is not None
                else {}
            ),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, crash_point: str = "", wait: bool = True) -> None:
        env = dict(self.env)
        if crash_point:
            env["BMI_CRASH_POINT"] = crash_point
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bmi_server.main", "--log-level", self.log_level, "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            try:
                self.wait_serving()
            except BaseException:
                self.stop()  # a fixture that fails to start never stops its process
                raise

    def wait_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc and self.proc.poll() is not None:
                    raise RuntimeError(f"bmi-server exited early:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise RuntimeError(f"bmi-server not serving after {timeout}s:\n{self.log()}")

    def channel(self) -> grpc.Channel:
        if self.channel_credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.channel_credentials)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


def config_drive_of(node) -> str:
    """The volume of a provisioned node's config drive (named after its instance id)."""
    return "bmi-cfg-" + node.identity.instance_id.removeprefix("i-")
