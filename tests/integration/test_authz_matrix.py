"""Authorisation matrix: every RPC x {admin, owner, other tenant, bad credentials, none}.

One table, checked against a real bmi-server (real Ceph and tgtd), in standalone mode
(bearer tokens) and in HIL mode (the HIL stand-in). The RPCs are read from the generated
service descriptors, so a new RPC without a row fails ``test_every_rpc_has_a_row``.

The owner is project ``alice``; the other tenant is ``bob`` acting on alice's objects
(or, for calls that create, naming alice's project). Each cell states the gRPC code
expected and checks, whatever the code, that nothing of the other tenant's leaks into
the answer or the error message (names, ids, MACs, CHAP secrets, boot tokens), unless
the caller itself put it in the request. Mutating rows make fresh objects per cell, and
a refused call must leave them as they were.

The rule (docs/tenant-guide.md, "Who sees what"): an object (image, disk, node) that is
not yours answers NOT_FOUND, exactly like one that does not exist; naming a project you
are not in, or an admin-only call, answers PERMISSION_DENIED (whether that project
exists or not); the agent's BootService accepts only its node's one-boot token.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import re
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import bmi.v1
import grpc
import pytest
import rbd
from bmi.v1 import (
    boot_pb2,
    disks_pb2,
    gateway_pb2,
    images_pb2,
    inventory_pb2,
    nodes_pb2,
    quotas_pb2,
)
from bmi_client.client import BmiClient, call_metadata
from hil_standin import HilStandin
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

OK = grpc.StatusCode.OK
NF = grpc.StatusCode.NOT_FOUND
PD = grpc.StatusCode.PERMISSION_DENIED
FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
CALLERS = ("admin", "owner", "other", "bad", "none")
OWNER, OTHER = "alice", "bob"
MIB = 1 << 20
CALL_SECONDS = 60  # a safety net against a hung call, not a timed assertion
NETWORK = "bmi-provision"
PASSWORDS = {"bmi": "bmi-hil-pw", "alice": "alice-hil-pw", "bob": "bob-hil-pw"}


# -- the RPCs, from the generated descriptors ----------------------------------------------


def all_methods() -> dict[str, Any]:
    """Every RPC of every service in bmi.v1: "Service.Method" -> MethodDescriptor."""
    found = {}
    for module in pkgutil.iter_modules(bmi.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        file = importlib.import_module(f"bmi.v1.{module.name}").DESCRIPTOR
        for service in file.services_by_name.values():
            for method in service.methods:
                found[f"{service.name}.{method.name}"] = method
    return found


METHODS = all_methods()


def stub_for(channel: grpc.Channel, method) -> Callable:
    service = method.containing_service
    module = service.file.name.rpartition("/")[2].removesuffix(".proto")
    grpc_module = importlib.import_module(f"bmi.v1.{module}_pb2_grpc")
    return getattr(getattr(grpc_module, f"{service.name}Stub")(channel), method.name)


# -- the world the cells act on ------------------------------------------------------------


@dataclass
class Prepared:
    request: Any
    metadata: tuple | None = None  # None: the caller's own credentials
    subject: str = ""  # the object the call is about (for intact checks)


@dataclass
class World:
    mode: str
    server: ServerProcess
    channel: grpc.Channel
    clients: dict[str, BmiClient]  # admin, alice, bob
    metadata: dict[str, tuple]  # per caller
    hil: HilStandin | None = None
    owned: dict[str, set[str]] = field(default_factory=lambda: {OWNER: set(), OTHER: set()})
    shared: dict[str, Any] = field(default_factory=dict)
    _macs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def client(self, project: str) -> BmiClient:
        return self.clients[project]

    def name(self, project: str, kind: str) -> str:
        return f"{project[0]}-{kind}-{secrets.token_hex(3)}"

    def own(self, project: str, *identifiers: str) -> None:
        """Record what belongs to ``project`` (must never reach the other tenant)."""
        self.owned[project].update(i for i in identifiers if i)

    def forget(self, project: str, *identifiers: str) -> None:
        self.owned[project].difference_update(identifiers)

    # -- making things ---------------------------------------------------------------

    def image(self, project: str, *, public: bool = False) -> images_pb2.Image:
        owner = "ops" if public else project
        made = self.clients["admin"].upload_image(
            self.shared["raw"], self.name(project if not public else "pub", "img"),
            project=owner,
            visibility=images_pb2.VISIBILITY_PUBLIC if public else images_pb2.VISIBILITY_PRIVATE,
        )
        if not public:
            self.own(project, made.id, made.name, made.rbd_name)
        return made

    def disk(self, project: str) -> disks_pb2.Disk:
        made = self.client(project).create_disk(self.name(project, "dsk"), self.golden.id)
        self.own(project, made.id, made.name, "bmi-" + made.id)
        return made

    @property
    def golden(self) -> images_pb2.Image:
        return self.shared["golden"]

    def mac(self) -> str:
        n = next(self._macs)
        return f"52:54:01:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"

    def node(self, project: str) -> nodes_pb2.Node:
        """A fresh AVAILABLE node of ``project``, known to BMI."""
        name, mac = self.name(project, "node"), self.mac()
        self.own(project, name, mac)
        if self.hil is None:
            made = self.clients["admin"].enroll_node(name, project, macs=[mac])
        else:
            self.hil.add_node(name, [("pxe", mac)])
            made = self.client(project).take_node(name)
        self.own(project, made.id)
        return made

    def provisioned(self, project: str, *, agent: bool = False) -> nodes_pb2.Node:
        node = self.node(project)
        mode = nodes_pb2.BOOT_MODE_AGENT if agent else nodes_pb2.BOOT_MODE_SANBOOT
        done = self.client(project).provision_node(node.name, image=self.golden.id,
                                                   boot_mode=mode)
        self.own(project, done.disk_id, done.target.iqn)
        return done

    def boot_script(self, node: nodes_pb2.Node) -> str:
        url = f"http://{self.server.http_address}/boot.ipxe?mac={node.macs[0]}"
        with urllib.request.urlopen(url, timeout=CALL_SECONDS) as reply:
            return reply.read().decode()

    def chap_secret(self, node: nodes_pb2.Node, project: str) -> str:
        script = self.boot_script(node)
        secret = next(line.split()[2] for line in script.splitlines()
                      if line.startswith("set password "))
        self.own(project, secret)
        return secret

    def agent(self, project: str) -> tuple[nodes_pb2.Node, str]:
        """A node provisioned in agent mode and its agent's one-boot token."""
        node = self.provisioned(project, agent=True)
        kernel = next(line for line in self.boot_script(node).splitlines()
                      if line.startswith("kernel "))
        args = dict(w.split("=", 1) for w in kernel.split() if "=" in w)
        assert args["bmi.node"] == node.id
        self.own(project, args["bmi.token"])
        return node, args["bmi.token"]

    # -- looking -------------------------------------------------------------------

    def exists(self, get: Callable, ref: str) -> Any:
        try:
            return get(ref)
        except grpc.RpcError as exc:
            assert exc.code() == NF, exc.details()
            return None

    def foreign_to(self, caller: str) -> set[str]:
        if caller == "owner":
            return self.owned[OTHER]
        if caller == "other":
            return self.owned[OWNER]
        if caller == "admin":
            return set()
        return self.owned[OWNER] | self.owned[OTHER]


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    method: str
    prepare: Callable[[World, str], Prepared]
    expect: dict[str, grpc.StatusCode]
    label: str = ""
    hil: dict[str, grpc.StatusCode] = field(default_factory=dict)  # HIL-mode overrides
    check: Callable[[World, str, Prepared, Any], None] | None = None  # after OK
    intact: Callable[[World, Prepared], None] | None = None  # after a refusal
    invoke: Callable[[World, str, Prepared], Any] | None = None  # custom call
    unserved: bool = False  # not served by these servers: UNIMPLEMENTED for everyone

    @property
    def id(self) -> str:
        return self.method + (f"[{self.label}]" if self.label else "")

    def expected(self, mode: str, caller: str) -> grpc.StatusCode:
        if self.unserved:
            return grpc.StatusCode.UNIMPLEMENTED
        if caller in ("bad", "none"):
            return UNAUTH
        if mode == "hil" and caller in self.hil:
            return self.hil[caller]
        return self.expect[caller]


def project_for(caller: str) -> str:
    """What a create call names as project: admins must name one; ``other`` names
    alice's (not his own), which is what must be refused."""
    return {"admin": OWNER, "other": OWNER}.get(caller, "")


def tenant(caller: str) -> str:
    return OTHER if caller == "other" else OWNER


ANYONE = {"admin": OK, "owner": OK, "other": OK}
HIDDEN = {"admin": OK, "owner": OK, "other": NF}  # alice's object; bob must not see it
ADMIN_ONLY = {"admin": OK, "owner": PD, "other": PD}
OWN_PROJECT = {"admin": OK, "owner": OK, "other": PD}  # bob names alice's project


def image_gone(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert w.exists(w.clients["admin"].get_image, p.subject) is None


def image_kept(w: World, p: Prepared) -> None:
    assert w.exists(w.clients["admin"].get_image, p.subject) is not None


def disk_kept(w: World, p: Prepared) -> None:
    assert w.exists(w.clients["admin"].get_disk, p.subject) is not None


def node_state_is(state: int) -> Callable[[World, Prepared], None]:
    def check(w: World, p: Prepared) -> None:
        assert w.clients["admin"].get_node(p.subject).state == state

    return check


def no_image_named(name: str) -> Callable[[World, Prepared], None]:
    def check(w: World, p: Prepared) -> None:
        assert not [i for i in w.clients["admin"].list_images() if i.name == name]

    return check


def fresh_named(w: World, caller: str, kind: str) -> str:
    name = w.name(OWNER, kind)
    w.own(OWNER, name)
    return name


def _list_check(field_name: str, mine: str) -> Callable:
    def check(w: World, caller: str, p: Prepared, reply: Any) -> None:
        shown = {item.id for item in getattr(reply, field_name)}
        expected = w.shared[mine]
        if caller == "admin":
            assert {expected[OWNER], expected[OTHER]} <= shown
        else:
            assert expected[tenant(caller)] in shown

    return check


def _get_check(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.id == p.subject


def verified(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.image_id == p.subject and reply.matches, reply


def upload(w: World, caller: str) -> Prepared:
    name = fresh_named(w, caller, "upl")
    header = images_pb2.UploadImageHeader(
        name=name, project=project_for(caller), format=images_pb2.IMAGE_FORMAT_RAW,
        file_size_bytes=MIB, request_id=secrets.token_hex(8),
    )
    return Prepared([images_pb2.UploadImageRequest(header=header),
                     images_pb2.UploadImageRequest(chunk=b"\1" * MIB)], subject=name)


def import_image(w: World, caller: str) -> Prepared:
    name = fresh_named(w, caller, "imp")
    request = images_pb2.ImportImageRequest(
        name=name, project=project_for(caller) or OWNER,
        source_rbd_image=w.shared["import_source"], request_id=secrets.token_hex(8),
    )
    return Prepared(request, subject=name)


def created_image(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER and reply.state == images_pb2.RESOURCE_STATE_READY
    w.own(OWNER, reply.id)


def created_in_owner(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER
    w.own(OWNER, reply.id)


def update_own(w: World, caller: str) -> Prepared:
    image = w.image(OWNER)
    return Prepared(images_pb2.UpdateImageRequest(image=image.id,
                                                  name=fresh_named(w, caller, "ren")),
                    subject=image.id)


def renamed(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.name == p.request.name


def name_kept(w: World, p: Prepared) -> None:
    assert w.clients["admin"].get_image(p.subject).name != p.request.name


def update_public(w: World, caller: str) -> Prepared:
    image = w.image(OWNER, public=True)
    return Prepared(images_pb2.UpdateImageRequest(image=image.id,
                                                  name=w.name("pub", "ren")),
                    subject=image.id)


def delete_image(w: World, caller: str) -> Prepared:
    image = w.image(OWNER)
    return Prepared(images_pb2.DeleteImageRequest(image=image.id), subject=image.id)


def copy_image(w: World, caller: str) -> Prepared:
    image = w.shared["images"][OWNER]
    return Prepared(images_pb2.CopyImageRequest(
        image=image, project=project_for(caller) if caller == "admin" else "",
        name=fresh_named(w, caller, "cpy"), request_id=secrets.token_hex(8)))


def create_disk(w: World, caller: str) -> Prepared:
    name = fresh_named(w, caller, "dsk")
    return Prepared(disks_pb2.CreateDiskRequest(
        name=name, image=w.shared["images"][OWNER],
        project=OWNER if caller == "admin" else "", request_id=secrets.token_hex(8)),
        subject=name)


def delete_disk(w: World, caller: str) -> Prepared:
    disk = w.disk(OWNER)
    return Prepared(disks_pb2.DeleteDiskRequest(disk=disk.id), subject=disk.id)


def disk_gone(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert w.exists(w.clients["admin"].get_disk, p.subject) is None


def snapshot(w: World, caller: str) -> Prepared:
    name = fresh_named(w, caller, "snp")
    return Prepared(disks_pb2.SnapshotDiskRequest(
        disk=w.shared["disks"][OWNER], image_name=name, request_id=secrets.token_hex(8)),
        subject=name)


def enrol(w: World, caller: str) -> Prepared:
    name, mac = fresh_named(w, caller, "enr"), w.mac()
    w.own(OWNER, mac)
    return Prepared(nodes_pb2.EnrollNodeRequest(name=name, project=OWNER, macs=[mac]),
                    subject=name)


def enrolled(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER and reply.state == nodes_pb2.NODE_STATE_AVAILABLE
    w.own(OWNER, reply.id)


def not_enrolled(w: World, p: Prepared) -> None:
    assert w.exists(w.clients["admin"].get_node, p.subject) is None


def provision(w: World, caller: str) -> Prepared:
    node = w.node(OWNER)
    return Prepared(nodes_pb2.ProvisionNodeRequest(
        node=node.id, image=w.golden.id, request_id=secrets.token_hex(8)), subject=node.id)


def provisioned(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.state == nodes_pb2.NODE_STATE_PROVISIONED
    w.own(OWNER, reply.disk_id, reply.target.iqn)
    w.chap_secret(reply, OWNER)


def provision_from_foreign(kind: str) -> Callable[[World, str], Prepared]:
    """Each caller's own node (admins: alice's) from alice's private image or her disk:
    bob's own node must not boot alice's things."""

    def prepare(w: World, caller: str) -> Prepared:
        node = w.node(tenant(caller))
        source = {"image": w.shared["images"][OWNER]} if kind == "image" else {
            "disk": w.disk(OWNER).id}
        return Prepared(nodes_pb2.ProvisionNodeRequest(node=node.id, **source), subject=node.id)

    return prepare


def deprovision(w: World, caller: str) -> Prepared:
    node = w.provisioned(OWNER)
    return Prepared(nodes_pb2.DeprovisionNodeRequest(node=node.id), subject=node.id)


def reprovision(w: World, caller: str) -> Prepared:
    node = w.provisioned(OWNER)
    w.shared["disk_before"] = node.disk_id
    return Prepared(nodes_pb2.ReprovisionNodeRequest(node=node.id), subject=node.id)


def new_disk(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.state == nodes_pb2.NODE_STATE_PROVISIONED
    assert reply.disk_id != w.shared["disk_before"]
    w.own(OWNER, reply.disk_id, reply.target.iqn)


def disk_unchanged(w: World, p: Prepared) -> None:
    node = w.clients["admin"].get_node(p.subject)
    assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
    assert node.disk_id == w.shared["disk_before"]


def take_owned(w: World, caller: str) -> Prepared:
    """Taking alice's node: bob must learn nothing of it; alice and admins already have it."""
    node = w.node(OWNER)
    return Prepared(nodes_pb2.TakeNodeRequest(
        node=node.name, project=OWNER if caller == "admin" else ""), subject=node.id)


def still_owned(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert (reply.id, reply.project) == (p.subject, OWNER)
    assert reply.state == nodes_pb2.NODE_STATE_AVAILABLE


def take_free(w: World, caller: str) -> Prepared:
    name, mac = fresh_named(w, caller, "free"), w.mac()
    if w.hil is not None:
        w.hil.add_node(name, [("pxe", mac)])
    w.forget(OWNER, name)  # a free node is no one's: its name is public
    return Prepared(nodes_pb2.TakeNodeRequest(node=name, project=project_for(caller)),
                    subject=name)


def taken(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER and reply.state == nodes_pb2.NODE_STATE_AVAILABLE
    w.own(OWNER, reply.id, reply.name, *reply.macs)


def still_free(w: World, p: Prepared) -> None:
    if w.hil is not None:
        assert w.hil.nodes[p.subject].project is None


def give_back(w: World, caller: str) -> Prepared:
    node = w.node(OWNER)
    return Prepared(nodes_pb2.GiveBackNodeRequest(node=node.name), subject=node.id)


def given_back(w: World, caller: str, p: Prepared, reply: Any) -> None:
    name = p.request.node
    assert w.hil is not None and w.hil.nodes[name].project is None
    w.forget(OWNER, name)  # free now: its name is public


def watch_all(w: World, caller: str) -> Prepared:
    return Prepared(nodes_pb2.WatchNodesRequest())


def watch_one(w: World, caller: str) -> Prepared:
    node = w.node(OWNER)
    return Prepared(nodes_pb2.WatchNodesRequest(node=node.id), subject=node.id)


def _events_until(stream, node_id: str, seen: list) -> None:
    for event in stream:
        seen.append(event)
        if event.node.id == node_id:
            return
    raise AssertionError("the watch ended before the expected event")


def invoke_watch_all(w: World, caller: str, p: Prepared) -> Any:
    """Only events of nodes the caller may see arrive: a transition of the other
    project's node, made between two of the caller's own, must not come in between."""
    stream = stub_for(w.channel, METHODS["NodeService.WatchNodes"])(
        p.request, metadata=w.metadata[caller], timeout=CALL_SECONDS)
    try:
        seen: list = []
        mine, theirs = (OTHER, OWNER) if caller == "other" else (OWNER, OTHER)
        ready = w.node(mine)  # once it arrives, the watch is surely subscribed
        _events_until(stream, ready.id, seen)
        foreign = w.node(theirs)
        marker = w.node(mine)
        _events_until(stream, marker.id, seen)
        shown = {e.node.id for e in seen}
        if caller == "admin":
            assert foreign.id in shown
        else:
            assert foreign.id not in shown, f"{caller} saw another project's node"
        return seen
    finally:
        stream.cancel()


def invoke_watch_one(w: World, caller: str, p: Prepared) -> Any:
    stream = stub_for(w.channel, METHODS["NodeService.WatchNodes"])(
        p.request, metadata=w.metadata[caller], timeout=CALL_SECONDS)
    try:
        # The first answer is either an error or, after a transition, its event; the
        # transition is made only once the call has been accepted (its metadata came).
        stream.initial_metadata()
        if stream.done():
            next(stream)  # raises the call's error
        node = w.clients["admin"].get_node(p.subject)
        w.client(OWNER).provision_node(node.name, image=w.golden.id)
        event = next(stream)
        assert event.node.id == p.subject
        w.own(OWNER, event.node.disk_id, event.node.target.iqn)
        return event
    finally:
        stream.cancel()


def agent_call(build: Callable[[nodes_pb2.Node], Any]) -> Callable[[World, str], Prepared]:
    """A BootService call about a fresh agent-mode node of alice's. Only that node's own
    boot token is accepted: admins' and tenants' credentials are not, and neither is
    another node's token (bob's) nor a made-up one."""

    def prepare(w: World, caller: str) -> Prepared:
        node, token = w.agent(OWNER)
        metadata = {
            "owner": (("bmi-boot-token", token),),
            "other": (("bmi-boot-token", w.shared["bob_agent_token"]),),
            "bad": (("bmi-boot-token", token[:-2] + "xx"),),
        }.get(caller)
        return Prepared(build(node), metadata=metadata, subject=node.id)

    return prepare


def register_request(node: nodes_pb2.Node) -> boot_pb2.RegisterRequest:
    nic = inventory_pb2.NetworkInterface(name="eth0", mac=node.macs[0])
    return boot_pb2.RegisterRequest(node_id=node.id,
                                    inventory=inventory_pb2.Inventory(interfaces=[nic]))


def plan_has_chap(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.action == boot_pb2.BOOT_PLAN_ACTION_ATTACH
    assert reply.target.chap_secret and reply.target.iqn.endswith(
        w.clients["admin"].get_node(p.subject).disk_id)


def get_quota(w: World, caller: str) -> Prepared:
    return Prepared(quotas_pb2.GetQuotaRequest(project=project_for(caller)))


def alices_quota(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER and reply.images.used >= 1 and reply.disks.used >= 1


def own_quota(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == tenant(caller) and reply.images.limit > 0


def set_quota(w: World, caller: str) -> Prepared:
    """Alice's limits, generous (the rows after this one go on making things in her
    project), and different in every cell, so a refused call shows as unchanged."""
    w.shared["quota_before"] = w.clients["admin"].get_quota(OWNER)
    return Prepared(quotas_pb2.SetQuotaRequest(
        project=OWNER, max_images=400 + secrets.randbelow(100),
        max_disks=400 + secrets.randbelow(100)))


def quota_set(w: World, caller: str, p: Prepared, reply: Any) -> None:
    assert reply.project == OWNER and reply.images.overridden
    assert (reply.images.limit, reply.disks.limit) == (p.request.max_images,
                                                       p.request.max_disks)


def quota_kept(w: World, p: Prepared) -> None:
    after = w.clients["admin"].get_quota(OWNER)
    before = w.shared["quota_before"]
    assert (after.images, after.disks) == (before.images, before.disks)


AGENT_ONLY = {"admin": UNAUTH, "owner": OK, "other": UNAUTH}

ROWS: list[Row] = [
    # -- ImageService
    Row("ImageService.ListImages", lambda w, c: Prepared(images_pb2.ListImagesRequest(
        page_size=1000)), ANYONE, check=_list_check("images", "images")),
    Row("ImageService.ListImages", lambda w, c: Prepared(images_pb2.ListImagesRequest(
        project=OWNER)), {"admin": OK, "owner": OK, "other": PD}, label="project"),
    Row("ImageService.GetImage", lambda w, c: Prepared(images_pb2.GetImageRequest(
        image=w.shared["images"][OWNER]), subject=w.shared["images"][OWNER]), HIDDEN,
        check=_get_check),
    Row("ImageService.GetImage", lambda w, c: Prepared(images_pb2.GetImageRequest(
        image=w.shared["images"]["name"])), HIDDEN, label="by name"),
    Row("ImageService.ImportImage", import_image, ADMIN_ONLY, check=created_image,
        intact=lambda w, p: no_image_named(p.subject)(w, p)),
    Row("ImageService.UploadImage", upload, OWN_PROJECT, check=created_image,
        intact=lambda w, p: no_image_named(p.subject)(w, p)),
    Row("ImageService.CopyImage", copy_image, HIDDEN, check=created_in_owner,
        intact=lambda w, p: no_image_named(p.request.name)(w, p)),
    Row("ImageService.UpdateImage", update_own, HIDDEN, check=renamed, intact=name_kept),
    Row("ImageService.UpdateImage", update_public, {"admin": OK, "owner": PD, "other": PD},
        label="public", check=renamed, intact=name_kept),
    Row("ImageService.DeleteImage", delete_image, HIDDEN, check=image_gone,
        intact=image_kept),
    Row("ImageService.VerifyImage", lambda w, c: Prepared(images_pb2.VerifyImageRequest(
        image=w.shared["images"][OWNER]), subject=w.shared["images"][OWNER]), HIDDEN,
        check=verified),
    # Verifying reads the whole image: its own project's work (a public image is ops'),
    # not every viewer's.
    Row("ImageService.VerifyImage", lambda w, c: Prepared(images_pb2.VerifyImageRequest(
        image=w.image(OWNER, public=True).id)), {"admin": OK, "owner": PD, "other": PD},
        label="public"),
    # -- DiskService
    Row("DiskService.ListDisks", lambda w, c: Prepared(disks_pb2.ListDisksRequest(
        page_size=1000)), ANYONE, check=_list_check("disks", "disks")),
    Row("DiskService.ListDisks", lambda w, c: Prepared(disks_pb2.ListDisksRequest(
        image=w.shared["images"][OWNER])), HIDDEN, label="of image"),
    Row("DiskService.GetDisk", lambda w, c: Prepared(disks_pb2.GetDiskRequest(
        disk=w.shared["disks"][OWNER]), subject=w.shared["disks"][OWNER]), HIDDEN,
        check=_get_check),
    Row("DiskService.CreateDisk", create_disk, HIDDEN, check=created_in_owner,
        intact=lambda w, p: None),
    Row("DiskService.DeleteDisk", delete_disk, HIDDEN, check=disk_gone, intact=disk_kept),
    Row("DiskService.SnapshotDisk", snapshot, HIDDEN, check=created_in_owner,
        intact=lambda w, p: no_image_named(p.subject)(w, p)),
    # -- NodeService
    Row("NodeService.ListNodes", lambda w, c: Prepared(nodes_pb2.ListNodesRequest(
        page_size=1000, include_free=True)), ANYONE, check=_list_check("nodes", "nodes")),
    Row("NodeService.ListNodes", lambda w, c: Prepared(nodes_pb2.ListNodesRequest(
        project=OWNER)), {"admin": OK, "owner": OK, "other": PD}, label="project"),
    Row("NodeService.GetNode", lambda w, c: Prepared(nodes_pb2.GetNodeRequest(
        node=w.shared["nodes"][OWNER]), subject=w.shared["nodes"][OWNER]), HIDDEN,
        check=_get_check),
    Row("NodeService.GetNode", lambda w, c: Prepared(nodes_pb2.GetNodeRequest(
        node=w.shared["nodes"]["name"])), HIDDEN, label="by name"),
    Row("NodeService.EnrollNode", enrol, ADMIN_ONLY, check=enrolled, intact=not_enrolled),
    Row("NodeService.ProvisionNode", provision, HIDDEN, check=provisioned,
        intact=node_state_is(nodes_pb2.NODE_STATE_AVAILABLE)),
    Row("NodeService.ProvisionNode", provision_from_foreign("image"), HIDDEN,
        label="alice's image", check=provisioned,
        intact=node_state_is(nodes_pb2.NODE_STATE_AVAILABLE)),
    Row("NodeService.ProvisionNode", provision_from_foreign("disk"), HIDDEN,
        label="alice's disk", check=provisioned,
        intact=node_state_is(nodes_pb2.NODE_STATE_AVAILABLE)),
    Row("NodeService.DeprovisionNode", deprovision, HIDDEN,
        intact=node_state_is(nodes_pb2.NODE_STATE_PROVISIONED)),
    Row("NodeService.ReprovisionNode", reprovision, HIDDEN, check=new_disk,
        intact=disk_unchanged),
    Row("NodeService.WatchNodes", watch_all, ANYONE, invoke=invoke_watch_all),
    Row("NodeService.WatchNodes", watch_one, HIDDEN, label="one node",
        invoke=invoke_watch_one),
    # Taking a node already in the project is a retry: the same node, unchanged.
    Row("NodeService.TakeNode", take_owned, HIDDEN, label="owned", check=still_owned,
        intact=node_state_is(nodes_pb2.NODE_STATE_AVAILABLE)),
    # Without HIL there is no free pool: the name is no node's.
    Row("NodeService.TakeNode", take_free, {"admin": NF, "owner": NF, "other": PD},
        label="free", hil={"admin": OK, "owner": OK, "other": PD}, check=taken,
        intact=still_free),
    # Without HIL there is no free pool to give back to: refused before any lookup.
    Row("NodeService.GiveBackNode", give_back, {"admin": FP, "owner": FP, "other": FP},
        hil={"admin": OK, "owner": OK, "other": NF}, check=given_back,
        intact=node_state_is(nodes_pb2.NODE_STATE_AVAILABLE)),
    # -- BootService (the node agent)
    Row("BootService.Register", agent_call(register_request), AGENT_ONLY),
    Row("BootService.GetBootPlan",
        agent_call(lambda n: boot_pb2.GetBootPlanRequest(node_id=n.id)), AGENT_ONLY,
        check=plan_has_chap),
    Row("BootService.ReportStatus", agent_call(lambda n: boot_pb2.ReportStatusRequest(
        node_id=n.id, phase=boot_pb2.AGENT_PHASE_ATTACHING, detail="matrix")), AGENT_ONLY),
    Row("BootService.Heartbeat",
        agent_call(lambda n: boot_pb2.HeartbeatRequest(node_id=n.id)), AGENT_ONLY),
    # -- QuotaService
    Row("QuotaService.GetQuota", get_quota, OWN_PROJECT, check=alices_quota),
    # No project named: one's own; admins have none, so they must name one.
    Row("QuotaService.GetQuota", lambda w, c: Prepared(quotas_pb2.GetQuotaRequest()),
        {"admin": IA, "owner": OK, "other": OK}, label="own", check=own_quota),
    # Tenants may not raise (or set at all) even their own project's limits.
    Row("QuotaService.SetQuota", set_quota, ADMIN_ONLY, check=quota_set, intact=quota_kept),
    # -- GatewayService: served only in gateway mode (target_mode = "gateways"), to
    # gateway credentials of its own (tests/unit/test_gateway_mode.py checks those); these
    # servers export through tgtd and do not serve it at all, to anyone.
    Row("GatewayService.HeartbeatGateway", lambda w, c: Prepared(
        gateway_pb2.HeartbeatGatewayRequest(name="gw1", portals=["127.0.0.1:3260"])),
        ANYONE, unserved=True),
    Row("GatewayService.WatchTargets", lambda w, c: Prepared(
        gateway_pb2.WatchTargetsRequest(name="gw1")), ANYONE, unserved=True),
    Row("GatewayService.ReportTargets", lambda w, c: Prepared(
        gateway_pb2.ReportTargetsRequest(name="gw1")), ANYONE, unserved=True),
]


# -- the servers -------------------------------------------------------------------------


def _hil_standin() -> HilStandin:
    standin = HilStandin(poll_seconds=0.05, switch_seconds=0.01)
    for project in (OWNER, OTHER):
        standin.add_project(project)
    standin.add_user("bmi", PASSWORDS["bmi"], admin=True)
    standin.add_user(OWNER, PASSWORDS[OWNER], projects=(OWNER,))
    standin.add_user(OTHER, PASSWORDS[OTHER], projects=(OTHER,))
    standin.add_network(NETWORK)
    return standin


def _hil_env(hil: HilStandin) -> dict[str, str]:
    return {
        "BMI_ISOLATOR": "hil",
        "BMI_HIL_URL": hil.url,
        "BMI_HIL_USER": "bmi",
        "BMI_HIL_PASSWORD": PASSWORDS["bmi"],
        "BMI_HIL_PROVISIONING_NETWORK": NETWORK,
        "BMI_HIL_BOOT_NIC": "pxe",
        "BMI_HIL_ACTION_TIMEOUT_SECONDS": "30",
        "BMI_HIL_AUTH_CACHE_SECONDS": "600",
    }


def _credentials(mode: str) -> dict[str, dict[str, str]]:
    """BmiClient/call_metadata keyword arguments per caller."""
    if mode == "standalone":
        return {
            "admin": {"token": ADMIN_TOKEN},
            "owner": {"token": TENANT_TOKENS[OWNER]},
            "other": {"token": TENANT_TOKENS[OTHER]},
            "bad": {"token": "not-a-token-" + secrets.token_hex(8)},
        }
    return {
        "admin": {"user": "bmi", "password": PASSWORDS["bmi"]},
        "owner": {"user": OWNER, "password": PASSWORDS[OWNER], "project": OWNER},
        "other": {"user": OTHER, "password": PASSWORDS[OTHER], "project": OTHER},
        "bad": {"user": OWNER, "password": "wrong-" + secrets.token_hex(4), "project": OWNER},
    }


@pytest.fixture(scope="module", params=["standalone", "hil"])
def world(request, ceph_cluster, tgtd, tmp_path_factory, raw_image, ioctx) -> Iterator[World]:
    mode = request.param
    import_source = f"authz-import-source-{mode}"  # not BMI's: BMI's own are never imported
    rbd.RBD().create(ioctx, import_source, MIB)
    hil = _hil_standin().start() if mode == "hil" else None
    process = ServerProcess(
        tmp_path_factory.mktemp(f"authz-{mode}"), str(ceph_cluster.conf_path),
        ceph_cluster.pool, tgtd=tgtd, extra_env=_hil_env(hil) if hil else None,
    )
    process.start()
    credentials = _credentials(mode)
    metadata = {c: call_metadata(**credentials[c]) for c in credentials} | {"none": ()}
    clients = {
        name: BmiClient(process.address, timeout=CALL_SECONDS, max_attempts=1,
                        **credentials[caller])
        for name, caller in (("admin", "admin"), (OWNER, "owner"), (OTHER, "other"))
    }
    channel = grpc.insecure_channel(process.address)
    w = World(mode, process, channel, clients, metadata, hil=hil)
    try:
        w.shared["raw"] = raw_image
        w.shared["golden"] = w.image(OWNER, public=True)
        images = {p: w.image(p) for p in (OWNER, OTHER)}
        w.shared["images"] = {p: i.id for p, i in images.items()} | {
            "name": images[OWNER].name}
        w.shared["import_source"] = import_source
        w.shared["disks"] = {p: w.disk(p).id for p in (OWNER, OTHER)}
        nodes = {p: w.provisioned(p) for p in (OWNER, OTHER)}
        for project, node in nodes.items():
            w.chap_secret(node, project)
        w.shared["nodes"] = {p: n.id for p, n in nodes.items()} | {"name": nodes[OWNER].name}
        w.shared["bob_agent_token"] = w.agent(OTHER)[1]
        yield w
        clean_up(clients["admin"])  # tgtd and Ceph are shared with the modules after this
    finally:
        channel.close()
        for client in clients.values():
            client.close()
        process.stop()
        if hil is not None:
            hil.stop()
        rbd.RBD().remove(ioctx, import_source)


def clean_up(admin: BmiClient) -> None:
    """Every target, disk and image this module made goes (the nodes stay: records)."""
    for node in admin.list_nodes():
        if node.disk_id or node.state == nodes_pb2.NODE_STATE_FAILED:
            admin.deprovision_node(node.id)
    for disk in admin.list_disks():
        admin.delete_disk(disk.id)
    for image in admin.list_images():
        admin.delete_image(image.id)


# -- the tests ---------------------------------------------------------------------------


def test_every_rpc_has_a_row():
    missing = sorted(set(METHODS) - {row.method for row in ROWS})
    assert not missing, f"RPCs without a row in the authorisation matrix: {missing}"
    unknown = sorted({row.method for row in ROWS} - set(METHODS))
    assert not unknown, f"rows for RPCs that do not exist: {unknown}"
    for row in ROWS:
        assert set(row.expect) == {"admin", "owner", "other"}, row.id


def _call(w: World, caller: str, row: Row, p: Prepared) -> tuple[grpc.StatusCode, Any, str]:
    try:
        if row.invoke is not None:
            return OK, row.invoke(w, caller, p), ""
        method = METHODS[row.method]
        metadata = p.metadata if p.metadata is not None else w.metadata[caller]
        request = iter(p.request) if method.client_streaming else p.request
        reply = stub_for(w.channel, method)(request, metadata=metadata, timeout=CALL_SECONDS)
        if method.server_streaming:  # rows with a stream that ends in an error at once
            reply = next(reply)
        return OK, reply, ""
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details() or ""


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_matrix(world: World, row: Row, caller: str):
    prepared = row.prepare(world, caller)
    code, reply, details = _call(world, caller, row, prepared)
    expected = row.expected(world.mode, caller)
    assert code == expected, f"{row.id} as {caller}: {code.name} {details!r}"
    # Nothing foreign in the answer or the error, unless the caller named it itself.
    said = str(prepared.request)
    answer = f"{reply}\n{details}"
    leaked = sorted(i for i in world.foreign_to(caller) if i in answer and i not in said)
    assert not leaked, f"{row.id} as {caller} leaked {leaked}: {answer[:500]}"
    if code == OK and row.check is not None:
        row.check(world, caller, prepared, reply)
    if code != OK and row.intact is not None:
        row.intact(world, prepared)


# -- retries: every mutating RPC, sent twice, acts once --------------------------------------
#
# Creates (ImportImage, UploadImage, CopyImage, CreateDisk, SnapshotDisk, ProvisionNode)
# keep their request_id on what they make and are retried in test_crash.py. Here the
# others: each is sent, then sent again exactly so (a retry after a lost reply); the
# second answer must be the first one's and Ceph, tgt, HIL and the nodes' histories must
# not change. BootService: see test_repeated_pivot_report_is_answered_with_no_effect.


@dataclass(frozen=True)
class Retry:
    method: str
    prepare: Callable[[World], tuple[str, Any]]  # -> (caller, request)
    same: Callable[[Any], Any] = lambda reply: reply  # what of the reply must repeat
    hil_only: bool = False


def key() -> str:
    return "retry-" + secrets.token_hex(6)


def retry_update(w: World) -> tuple[str, Any]:
    image = w.image(OWNER)
    # By name: the retry must find the image the first call renamed.
    return "owner", images_pb2.UpdateImageRequest(image=image.name, name=w.name(OWNER, "ren"),
                                                  request_id=key())


def retry_delete_image(w: World) -> tuple[str, Any]:
    return "owner", images_pb2.DeleteImageRequest(image=w.image(OWNER).name, request_id=key())


def retry_delete_disk(w: World) -> tuple[str, Any]:
    return "owner", disks_pb2.DeleteDiskRequest(disk=w.disk(OWNER).name, request_id=key())


def retry_enrol(w: World) -> tuple[str, Any]:
    name, mac = w.name(OWNER, "enr"), w.mac()
    return "admin", nodes_pb2.EnrollNodeRequest(name=name, project=OWNER, macs=[mac])


def retry_deprovision(w: World) -> tuple[str, Any]:
    node = w.provisioned(OWNER)
    return "owner", nodes_pb2.DeprovisionNodeRequest(node=node.name, request_id=key())


def retry_reprovision(w: World) -> tuple[str, Any]:
    node = w.provisioned(OWNER)
    return "owner", nodes_pb2.ReprovisionNodeRequest(node=node.name, request_id=key())


def retry_take(w: World) -> tuple[str, Any]:
    name, mac = w.name(OWNER, "tk"), w.mac()
    w.hil.add_node(name, [("pxe", mac)])
    return "owner", nodes_pb2.TakeNodeRequest(node=name)


def retry_give_back(w: World) -> tuple[str, Any]:
    node = w.node(OWNER)
    w.forget(OWNER, node.name)
    return "owner", nodes_pb2.GiveBackNodeRequest(node=node.name)


def retry_set_quota(w: World) -> tuple[str, Any]:
    return "admin", quotas_pb2.SetQuotaRequest(project=OWNER, max_images=600, max_disks=600)


def node_result(reply: Any) -> Any:
    return (reply.id, reply.project, reply.state, reply.disk_id, reply.target.iqn)


RETRIES = [
    Retry("ImageService.UpdateImage", retry_update, lambda r: (r.id, r.name, r.visibility)),
    Retry("ImageService.DeleteImage", retry_delete_image),
    Retry("DiskService.DeleteDisk", retry_delete_disk),
    Retry("NodeService.EnrollNode", retry_enrol, node_result),
    Retry("NodeService.DeprovisionNode", retry_deprovision, node_result),
    Retry("NodeService.ReprovisionNode", retry_reprovision, node_result),
    Retry("NodeService.TakeNode", retry_take, node_result, hil_only=True),
    Retry("NodeService.GiveBackNode", retry_give_back, hil_only=True),
    # Set-to: setting the same limits again changes nothing.
    Retry("QuotaService.SetQuota", retry_set_quota,
          lambda r: (r.project, r.virtual_bytes, r.images, r.disks)),
]


def everything(w: World, tgtd) -> Any:
    """All that a second, acting call would change: catalogue, Ceph, tgt, nodes, HIL."""
    admin = w.clients["admin"]
    shown = tgtd.tgtadm("--lld", "iscsi", "--op", "show", "--mode", "target").stdout
    nodes = sorted((n.id, n.project, n.state, n.disk_id, len(admin.get_node(n.id).history))
                   for n in admin.list_nodes())
    hil = sorted((n.name, n.project) for n in w.hil.nodes.values()) if w.hil else []
    return (sorted((i.id, i.name, i.visibility) for i in admin.list_images()),
            sorted(d.id for d in admin.list_disks()),
            sorted(v.name for v in w.shared["rbd_store"].list_volumes()),
            sorted(re.findall(r"^Target \d+: (\S+)", shown, re.MULTILINE)), nodes, hil)


def test_every_mutating_rpc_is_covered_by_a_retry_rule():
    """Creates carry their key on what they make (test_crash.py); reads change nothing."""
    creates = {"ImageService.ImportImage", "ImageService.UploadImage", "ImageService.CopyImage",
               "DiskService.CreateDisk", "DiskService.SnapshotDisk", "NodeService.ProvisionNode"}
    reads = {m for m in METHODS
             if m.split(".")[1].startswith(("List", "Get", "Watch", "Verify"))}
    agent = {m for m in METHODS if m.startswith(("BootService.", "GatewayService."))}
    covered = creates | reads | agent | {r.method for r in RETRIES}
    assert set(METHODS) - covered == set()


@pytest.mark.parametrize("retry", RETRIES, ids=lambda r: r.method)
def test_a_retry_gives_the_same_result_and_acts_once(world: World, retry: Retry, tgtd,
                                                     rbd_store):
    if retry.hil_only and world.hil is None:
        pytest.skip("taking and giving back nodes needs HIL")
    world.shared["rbd_store"] = rbd_store
    caller, request = retry.prepare(world)
    call = stub_for(world.channel, METHODS[retry.method])
    first = call(request, metadata=world.metadata[caller], timeout=CALL_SECONDS)
    after_first = everything(world, tgtd)
    again = call(request, metadata=world.metadata[caller], timeout=CALL_SECONDS)
    assert retry.same(again) == retry.same(first)
    assert everything(world, tgtd) == after_first


def test_a_node_that_changed_hands_shows_nothing_of_its_past(world: World):
    """Given back by alice and taken by bob, a node's history must not tell bob which
    images alice booted on it (the reasons name them)."""
    if world.hil is None:
        pytest.skip("nodes change projects only with HIL")
    node = world.provisioned(OWNER)
    alice, bob = world.client(OWNER), world.client(OTHER)
    alice.deprovision_node(node.name)
    alice.give_back_node(node.name)
    world.forget(OWNER, node.name, node.id, *node.macs)  # the node itself is bob's now
    taken = bob.take_node(node.name)
    shown = bob.get_node(node.name)
    assert shown.id == taken.id == node.id and shown.project == OTHER
    leaked = sorted(i for i in world.foreign_to("other") if i in str(shown))
    assert not leaked and [t.reason for t in shown.history] == [f"taken by project {OTHER}"]
    assert world.golden.name in str(world.clients["admin"].get_node(node.name).history)
    world.own(OTHER, node.name, node.id, *node.macs)
