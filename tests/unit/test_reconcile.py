"""Reconcile after a crash, on states a crash at each step leaves behind."""

from __future__ import annotations

import pytest
from fakes import TEMP_PREFIX
from principals import ALICE
from test_catalogue import upload

from bmi_server.core import volume_metadata
from bmi_server.core.errors import FailedPrecondition
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


def test_records_whose_volumes_vanished_are_marked_missing_and_say_so(
    core, store, inspector, tmp_path
):
    """The image store was emptied behind BMI's back (a Ceph cluster made afresh): the
    records say MISSING, uses are refused naming the record only, and they can go."""
    image = upload(core, store, inspector, tmp_path, ALICE, "img")
    disk = core.disks.create(ALICE, name="d1", image="img")
    saved = dict(store.volumes)
    store.volumes.clear()
    report = reconcile(core.state, store)
    assert core.state.get_image(image.id).state is ResourceState.MISSING
    assert core.state.get_disk(disk.id).state is ResourceState.MISSING
    assert len([line for line in report.problems if "marked missing" in line]) == 2
    for use in (lambda: core.disks.create(ALICE, name="d2", image="img"),
                lambda: core.disks.snapshot(ALICE, "d1", image_name="snap")):
        with pytest.raises(FailedPrecondition) as refused:
            use()
        assert "is missing: its data is no longer in the image store" in refused.value.message
        assert "bmi-" not in refused.value.message  # no internal volume name
    # Marked once; the next round only reports it again.
    again = reconcile(core.state, store)
    assert any("still missing" in line for line in again.problems) and not again.repaired
    # The data comes back (the right cluster again): ready again, usable.
    store.volumes.update(saved)
    back = reconcile(core.state, store)
    assert core.state.get_image(image.id).state is ResourceState.READY
    assert core.state.get_disk(disk.id).state is ResourceState.READY
    assert len([line for line in back.repaired if "ready again" in line]) == 2
    # Gone for good: the records can be deleted, disk first.
    store.volumes.clear()
    reconcile(core.state, store)
    core.disks.delete(ALICE, "d1")
    core.images.delete(ALICE, "img")
    assert core.state.all_images() == [] and core.state.all_disks() == []


def test_disk_whose_volume_vanished_since_reconcile_shows_missing(core, store, inspector,
                                                                 tmp_path):
    upload(core, store, inspector, tmp_path, ALICE, "img")
    disk = core.disks.create(ALICE, name="d1", image="img")
    del store.volumes[disk.volume]
    shown = core.disks.get(ALICE, "d1")
    assert core.disks.used_bytes(shown) == 0  # not NOT_FOUND with the volume's name
    assert shown.state is ResourceState.MISSING


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
