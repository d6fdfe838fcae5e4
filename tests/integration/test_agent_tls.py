"""In QEMU: with TLS on, a node booting the agent gets the CA as a second initrd and
reports its inventory over TLS (the gRPC API accepts nothing else)."""

from __future__ import annotations

import time

import pytest
from bmi_client.client import BmiClient, channel_credentials
from server_process import ADMIN_TOKEN, ServerProcess
from tls_certs import CertificateAuthority

from bmi_server.devenv import agent_image
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 300  # TCG: the agent's Python and grpc are slow to start


def test_agent_reports_inventory_over_tls(ceph_cluster, tgtd, tmp_path):
    image = agent_image.build(log=print)
    ca = CertificateAuthority(tmp_path / "pki", "site")
    # Agents in QEMU reach the host's 127.0.0.1 at 10.0.2.2: the certificate names both.
    cert = ca.issue("bmi-server", server=True, addresses=("127.0.0.1", "10.0.2.2"))
    server = ServerProcess(
        tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool, tgtd=tgtd,
        extra_env={
            "BMI_TLS_CERT_FILE": str(cert.cert), "BMI_TLS_KEY_FILE": str(cert.key),
            "BMI_AGENT_CA_FILE": str(ca.cert),
            "BMI_DISCOVERY_MODE": "inventory", "BMI_DISCOVERY_RETRY_SECONDS": "2",
            "BMI_AGENT_IMAGE_DIR": str(image.directory), "BMI_AGENT_HEARTBEAT_SECONDS": "1",
        },
        channel_credentials=channel_credentials(ca.cert),
    )  # fmt: skip
    server.start()
    mac = "52:54:00:a7:00:01"
    tftp = tmp_path / "tftp"
    write_chain_script(tftp, f"10.0.2.2:{server.http_address.rpartition(':')[2]}")
    (tmp_path / "vm").mkdir()
    vm = QemuNode("tls-agent-vm", mac, tftp, tmp_path / "vm", memory_mib=512, cpus=2)
    vm.power_on()
    try:
        with BmiClient(server.address, ADMIN_TOKEN, ca_file=ca.cert) as admin:
            deadline = time.monotonic() + BOOT_TIMEOUT
            node = None
            while time.monotonic() < deadline:
                node = next((n for n in admin.list_nodes() if mac in n.macs), None)
                if node is not None and admin.get_node(node.id).HasField("inventory"):
                    break
                time.sleep(0.5)
            assert node is not None, f"never discovered; serial:\n{vm.serial_text()[-3000:]}"
            inventory = admin.get_node(node.id).inventory
            assert [nic.mac for nic in inventory.interfaces] == [mac], vm.serial_text()[-3000:]
    finally:
        vm.power_off()
        server.stop()
    assert "plaintext" not in server.log()
