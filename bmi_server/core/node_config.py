"""A node's identity for its OS: host name, SSH keys, user-data, network config and
metadata, checked here and delivered as a config drive cloud-init reads as it is.

The drive is a small FAT file system labelled ``cidata`` (cloud-init's NoCloud
datasource) holding ``meta-data`` (``instance-id``, ``local-hostname``, ``public-keys``,
the caller's key/values under ``meta``), ``user-data`` and, if given, ``network-config``.
It is a volume of its own, exported as LUN 2 of the node's target: the same CHAP account
and initiator ACL as the disk, so it reaches that node only, and the session the node's
OS (or the agent) opens for its disk brings it along. Nothing in the golden image or the
tenant's disk changes. A new ``instance-id`` at every provisioning makes cloud-init run
its per-instance steps again (host name, new SSH host keys).

Every limit is checked before anything is changed; the messages name the field, never
its content (user-data may hold secrets).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import vfat
from . import volume_metadata
from .errors import AlreadyExists, BmiError, InvalidArgument
from .faults import crash_point
from .lifecycle import HAS_EXPORT
from .models import Node, NodeConfig, VolumeInfo
from .naming import volume_name
from .ports import ImageStore, NodeStateStore

if TYPE_CHECKING:
    from .reconcile import ReconcileReport

CONFIG_LUN = 2  # LUN 0: tgt's controller; LUN 1: the disk
LABEL = "cidata"  # what NoCloud looks for
DRIVE_BYTES = vfat.DEFAULT_SIZE  # 2 MiB; thin: only what is written is allocated

MAX_USER_DATA = 64 << 10
MAX_NETWORK_CONFIG = 64 << 10
MAX_SSH_KEYS = 32
# One key line, in UTF-8 bytes (a comment may hold any printable character; bytes bound
# what meta-data holds, so the largest config fits its drive); an RSA 16384-bit key is
# ~2.8 KiB.
MAX_SSH_KEY_LENGTH = 16 << 10
MAX_METADATA_ENTRIES = 32
MAX_METADATA_VALUE = 1024
MAX_METADATA_BYTES = 16 << 10
MAX_HOSTNAME = 253

INSTANCE_PREFIX = "i-"
_INSTANCE = re.compile(r"i-([0-9a-f]{16})")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What cloud-init recognises as user-data (its first bytes); anything else it ignores.
USER_DATA_STARTS = (b"#cloud-config", b"#!", b"#include", b"#cloud-boothook",
                    b"#part-handler", b"## template: jinja")  # fmt: skip
_MIME_STARTS = (b"content-type:", b"mime-version:")
_GZIP = b"\x1f\x8b"
_VERSION_LINE = re.compile(r"^\s*version:\s*['\"]?([12])['\"]?\s*(#.*)?$", re.MULTILINE)


# -- checking what a caller gave ------------------------------------------------------------


@dataclass(frozen=True)
class ConfigRequest:
    """A node's config as a caller gave it, unchecked (``check`` makes a NodeConfig)."""

    hostname: str = ""
    ssh_keys: tuple[str, ...] = ()
    user_data: bytes = field(default=b"", repr=False)
    network_config: bytes = field(default=b"", repr=False)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def check(self, node_name: str) -> NodeConfig:
        return check_config(hostname=self.hostname, ssh_keys=self.ssh_keys,
                            user_data=self.user_data, network_config=self.network_config,
                            metadata=self.metadata, default_hostname=node_name)  # fmt: skip


def check_config(
    *,
    hostname: str = "",
    ssh_keys: Iterable[str] = (),
    user_data: bytes = b"",
    network_config: bytes = b"",
    metadata: Mapping[str, str] | None = None,
    default_hostname: str,
) -> NodeConfig:
    """The normalised config; InvalidArgument naming the first bad field otherwise.
    ``default_hostname`` (the node's name) is used, made a valid host name, when
    ``hostname`` is empty."""
    return NodeConfig(
        hostname=check_hostname(hostname) if hostname else hostname_for(default_hostname),
        ssh_keys=check_ssh_keys(ssh_keys),
        user_data=check_user_data(user_data),
        network_config=check_network_config(network_config),
        metadata=check_metadata(metadata or {}),
    )


def check_hostname(hostname: str) -> str:
    """A DNS name: labels of letters, digits and inner hyphens, 1-63 each, 253 in all;
    the last label not all digits (so it is no IP address)."""
    if len(hostname) > MAX_HOSTNAME:
        raise InvalidArgument(f"hostname is longer than {MAX_HOSTNAME} characters")
    labels = hostname.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise InvalidArgument(
            f"hostname {hostname[:80]!r} is not a DNS name: dot-separated labels of letters, "
            "digits and hyphens (not first or last), 1 to 63 characters each, the last not "
            "all digits"
        )
    return hostname


def hostname_for(name: str) -> str:
    """A valid host name made from a node's name ('_' becomes '-', empty labels go)."""
    labels = []
    for part in name.lower().replace("_", "-").split("."):
        label = re.sub(r"[^a-z0-9-]", "", part).strip("-")[:63].strip("-")
        if label:
            labels.append(label)
    if not labels:
        return "node"
    if labels[-1].isdigit():
        labels = ["-".join(labels)[:63].strip("-")]
    return ".".join(labels)[:MAX_HOSTNAME].strip(".-")


def check_ssh_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Each an OpenSSH public key (``type base64 [comment]``, as in ``id_ed25519.pub``),
    parsed; duplicates dropped (first kept)."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    keys = list(keys)
    if len(keys) > MAX_SSH_KEYS:
        raise InvalidArgument(f"at most {MAX_SSH_KEYS} SSH keys")
    for i, key in enumerate(keys):
        what = f"ssh_authorized_keys[{i}]"
        if len(key.encode()) > MAX_SSH_KEY_LENGTH:
            raise InvalidArgument(f"{what} is longer than {MAX_SSH_KEY_LENGTH} bytes")
        kind, blob, comment = _parse_public_key(key.strip(), what)
        if (kind, blob) not in seen:
            seen.add((kind, blob))
            out.append(f"{kind} {blob}" + (f" {comment}" if comment else ""))
    return tuple(out)


def check_user_data(data: bytes) -> bytes:
    if len(data) > MAX_USER_DATA:
        raise InvalidArgument(f"user_data is larger than {MAX_USER_DATA} bytes")
    if not data:
        return b""
    head = data[:64]
    if not (head.startswith(USER_DATA_STARTS) or head.startswith(_GZIP)
            or head.lower().startswith(_MIME_STARTS)):  # fmt: skip
        # Its content is never echoed: it may hold secrets.
        raise InvalidArgument(
            "user_data is not a format cloud-init runs: it must start with '#cloud-config', "
            "'#!' (a script), '#include', '#cloud-boothook', '#part-handler', "
            "'## template: jinja', a MIME multipart header, or be gzip-compressed"
        )
    return data


def check_network_config(data: bytes) -> bytes:
    """cloud-init network config (version 1 or 2), YAML or JSON: text within limits with
    a ``version``; the rest is cloud-init's to read."""
    if len(data) > MAX_NETWORK_CONFIG:
        raise InvalidArgument(f"network_config is larger than {MAX_NETWORK_CONFIG} bytes")
    if not data:
        return b""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("network_config is not UTF-8 text") from None
    if any(c < " " and c not in "\t\r\n" for c in text) or "\x7f" in text:
        raise InvalidArgument("network_config holds control characters")
    if text.lstrip().startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise InvalidArgument("network_config starts like JSON but is not JSON") from None
        inner = parsed.get("network", parsed) if isinstance(parsed, dict) else None
        if not isinstance(inner, dict) or inner.get("version") not in (1, 2):
            raise InvalidArgument("network_config has no 'version': 1 or 2")
        return data
    if re.search(r"^ *\t", text, re.MULTILINE):
        raise InvalidArgument("network_config indents with tabs, which YAML does not allow")
    if not _VERSION_LINE.search(text):
        raise InvalidArgument(
            "network_config has no 'version: 1' or 'version: 2' (cloud-init's network "
            "config formats)"
        )
    return data


def check_metadata(metadata: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"at most {MAX_METADATA_ENTRIES} metadata entries")
    total = 0
    for key, value in metadata.items():
        if not _META_KEY.fullmatch(key):
            raise InvalidArgument(
                f"metadata key {key[:80]!r} is invalid: 1 to 64 letters, digits, '_', '.' "
                "and '-', starting with a letter or digit"
            )
        if len(value) > MAX_METADATA_VALUE or not value.isprintable():
            raise InvalidArgument(
                f"metadata {key!r}: the value must be at most {MAX_METADATA_VALUE} printable "
                "characters"
            )
        total += len(key.encode()) + len(value.encode())
    if total > MAX_METADATA_BYTES:
        raise InvalidArgument(f"metadata is larger than {MAX_METADATA_BYTES} bytes in all")
    return tuple(sorted(metadata.items()))


# -- OpenSSH public keys ------------------------------------------------------------------

_ECDSA_POINT = {"nistp256": 65, "nistp384": 97, "nistp521": 133}


def _parse_public_key(line: str, what: str) -> tuple[str, str, str]:
    """(type, base64 blob, comment) of one public key line, its blob fully parsed."""
    if "\n" in line or "\r" in line or "\0" in line:
        raise InvalidArgument(f"{what} must be one line")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise InvalidArgument(f"{what} is not an OpenSSH public key ('type base64 [comment]')")
    kind, blob = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) > 2 else ""
    if kind == "ssh-dss":
        raise InvalidArgument(f"{what} is a DSA key, which OpenSSH no longer accepts")
    if kind not in _KEY_PARSERS:
        raise InvalidArgument(
            f"{what} has key type {kind[:40]!r}; use one of {', '.join(sorted(_KEY_PARSERS))} "
            "(a public key, as in ~/.ssh/id_ed25519.pub, without options)"
        )
    if not comment.isprintable():
        raise InvalidArgument(f"{what} has control characters in its comment")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what}: the key is not valid base64") from None
    try:
        reader = _Reader(raw)
        if reader.string() != kind.encode():
            raise ValueError("the key's type does not match its data")
        _KEY_PARSERS[kind](reader)
        if reader.left():
            raise ValueError("trailing data")
    except (ValueError, struct.error) as exc:
        raise InvalidArgument(f"{what} is not a valid {kind} key: {exc}") from None
    return kind, blob, comment


class _Reader:
    """RFC 4251 wire types."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def string(self) -> bytes:
        (length,) = struct.unpack_from(">I", self._data, self._at)
        start = self._at + 4
        if start + length > len(self._data):
            raise ValueError("truncated")
        self._at = start + length
        return self._data[start : self._at]

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def left(self) -> int:
        return len(self._data) - self._at


def _rsa(r: _Reader) -> None:
    exponent, modulus = r.mpint(), r.mpint()
    if exponent < 3 or exponent % 2 == 0:
        raise ValueError("bad public exponent")
    if modulus.bit_length() < 1024:
        raise ValueError("RSA keys need at least 1024 bits")


def _ed25519(r: _Reader) -> None:
    if len(r.string()) != 32:
        raise ValueError("an Ed25519 key is 32 bytes")


def _ecdsa(curve: str):
    def parse(r: _Reader) -> None:
        if r.string() != curve.encode():
            raise ValueError(f"not a {curve} key")
        point = r.string()
        if len(point) != _ECDSA_POINT[curve] or point[0] != 4:
            raise ValueError("bad curve point")

    return parse


def _security_key(inner):
    def parse(r: _Reader) -> None:
        inner(r)
        if not r.string():
            raise ValueError("no application")

    return parse


_KEY_PARSERS = {
    "ssh-rsa": _rsa,
    "ssh-ed25519": _ed25519,
    "ecdsa-sha2-nistp256": _ecdsa("nistp256"),
    "ecdsa-sha2-nistp384": _ecdsa("nistp384"),
    "ecdsa-sha2-nistp521": _ecdsa("nistp521"),
    "sk-ssh-ed25519@openssh.com": _security_key(_ed25519),
    "sk-ecdsa-sha2-nistp256@openssh.com": _security_key(_ecdsa("nistp256")),
}


# -- the drive ----------------------------------------------------------------------------


def new_instance_id() -> str:
    return INSTANCE_PREFIX + secrets.token_hex(8)


def drive_volume(instance_id: str) -> str:
    """The config drive's volume is named after the instance it serves."""
    match = _INSTANCE.fullmatch(instance_id)
    if match is None:
        raise ValueError(f"bad instance id {instance_id!r}")
    return volume_name("cfg-" + match.group(1))


def seed_files(config: NodeConfig, instance_id: str) -> list[tuple[str, bytes]]:
    """The NoCloud seed: ``meta-data`` (JSON, which YAML readers accept), ``user-data``
    (required by NoCloud; empty when none was given), ``network-config`` if given."""
    meta: dict[str, object] = {"instance-id": instance_id, "local-hostname": config.hostname}
    if config.ssh_keys:
        meta["public-keys"] = list(config.ssh_keys)
    if config.metadata:
        meta["meta"] = dict(config.metadata)
    files = [
        ("meta-data", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()),
        ("user-data", config.user_data),
    ]
    if config.network_config:
        files.append(("network-config", config.network_config))
    return files


def drive_image(config: NodeConfig, instance_id: str) -> bytes:
    """The whole drive; the same config and instance id always give the same bytes."""
    return vfat.build(seed_files(config, instance_id), label=LABEL, seed=instance_id,
                      size_bytes=DRIVE_BYTES)  # fmt: skip


class ConfigDrives:
    """Config drive volumes in the image store. A drive is made after the node's record
    names it (so reconcile knows what to remove) and marked complete last."""

    def __init__(self, store: ImageStore, nodes: NodeStateStore) -> None:
        self._store = store
        self._nodes = nodes

    def make(self, node: Node, config: NodeConfig) -> None:
        """Write the drive of ``node``'s current provisioning (``node.target``)."""
        assert node.target is not None and node.target.config_volume
        volume = node.target.config_volume
        image = drive_image(config, node.instance_id)
        metadata = volume_metadata.for_config_drive(node)
        try:
            self._store.create(volume, len(image), metadata)
        except AlreadyExists:
            # Left by an attempt that failed before its rollback could remove it.
            self._store.remove(volume)
            self._store.create(volume, len(image), metadata)
        used = image.rstrip(b"\0")
        self._store.write(volume, 0, used + bytes(-len(used) % vfat.SECTOR))
        crash_point("node.config.before_complete")
        self._store.mark_complete(volume)

    def remove(self, volume: str) -> None:
        """Idempotent: a missing volume is not an error."""
        self._store.remove(volume)

    def settle(
        self,
        listed: Mapping[str, VolumeInfo],
        report: ReconcileReport,
        *,
        remove_unknown: bool = False,
    ) -> None:
        """After a crash (``reconcile``): ``listed`` are the config drive volumes the store
        held, listed before the nodes are read here (a node names its drive before the
        drive is made, so a drive being made now is claimed). A drive no node names is
        removed when it is incomplete, or when it was made for a node of this database
        (which no longer names it): it holds nothing a record does not. A complete drive
        of a node this database does not know (another deployment's on a shared pool, or
        one made after the backup the database was restored from) is only reported, as
        complete disks are (``remove_unknown`` removes it). The drive of an exported
        node that is missing or incomplete (lost from the store) is written again from
        the node's record."""
        claimed = {
            n.target.config_volume: n
            for n in self._nodes.all_nodes()
            if n.target is not None and n.target.config_volume
        }
        for name in sorted(set(listed) - set(claimed)):
            volume = listed[name]
            node_id = volume.metadata.get("bmi.node", "")
            ours = bool(node_id) and self._nodes.get_node(node_id) is not None
            if volume.complete and not ours and not remove_unknown:
                report.problems.append(
                    f"config drive volume {name} (node {node_id or '?'}) is unknown to the "
                    "database (`bmi-server admin reconcile --remove-unknown` removes it)"
                )
                continue
            try:
                self._store.remove(name)
            except BmiError as exc:
                report.problems.append(f"could not remove config drive {name}: {exc.message}")
                continue
            report.removed_volumes.add(name)
            report.repaired.append(f"removed config drive volume {name}, which no node names")
        for name, node in sorted(claimed.items()):
            volume = listed.get(name)
            if node.state not in HAS_EXPORT or (volume is not None and volume.complete):
                continue  # in flight: the node's reconcile settles it; failed: deprovision
            try:
                self._rewrite(node, name, report)
            except BmiError as exc:
                report.problems.append(
                    f"could not write the config drive of node {node.name} again: {exc.message}"
                )

    def _rewrite(self, node: Node, name: str, report: ReconcileReport) -> None:
        current = self._store.get(name)
        if current is not None and current.complete:
            return  # made since the listing
        fresh = self._nodes.get_node(node.id)
        config = self._nodes.get_node_config(node.id)
        if (fresh is None or fresh.state not in HAS_EXPORT or fresh.target is None
                or fresh.target.config_volume != name):  # fmt: skip
            return  # reprovisioned or deprovisioned meanwhile
        if config is None:
            report.problems.append(f"node {node.name} has no config to write its drive from")
            return
        if current is not None:
            self._store.remove(name)
        self.make(fresh, config)
        report.repaired.append(
            f"wrote the config drive {name} of node {node.name} again (it was "
            f"{'incomplete' if current is not None else 'missing'})"
        )
