"""Per-node identity on the real stack (bmi-server, Ceph, tgtd): the config drive is LUN 2
of the node's own target, read from the outside with libiscsi and qemu-img's iSCSI driver
and opened with mtools; it changes with reprovision and goes with deprovision; another
project learns nothing of it, and user-data reaches no answer, error, log line or metric."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request

import grpc
import pytest
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import node_config
from server_process import ServerProcess, config_drive_of, free_port
from test_network_boot import boot_script_credentials, list_targets

pytestmark = pytest.mark.ceph

SECRET = "s3cret-db-password-Q29uZmlnRHJpdmU"
USER_DATA = f"#cloud-config\nruncmd:\n  - echo {SECRET} > /root/db\n".encode()
NETWORK = b"network:\n  version: 2\n  ethernets:\n    eno1:\n      dhcp4: true\n"
MAC = "52:54:00:1d:00:01"


@pytest.fixture(scope="module")
def server(ceph_cluster, tgtd, tmp_path_factory):
    """The module's server logs at DEBUG and serves metrics: both are searched for secrets."""
    metrics = f"127.0.0.1:{free_port()}"
    process = ServerProcess(
        tmp_path_factory.mktemp("identity-state"), str(ceph_cluster.conf_path),
        ceph_cluster.pool, tgtd=tgtd, log_level="DEBUG",
        extra_env={"BMI_METRICS_LISTEN": metrics},
    )  # fmt: skip
    process.metrics_address = metrics
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f",
                    str(path)], check=True)  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def image(admin, raw_image):
    made = admin.upload_image(raw_image, "identity-golden", project="ops",
                              visibility=images_pb2.VISIBILITY_PUBLIC)  # fmt: skip
    yield made
    admin.delete_image(made.id)


def read_lun(server: ServerProcess, tgtd, node, lun: int, out) -> bytes:
    """The LUN as qemu-img's iSCSI driver reads it, with the node's own initiator name and
    CHAP secret (from its boot script, the only place they are shown)."""
    cred = boot_script_credentials(server, MAC)
    secret = out.with_suffix(".chap")
    secret.write_text(cred["password"])
    host, port = tgtd.portal.split(":")
    opts = (f"driver=iscsi,transport=tcp,portal={host}:{port},target={node.target.iqn},"
            f"lun={lun},user={cred['user']},password-secret=chap,"
            f"initiator-name={cred['initiator']}")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                    f"secret,id=chap,file={secret}", "--image-opts", opts, str(out)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    return out.read_bytes()


def files_on(drive) -> dict[str, bytes]:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    names = subprocess.run(["mdir", "-b", "-i", str(drive), "::"], capture_output=True,
                           text=True, check=True, env=env).stdout.split()  # fmt: skip
    return {n.removeprefix("::/"): subprocess.run(["mtype", "-i", str(drive), n], env=env,
                                                  capture_output=True, check=True).stdout
            for n in names}  # fmt: skip


def luns_seen(tgtd, node, cred) -> list[int]:
    """LUNs an initiator with these credentials sees (iscsi-ls), or [] when refused."""
    url = f"iscsi://{cred['user']}%{cred['password']}@{tgtd.portal}"
    done = subprocess.run(["iscsi-ls", "-s", "-i", cred["initiator"], url], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    section = done.stdout.split(node.target.iqn, 1)[1] if node.target.iqn in done.stdout else ""
    return [int(n) for n in re.findall(r"Lun:(\d+)", section)]


def test_the_config_drive_is_lun_2_of_the_node_s_target(server, tgtd, admin, alice, image,
                                                        ssh_key, rbd_store, tmp_path):
    admin.enroll_node("id-node", "alice", macs=[MAC])
    config = node_config(hostname="web1.example.org", ssh_authorized_keys=[ssh_key],
                         user_data=USER_DATA, network_config=NETWORK,
                         metadata={"role": "db"})  # fmt: skip
    node = alice.provision_node("id-node", image="identity-golden", config=config)
    ident = node.identity
    assert ident.hostname == "web1.example.org" and ident.instance_id.startswith("i-")
    assert list(ident.ssh_authorized_keys) == [ssh_key] and dict(ident.metadata) == {"role": "db"}
    assert ident.user_data_set and ident.network_config_set
    assert node.target.lun == 1 and node.target.config_lun == 2

    cred = boot_script_credentials(server, MAC)
    assert luns_seen(tgtd, node, cred) == [0, 1, 2]
    drive = tmp_path / "lun2.img"
    read_lun(server, tgtd, node, 2, drive)
    files = files_on(drive)
    assert json.loads(files["meta-data"]) == {
        "instance-id": ident.instance_id, "local-hostname": "web1.example.org",
        "public-keys": [ssh_key], "meta": {"role": "db"}}  # fmt: skip
    assert files["user-data"] == USER_DATA and files["network-config"] == NETWORK
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(drive)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "TYPE=vfat" in blkid and "LABEL=cidata" in blkid
    # LUN 1 is still the disk: the golden image's bytes.
    disk = read_lun(server, tgtd, node, 1, tmp_path / "lun1.img")
    assert disk[:4096] == bytes(range(256)) * 16

    # Protected as the disk is: another initiator name, or the wrong secret, sees nothing.
    assert luns_seen(tgtd, node, {**cred, "initiator": "iqn.2026-11.org.moc.bmi.node:x"}) == []
    assert luns_seen(tgtd, node, {**cred, "password": "not-the-secret1"}) == []

    volume = rbd_store.get(config_drive_of(node))
    assert volume.complete and volume.metadata["bmi.kind"] == "node-config"
    assert volume.metadata["bmi.node"] == node.id and SECRET not in json.dumps(volume.metadata)

    # Reprovision: a new instance id and drive, the same config; the old drive is gone.
    again = alice.reprovision_node("id-node")
    assert again.identity.instance_id != ident.instance_id
    assert again.identity.hostname == "web1.example.org" and again.identity.user_data_set
    assert rbd_store.get(config_drive_of(node)) is None
    assert config_drive_of(again) in {v.name for v in rbd_store.list_volumes()}
    read_lun(server, tgtd, again, 2, tmp_path / "re.img")
    meta = json.loads(files_on(tmp_path / "re.img")["meta-data"])
    assert meta["instance-id"] == again.identity.instance_id

    # Reprovision with a new config replaces all of it.
    replaced = alice.reprovision_node("id-node", config=node_config(hostname="web2"))
    assert replaced.identity.hostname == "web2" and not replaced.identity.user_data_set
    assert not replaced.identity.ssh_authorized_keys
    read_lun(server, tgtd, replaced, 2, tmp_path / "r2.img")
    files = files_on(tmp_path / "r2.img")
    assert files["user-data"] == b"" and "network-config" not in files

    # Deprovision: target and drive gone from tgtd and Ceph.
    gone = alice.deprovision_node("id-node")
    assert not gone.HasField("identity") and not gone.HasField("target")
    assert replaced.target.iqn not in list_targets(tgtd)
    assert not [v for v in rbd_store.list_volumes() if v.metadata.get("bmi.node") == node.id]


def test_another_project_cannot_read_or_learn_of_user_data(server, admin, alice, bob, image):
    """Bob, and every answer, error, log line and metric, never see Alice's user-data; Bob
    cannot even tell her node exists."""
    admin.enroll_node("id-private", "alice", macs=["52:54:00:1d:00:02"])
    errors: list[str] = []

    def refused(call, code: grpc.StatusCode) -> None:
        with pytest.raises(grpc.RpcError) as failed:
            call()
        assert failed.value.code() == code, failed.value.details()
        errors.append(failed.value.details())

    # A refused user-data or network config (which may hold a Wi-Fi password) says why
    # without echoing it.
    for bad in (node_config(user_data=f"password: {SECRET}\n"),
                node_config(network_config=f"eth0: {SECRET}\n"),
                node_config(network_config=f"version: 2\n\tpassword: {SECRET}\n")):
        refused(lambda bad=bad: alice.provision_node("id-private", image="identity-golden",
                                                     config=bad),
                grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    node = alice.provision_node("id-private", image="identity-golden",
                                config=node_config(user_data=USER_DATA))  # fmt: skip
    answers = [node, alice.get_node(node.id), *alice.list_nodes(), *admin.list_nodes(),
               admin.get_node("id-private")]
    assert answers[1].identity.user_data_set and answers[-1].identity.user_data_set
    refused(lambda: bob.get_node(node.id), grpc.StatusCode.NOT_FOUND)
    refused(lambda: bob.get_node("id-private"), grpc.StatusCode.NOT_FOUND)
    refused(lambda: bob.reprovision_node("id-private", config=node_config(hostname="x")),
            grpc.StatusCode.NOT_FOUND)
    refused(lambda: bob.provision_node("id-private", image="identity-golden"),
            grpc.StatusCode.NOT_FOUND)
    assert node.id not in {n.id for n in bob.list_nodes()}
    watch = alice.watch_nodes(node="id-private")
    reprovisioned = alice.reprovision_node("id-private")
    events = []
    for event in watch:
        events.append(event)
        if event.transition.to_state == nodes_pb2.NODE_STATE_PROVISIONED:
            break
    watch.cancel()
    answers += [reprovisioned, *(e.node for e in events)]
    assert all(not e.node.identity.user_data_set for e in events)  # lists say nothing more
    alice.deprovision_node("id-private")

    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics") as reply:
        metrics = reply.read().decode()
    log = server.log()
    assert "DEBUG" in log and "LUN 2" in log  # the search covers the DEBUG tgtadm lines
    for where, text in {"answers": b"".join(a.SerializeToString() for a in answers).decode(
                            errors="replace"),
                        "errors": "\n".join(errors), "server log": log,
                        "metrics": metrics}.items():  # fmt: skip
        assert SECRET not in text, where
