"""Per-project quotas in the core: every way an image or disk is made is checked, a
refusal leaves nothing behind, limits come from the defaults or a project's own, and only
admins set them."""

from __future__ import annotations

import pytest
from fakes import FakeInspector, FakeIsolator
from principals import ADMIN, ALICE, BOB
from test_catalogue import LIMITS, snapshot_of_world, upload

from bmi_server.config import Settings, load_settings
from bmi_server.core import errors
from bmi_server.core.models import (
    ImageFormatInfo,
    NodeState,
    QuotaAmounts,
    QuotaOverride,
    ResourceState,
    Visibility,
)
from bmi_server.core.quotas import DEFAULT_LIMITS, TIB, format_bytes
from bmi_server.core.uploads import begin_upload
from bmi_server.server import Core

KIB = 1024
SMALL = QuotaAmounts(size_bytes=64 * KIB, images=2, disks=3)
MAC = "52:54:00:0c:00:01"


@pytest.fixture
def core(state, store, targets) -> Core:
    """Projects may hold 2 images, 3 disks and 64 KiB (virtual) unless given their own."""
    return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"],
                      quota_defaults=SMALL)


@pytest.fixture
def make(core, store, inspector, tmp_path):
    def _make(principal, name, **kw):
        return upload(core, store, inspector, tmp_path, principal, name, **kw)
    return _make


def refused(call) -> errors.QuotaExceeded:
    with pytest.raises(errors.QuotaExceeded) as caught:
        call()
    assert isinstance(caught.value, errors.ResourceExhausted)  # RESOURCE_EXHAUSTED
    return caught.value


def test_defaults_are_finite_and_the_same_in_settings_and_core(state, store, targets):
    assert QuotaAmounts(size_bytes=100 * TIB, images=50, disks=1000) == DEFAULT_LIMITS
    assert Settings().quota_defaults == DEFAULT_LIMITS
    plain = Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"])
    assert plain.quotas.get(ALICE).limits == DEFAULT_LIMITS


def test_settings_take_sizes_and_refuse_negative_limits():
    settings = load_settings(env={"BMI_QUOTA_BYTES": "10T", "BMI_QUOTA_IMAGES": "0",
                                  "BMI_QUOTA_DISKS": "20"})
    assert settings.quota_defaults == QuotaAmounts(size_bytes=10 * TIB, images=0, disks=20)
    assert load_settings(env={"BMI_QUOTA_BYTES": "500GiB"}).quota_bytes == 500 << 30
    assert load_settings(env={"BMI_QUOTA_BYTES": "1048576"}).quota_bytes == 1 << 20
    for env in ({"BMI_QUOTA_DISKS": "-1"}, {"BMI_QUOTA_BYTES": "lots"},
                {"BMI_QUOTA_BYTES": "-5G"}):
        with pytest.raises(errors.InvalidArgument):
            load_settings(env=env)


def test_an_upload_past_the_image_limit_says_why_and_leaves_nothing(core, make, store):
    make(ALICE, "one")
    make(ALICE, "two")
    make(BOB, "bobs")  # another project's images count for it alone
    before = snapshot_of_world(core, store)
    error = refused(lambda: make(ALICE, "three"))
    assert (error.project, error.kind, error.limit, error.used, error.asked) == (
        "alice", "images", 2, 2, 1)
    assert error.message == (
        "quota exceeded in project 'alice': images: limit 2, in use 2, this request needs "
        "1 more; delete some, or ask an admin to raise the quota")
    assert snapshot_of_world(core, store) == before
    error = refused(lambda: make(ALICE, "q", data=b"QFI\xfb" + b"\x01" * 2048, fmt="qcow2"))
    assert error.kind == "images"
    assert snapshot_of_world(core, store) == before
    core.images.delete(ALICE, "one")  # room again
    assert make(ALICE, "three").state is ResourceState.READY


def test_an_upload_under_way_holds_its_share(core, make, store, inspector, tmp_path):
    make(ALICE, "one")
    started = begin_upload(core.images, store, inspector, ALICE, name="big", project="",
                           file_format="raw", file_size=8192, visibility=Visibility.PRIVATE,
                           **LIMITS(tmp_path))
    started.add(b"\x01" * 4096)  # a raw upload's record (CREATING) exists from here
    assert core.state.quota_usage("alice").images == 2
    refused(lambda: make(ALICE, "late"))
    started.abort()
    assert make(ALICE, "late").state is ResourceState.READY


def test_bytes_are_virtual_sizes_of_images_and_disks(core, store, tmp_path):
    """A qcow2 counts with its virtual size (known once inspected), and a thin clone
    with its image's: a node can fill its disk up to that."""

    class Sparse(FakeInspector):
        def inspect(self, path, declared_format):
            return ImageFormatInfo("qcow2", 40 * KIB, 1020)

    image = upload(core, store, Sparse(), tmp_path, ALICE, "sparse",
                   data=b"QFI\xfb" + b"\x01" * 1020, fmt="qcow2")
    assert image.size_bytes == 40 * KIB
    assert core.state.quota_usage("alice") == QuotaAmounts(size_bytes=40 * KIB, images=1)
    before = snapshot_of_world(core, store)
    error = refused(lambda: core.disks.create(ALICE, name="d1", image="sparse"))
    assert (error.kind, error.limit, error.used, error.asked) == (
        "bytes", 64 * KIB, 40 * KIB, 40 * KIB)
    assert ("virtual bytes of images and disks: limit 64 KiB, in use 40 KiB, this request "
            "needs 40 KiB more") in error.message
    assert image.volume not in error.message and image.id not in error.message
    assert snapshot_of_world(core, store) == before
    # Another project's room is its own: bob clones alice's image, made public.
    core.images.update(ADMIN, image.id, visibility=Visibility.PUBLIC)
    assert core.disks.create(BOB, name="d1", image=image.id).size_bytes == 40 * KIB
    assert core.state.quota_usage("bob") == QuotaAmounts(size_bytes=40 * KIB, disks=1)


def test_every_way_of_making_an_image_or_disk_is_checked(core, make, store):
    core.quotas.set(ADMIN, "alice", size_bytes=0)  # counts only, here
    make(ADMIN, "pub", project="ops", visibility=Visibility.PUBLIC)
    store.add_external("site-golden", b"\x02" * 4096)
    make(ALICE, "own")
    disks = [core.disks.create(ALICE, name=f"d{n}", image="pub") for n in range(3)]
    core.disks.snapshot(ALICE, "d0", image_name="snap")  # alice's second image: the last
    before = snapshot_of_world(core, store)
    attempts = [
        ("disks", lambda: core.disks.create(ALICE, name="d3", image="own")),
        ("disks", lambda: core.disks.create(ADMIN, name="d3", image="pub", project="alice")),
        ("images", lambda: core.disks.snapshot(ALICE, "d1", image_name="snap2")),
        ("images", lambda: core.images.copy(ALICE, "pub", project="", name="copy")),
        ("images", lambda: core.images.copy(ADMIN, "pub", project="alice", name="copy")),
        ("images", lambda: core.images.import_volume(
            ADMIN, name="imp", project="alice", source_volume="site-golden",
            visibility=Visibility.PRIVATE)),
        ("images", lambda: make(ALICE, "upload")),
    ]
    for kind, call in attempts:
        assert refused(call).kind == kind
    assert snapshot_of_world(core, store) == before
    core.disks.delete(ALICE, disks[0].id)
    assert core.disks.create(ALICE, name="d3", image="own").state is ResourceState.READY


def test_a_projects_own_limits_replace_the_defaults_one_by_one(core, make):
    assert core.quotas.set(ADMIN, "alice", images=3).limits == QuotaAmounts(
        size_bytes=64 * KIB, images=3, disks=3)
    for n in range(3):
        make(ALICE, f"i{n}")
    refused(lambda: make(ALICE, "i3"))
    make(BOB, "b0")
    make(BOB, "b1")
    refused(lambda: make(BOB, "b2"))  # bob still has the defaults
    shown = core.quotas.set(ADMIN, "alice", images=0, disks=7)  # 0: no limit
    assert shown.override == QuotaOverride(images=0, disks=7)
    assert make(ALICE, "i3").state is ResourceState.READY
    shown = core.quotas.set(ADMIN, "alice", size_bytes=1 << 20, reset=True)
    assert shown.override == QuotaOverride(size_bytes=1 << 20)
    assert shown.limits == QuotaAmounts(size_bytes=1 << 20, images=2, disks=3)
    assert shown.used == QuotaAmounts(size_bytes=4 * 4096, images=4, disks=0)
    # Over a lowered limit nothing is removed; only what adds to it is refused.
    refused(lambda: make(ALICE, "i4"))
    core.images.delete(ALICE, "i0")
    assert core.quotas.set(ADMIN, "alice", reset=True).override == QuotaOverride()


def test_who_may_see_and_set_quotas(core):
    assert core.quotas.get(ALICE).project == "alice"
    assert core.quotas.get(ALICE, "alice").limits == SMALL
    assert core.quotas.get(ADMIN, "bob").project == "bob"
    with pytest.raises(errors.PermissionDenied):
        core.quotas.get(ALICE, "bob")
    with pytest.raises(errors.InvalidArgument, match="project is required"):
        core.quotas.get(ADMIN)
    with pytest.raises(errors.InvalidArgument):
        core.quotas.get(ADMIN, "../etc")
    for project in ("alice", "bob", ""):
        with pytest.raises(errors.PermissionDenied, match="only admins"):
            core.quotas.set(ALICE, project, images=100)
    assert core.state.get_quota_override("alice") == QuotaOverride()
    for bad in ({"images": -1}, {"size_bytes": -(1 << 30)}, {"disks": 1 << 63}):
        with pytest.raises(errors.InvalidArgument):
            core.quotas.set(ADMIN, "alice", **bad)
    with pytest.raises(errors.InvalidArgument):
        core.quotas.set(ADMIN, "", images=1)
    # Setting nothing changes nothing and shows the quota.
    assert core.quotas.set(ADMIN, "alice").limits == SMALL


def test_check_is_an_early_look_at_the_room_left(core, make):
    make(ALICE, "one")
    core.quotas.check("alice", add_bytes=60 * KIB, add_images=1)
    assert refused(lambda: core.quotas.check("alice", add_bytes=61 * KIB)).kind == "bytes"
    make(ALICE, "two")
    assert refused(lambda: core.quotas.check("alice", add_images=1)).kind == "images"
    core.quotas.check("alice", add_disks=3)
    core.quotas.check("bob", add_images=2)


def test_format_bytes():
    assert format_bytes(100 * TIB) == "100 TiB"
    assert format_bytes(1536) == "1.5 KiB (1536 bytes)"
    assert format_bytes(512) == "512 bytes"


# -- provisioning --------------------------------------------------------------------------


@pytest.fixture
def hil() -> FakeIsolator:
    fake = FakeIsolator()
    fake.add("h1", "alice", MAC)
    return fake


@pytest.fixture
def hil_core(state, store, targets, hil) -> Core:
    return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"],
                      isolator=hil, quota_defaults=SMALL)


@pytest.fixture
def golden(hil_core, store, inspector, tmp_path):
    return upload(hil_core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
                  visibility=Visibility.PUBLIC)


def test_provisioning_past_the_disk_limit_is_refused_before_the_node_is_touched(
    hil_core, hil, golden, targets, store
):
    for n in range(3):
        hil_core.disks.create(ALICE, name=f"d{n}", image="golden")
    before = snapshot_of_world(hil_core, store)
    error = refused(lambda: hil_core.provisioner.provision(ALICE, "h1", image="golden"))
    assert (error.kind, error.used, error.limit) == ("disks", 3, 3)
    assert [m for m, _, _ in hil.calls] == ["node"] and not hil.attached
    node = hil_core.state.find_node_by_name("h1")
    assert node.state is NodeState.AVAILABLE and node.disk_id == ""
    assert [t.reason for t in hil_core.registry.history(node)] == [
        "enrolled in project alice"]  # learnt from HIL, never moved
    assert snapshot_of_world(hil_core, store) == before and targets.targets == {}


def test_a_clone_that_loses_the_last_slot_to_a_concurrent_create_rolls_back(
    hil_core, hil, golden, targets, store
):
    """The early look passes; a create elsewhere takes the last disk slot while the
    provisioning puts the node on the network: the clone's insert is refused (checked
    atomically), and the provisioning is rolled back, leaving nothing."""
    for n in range(2):
        hil_core.disks.create(ALICE, name=f"d{n}", image="golden")

    def meanwhile(method: str) -> None:
        if method == "attach":
            hil_core.disks.create(ALICE, name="taken", image="golden")

    hil.observe = meanwhile
    error = refused(lambda: hil_core.provisioner.provision(ALICE, "h1", image="golden"))
    assert error.kind == "disks"
    hil.observe = lambda method: None
    node = hil_core.state.find_node_by_name("h1")
    assert node.state is NodeState.AVAILABLE and node.disk_id == "" and node.target is None
    assert "rolled back: quota exceeded" in hil_core.registry.history(node)[-1].reason
    assert not hil.attached and targets.targets == {}
    assert sorted(d.name for d in hil_core.state.all_disks()) == ["d0", "d1", "taken"]
    assert all(d.state is ResourceState.READY for d in hil_core.state.all_disks())


def test_reprovisioning_at_the_limit_replaces_the_disk(hil_core, golden, targets):
    for n in range(2):
        hil_core.disks.create(ALICE, name=f"d{n}", image="golden")
    first = hil_core.provisioner.provision(ALICE, "h1", image="golden")
    assert hil_core.state.quota_usage("alice").disks == 3  # the last slot
    again = hil_core.provisioner.reprovision(ALICE, "h1")
    assert again.state is NodeState.PROVISIONED and again.disk_id != first.disk_id
    assert hil_core.state.quota_usage("alice").disks == 3


def test_reprovisioning_that_could_not_fit_keeps_the_disk(hil_core, golden, targets, store):
    """A node provisioned from an existing disk does not own it: a reprovisioning would
    add a disk. Refused before anything is removed."""
    disk = hil_core.disks.create(ALICE, name="kept", image="golden")
    node = hil_core.provisioner.provision(ALICE, "h1", disk="kept")
    for n in range(2):
        hil_core.disks.create(ALICE, name=f"d{n}", image="golden")
    before = snapshot_of_world(hil_core, store)
    assert refused(lambda: hil_core.provisioner.reprovision(ALICE, "h1")).kind == "disks"
    after = hil_core.state.get_node(node.id)
    assert (after.state, after.disk_id) == (NodeState.PROVISIONED, disk.id)
    assert snapshot_of_world(hil_core, store) == before
    assert list(targets.targets) == [node.target.iqn]
