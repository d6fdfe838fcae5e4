"""Runs a real `bmi-gateway` process for integration tests (killable, restartable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from child_process import LoggedChild


class GatewayProcess(LoggedChild):
    stop_seconds = 15

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
