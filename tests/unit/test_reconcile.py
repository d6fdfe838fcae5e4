"""Reconcile after a crash, on states a crash at each step leaves behind."""

from __future__ import annotations

from fakes import TEMP_PREFIX
from principals import ALICE
from test_catalogue import upload

from bmi_server.core import volume_metadata
from bmi_server.core.models import Disk, ImageKind, ResourceState, Visibility
from bmi_server.core.naming import new_id, volume_name
from bmi_server.core.reconcile import rebuild_catalogue, reconcile


def _disk_record(image, state):
    disk_id = new_id("dsk-")
    return Disk(id=disk_id, name="d-" + disk_id[-4:], project="alice", image_id=image.id,
                image_name=image.name, size_bytes=image.size_bytes, volume=volume_name(disk_id),
                state=state)


def test_creating_record_without_volume_is_rolled_back(core, store, inspector, tmp_path):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    disk = _disk_record(image, ResourceState.CREATING)
    core.state.add_disk(disk)
    report = reconcile(core.state, store)
    assert core.state.get_disk(disk.id) is None
    assert any("rolled back" in line for line in report.repaired)


def test_creating_record_with_complete_clone_is_finished(core, store, inspector, tmp_path):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    disk = _disk_record(image, ResourceState.CREATING)
    core.state.add_disk(disk)
    store.clone(image.volume, disk.volume, volume_metadata.for_disk(disk))
    reconcile(core.state, store)
    assert core.state.get_disk(disk.id).state is ResourceState.READY
    assert disk.volume in store.volumes


def test_half_imported_image_is_removed_with_its_record(core, store):
    image = core.images.new_image(ALICE, name="half", project="", kind=ImageKind.GOLDEN,
                                  visibility=Visibility.PRIVATE, size_bytes=4096)
    core.state.add_image(image)
    store.create(image.volume, 4096, volume_metadata.for_image(image))  # never sealed
    reconcile(core.state, store)
    assert core.state.all_images() == [] and store.volumes == {}


def test_deleting_record_is_finished(core, store, inspector, tmp_path):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    image.state = ResourceState.DELETING
    core.state.update_image(image)
    reconcile(core.state, store)
    assert core.state.all_images() == [] and store.volumes == {}


def test_incomplete_orphan_volume_is_removed_complete_one_only_reported(
    core, store, inspector, tmp_path
):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    orphan = _disk_record(image, ResourceState.READY)
    store.create(orphan.volume, 10, volume_metadata.for_disk(orphan))  # incomplete
    unknown = _disk_record(image, ResourceState.READY)
    store.clone(image.volume, unknown.volume, volume_metadata.for_disk(unknown))  # complete
    report = reconcile(core.state, store)
    assert orphan.volume not in store.volumes
    assert unknown.volume in store.volumes  # complete data is never destroyed silently
    assert any(unknown.volume in line for line in report.problems)
    reconcile(core.state, store, remove_unknown=True)
    assert unknown.volume not in store.volumes


def test_leftover_temporary_snapshot_is_removed(core, store, inspector, tmp_path):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    store.volumes[image.volume].snapshots.add(TEMP_PREFIX + "bmi-img-x")
    reconcile(core.state, store)
    assert store.volumes[image.volume].snapshots == {"golden"}


def test_missing_volume_of_ready_record_is_reported_not_deleted(core, store, inspector, tmp_path):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    del store.volumes[image.volume]
    report = reconcile(core.state, store)
    assert core.state.get_image(image.id) is not None
    assert any("missing" in line for line in report.problems)


def test_rebuild_catalogue_from_store_alone(core, store, inspector, tmp_path, state):
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    disk = core.disks.create(ALICE, name="n1", image="img")
    for d in state.all_disks():
        state.delete_disk(d.id)
    for i in state.all_images():
        state.delete_image(i.id)
    report = rebuild_catalogue(state, store)
    assert len(report.repaired) == 2
    rebuilt_image = state.get_image(image.id)
    assert (rebuilt_image.name, rebuilt_image.project) == ("img", "alice")
    assert state.get_disk(disk.id).image_id == image.id
    assert reconcile(state, store).problems == []
