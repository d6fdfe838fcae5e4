"""What a gateway must do to make its tgtd equal to the desired targets: pure decisions
(``plan``) and their execution against a narrow driver (``apply``), so both are tested
with a fake.

Ownership: BMI owns exactly the targets under its IQN prefix. Others are never touched,
whatever they are. An owned target no desired one names is removed.

Drift, per owned target that is desired:
- missing, LUN 1 backed by another volume, or LUN 2 (the node's config drive) backed by
  another volume or there when the spec has none: (re)create it (a wrong volume means
  the target must go: tgtd cannot swap a LUN's backing store);
- ACL entries or CHAP users besides the desired ones: unbind them;
- anything else missing (a LUN, CHAP binding, ACL entry), a spec changed since this daemon
  last applied it, or one it never applied (first pass after a start): ``create_export``,
  which completes the target and replaces its CHAP account, so the secret is the spec's
  (tgtd never shows secrets, so that is the only way to be sure of it). None of this
  drops a logged-in initiator: only removal does.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from bmi_server.adapters.tgt.tgtadm import CONFIG_LUN, LUN, LiveTarget
from bmi_server.core.errors import BmiError, Unavailable
from bmi_server.core.models import TargetSpec

log = logging.getLogger(__name__)


class LocalTargets(Protocol):
    """The local tgtd, as the gateway needs it (production: TgtTargetDriver)."""

    def live_targets(self) -> dict[str, LiveTarget]: ...

    def backing_store(self, spec: TargetSpec) -> str: ...

    def create_export(self, spec: TargetSpec) -> None: ...

    def remove_export(self, iqn: str) -> None: ...

    def unbind_initiator(self, iqn: str, entry: str) -> None: ...

    def unbind_account(self, iqn: str, user: str) -> None: ...


class Kind(enum.StrEnum):
    CREATE = "create"  # missing: make it
    REPLACE = "replace"  # wrong backing volume: remove, then make it
    REPAIR = "repair"  # extras to unbind and/or something to (re)set
    REMOVE = "remove"  # owned, not desired


@dataclass(frozen=True)
class Step:
    kind: Kind
    iqn: str
    spec: TargetSpec | None = None
    extra_acl: tuple[str, ...] = ()
    extra_accounts: tuple[str, ...] = ()
    why: str = ""


def plan(
    desired: Mapping[str, TargetSpec],
    live: Mapping[str, LiveTarget],
    applied: Mapping[str, TargetSpec],
    *,
    prefix: str,
    backing_store: Callable[[TargetSpec], str],
) -> list[Step]:
    """Steps that make ``live`` equal ``desired``. ``applied``: what this daemon last
    applied (a target it never applied since its start gets a REPAIR, which resets CHAP).
    ``backing_store(spec)`` is the path tgtd shows for the spec's LUN 1 (and, for the
    spec's config volume in its place, for LUN 2)."""
    steps: list[Step] = []
    for iqn, spec in sorted(desired.items()):
        target = live.get(iqn)
        if target is None:
            steps.append(Step(Kind.CREATE, iqn, spec, why="missing"))
            continue
        if wrong := _wrong_backing(target, spec, backing_store):
            steps.append(Step(Kind.REPLACE, iqn, spec, why=wrong))
            continue
        extra_acl = tuple(sorted(target.acl - {spec.initiator_iqn}))
        extra_accounts = tuple(sorted(target.accounts - {spec.chap_user}))
        complete = (LUN in target.luns and spec.chap_user in target.accounts
                    and spec.initiator_iqn in target.acl
                    and (not spec.config_volume or CONFIG_LUN in target.luns))
        reasons = [
            *(["ACL allows " + ", ".join(extra_acl)] if extra_acl else []),
            *(["CHAP users " + ", ".join(extra_accounts)] if extra_accounts else []),
            *([] if complete else ["incomplete"]),
            *([] if applied.get(iqn) == spec else ["not applied by this run"]),
        ]
        if reasons:
            steps.append(Step(Kind.REPAIR, iqn, spec, extra_acl, extra_accounts,
                              why="; ".join(reasons)))
    for iqn in sorted(live):
        if iqn.startswith(prefix) and iqn != prefix and iqn not in desired:
            steps.append(Step(Kind.REMOVE, iqn, why="not desired"))
    return steps


def _wrong_backing(
    target: LiveTarget, spec: TargetSpec, backing_store: Callable[[TargetSpec], str]
) -> str:
    """Why a LUN of ``target`` is not what ``spec`` wants ("" if both are right or not
    there yet: missing LUNs are made by a repair)."""
    want = backing_store(spec)
    if LUN in target.luns and target.backing.get(LUN, want) != want:
        return f"LUN {LUN} is {target.backing[LUN]}, not {want}"
    if CONFIG_LUN in target.luns:
        if not spec.config_volume:
            return f"LUN {CONFIG_LUN} is {target.backing.get(CONFIG_LUN, '?')}, not wanted"
        want = backing_store(dataclasses.replace(spec, volume=spec.config_volume))
        if target.backing.get(CONFIG_LUN, want) != want:
            return f"LUN {CONFIG_LUN} is {target.backing[CONFIG_LUN]}, not {want}"
    return ""


@dataclass
class Outcome:
    """What ``apply`` achieved: specs now applied, failures by IQN, removals done."""

    applied: dict[str, TargetSpec] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


def apply(steps: list[Step], driver: LocalTargets) -> Outcome:
    """Run the steps one by one; a failing step is recorded and the others go on.
    Unavailable (tgtd unreachable) propagates: nothing else would work either."""
    outcome = Outcome()
    for step in steps:
        try:
            if step.kind is Kind.REMOVE:
                driver.remove_export(step.iqn)
                outcome.removed.append(step.iqn)
                log.info("removed %s (%s)", step.iqn, step.why)
                continue
            assert step.spec is not None
            if step.kind is Kind.REPLACE:
                driver.remove_export(step.iqn)
            for entry in step.extra_acl:
                driver.unbind_initiator(step.iqn, entry)
            for user in step.extra_accounts:
                driver.unbind_account(step.iqn, user)
            driver.create_export(step.spec)
            outcome.applied[step.iqn] = step.spec
            log.info("%s %s (%s)", step.kind.value, step.iqn, step.why)
        except Unavailable:
            raise
        except BmiError as exc:
            outcome.failed[step.iqn] = exc.message
            log.warning("could not %s %s: %s", step.kind.value, step.iqn, exc.message)
    return outcome
