"""`bmi node ...`: enrol, provision, watch nodes."""

from __future__ import annotations

import json
from datetime import UTC

import click
from bmi.v1 import nodes_pb2

from bmi_client.cli import State, emit_list, emit_one, pass_state, short_enum, to_dict, usage
from bmi_client.client import node_config, read_ssh_keys

NODE_COLUMNS = ["ID", "NAME", "PROJECT", "STATE", "MACS", "DISK"]


def _when(ts) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _node_row(n: nodes_pb2.Node) -> list[str]:
    return [
        n.id or "-",  # none yet: HIL put it in the project, BMI has not recorded it
        n.name,
        n.project or "-",
        short_enum(n, "state"),
        ",".join(n.macs),
        n.disk_id or "-",
    ]


def _node_details(n: nodes_pb2.Node) -> list[tuple[str, str]]:
    rows = list(zip([c.lower() for c in NODE_COLUMNS], _node_row(n), strict=True))
    if n.failure_reason:
        rows.append(("failure", n.failure_reason))
    rows.append(("image", n.image_id or "-"))
    if n.HasField("target"):
        rows += [
            ("target", n.target.iqn),
            ("portals", ", ".join(n.target.portals)),
            ("initiator", n.target.initiator_iqn),
        ]
    if n.HasField("session"):
        rows.append(("session", _session(n.session)))
    smbios = n.smbios
    ident = " ".join(
        f"{k}={v}"
        for k, v in (
            ("uuid", smbios.uuid),
            ("serial", smbios.serial),
            ("vendor", smbios.manufacturer),
            ("product", smbios.product),
        )
        if v
    )
    rows.append(("smbios", ident or "-"))
    rows.append(("boot mode", short_enum(n, "boot_mode")))
    if n.HasField("identity"):
        rows += _identity_rows(n)
    if n.HasField("inventory"):
        rows += _inventory_rows(n.inventory)
    if n.HasField("last_seen_time"):
        rows.append(("last seen", _when(n.last_seen_time)))
    for t in n.history:
        rows.append((_when(t.time), f"{_transition(t)}: {t.reason}"))
    return rows


def _identity_rows(n: nodes_pb2.Node) -> list[tuple[str, str]]:
    """What the node's config drive gives it; user-data and network config only as set
    or not (the server never returns them)."""
    ident = n.identity
    rows = [("hostname", ident.hostname), ("instance id", ident.instance_id)]
    if n.target.config_lun:
        rows.append(("config drive", f"LUN {n.target.config_lun} of {n.target.iqn}"))
    for key in ident.ssh_authorized_keys:
        kind, _, rest = key.partition(" ")
        blob, _, comment = rest.partition(" ")
        rows.append(("ssh key", f"{kind} ...{blob[-12:]} {comment}".rstrip()))
    rows.append(("user-data", "set" if ident.user_data_set else "-"))
    rows.append(("network config", "set" if ident.network_config_set else "-"))
    for key, value in sorted(ident.metadata.items()):
        rows.append((f"meta {key}", value))
    return rows


def _transition(t: nodes_pb2.NodeTransition) -> str:
    """``available -> provisioning``; a node's first record reads ``new -> discovered``."""
    before = short_enum(t, "from_state") if t.from_state else "new"
    return f"{before} -> {short_enum(t, 'to_state')}"


def _session(session: nodes_pb2.NodeSession) -> str:
    """logged in since T / ended at T / none seen yet."""
    if session.state == nodes_pb2.SESSION_STATE_LOGGED_IN:
        return f"logged in since {_when(session.time)}"
    if session.state == nodes_pb2.SESSION_STATE_ENDED:
        return f"ended at {_when(session.time)} (the machine is off, rebooting or elsewhere)"
    return "none seen yet"


def _inventory_rows(inv) -> list[tuple[str, str]]:
    """What the node's agent reported: one line per CPU/memory/firmware, disk and NIC."""
    rows = [
        ("cpu", f"{inv.cpu.count} x {inv.cpu.model or '?'} ({inv.cpu.architecture or '?'})"),
        ("memory", f"{inv.memory.physical_bytes / 2**30:.1f} GiB"),
        ("firmware", f"{short_enum(inv.firmware, 'kind')} {inv.firmware.vendor} "
                     f"{inv.firmware.version}".strip()),
    ]  # fmt: skip
    for d in inv.block_devices:
        kind = "hdd" if d.rotational else "ssd"
        rows.append((f"disk {d.name}", f"{d.size_bytes / 1e9:.1f} GB {kind} {d.model} {d.serial}"))
    for nic in inv.interfaces:
        link = f"up {nic.speed_mbps} Mb/s" if nic.carrier else "down"
        rows.append((f"nic {nic.name}", f"{nic.mac} {nic.driver} {link}"))
    if inv.HasField("collect_time"):
        rows.append(("inventory", f"{_when(inv.collect_time)} by {', '.join(inv.collectors)}"))
    return rows


@click.group()
def node() -> None:
    """Physical nodes: enrol, provision, watch."""


@node.command("ls")
@click.option("--project", default="", help="Only this project's nodes.")
@click.option("--state", "state_name", default="", help="Only nodes in this state.")
@click.option("--free", is_flag=True, help="List the nodes in no project instead (HIL).")
@pass_state
def node_ls(state: State, project: str, state_name: str, free: bool) -> None:
    """List nodes."""
    if free:
        if project or state_name:
            usage("--free lists HIL's free pool; it takes no --project or --state")
        names = state.client().free_nodes()
        if state.as_json:
            click.echo(json.dumps(names))
        else:
            click.echo("\n".join(names) if names else "no free nodes")
        return
    wanted = nodes_pb2.NODE_STATE_UNSPECIFIED
    if state_name:
        try:
            wanted = nodes_pb2.NodeState.Value("NODE_STATE_" + state_name.upper())
        except ValueError:
            usage(f"unknown state {state_name!r}")
    nodes = state.client().list_nodes(project=project, state=wanted)
    emit_list(state, nodes, NODE_COLUMNS, _node_row)


@node.command("show")
@click.argument("node_ref", metavar="NODE")
@pass_state
def node_show(state: State, node_ref: str) -> None:
    """Show NODE (id or name) with its history."""
    emit_one(state, state.client().get_node(node_ref), _node_details)


@node.command("enrol")
@click.argument("name")
@click.option("--project", required=True, help="Project to enrol the node in.")
@click.option("--mac", "macs", multiple=True, help="A MAC of the node (repeatable).")
@click.option("--discovered", default="", help="Id of a discovered node to enrol.")
@pass_state
def node_enrol(
    state: State, name: str, project: str, macs: tuple[str, ...], discovered: str
) -> None:
    """Enrol node NAME into --project (admins)."""
    if bool(macs) == bool(discovered):
        usage("give --mac (one or more) or --discovered, not both")
    emit_one(
        state, state.client().enroll_node(name, project, list(macs), discovered), _node_details
    )


def config_options(command):
    """--hostname, --ssh-key, --user-data, --network-config, --meta."""
    options = [
        click.option("--hostname", default=None,
                     help="Host name its OS gets (default: the node's name)."),
        click.option("--ssh-key", "ssh_keys", multiple=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="File of OpenSSH public keys (e.g. ~/.ssh/id_ed25519.pub) for "
                          "the image's default user (repeatable)."),
        click.option("--user-data", type=click.File("rb"),
                     help="cloud-init user-data: #cloud-config YAML or a script (64 KiB)."),
        click.option("--network-config", type=click.File("rb"),
                     help="cloud-init network config, version 1 or 2 (YAML or JSON)."),
        click.option("--meta", "metadata", multiple=True, metavar="KEY=VALUE",
                     help="Plain metadata for the OS (repeatable; no secrets)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _config(hostname, ssh_keys, user_data, network_config, metadata, *, always: bool):
    """The NodeConfig the options give; None when none was given and not ``always``."""
    if not always and hostname is None and not ssh_keys and user_data is None and (
        network_config is None
    ) and not metadata:
        return None
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            usage(f"--meta wants KEY=VALUE, not {item!r}")
        pairs[key] = value
    keys = [key for path in ssh_keys for key in read_ssh_keys(path)]
    return node_config(
        hostname=hostname or "",
        ssh_authorized_keys=keys,
        user_data=user_data.read() if user_data else b"",
        network_config=network_config.read() if network_config else b"",
        metadata=pairs,
    )


@node.command("provision")
@click.argument("node_ref", metavar="NODE")
@click.option("--image", default="", help="Boot a fresh clone of this image.")
@click.option("--disk", default="", help="Boot this existing disk.")
@click.option("--power-cycle", is_flag=True, help="Reboot the node once it is ready.")
@click.option(
    "--boot-mode",
    type=click.Choice(["sanboot", "agent"]),
    default="sanboot",
    show_default=True,
    help="iPXE boots the disk itself, or boots the node agent, which attaches it.",
)
@config_options
@pass_state
def node_provision(
    state: State, node_ref: str, image: str, disk: str, power_cycle: bool, boot_mode: str,
    hostname, ssh_keys, user_data, network_config, metadata,
) -> None:
    """Give NODE a disk, a config drive (host name, SSH keys, user-data for cloud-init),
    an iSCSI target and a boot plan."""
    if bool(image) == bool(disk):
        usage("give exactly one of --image or --disk")
    config = _config(hostname, ssh_keys, user_data, network_config, metadata, always=True)
    node = state.client().provision_node(
        node_ref,
        image=image,
        disk=disk,
        power_cycle=power_cycle,
        boot_mode=nodes_pb2.BootMode.Value("BOOT_MODE_" + boot_mode.upper()),
        config=config,
    )
    emit_one(state, node, _node_details)


@node.command("deprovision")
@click.argument("node_ref", metavar="NODE")
@click.option("--keep-disk", is_flag=True, help="Keep the disk as an ordinary disk.")
@pass_state
def node_deprovision(state: State, node_ref: str, keep_disk: bool) -> None:
    """Remove NODE's target, boot plan and (unless kept) disk."""
    emit_one(state, state.client().deprovision_node(node_ref, keep_disk), _node_details)


@node.command("reprovision")
@click.argument("node_ref", metavar="NODE")
@config_options
@pass_state
def node_reprovision(
    state: State, node_ref: str, hostname, ssh_keys, user_data, network_config, metadata
) -> None:
    """Replace NODE's disk with a fresh clone of its image, and its config drive with a
    new instance id. With any of the config options, they replace the whole config the
    node had; without, it keeps it."""
    config = _config(hostname, ssh_keys, user_data, network_config, metadata, always=False)
    emit_one(state, state.client().reprovision_node(node_ref, config=config), _node_details)


@node.command("take")
@click.argument("name")
@click.option("--project", default="", help="Project to take it into (admins).")
@pass_state
def node_take(state: State, name: str, project: str) -> None:
    """Take free node NAME into your project (HIL)."""
    emit_one(state, state.client().take_node(name, project), _node_details)


@node.command("give")
@click.argument("node_ref", metavar="NODE")
@pass_state
def node_give(state: State, node_ref: str) -> None:
    """Give NODE back to the free pool (HIL); deprovision it first."""
    state.client().give_back_node(node_ref)
    if state.as_json:
        click.echo(json.dumps({"given_back": node_ref}))
    else:
        click.echo(f"gave back node {node_ref}")


@node.command("watch")
@click.option("--project", default="", help="Only this project's nodes.")
@click.option("--node", "node_ref", default="", help="Only this node.")
@click.option("--count", type=int, default=0, help="Stop after this many events.")
@pass_state
def node_watch(state: State, project: str, node_ref: str, count: int) -> None:
    """Print node transitions as they happen (Ctrl-C to stop)."""
    stream = state.client().watch_nodes(project=project, node=node_ref)
    seen = 0
    try:
        for event in stream:
            t = event.transition
            if state.as_json:
                click.echo(json.dumps(to_dict(event)))
            else:
                click.echo(f"{_when(t.time)} {event.node.name} {_transition(t)}: {t.reason}")
            seen += 1
            if count and seen >= count:
                break
    finally:
        stream.cancel()
