"""`bmi quota show|set`: a project's limits and use."""

from __future__ import annotations

import json
import re

import click
from bmi.v1 import quotas_pb2
from rich.table import Table

from bmi_client.cli import State, _stdout, human_size, pass_state, to_dict, usage

# (field of Quota, row name, whether it counts bytes)
AMOUNTS = (("virtual_bytes", "bytes", True), ("images", "images", False),
           ("disks", "disks", False))
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)


class Size(click.ParamType):
    """Bytes, or a size like 500G, 10T, 1.5TiB (powers of 1024)."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a size (bytes, or like 500G, 10T)", param, ctx)
        number, unit = match.groups()
        return int(float(number) * 1024 ** " KMGTPE".index(unit.upper() or " "))


def quota_rows(quota: quotas_pb2.Quota) -> list[list[str]]:
    rows = []
    for field, label, is_bytes in AMOUNTS:
        amount = getattr(quota, field)
        show = human_size if is_bytes else str
        if amount.limit == 0:
            limit, free = "unlimited", "-"
        else:
            limit = show(amount.limit)
            free = show(amount.limit - amount.used) if amount.used <= amount.limit else (
                f"0 (over by {show(amount.used - amount.limit)})")
        rows.append([label, limit, show(amount.used), free,
                     "project" if amount.overridden else "default"])
    return rows


def emit_quota(state: State, quota: quotas_pb2.Quota) -> None:
    if state.as_json:
        click.echo(json.dumps(to_dict(quota), indent=2))
        return
    table = Table(title=f"quota of project {quota.project}", title_justify="left",
                  box=None, header_style="bold")
    for column in ("", "LIMIT", "USED", "FREE", "SET BY"):
        table.add_column(column, no_wrap=True)
    for row in quota_rows(quota):
        table.add_row(*row)
    _stdout().print(table)


@click.group()
def quota() -> None:
    """Per-project limits: virtual bytes, images, disks."""


@quota.command("show")
@click.option("--project", default="", help="The project (default: yours; admins: required).")
@pass_state
def quota_show(state: State, project: str) -> None:
    """Show a project's limits, use and room left."""
    emit_quota(state, state.client().get_quota(project))


@quota.command("set")
@click.argument("project")
@click.option("--bytes", "max_bytes", type=Size(), metavar="SIZE",
              help="Limit on the virtual bytes of images and disks, e.g. 10T, 500G.")
@click.option("--images", "max_images", type=click.IntRange(min=0), metavar="N",
              help="Limit on the number of images.")
@click.option("--disks", "max_disks", type=click.IntRange(min=0), metavar="N",
              help="Limit on the number of disks.")
@click.option("--reset", is_flag=True,
              help="Limits not given here go back to the server's defaults.")
@pass_state
def quota_set(
    state: State,
    project: str,
    max_bytes: int | None,
    max_images: int | None,
    max_disks: int | None,
    reset: bool,
) -> None:
    """Give PROJECT limits of its own (admins). 0 means no limit."""
    if max_bytes is None and max_images is None and max_disks is None and not reset:
        usage("nothing to set: give --bytes, --images, --disks or --reset")
    quota_reply = state.client().set_quota(
        project, max_virtual_bytes=max_bytes, max_images=max_images, max_disks=max_disks,
        reset=reset,
    )
    emit_quota(state, quota_reply)
