"""kill -9 at every step of every multi-step operation, restart, and check that the
catalogue and Ceph agree, nothing is orphaned, and a retry with the same request id
gives one result."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import grpc
import pytest
from bmi.v1 import nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess

import bmi_server

CREATE_STEPS = {
    "upload": ["image.upload.after_record", "rbd.seal.before_complete",
               "image.upload.before_ready"],
    "import": ["image.create.after_record", "rbd.seal.before_complete",
               "image.create.before_ready"],
    "create_disk": ["disk.create.after_record", "rbd.clone.before_claim",
                    "disk.create.before_ready"],
    "snapshot": ["image.create.after_record", "rbd.copy.after_snapshot", "rbd.copy.after_clone",
                 "rbd.seal.before_complete", "image.create.before_ready"],
    "copy": ["image.create.after_record", "rbd.copy.after_clone", "image.create.before_ready"],
    "url_import": ["image.url.after_record", "rbd.seal.before_complete",
                   "image.url.before_ready"],
}
DELETE_STEPS = {
    "delete_disk": ["disk.delete.after_mark", "rbd.remove.after_snapshots",
                    "disk.delete.after_remove"],
    "delete_image": ["image.delete.after_mark", "rbd.remove.after_snapshots",
                     "image.delete.after_remove"],
}
CASES = [(op, point) for op, points in {**CREATE_STEPS, **DELETE_STEPS}.items() for point in points]
NODE_STEPS = {
    "provision": ["node.provision.after_disk", "node.config.before_complete",
                  "node.provision.after_config", "node.provision.after_export",
                  "disk.create.after_record", "rbd.clone.before_claim"],
    "deprovision": ["node.detach.after_export", "disk.delete.after_mark",
                    "disk.delete.after_remove"],
    "reprovision": ["node.detach.after_export", "node.provision.after_disk",
                    "node.config.before_complete", "node.provision.after_config",
                    "node.provision.after_export"],
}
NODE_CASES = [(op, point) for op, points in NODE_STEPS.items() for point in points]


@pytest.fixture(scope="module")
def crashable(ceph_cluster, tgtd, tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("crash-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd,
        extra_env={"BMI_URL_IMPORT_ALLOWED_HOSTS": "127.0.0.1", "BMI_URL_IMPORT_SCHEMES": "http"},
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def web(raw_image):
    """A web server on 127.0.0.1 serving raw_image as /image.raw; its URL and digest."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(raw_image.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    digest = "sha256:" + hashlib.sha256(raw_image.read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{server.server_address[1]}/{raw_image.name}", digest
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base(crashable, raw_image, ioctx, web):
    """A golden image and a disk that every case starts from."""
    import rbd

    rbd.RBD().create(ioctx, "crash-src", 4 << 20)
    crashable.start()
    with BmiClient(crashable.address, ADMIN_TOKEN) as admin:
        image = admin.upload_image(raw_image, "crash-base", project="ops")
        disk = admin.create_disk("crash-disk", image.id, project="ops")
    crashable.stop()
    return image, disk, web


def run_operation(client: BmiClient, op: str, base, raw_image, request_id: str):
    image, disk, (url, digest) = base
    if op == "upload":
        return client.upload_image(raw_image, "crash-new", project="ops", request_id=request_id)
    if op == "import":
        return client.import_image("crash-new", "crash-src", project="ops", request_id=request_id)
    if op == "create_disk":
        return client.create_disk("crash-new", image.id, project="ops", request_id=request_id)
    if op == "snapshot":
        return client.snapshot_disk(disk.id, "crash-new", request_id=request_id)
    if op == "url_import":
        return client.import_image_from_url("crash-new", url, digest, project="ops",
                                            request_id=request_id)
    if op == "copy":
        return client.copy_image(image.id, project="ops", name="crash-new",
                                 request_id=request_id)
    raise AssertionError(op)


def catalogue(client: BmiClient):
    images = {i.id: i for i in client.list_images()}
    disks = {d.id: d for d in client.list_disks()}
    return images, disks


def assert_agrees_with_ceph(client: BmiClient, rbd_store, baseline: set[str]) -> set[str]:
    images, disks = catalogue(client)
    states = {r.state for r in [*images.values(), *disks.values()]}
    assert states <= {2}, f"records left in transition: {images} {disks}"  # 2 = READY
    volumes = {v.name: v for v in rbd_store.list_volumes()}
    mine = {name for name in volumes if name not in baseline}
    # Config drives of provisioned nodes: named after their instance ids.
    drives = {"bmi-cfg-" + n.identity.instance_id.removeprefix("i-")
              for n in client.list_nodes() if n.identity.instance_id}
    recorded = {"bmi-" + i for i in [*images, *disks]} | drives
    assert recorded - set(volumes) == set(), "records without volumes"
    assert mine <= recorded, f"orphan volumes: {mine - recorded}"
    assert all(volumes[n].complete for n in recorded)
    assert all(not v.temporary_snapshots for v in volumes.values())
    return mine


@pytest.mark.parametrize("op, point", CASES)
def test_crash_and_restart(op, point, crashable, base, raw_image, rbd_store, ceph_cluster):
    image = base[0]
    baseline = {v.name for v in rbd_store.list_volumes()}
    request_id = f"{op}-{point}"
    victim = None
    if op in DELETE_STEPS:
        crashable.start()
        with BmiClient(crashable.address, ADMIN_TOKEN) as admin:
            victim = (admin.create_disk("victim", image.id, project="ops") if op == "delete_disk"
                      else admin.upload_image(raw_image, "victim", project="ops"))
        crashable.stop()

    crashable.start(crash_point=point)
    with BmiClient(crashable.address, ADMIN_TOKEN, max_attempts=1) as admin:
        with pytest.raises(grpc.RpcError) as died:
            if victim is None:
                run_operation(admin, op, base, raw_image, request_id)
            elif op == "delete_disk":
                admin.delete_disk(victim.id, request_id=request_id)
            else:
                admin.delete_image(victim.id, request_id=request_id)
        assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    assert crashable.wait_exit() == 137, "the crash point was not reached"

    crashable.start()  # reconciles before serving
    with BmiClient(crashable.address, ADMIN_TOKEN) as admin:
        assert_agrees_with_ceph(admin, rbd_store, baseline)
        if victim is None:
            made = run_operation(admin, op, base, raw_image, request_id)  # the retry
            again = run_operation(admin, op, base, raw_image, request_id)
            assert made.id == again.id and made.state == 2
            mine = assert_agrees_with_ceph(admin, rbd_store, baseline)
            assert mine == {"bmi-" + made.id}
            if op == "create_disk":
                admin.delete_disk(made.id)
            else:
                admin.delete_image(made.id)
        else:
            images, disks = catalogue(admin)
            assert victim.id not in images and victim.id not in disks  # deletion finished
            # The retry with the same request id gives the first call's result: done.
            delete = admin.delete_disk if op == "delete_disk" else admin.delete_image
            delete(victim.id, request_id=request_id)
            with pytest.raises(grpc.RpcError) as gone:  # a new request finds nothing
                delete(victim.id, request_id=request_id + "-new")
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert assert_agrees_with_ceph(admin, rbd_store, baseline) == set()
    crashable.stop()


def test_every_crash_point_in_the_code_is_tried():
    """New crash points must join CASES; the count tried is in the test ids above."""
    found = set()
    for path in Path(bmi_server.__file__).parent.rglob("*.py"):
        for name in re.findall(r'crash_point\(f?"([^"]+)"\)', path.read_text()):
            found |= {name.replace("{ops.kind}", kind) for kind in ("image", "disk")}
    tried = {point for _, point in CASES + NODE_CASES}
    assert found - tried == set()


def live_targets(tgtd) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


@pytest.mark.parametrize("op, point", NODE_CASES)
def test_node_crash_and_restart(op, point, crashable, base, rbd_store, tgtd):
    image = base[0]
    baseline = {v.name for v in rbd_store.list_volumes()}
    targets_before = live_targets(tgtd)
    name = f"crash-{op}-{point.replace('.', '-').replace('_', '-')}"[:60]
    crashable.start()
    with BmiClient(crashable.address, ADMIN_TOKEN) as admin:
        node = admin.enroll_node(name, "ops", macs=[_mac_for(name)])
        if op != "provision":
            admin.provision_node(node.id, image=image.id)
    crashable.stop()

    crashable.start(crash_point=point)
    with BmiClient(crashable.address, ADMIN_TOKEN, max_attempts=1) as admin:
        with pytest.raises(grpc.RpcError) as died:
            if op == "provision":
                admin.provision_node(node.id, image=image.id, request_id=name)
            elif op == "deprovision":
                admin.deprovision_node(node.id, request_id=name)
            else:
                admin.reprovision_node(node.id)
        assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    assert crashable.wait_exit() == 137, "the crash point was not reached"

    crashable.start()  # reconciles nodes, then the catalogue
    with BmiClient(crashable.address, ADMIN_TOKEN) as admin:
        after = admin.get_node(node.id)
        # An interrupted provisioning is rolled back, a deprovisioning finished.
        assert after.state == nodes_pb2.NODE_STATE_AVAILABLE, after
        assert not after.disk_id and not after.HasField("target")
        assert not after.HasField("identity")
        assert live_targets(tgtd) == targets_before
        assert assert_agrees_with_ceph(admin, rbd_store, baseline) == set()
        if op == "deprovision":  # finished on restart: the retry gets the node, as it is
            retried = admin.deprovision_node(node.id, request_id=name)
            assert retried.state == nodes_pb2.NODE_STATE_AVAILABLE
            assert len(admin.get_node(node.id).history) == len(after.history)
        # And the node can be provisioned again, then cleaned up.
        again = admin.provision_node(node.id, image=image.id, request_id=name + "-again")
        assert again.state == nodes_pb2.NODE_STATE_PROVISIONED
        admin.deprovision_node(node.id)
        assert live_targets(tgtd) == targets_before
        assert assert_agrees_with_ceph(admin, rbd_store, baseline) == set()
    crashable.stop()


def _mac_for(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
