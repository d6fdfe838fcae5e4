"""No secret in any log line, error message or metric: a whole provision, boot-script
fetch and agent flow against a real server logging JSON at DEBUG, with the secrets it
handed out (CHAP secrets, one-boot tokens) and the ones callers used (bearer tokens, a
forged token, a forged boot token, a password in a node's user-data) collected and
searched for afterwards."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from bmi.v1 import boot_pb2, images_pb2, nodes_pb2
from bmi_client.client import BmiClient, node_config
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess, free_port

from bmi_agent.client import BootClient, ServerRefused, TokenRejected
from bmi_agent.cmdline import AgentConfig
from bmi_agent.inventory import Inventory, NetworkInterface

pytestmark = pytest.mark.ceph

SANBOOT_MAC = "52:54:00:5e:00:01"
AGENT_MAC = "52:54:00:5e:00:02"
FORGED_BEARER = "forged-bearer-token-QmFkVG9rZW4x"
FORGED_BOOT_TOKEN = "forged-boot-token-Rm9yZ2VkQm9vdA"
USER_DATA_SECRET = "user-data-password-VXNlckRhdGE"


@pytest.fixture
def server(ceph_cluster, tgtd, tmp_path):
    agent_image = tmp_path / "agent-image"
    agent_image.mkdir()
    (agent_image / "vmlinuz").write_bytes(b"kernel")
    (agent_image / "initrd").write_bytes(b"initrd")
    metrics = f"127.0.0.1:{free_port()}"
    process = ServerProcess(
        tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool, tgtd=tgtd,
        extra_env={"BMI_LOG_FORMAT": "json", "BMI_AGENT_IMAGE_DIR": str(agent_image),
                   "BMI_METRICS_LISTEN": metrics},
        log_level="DEBUG",
    )  # fmt: skip
    process.metrics_address = metrics
    process.start()
    yield process
    process.stop()


def boot_script(server: ServerProcess, mac: str) -> str:
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        return reply.read().decode()


def test_no_secret_is_logged_returned_in_errors_or_exported(server, raw_image, caplog):
    caplog.set_level(logging.DEBUG)  # the agent's and the client's own logs, in this process
    secrets = {ADMIN_TOKEN, *TENANT_TOKENS.values(), FORGED_BEARER, FORGED_BOOT_TOKEN,
               USER_DATA_SECRET}
    errors: list[str] = []

    def refused(call: Callable[[], object]) -> None:
        try:
            call()
        except grpc.RpcError as error:
            errors.append(f"{error.code().name}: {error.details()}")
        except (TokenRejected, ServerRefused) as error:
            errors.append(str(error))
        else:
            raise AssertionError("expected a refusal")

    admin = BmiClient(server.address, ADMIN_TOKEN, max_attempts=1)
    alice = BmiClient(server.address, TENANT_TOKENS["alice"], max_attempts=1)
    bob = BmiClient(server.address, TENANT_TOKENS["bob"], max_attempts=1)
    forged = BmiClient(server.address, FORGED_BEARER, max_attempts=1)
    admin.upload_image(raw_image, "hygiene", project="ops",
                       visibility=images_pb2.VISIBILITY_PUBLIC)  # fmt: skip

    # iSCSI boot: the CHAP secret is in the node's boot script and nowhere else; the
    # user-data on its config drive nowhere but there.
    admin.enroll_node("hyg-sanboot", "alice", macs=[SANBOOT_MAC])
    user_data = f"#cloud-config\nchpasswd:\n  list: root:{USER_DATA_SECRET}\n"
    alice.provision_node("hyg-sanboot", image="hygiene",
                         config=node_config(user_data=user_data))  # fmt: skip
    chap = re.search(r"^set password (\S+)$", boot_script(server, SANBOOT_MAC), re.M)
    assert chap, "no CHAP secret in the boot script"
    secrets.add(chap.group(1))

    # Agent boot: a one-boot token on the kernel command line, a boot plan with CHAP.
    admin.enroll_node("hyg-agent", "alice", macs=[AGENT_MAC])
    node = alice.provision_node("hyg-agent", image="hygiene",
                                boot_mode=nodes_pb2.BOOT_MODE_AGENT)  # fmt: skip
    first_token = re.search(r"bmi\.token=(\S+)", boot_script(server, AGENT_MAC)).group(1)
    token = re.search(r"bmi\.token=(\S+)", boot_script(server, AGENT_MAC)).group(1)
    secrets |= {first_token, token}
    agent = BootClient(AgentConfig(server.address, node.id, token, AGENT_MAC), timeout=30)
    agent.register(Inventory(interfaces=[NetworkInterface("eth0", AGENT_MAC)]), attempts=1)
    plan = agent.boot_plan(attempts=1)
    assert plan.target.chap_secret
    secrets.add(plan.target.chap_secret)
    agent.report(boot_pb2.AGENT_PHASE_ATTACHING, "logging in", attempts=1)
    agent.heartbeat(attempts=1)

    # Refusals of every kind, each with a secret in play.
    refused(lambda: list(forged.list_images()))
    refused(lambda: bob.get_node("hyg-sanboot"))
    refused(lambda: alice.provision_node("hyg-sanboot", image="hygiene"))
    refused(lambda: alice.reprovision_node("hyg-sanboot", config=node_config(
        user_data=f"password={USER_DATA_SECRET}")))  # not a format cloud-init runs
    refused(lambda: admin.get_image("no-such-image"))
    stale = BootClient(AgentConfig(server.address, node.id, first_token), timeout=30)
    refused(lambda: stale.heartbeat(attempts=1))  # replaced by the second script
    wrong = BootClient(AgentConfig(server.address, node.id, FORGED_BOOT_TOKEN), timeout=30)
    refused(lambda: wrong.boot_plan(attempts=1))
    agent.report(boot_pb2.AGENT_PHASE_PIVOTING, "switching root", attempts=1)
    refused(lambda: agent.heartbeat(attempts=1))  # the pivot revoked the token
    for name in ("hyg-sanboot", "hyg-agent"):
        alice.deprovision_node(name)
    for client in (admin, alice, bob, forged, agent, stale, wrong):
        client.close()

    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics") as reply:
        metrics = reply.read().decode()
    server.stop()
    lines = server.log().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # The search covers something: DEBUG lines from the tgtadm calls that carried CHAP.
    assert any(r["level"] == "DEBUG" and "CHAP account" in r["message"] for r in records)
    assert len(errors) == 8 and len(secrets) == 10
    places = {"server log": lines, "error messages": errors, "metrics": metrics.splitlines(),
              "client-side logs": [r.getMessage() for r in caplog.records]}  # fmt: skip
    for where, texts in places.items():
        for text in texts:
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{where}: a secret in {text!r}"
