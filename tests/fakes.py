"""In-memory stand-ins for the core's ports, for unit tests only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from bmi_server.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from bmi_server.core.models import (
    ExternalVolume,
    ImageFormatInfo,
    IsolatedNode,
    NodeNic,
    Principal,
    TargetSpec,
    VolumeInfo,
)
from bmi_server.core.naming import NOT_IMPORTABLE, TEMP_SNAPSHOT_PREFIX, is_bmi_volume_name

TEMP_PREFIX = TEMP_SNAPSHOT_PREFIX


@dataclass
class FakeVolume:
    size: int
    data: bytearray
    metadata: dict[str, str]
    parent: str | None = None
    complete: bool = False
    snapshots: set[str] = field(default_factory=set)
    external: bool = False
    sealed_data: bytearray | None = None  # the content at seal (the golden snapshot)


class FakeImageStore:
    """Behaves like the RBD adapter at the level the core sees; ``fail`` injects errors."""

    def __init__(self) -> None:
        self.volumes: dict[str, FakeVolume] = {}
        self.fail: dict[str, Exception] = {}  # method name -> exception to raise
        self.calls: list[str] = []

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        if method in self.fail:
            raise self.fail[method]

    def add_external(
        self, name: str, data: bytes, metadata: Mapping[str, str] | None = None,
        parent: str | None = None,
    ) -> None:
        """A volume someone else put in the pool (``metadata`` and ``parent``: as a copy or
        clone of one of BMI's would have them)."""
        self.volumes[name] = FakeVolume(len(data), bytearray(data), dict(metadata or {}),
                                        parent=parent, external=True)  # fmt: skip

    def create(self, volume: str, size_bytes: int, metadata: Mapping[str, str]) -> None:
        self._enter("create")
        if volume in self.volumes:
            raise AlreadyExists(volume)
        self.volumes[volume] = FakeVolume(size_bytes, bytearray(size_bytes), dict(metadata))

    def write(self, volume: str, offset: int, data: bytes) -> None:
        self._enter("write")
        self.volumes[volume].data[offset : offset + len(data)] = data

    def import_raw_file(self, volume: str, path: Path) -> None:
        self._enter("import_raw_file")
        content = Path(path).read_bytes()
        vol = self.volumes[volume]
        vol.data[: len(content)] = content

    def external_volume(self, source: str) -> ExternalVolume:
        self._enter("external_volume")
        if source not in self.volumes:
            raise NotFound(f"rbd image {source!r} not found")
        return ExternalVolume(self.volumes[source].size, self._from_bmi(source))

    def _from_bmi(self, name: str | None) -> bool:
        """As the RBD adapter decides: a bmi.* key, or an ancestor named or marked BMI's."""
        while name is not None:
            volume = self.volumes[name]
            if any(key.startswith("bmi.") for key in volume.metadata):
                return True
            if volume.parent is not None and is_bmi_volume_name(volume.parent):
                return True
            name = volume.parent
        return False

    def copy_external(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        self._enter("copy_external")
        if self._from_bmi(source):
            raise PermissionDenied(NOT_IMPORTABLE)
        src = self.volumes[source]
        self.volumes[volume] = FakeVolume(src.size, bytearray(src.data), dict(metadata))

    def copy_flattened(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        src = self.volumes[source]
        src.snapshots.add(TEMP_PREFIX + volume)
        self._enter("copy_flattened")
        self.volumes[volume] = FakeVolume(src.size, bytearray(src.data), dict(metadata))
        src.snapshots.discard(TEMP_PREFIX + volume)

    def seal(self, volume: str) -> None:
        self._enter("seal")
        vol = self.volumes[volume]
        vol.snapshots.add("golden")
        vol.sealed_data = bytearray(vol.data)
        vol.complete = True

    def clone(self, image_volume: str, volume: str, metadata: Mapping[str, str]) -> None:
        self._enter("clone")
        parent = self.volumes[image_volume]
        if "golden" not in parent.snapshots:
            raise FailedPrecondition(f"{image_volume} is not sealed")
        if volume in self.volumes:
            raise AlreadyExists(volume)
        self.volumes[volume] = FakeVolume(
            parent.size, bytearray(parent.data), dict(metadata), parent=image_volume, complete=True
        )

    def mark_complete(self, volume: str) -> None:
        self._enter("mark_complete")
        self.volumes[volume].complete = True

    def set_metadata(self, volume: str, metadata: Mapping[str, str]) -> None:
        self._enter("set_metadata")
        self.volumes[volume].metadata.update(metadata)

    def remove(self, volume: str) -> None:
        self._enter("remove")
        if volume not in self.volumes:
            return
        children = [n for n, v in self.volumes.items() if v.parent == volume]
        if children:
            raise FailedPrecondition(f"{volume} has clones: {', '.join(children)}")
        if any(s.startswith(TEMP_PREFIX) for s in self.volumes[volume].snapshots):
            raise FailedPrecondition(f"{volume} is being copied")
        del self.volumes[volume]

    def remove_temporary_snapshot(self, volume: str, snapshot: str) -> None:
        self._enter("remove_temporary_snapshot")
        self.volumes[volume].snapshots.discard(snapshot)

    def _info(self, name: str, vol: FakeVolume) -> VolumeInfo:
        return VolumeInfo(
            name=name,
            size_bytes=vol.size,
            metadata=dict(vol.metadata),
            parent=vol.parent,
            complete=vol.complete,
            temporary_snapshots=tuple(
                sorted(s for s in vol.snapshots if s.startswith(TEMP_PREFIX))
            ),
        )

    def get(self, volume: str) -> VolumeInfo | None:
        vol = self.volumes.get(volume)
        return None if vol is None or vol.external else self._info(volume, vol)

    def list_volumes(self) -> list[VolumeInfo]:
        self._enter("list_volumes")
        return [self._info(n, v) for n, v in self.volumes.items() if not v.external]

    def used_bytes(self, volume: str) -> int:
        self._enter("used_bytes")
        if volume not in self.volumes:
            raise NotFound(f"usage of {volume}: no such volume")  # as the RBD store says it
        vol = self.volumes[volume]
        return sum(1 for b in vol.data if b) if vol.parent is None else 0


    def content_digest(self, volume: str) -> str:
        self._enter("content_digest")
        vol = self.volumes[volume]
        data = vol.sealed_data if vol.sealed_data is not None else vol.data
        return hashlib.sha256(bytes(data).ljust(vol.size, b"\0")).hexdigest()

    def modified_since_sealed(self, volume: str) -> bool:
        vol = self.volumes[volume]
        return vol.sealed_data is not None and vol.sealed_data != vol.data


class FakeInspector:
    """Treats files starting with the qcow2 magic as qcow2 of (length - 4) bytes."""

    def inspect(self, path: Path, declared_format: str) -> ImageFormatInfo:
        content = Path(path).read_bytes()
        if declared_format == "qcow2":
            if not content.startswith(b"QFI\xfb"):
                raise InvalidArgument("not a valid qcow2 image")
            return ImageFormatInfo("qcow2", len(content) - 4, len(content) - 4)
        return ImageFormatInfo("raw", len(content), len(content))

    def convert_to_raw(self, path: Path, output: Path, timeout: float | None = None) -> None:
        output.write_bytes(Path(path).read_bytes()[len(b"QFI\xfb") :])


class FakeTargetDriver:
    """Targets in a dict; ``fail`` injects errors; ``logged_in`` says who is logged in."""

    def __init__(self, portal: str = "127.0.0.1:3260") -> None:
        self.targets: dict[str, TargetSpec] = {}
        self.fail: dict[str, Exception] = {}
        self.logged_in: set[str] = set()
        self._portal = portal
        # Called by ensure_exports after it got its specs: a concurrent call's moment.
        self.before_recreate = None

    def _enter(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def create_export(self, spec: TargetSpec) -> None:
        self._enter("create_export")
        self.targets[spec.iqn] = spec

    def remove_export(self, iqn: str) -> None:
        self._enter("remove_export")
        self.targets.pop(iqn, None)

    def ensure_exports(self, specs: Iterable[TargetSpec], still_wanted=None) -> list[str]:
        self._enter("ensure_exports")
        wanted = {s.iqn: s for s in specs}
        if self.before_recreate is not None:
            self.before_recreate()
        for iqn, spec in wanted.items():
            if iqn not in self.targets and (still_wanted is None or still_wanted(iqn)):
                self.targets[iqn] = spec
        return sorted(set(self.targets) - set(wanted))

    def list_exports(self) -> list[str]:
        return sorted(self.targets)

    def portals(self) -> list[str]:
        return [self._portal]

    def has_session(self, iqn: str) -> bool:
        return iqn in self.logged_in

    def sessions(self) -> set[str]:
        self._enter("sessions")
        return set(self.logged_in)


class FakeIsolator:
    """HIL as the core sees it: nodes with an owner and NICs, the provisioning network
    on or off each node's boot NIC. ``fail`` injects errors per method; ``calls`` records
    (method, node, caller) in order; ``observe(method)`` runs at each call, so a test can
    look at the other fakes at that moment."""

    has_free_pool = True

    def __init__(self) -> None:
        self.nodes: dict[str, IsolatedNode] = {}
        self.attached: set[str] = set()
        self.powered: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.calls: list[tuple[str, str, Principal]] = []
        self.detach_waits: list[bool] = []  # each detach's ``wait``
        self.attach_views: list[IsolatedNode] = []  # the node as each attach was given it
        self.observe = lambda method: None

    def add(self, name: str, project: str | None, mac: str, label: str = "eth0") -> None:
        self.nodes[name] = IsolatedNode(name, project, (NodeNic(label, mac),), label)

    def _enter(self, method: str, name: str, caller: Principal) -> None:
        self.calls.append((method, name, caller))
        self.observe(method)
        if method in self.fail:
            raise self.fail[method]

    def _visible(self, caller: Principal, name: str) -> IsolatedNode:
        view = self.nodes.get(name)
        if view is None:
            raise NotFound(f"HIL: Node {name} does not exist.")
        if view.project is not None and not caller.is_admin and caller.project != view.project:
            raise PermissionDenied("HIL: You do not have access to the required project.")
        return view

    def node(self, caller: Principal, name: str) -> IsolatedNode:
        self._enter("node", name, caller)
        return self._visible(caller, name)

    def attach_provisioning_network(self, caller: Principal, node: IsolatedNode) -> None:
        self.attach_views.append(node)
        self._enter("attach", node.name, caller)
        self._visible(caller, node.name)
        self.attached.add(node.name)

    def detach_provisioning_network(
        self, caller: Principal, name: str, *, wait: bool = True
    ) -> None:
        self.detach_waits.append(wait)
        self._enter("detach", name, caller)
        self._visible(caller, name)
        self.attached.discard(name)

    def project_nodes(self, caller: Principal, project: str) -> frozenset[str]:
        self._enter("project_nodes", project, caller)
        if not caller.is_admin and caller.project != project:
            raise PermissionDenied("HIL: You do not have access to the required project.")
        return frozenset(n for n, v in self.nodes.items() if v.project == project)

    def power_cycle(self, caller: Principal, name: str) -> None:
        self._enter("power_cycle", name, caller)
        self.powered.append(name)

    def free_nodes(self, caller: Principal) -> list[str]:
        self._enter("free_nodes", "", caller)
        return [n for n, v in self.nodes.items() if v.project is None]

    def connect_node(self, caller: Principal, project: str, name: str) -> None:
        self._enter("connect_node", name, caller)
        view = self._visible(caller, name)
        if view.project is not None:
            raise FailedPrecondition("HIL: Node is already owned by a project.")
        self.nodes[name] = replace(view, project=project)

    def detach_node(self, caller: Principal, project: str, name: str) -> None:
        self._enter("detach_node", name, caller)
        view = self._visible(caller, name)
        if name in self.attached:
            raise FailedPrecondition("HIL: Node attached to a network")
        self.nodes[name] = replace(view, project=None)


class SecondsClock:
    """A monotonic clock in seconds that moves only when a test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WallClock:
    """A UTC clock that moves only by ``advance``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
