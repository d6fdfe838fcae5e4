"""Runs a real `bmi-gateway` process for integration tests (killable, restartable)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class GatewayProcess:
    def __init__(self, name: str, token: str, server: str, tgtd, ceph_conf: str, pool: str,
                 log_dir: Path, *, advertised_host: str = "10.0.2.2") -> None:
        self.name = name
        self.tgtd = tgtd
        self.log_path = log_dir / f"{name}.log"
        # QEMU's user networking reaches the host's 127.0.0.1 at 10.0.2.2.
        self.portal = f"{advertised_host}:{tgtd.port}"
        self.env = {
            **os.environ,
            "BMI_GATEWAY_NAME": name,
            "BMI_GATEWAY_TOKEN": token,
            "BMI_GATEWAY_SERVER": server,
            "BMI_GATEWAY_TGT_PORTAL": tgtd.portal,
            "BMI_GATEWAY_TGT_CONTROL": str(tgtd.control),
            "BMI_GATEWAY_ADVERTISED_PORTALS": self.portal,
            "BMI_GATEWAY_CEPH_CONF": ceph_conf,
            "BMI_GATEWAY_CEPH_POOL": pool,
            "BMI_GATEWAY_AUDIT_SECONDS": "1",
            "BMI_GATEWAY_RECONNECT_MAX_SECONDS": "2",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "bmi_gateway.main"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
