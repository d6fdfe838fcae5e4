"""Where each of a host's K tgtd processes listens and is controlled.

Process i listens on the i-th portal of a list, or, when one portal is given, on its port
plus i; its control number is the first one plus i (``tgtd@<i>.service`` in contrib does
exactly that from 3260 and 0). Nodes are told the advertised portals of their target's
process: groups separated by ``;`` (one per process), or one group whose ports are
shifted by i the same way.
"""

from __future__ import annotations

import os

from bmi_server.core.errors import InvalidArgument

MAX_DEFAULT_PROCESSES = 8


def default_processes(cores: int | None = None) -> int:
    """K for the tgtds BMI runs itself: two per core, 2..8. More processes than cores
    still help, because adding a LUN mostly waits on Ceph; past a handful each
    process's fixed cost (a listener, a management thread) is all they add."""
    cores = cores or os.cpu_count() or 1
    return max(2, min(MAX_DEFAULT_PROCESSES, 2 * cores))


def _shifted(portal: str, by: int) -> str:
    host, _, port = portal.rpartition(":")
    return f"{host}:{int(port) + by}"


def split_list(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def process_portals(portals: list[str], count: int) -> list[str]:
    """The portal of each of ``count`` processes from the configured list."""
    if len(portals) >= count:
        return portals[:count]
    if len(portals) == 1:
        return [_shifted(portals[0], i) for i in range(count)]
    raise InvalidArgument(f"{len(portals)} tgtd portals listed for {count} tgtd processes: "
                     "list one per process, or one (the others on the next ports)")


def advertised_groups(advertised: str, portals: list[str]) -> list[list[str]]:
    """What nodes are told for each process whose portal is ``portals[i]``."""
    groups = [split_list(g) for g in advertised.split(";") if split_list(g)]
    if not groups:
        return [[p] for p in portals]
    if len(groups) >= len(portals):
        return groups[: len(portals)]
    if len(groups) == 1:
        return [[_shifted(p, i) for p in groups[0]] for i in range(len(portals))]
    raise InvalidArgument(f"{len(groups)} groups of advertised portals for {len(portals)} tgtd "
                     "processes: one group per process (separated by ';'), or one")
