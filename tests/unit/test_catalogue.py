"""Core rules of images and disks, on an in-memory image store."""

from __future__ import annotations

import re

import pytest
from principals import ADMIN, ALICE, BOB

from bmi_server.adapters.spool import LocalSpool
from bmi_server.core import errors, tracked
from bmi_server.core.models import ImageKind, ResourceState, Visibility
from bmi_server.core.naming import NOT_IMPORTABLE
from bmi_server.core.uploads import begin_upload

MIB = 1 << 20


def LIMITS(spool_dir):
    return {"spool": LocalSpool(spool_dir, 0), "max_virtual_bytes": 1 << 40}


def upload(core, store, inspector, tmp_path, principal, name, data=b"\x01" * 4096,
           project="", visibility=Visibility.PRIVATE, fmt="raw", request_id=""):
    up = begin_upload(core.images, store, inspector, principal, name=name, project=project,
                      file_format=fmt, file_size=len(data), visibility=visibility,
                      **LIMITS(tmp_path), request_id=request_id)
    try:
        for i in range(0, len(data), 1024):
            up.add(data[i : i + 1024])
        return up.finish()
    except BaseException:
        up.abort()
        raise


@pytest.fixture
def make(core, store, inspector, tmp_path):
    def _make(principal, name, **kw):
        return upload(core, store, inspector, tmp_path, principal, name, **kw)
    return _make


def snapshot_of_world(core, store):
    return (
        sorted((i.id, i.name, i.state) for i in core.state.all_images()),
        sorted((d.id, d.name, d.state) for d in core.state.all_disks()),
        sorted(store.volumes),
    )


def test_raw_upload_makes_a_sealed_ready_image(make, store):
    image = make(ALICE, "ubuntu", data=b"\x07" * 8192)
    assert image.state is ResourceState.READY
    assert image.project == "alice" and image.kind is ImageKind.GOLDEN
    vol = store.volumes[image.volume]
    assert vol.complete and bytes(vol.data) == b"\x07" * 8192
    assert vol.metadata["bmi.name"] == "ubuntu" and vol.metadata["bmi.project"] == "alice"
    assert image.volume == "bmi-" + image.id  # store names are ids, never user names


def test_qcow2_upload_uses_virtual_size(make, store):
    image = make(ALICE, "q", data=b"QFI\xfb" + b"\x02" * 2048, fmt="qcow2")
    assert image.size_bytes == 2048
    assert bytes(store.volumes[image.volume].data) == b"\x02" * 2048


def test_corrupt_qcow2_is_rejected_and_leaves_nothing(core, store, make, tmp_path):
    with pytest.raises(errors.InvalidArgument):
        make(ALICE, "bad", data=b"garbage!" * 64, fmt="qcow2")
    assert snapshot_of_world(core, store) == ([], [], [])
    assert list(tmp_path.glob("bmi-upload-*")) == []


def test_short_and_long_uploads_are_rejected_without_trace(core, store, inspector, tmp_path):
    up = begin_upload(core.images, store, inspector, ALICE, name="x", project="",
                      file_format="raw", file_size=4096, visibility=Visibility.PRIVATE,
                      **LIMITS(tmp_path))
    up.add(b"\0" * 1024)
    with pytest.raises(errors.InvalidArgument, match="1024 of the declared 4096"):
        up.finish()
    up.abort()
    up = begin_upload(core.images, store, inspector, ALICE, name="y", project="",
                      file_format="raw", file_size=512, visibility=Visibility.PRIVATE,
                      **LIMITS(tmp_path))
    with pytest.raises(errors.InvalidArgument, match="longer than"):
        up.add(b"\0" * 1024)
    up.abort()
    assert snapshot_of_world(core, store) == ([], [], [])


@pytest.mark.parametrize(
    "header, message",
    [
        ({"file_format": "vmdk"}, "format"),
        ({"file_size": -1}, "positive"),
        ({"file_size": 0}, "positive"),
        ({"file_size": 1 << 60}, "larger"),
        ({"file_size": 1000}, "multiple of 512"),
        ({"name": ""}, "required"),
        ({"name": "a" * 64}, "longer"),
        ({"name": "../etc"}, "invalid"),
        ({"name": "img-0123456789abcdef"}, "looks like an id"),
        ({"project": "bob"}, "may not"),
        ({"visibility": Visibility.PUBLIC}, "only admins"),
    ],
)
def test_bad_upload_headers_are_refused_before_anything_is_stored(
    core, store, inspector, tmp_path, header, message
):
    args = dict(name="ok", project="", file_format="raw", file_size=4096,
                visibility=Visibility.PRIVATE, **LIMITS(tmp_path))
    args.update(header)
    with pytest.raises(errors.BmiError, match=message):
        begin_upload(core.images, store, inspector, ALICE, **args)
    assert snapshot_of_world(core, store) == ([], [], [])


def test_duplicate_name_in_project_is_already_exists_but_other_project_is_fine(make):
    make(ALICE, "ubuntu")
    with pytest.raises(errors.AlreadyExists):
        make(ALICE, "ubuntu")
    assert make(BOB, "ubuntu").project == "bob"


def test_tenants_see_own_and_public_images_only(core, make):
    make(ALICE, "a1")
    make(BOB, "b1")
    make(ADMIN, "pub", project="ops", visibility=Visibility.PUBLIC)
    make(ADMIN, "secret", project="ops")
    names = lambda who: [i.name for i in core.images.list(who).items]  # noqa: E731
    assert names(ALICE) == ["a1", "pub"]
    assert names(BOB) == ["b1", "pub"]
    assert names(ADMIN) == ["a1", "b1", "pub", "secret"]
    with pytest.raises(errors.NotFound):
        core.images.get(ALICE, "b1")
    with pytest.raises(errors.NotFound):
        core.images.get(ALICE, core.images.get(BOB, "b1").id)
    with pytest.raises(errors.PermissionDenied):
        core.images.list(ALICE, project="bob")
    assert core.images.get(ALICE, "pub").project == "ops"


def test_paging_walks_every_image_once(core, make):
    for n in range(7):
        make(ALICE, f"img{n}")
    seen, token = [], ""
    while True:
        page = core.images.list(ALICE, size=3, token=token)
        seen += [i.name for i in page.items]
        token = page.next_token
        if not token:
            break
    assert seen == [f"img{n}" for n in range(7)]
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        core.images.list(ALICE, token="not-a-token")
    with pytest.raises(errors.InvalidArgument):
        core.images.list(ALICE, size=-1)


def test_disk_is_a_clone_and_image_delete_is_refused_while_it_exists(core, make, store):
    image = make(ALICE, "ubuntu")
    disk = core.disks.create(ALICE, name="node1", image="ubuntu")
    assert disk.state is ResourceState.READY and disk.image_id == image.id
    assert store.volumes[disk.volume].parent == image.volume
    with pytest.raises(errors.FailedPrecondition, match="node1"):
        core.images.delete(ALICE, "ubuntu")
    assert core.images.get(ALICE, "ubuntu").state is ResourceState.READY
    core.disks.delete(ALICE, "node1")
    core.images.delete(ALICE, "ubuntu")
    assert snapshot_of_world(core, store) == ([], [], [])


def test_refusal_names_own_disks_but_only_counts_other_projects(core, make):
    make(ADMIN, "pub", project="ops", visibility=Visibility.PUBLIC)
    core.disks.create(ALICE, name="alice-node", image="pub")
    core.disks.create(BOB, name="bob-node", image="pub")
    with pytest.raises(errors.FailedPrecondition) as refused:
        core.images.delete(ADMIN, "pub")
    assert "alice/alice-node" in refused.value.message
    assert "bob/bob-node" in refused.value.message
    core.disks.delete(BOB, "bob-node")
    # A tenant owning neither the image nor the disk cannot delete it at all.
    with pytest.raises(errors.PermissionDenied):
        core.images.delete(ALICE, "pub")


def test_tenant_cannot_clone_another_projects_private_image(core, make):
    make(BOB, "bobs")
    with pytest.raises(errors.NotFound):
        core.disks.create(ALICE, name="d", image="bobs")
    bobs = core.images.get(BOB, "bobs")
    with pytest.raises(errors.NotFound):
        core.disks.create(ALICE, name="d", image=bobs.id)
    # Not even an admin can put bob's private image under alice's disk.
    with pytest.raises(errors.FailedPrecondition, match="private"):
        core.disks.create(ADMIN, name="d", image=bobs.id, project="alice")


def test_failed_clone_leaves_no_record_or_volume(core, make, store):
    make(ALICE, "ubuntu")
    before = snapshot_of_world(core, store)
    store.fail["clone"] = errors.Unavailable("ceph: timed out")
    with pytest.raises(errors.Unavailable):
        core.disks.create(ALICE, name="d1", image="ubuntu")
    assert snapshot_of_world(core, store) == before


def test_a_rollback_the_outage_interrupted_is_finished_later(core, make, store):
    """Ceph went away mid-creation: the undo fails too, so the CREATING record stays
    (the intent) until a background retry or a retry of the same request finishes it."""
    make(ALICE, "ubuntu")
    before = snapshot_of_world(core, store)
    store.fail["clone"] = store.fail["remove"] = errors.Unavailable("ceph: timed out")
    for request_id in ("r1", "r2"):
        with pytest.raises(errors.Unavailable):
            core.disks.create(ALICE, name=f"d-{request_id}", image="ubuntu",
                              request_id=request_id)
    assert len(core.disks.ops.pending_undos) == 2
    assert tracked.retry_undos(core.disks.ops, store) == 2  # still down
    del store.fail["clone"], store.fail["remove"]
    # The same request again: its leftover is rolled back first, then it is done afresh.
    disk = core.disks.create(ALICE, name="d-r1", image="ubuntu", request_id="r1")
    assert disk.state is ResourceState.READY and len(core.disks.ops.pending_undos) == 1
    assert tracked.retry_undos(core.disks.ops, store) == 0  # the background's round
    core.disks.delete(ALICE, "d-r1")
    assert snapshot_of_world(core, store) == before


def test_snapshot_makes_an_independent_image(core, make, store):
    make(ALICE, "ubuntu", data=b"\x01" * 4096)
    disk = core.disks.create(ALICE, name="d1", image="ubuntu")
    store.volumes[disk.volume].data[0:4] = b"ABCD"  # the node wrote to its disk
    snap = core.disks.snapshot(ALICE, "d1", image_name="d1-snap")
    assert snap.kind is ImageKind.SNAPSHOT and snap.source == disk.id
    vol = store.volumes[snap.volume]
    assert vol.parent is None and vol.complete and bytes(vol.data[:4]) == b"ABCD"
    core.disks.delete(ALICE, "d1")  # the snapshot does not depend on the disk
    assert core.images.get(ALICE, "d1-snap").state is ResourceState.READY
    assert store.volumes[snap.volume].snapshots == {"golden"}


def test_failed_snapshot_is_rolled_back(core, make, store):
    make(ALICE, "ubuntu")
    core.disks.create(ALICE, name="d1", image="ubuntu")
    before = snapshot_of_world(core, store)
    store.fail["seal"] = errors.Unavailable("ceph: down")
    with pytest.raises(errors.Unavailable):
        core.disks.snapshot(ALICE, "d1", image_name="s")
    assert snapshot_of_world(core, store) == before


def test_copy_to_another_project_and_rename(core, make):
    make(ADMIN, "pub", project="ops", visibility=Visibility.PUBLIC)
    copy = core.images.copy(ALICE, "pub", project="", name="mine")
    assert (copy.project, copy.name, copy.kind) == ("alice", "mine", ImageKind.COPY)
    with pytest.raises(errors.PermissionDenied):
        core.images.copy(ALICE, "pub", project="bob")
    renamed = core.images.update(ALICE, "mine", name="mine2", visibility=None)
    assert renamed.name == "mine2"
    assert core.store.volumes[renamed.volume].metadata["bmi.name"] == "mine2"
    with pytest.raises(errors.PermissionDenied):
        core.images.update(ALICE, "mine2", visibility=Visibility.PUBLIC)
    make(ALICE, "other")
    with pytest.raises(errors.AlreadyExists):
        core.images.update(ALICE, "other", name="mine2", visibility=None)
    assert core.images.get(ALICE, "other").name == "other"


def test_failed_metadata_write_reverts_rename(core, make, store):
    make(ALICE, "a")
    store.fail["set_metadata"] = errors.Unavailable("ceph: down")
    with pytest.raises(errors.Unavailable):
        core.images.update(ALICE, "a", name="b", visibility=None)
    assert core.images.get(ALICE, "a").name == "a"


def test_import_from_pool_is_admin_only_and_copies(core, store):
    store.add_external("golden-src", b"\x05" * 2048)
    with pytest.raises(errors.PermissionDenied):
        core.images.import_volume(ALICE, name="g", project="", source_volume="golden-src",
                                  visibility=Visibility.PRIVATE)
    with pytest.raises(errors.NotFound):
        core.images.import_volume(ADMIN, name="g", project="ops", source_volume="nope",
                                  visibility=Visibility.PRIVATE)
    image = core.images.import_volume(ADMIN, name="g", project="ops", source_volume="golden-src",
                                      visibility=Visibility.PUBLIC)
    assert image.size_bytes == 2048 and "golden-src" in store.volumes


def import_from_pool(core, source, name="g"):
    return core.images.import_volume(ADMIN, name=name, project="ops", source_volume=source,
                                     visibility=Visibility.PRIVATE)


@pytest.fixture
def tenants_volumes(core, make):
    """Alice's image and Bob's disk (a clone of a public image): BMI volumes in the pool."""
    image = make(ALICE, "alices")
    public = make(ADMIN, "public", project="ops", visibility=Visibility.PUBLIC)
    disk = core.disks.create(BOB, name="bobs", image=public.id)
    return image, disk


def test_import_refuses_bmi_names_before_looking_anything_up(core, store, tenants_volumes):
    image, disk = tenants_volumes
    before = snapshot_of_world(core, store)
    # Existing or not, any kind, any case: one answer that names neither source nor owner.
    for source in (disk.volume, image.volume, "bmi-dsk-0000000000000000", "bmi-tmp-x",
                   "BMI-IMG-" + image.id[4:], "bmi-anything-else"):  # fmt: skip
        store.calls.clear()
        with pytest.raises(errors.PermissionDenied) as refused:
            import_from_pool(core, source)
        assert refused.value.message == NOT_IMPORTABLE and source not in NOT_IMPORTABLE
        assert store.calls == []  # nothing asked of the store
    assert snapshot_of_world(core, store) == before


def test_import_refuses_volumes_the_store_marks_as_made_from_bmis(core, store, tenants_volumes):
    image, disk = tenants_volumes
    data = b"\x09" * 2048
    # `rbd cp` of Bob's disk under another name: librbd copies its bmi.* keys along.
    store.add_external("copied-disk", data, metadata=store.volumes[disk.volume].metadata)
    # `rbd clone` of Alice's image, inherited keys removed: its parent is still hers.
    store.add_external("stripped-clone", data, parent=image.volume)
    # A clone of the copy, two steps from BMI: the copy's keys give it away.
    store.add_external("clone-of-copy", data, parent="copied-disk")
    before = snapshot_of_world(core, store)
    for source in ("copied-disk", "stripped-clone", "clone-of-copy"):
        with pytest.raises(errors.PermissionDenied) as refused:
            import_from_pool(core, source)
        assert refused.value.message == NOT_IMPORTABLE
    assert "copy_external" not in store.calls
    assert snapshot_of_world(core, store) == before
    # Someone else's metadata, and clones of volumes that are not BMI's, are importable.
    store.add_external("site-golden", data, metadata={"owner": "site team"})
    store.add_external("site-clone", data, parent="site-golden")
    assert import_from_pool(core, "site-golden", "a").size_bytes == 2048
    assert import_from_pool(core, "site-clone", "b").state is ResourceState.READY


def test_an_import_source_that_turns_out_bmis_when_copied_leaves_nothing(core, store):
    store.add_external("swapped", b"\x09" * 2048)
    looked_up = store.external_volume

    def then_swapped(source):
        found = looked_up(source)
        # Between the look-up and the copy, the name came to mean a copy of a BMI disk.
        store.volumes[source].metadata.update({"bmi.kind": "disk", "bmi.project": "bob"})
        return found

    store.external_volume = then_swapped
    before = snapshot_of_world(core, store)
    with pytest.raises(errors.PermissionDenied, match="never imports"):
        import_from_pool(core, "swapped")
    assert snapshot_of_world(core, store) == before  # record and volume rolled back


@pytest.mark.parametrize("source", [
    "", "a" * 256, "a" * 5000, "a\x00b", "x/y", "pool/image", "image@snap", "-rf", ".hidden",
    "with space", "ünïcödé", "tab\there", "new\nline", "semi;colon", "a:b",
])  # fmt: skip
def test_import_source_names_are_checked_before_they_reach_the_store(core, store, source):
    with pytest.raises(errors.InvalidArgument) as refused:
        import_from_pool(core, source)
    assert store.calls == [] and core.state.all_images() == []
    assert (source or "\x00") not in refused.value.message  # never echoed back


def test_import_source_names_rbd_allows_and_bmi_accepts(core, store):
    for source in ("a" * 255, "_under", "ubuntu-24.04_LTS", "9"):
        store.add_external(source, b"\x01" * 512)
        made = import_from_pool(core, source, name=f"i{len(core.state.all_images())}")
        assert made.state is ResourceState.READY and made.source == source
    with pytest.raises(errors.NotFound):  # well formed, just not there
        import_from_pool(core, "b" * 255)


def test_import_errors_tell_the_new_image_by_id_not_by_volume(core, store):
    store.add_external("site-golden", b"\x01" * 512)
    sealed = store.seal

    def ceph_times_out(volume):
        raise errors.Unavailable(f"ceph: seal {volume}: [errno 110] Connection timed out")

    store.seal = ceph_times_out
    with pytest.raises(errors.Unavailable) as failed:
        import_from_pool(core, "site-golden")
    assert "bmi-" not in failed.value.message
    assert re.fullmatch(r"ceph: seal image img-[0-9a-f]{16}: \[errno 110\] Connection timed out",
                        failed.value.message)
    store.seal = sealed
    assert sorted(store.volumes) == ["site-golden"] and core.state.all_images() == []


def test_request_id_makes_creates_idempotent(core, make):
    make(ALICE, "ubuntu")
    first = core.disks.create(ALICE, name="d", image="ubuntu", request_id="r1")
    again = core.disks.create(ALICE, name="d", image="ubuntu", request_id="r1")
    assert again.id == first.id
    with pytest.raises(errors.InvalidArgument, match="another request"):
        core.disks.create(ALICE, name="other", image="ubuntu", request_id="r1")
    # Another caller's identical request id is its own.
    make(BOB, "ubuntu")
    assert core.disks.create(BOB, name="d", image="ubuntu", request_id="r1").id != first.id
    img = make(ALICE, "up", request_id="u1")
    assert make(ALICE, "up", request_id="u1").id == img.id


def test_ambiguous_public_names_ask_for_an_id(core, make):
    make(ADMIN, "linux", project="ops", visibility=Visibility.PUBLIC)
    make(ADMIN, "linux", project="ops2", visibility=Visibility.PUBLIC)
    with pytest.raises(errors.InvalidArgument, match="ambiguous"):
        core.images.get(ALICE, "linux")
    make(ALICE, "linux")
    assert core.images.get(ALICE, "linux").project == "alice"  # own image wins


def test_update_retry_acts_on_the_same_image_even_renamed(core, make, store):
    image = make(ALICE, "a")
    first = core.images.update(ALICE, "a", name="b", visibility=None, request_id="u1")
    writes = store.calls.count("set_metadata")
    again = core.images.update(ALICE, "a", name="b", visibility=None, request_id="u1")
    assert (again.id, again.name) == (first.id, "b") == (image.id, "b")
    assert store.calls.count("set_metadata") == writes  # nothing changed the second time
    with pytest.raises(errors.NotFound):  # without the key, "a" is no image any more
        core.images.update(ALICE, "a", name="b", visibility=None)
    with pytest.raises(errors.InvalidArgument, match="another request"):
        core.images.delete(ALICE, "b", request_id="u1")
    with pytest.raises(errors.NotFound):  # keys are per caller: bob's "u1" is his own
        core.images.update(BOB, "a", name="b", visibility=None, request_id="u1")


def test_delete_retry_succeeds_once_gone_and_finishes_an_interrupted_one(core, make, store):
    make(ALICE, "a")
    core.images.delete(ALICE, "a", request_id="d1")
    before = snapshot_of_world(core, store)
    core.images.delete(ALICE, "a", request_id="d1")  # the retry: same result
    assert snapshot_of_world(core, store) == before
    with pytest.raises(errors.NotFound):
        core.images.delete(ALICE, "a", request_id="d2")  # a new request: nothing to delete
    with pytest.raises(errors.NotFound):
        core.images.delete(BOB, "a", request_id="d1")  # another caller's key is not his

    make(ALICE, "u")
    disk = core.disks.create(ALICE, name="d", image="u")
    store.fail["remove"] = errors.Unavailable("ceph: down")
    with pytest.raises(errors.Unavailable):
        core.disks.delete(ALICE, "d", request_id="d3")
    assert core.state.get_disk(disk.id).state is ResourceState.DELETING
    del store.fail["remove"]
    core.disks.delete(ALICE, "d", request_id="d3")  # the retry finishes it
    assert core.state.get_disk(disk.id) is None and disk.volume not in store.volumes
    core.disks.delete(ALICE, "d", request_id="d3")


def test_an_upload_past_the_quota_is_refused_before_a_byte_is_spooled(
    core, store, inspector, tmp_path
):
    core.quotas.set(ADMIN, "alice", images=1)
    upload(core, store, inspector, tmp_path, ALICE, "first")
    spool = tmp_path / "spool"
    for fmt in ("raw", "qcow2"):
        with pytest.raises(errors.QuotaExceeded, match="images: limit 1"):
            begin_upload(core.images, store, inspector, ALICE, name=f"second-{fmt}",
                         project="", file_format=fmt, file_size=4096,
                         visibility=Visibility.PRIVATE, **LIMITS(spool))
    assert not spool.exists() or list(spool.iterdir()) == []
    assert [i.name for i in core.state.all_images()] == ["first"]
