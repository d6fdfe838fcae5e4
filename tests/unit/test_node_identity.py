"""Per-node identity through the config drive: made with the disk and target, replaced on
reprovision, removed on deprovision and rollback, settled by reconcile after a crash at any
step; on in-memory Ceph and tgt."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
from principals import ADMIN, ALICE, BOB

from bmi_server.core import errors, node_config, provisioning
from bmi_server.core.models import NodeConfig, NodeState
from bmi_server.core.node_config import ConfigRequest
from bmi_server.core.reconcile import rebuild_catalogue, reconcile
from bmi_server.server import Core

MAC = "52:54:00:12:34:56"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHC5ZJbn1ZKpHC2Vhfi6JjwN2LVbQMFN4nD6AX4mhTS6 me@x"
SECRET = "db-password-Zm9vYmFyCg"
USER_DATA = f"#cloud-config\nruncmd: [echo {SECRET}]\n".encode()


@pytest.fixture
def node(core):
    return core.registry.enrol(ADMIN, name="rack7_n1", project="alice", macs=[MAC])


def request(**fields) -> ConfigRequest:
    return ConfigRequest(**{"hostname": "web1", "ssh_keys": (KEY,), "user_data": USER_DATA,
                            "metadata": {"role": "db"}, **fields})  # fmt: skip


def drive_files(store, volume: str, tmp_path) -> dict[str, bytes]:
    """What mtools reads from the drive's bytes in the (fake) image store."""
    image = tmp_path / f"{volume}.img"
    image.write_bytes(bytes(store.volumes[volume].data))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    names = subprocess.run(["mdir", "-b", "-i", str(image), "::"], capture_output=True,
                           text=True, check=True, env=env).stdout.split()  # fmt: skip
    return {
        n.removeprefix("::/"): subprocess.run(["mtype", "-i", str(image), n], check=True,
                                              capture_output=True, env=env).stdout
        for n in names
    }  # fmt: skip


def test_provisioning_makes_a_drive_with_the_node_s_identity(core, node, golden, store,
                                                             targets, tmp_path):
    done = core.provisioner.provision(ALICE, "rack7_n1", image="golden", config=request())
    assert done.state is NodeState.PROVISIONED
    assert done.instance_id.startswith("i-") and done.hostname == "web1"
    drive = done.target.config_volume
    assert drive == node_config.drive_volume(done.instance_id)
    assert targets.targets[done.target.iqn].config_volume == drive
    volume = store.volumes[drive]
    assert volume.complete and volume.parent is None
    assert volume.metadata == {**volume.metadata, "bmi.kind": "node-config",
                               "bmi.node": node.id, "bmi.project": "alice",
                               "bmi.instance_id": done.instance_id,
                               "bmi.disk_id": done.disk_id, "bmi.hostname": "web1"}  # fmt: skip
    assert not any(SECRET in value for value in volume.metadata.values())
    files = drive_files(store, drive, tmp_path)
    assert json.loads(files["meta-data"]) == {
        "instance-id": done.instance_id, "local-hostname": "web1", "public-keys": [KEY],
        "meta": {"role": "db"}}  # fmt: skip
    assert files["user-data"] == USER_DATA and "network-config" not in files
    stored = core.state.get_node(node.id)
    assert (stored.instance_id, stored.hostname) == (done.instance_id, "web1")
    assert core.registry.config(stored) == request().check("rack7_n1")


def test_without_a_config_the_node_name_is_the_host_name(core, node, golden, store, tmp_path):
    done = core.provisioner.provision(ALICE, node.id, image="golden")
    files = drive_files(store, done.target.config_volume, tmp_path)
    assert json.loads(files["meta-data"]) == {"instance-id": done.instance_id,
                                              "local-hostname": "rack7-n1"}  # fmt: skip
    assert files["user-data"] == b""
    assert core.registry.config(done) == NodeConfig(hostname="rack7-n1")


def test_two_nodes_from_one_image_get_their_own_instance_and_drive(core, node, golden, targets):
    core.registry.enrol(ADMIN, name="n2", project="alice", macs=["52:54:00:00:00:09"])
    a = core.provisioner.provision(ALICE, node.id, image="golden")
    b = core.provisioner.provision(ALICE, "n2", image="golden")
    assert a.instance_id != b.instance_id
    assert a.target.config_volume != b.target.config_volume
    assert {a.hostname, b.hostname} == {"rack7-n1", "n2"}


def test_a_bad_config_is_refused_before_anything_changes(core, node, golden, store, targets):
    before = (set(store.volumes), dict(targets.targets), core.registry.history(node))
    for bad in (request(hostname="-x"), request(ssh_keys=("ssh-rsa nope",)),
                request(user_data=f"password: {SECRET}".encode()),
                request(network_config=b"ethernets: {}"), request(metadata={"": "x"})):
        with pytest.raises(errors.InvalidArgument) as refused:
            core.provisioner.provision(ALICE, node.id, image="golden", config=bad)
        assert SECRET not in refused.value.message
    assert (set(store.volumes), dict(targets.targets), core.registry.history(node)) == before
    assert core.state.get_node(node.id).state is NodeState.AVAILABLE


def test_reprovision_gives_a_new_instance_and_drive_keeping_or_replacing_the_config(
    core, node, golden, store, targets, tmp_path
):
    first = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    kept = core.provisioner.reprovision(ALICE, node.id)
    assert kept.instance_id != first.instance_id
    assert first.target.config_volume not in store.volumes  # the old drive went
    assert first.target.iqn not in targets.targets
    files = drive_files(store, kept.target.config_volume, tmp_path)
    assert json.loads(files["meta-data"])["instance-id"] == kept.instance_id
    assert files["user-data"] == USER_DATA  # the config it had
    assert core.registry.config(kept) == request().check(node.name)

    new = request(hostname="web2", ssh_keys=(), user_data=b"#!/bin/sh\necho hi\n",
                  network_config=b"version: 2\n", metadata={})  # fmt: skip
    replaced = core.provisioner.reprovision(ALICE, node.id, config=new)
    assert replaced.instance_id not in (first.instance_id, kept.instance_id)
    assert replaced.hostname == "web2"
    files = drive_files(store, replaced.target.config_volume, tmp_path)
    assert json.loads(files["meta-data"]) == {"instance-id": replaced.instance_id,
                                              "local-hostname": "web2"}  # fmt: skip
    assert files["user-data"] == b"#!/bin/sh\necho hi\n"
    assert files["network-config"] == b"version: 2\n"
    drives = [v for v in store.volumes if v.startswith("bmi-cfg-")]
    assert drives == [replaced.target.config_volume]
    with pytest.raises(errors.InvalidArgument):
        core.provisioner.reprovision(ALICE, node.id, config=request(hostname="a..b"))
    assert core.state.get_node(node.id).instance_id == replaced.instance_id  # untouched


def test_reprovisioning_a_node_from_before_config_drives_gives_it_the_defaults(
    core, node, golden, store, tmp_path
):
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    # As a release before config drives left it: no instance, drive or config.
    store.remove(done.target.config_volume)
    done.instance_id = done.hostname = ""
    done.target = dataclasses.replace(done.target, config_volume="")
    core.state.save_node(done, None, expected=done.state, config=None)
    assert core.registry.config(core.state.get_node(node.id)) is None

    again = core.provisioner.reprovision(ALICE, node.id)
    assert again.instance_id and again.hostname == "rack7-n1"
    files = drive_files(store, again.target.config_volume, tmp_path)
    assert json.loads(files["meta-data"]) == {"instance-id": again.instance_id,
                                              "local-hostname": "rack7-n1"}  # fmt: skip
    assert files["user-data"] == b""
    assert core.registry.config(again) == NodeConfig(hostname="rack7-n1")


def test_deprovision_removes_the_drive_and_the_config(core, node, golden, store, targets):
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    gone = core.provisioner.deprovision(ALICE, node.id, keep_disk=True)
    assert done.target.config_volume not in store.volumes
    assert done.disk_id in {d.id for d in core.state.all_disks()}  # only the disk stays
    assert (gone.instance_id, gone.hostname, gone.target) == ("", "", None)
    assert core.state.get_node_config(node.id) is None and targets.targets == {}


@pytest.mark.parametrize("method", ["create", "write", "mark_complete"])
def test_a_drive_that_cannot_be_written_rolls_everything_back(core, node, golden, store,
                                                              targets, method):
    before = set(store.volumes)
    store.fail[method] = errors.Unavailable("ceph: timed out")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    after = core.state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and after.target is None
    assert set(store.volumes) == before and targets.targets == {}
    assert core.state.get_node_config(node.id) is None


def test_a_failed_export_removes_the_drive_it_made(core, node, golden, store, targets):
    targets.fail["create_export"] = errors.FailedPrecondition("LUN 2: invalid request")
    with pytest.raises(errors.FailedPrecondition):
        core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    assert not [v for v in store.volumes if v.startswith("bmi-cfg-")]
    assert core.state.get_node_config(node.id) is None


def test_another_project_cannot_provision_or_learn_of_the_node(core, node, golden):
    core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    with pytest.raises(errors.NotFound):
        core.provisioner.reprovision(BOB, node.id, config=request(hostname="evil"))
    with pytest.raises(errors.NotFound):
        core.registry.resolve(BOB, node.id)


# -- crashes and reconcile -------------------------------------------------------------------


class Crash(BaseException):
    """The process died here: nothing after it runs, not even the rollback."""


@pytest.fixture
def crash_at(monkeypatch):
    def arm(point: str) -> None:
        armed = [point]

        def crash_point(name: str) -> None:
            if name in armed:  # once: the restarted server passes it again
                armed.clear()
                raise Crash(name)

        for module in (provisioning, node_config):
            monkeypatch.setattr(module, "crash_point", crash_point)

        def die(self, principal, node, cause):
            raise cause

        monkeypatch.setattr(provisioning.Provisioner, "_roll_back", die)

    return arm


def restarted(state, store, targets) -> Core:
    return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"])


STEPS = ["node.provision.after_disk", "node.config.before_complete",
         "node.provision.after_config", "node.provision.after_export"]  # fmt: skip


@pytest.mark.parametrize("point", STEPS)
@pytest.mark.parametrize("op", ["provision", "reprovision"])
def test_a_crash_at_any_step_is_rolled_back_by_reconcile(
    core, node, golden, store, targets, state, crash_at, point, op
):
    if op == "reprovision":
        core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    crash_at(point)
    with pytest.raises(Crash):
        if op == "provision":
            core.provisioner.provision(ALICE, node.id, image="golden", config=request())
        else:
            core.provisioner.reprovision(ALICE, node.id)
    assert state.get_node(node.id).state is NodeState.PROVISIONING
    report = restarted(state, store, targets).reconcile()
    after = state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and after.target is None
    assert state.get_node_config(node.id) is None
    assert set(store.volumes) == {golden.volume}, report
    assert targets.targets == {}


def test_a_crash_while_deprovisioning_is_finished_by_reconcile(
    core, node, golden, store, targets, state, crash_at
):
    core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    crash_at("node.detach.after_export")
    with pytest.raises(Crash):
        core.provisioner.deprovision(ALICE, node.id)
    restarted(state, store, targets).reconcile()
    assert state.get_node(node.id).state is NodeState.AVAILABLE
    assert set(store.volumes) == {golden.volume} and targets.targets == {}


def test_reconcile_removes_drives_no_node_names(core, node, golden, store, targets, state):
    """Left by this database's nodes, or half made: removed. Complete, of a node this
    database does not know (another deployment's, on a shared pool): only reported."""
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    ours, half, foreign = (f"bmi-cfg-00000000000000f{i}" for i in (1, 2, 3))
    for name, owner, complete in ((ours, node.id, True), (half, "node-gone", False),
                                  (foreign, "node-0000000000000000", True)):  # fmt: skip
        store.create(name, 4096, {"bmi.kind": "node-config", "bmi.node": owner})
        store.volumes[name].complete = complete
    report = core.reconcile()
    assert ours not in store.volumes and half not in store.volumes
    assert {ours, half} == report_volumes(report)
    assert foreign in store.volumes
    assert any(foreign in line and "unknown" in line for line in report.problems)
    assert done.target.config_volume in store.volumes  # a node names this one
    reconcile(state, store, remove_unknown=True, drives=core.provisioner.drives)
    assert foreign not in store.volumes and done.target.config_volume in store.volumes


def report_volumes(report) -> set[str]:
    return {w.strip(",") for line in report.repaired for w in line.split() if w.startswith("bmi-")}


@pytest.mark.parametrize("loss", ["missing", "incomplete"])
def test_a_lost_drive_of_a_provisioned_node_is_written_again(core, node, golden, store,
                                                             targets, loss):
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    drive = done.target.config_volume
    written = bytes(store.volumes[drive].data)
    if loss == "missing":
        del store.volumes[drive]
    else:
        store.volumes[drive].complete = False
    report = core.reconcile()
    assert any(f"wrote the config drive {drive}" in line for line in report.repaired)
    assert store.volumes[drive].complete and bytes(store.volumes[drive].data) == written


def test_the_target_audit_re_exports_lun_2(core, node, golden, targets):
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    targets.targets.clear()  # tgtd restarted
    core.provisioner.ensure_targets()
    assert targets.targets[done.target.iqn].config_volume == done.target.config_volume


def test_rebuild_catalogue_keeps_a_provisioned_node_s_drive(core, node, golden, store, state):
    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request())
    disk = state.get_disk(done.disk_id)
    state.delete_disk(disk.id)  # the disk's record was lost; the node's was not
    report = rebuild_catalogue(state, store)
    assert [line for line in report.repaired if "adopted disk" in line]
    assert not report.problems  # the drive is no "unknown" volume
    assert {d.volume for d in state.all_disks()} == {disk.volume}  # not adopted as a disk
    assert core.reconcile().problems == []
    assert done.target.config_volume in store.volumes
    assert state.get_node(node.id).target.config_volume == done.target.config_volume


def test_answers_say_whether_user_data_is_set_never_what_it_is(core, node, golden):
    from bmi_server.api import convert

    done = core.provisioner.provision(ALICE, node.id, image="golden", config=request(
        network_config=b"version: 2\n# net-" + SECRET.encode() + b"\n"))
    listed = convert.node_message(done, [])  # ListNodes, WatchNodes
    assert (listed.identity.instance_id, listed.identity.hostname) == (done.instance_id, "web1")
    assert not listed.identity.ssh_authorized_keys and not listed.identity.user_data_set
    assert listed.target.config_lun == 2
    single = convert.node_message(done, [], config=core.registry.config(done))  # GetNode
    assert list(single.identity.ssh_authorized_keys) == [KEY]
    assert single.identity.user_data_set and single.identity.network_config_set
    assert dict(single.identity.metadata) == {"role": "db"}
    for message in (listed, single):
        assert SECRET.encode() not in message.SerializeToString()
    bare = core.provisioner.reprovision(ALICE, node.id, config=ConfigRequest())
    single = convert.node_message(bare, [], config=core.registry.config(bare))
    assert not single.identity.user_data_set and not single.identity.network_config_set
    gone = core.provisioner.deprovision(ALICE, node.id)
    assert not convert.node_message(gone, []).HasField("identity")
