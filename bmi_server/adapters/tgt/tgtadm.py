"""TargetDriver on tgtd: one iSCSI target per disk, managed one command at a time with tgtadm.

Each target gets LUN 1 backed by the disk's RBD volume (tgt's ``rbd`` backing store), LUN 2
backed by the node's config drive volume when the spec names one, its own CHAP account and an
ACL naming the one initiator allowed in (by name: behind NAT or QEMU user networking every
node comes from the same address). Both LUNs are behind the same CHAP account and ACL. No
configuration file is ever written: tgtd holds targets in memory only, and
``ensure_exports`` re-creates them after a restart.

Cost: this process keeps an ``iqn -> tid`` map, read once from ``tgtadm --op show`` (and again by
``ensure_exports``/``list_exports``), so a create or remove runs a fixed handful of tgtadm
commands however many targets exist. The map is this process's view; a second process sharing
the tgtd is noticed when tgtadm refuses a tid, which triggers a one-off re-read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from bmi_server.core.errors import BmiError, FailedPrecondition, InvalidArgument, Unavailable
from bmi_server.core.models import TargetSpec

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], tuple[int, str, str]]
"""Runs one command (argv) and returns (exit code, stdout, stderr); a negative code means the
command could not be run at all (missing binary, timeout)."""

LUN = 1  # LUN 0 is tgt's controller
CONFIG_LUN = 2  # the node's config drive (core/node_config.py)
MAX_TID_ATTEMPTS = 64


def subprocess_runner(timeout: float = 30) -> Runner:
    def run(argv: Sequence[str]) -> tuple[int, str, str]:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except FileNotFoundError:
            return -1, "", f"{argv[0]} not found (install Debian's tgt)"
        except subprocess.TimeoutExpired:
            return -1, "", f"{argv[0]} timed out after {timeout:g} s"
        return done.returncode, done.stdout, done.stderr

    return run


@dataclass
class LiveTarget:
    """One target as ``tgtadm --op show --mode target`` describes it."""

    tid: int
    iqn: str
    luns: set[int] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)  # incoming CHAP users
    acl: set[str] = field(default_factory=set)  # initiator names or addresses
    backing: dict[int, str] = field(default_factory=dict)  # LUN -> backing store path
    sessions: int = 0  # I_T nexuses: initiators logged in now


_TARGET_OR_NEXUS = re.compile(r"^Target \d+: (\S+)$|^\s+I_T nexus: \d+", re.MULTILINE)


def parse_sessions(show: str) -> set[str]:
    """IQNs of the targets with an I_T nexus (a logged-in initiator) in the output of
    ``tgtadm --op show --mode target``: a scan for two kinds of line, many times faster
    than ``parse_targets`` on thousands of targets."""
    logged_in: set[str] = set()
    current = None
    for match in _TARGET_OR_NEXUS.finditer(show):
        if match.group(1):
            current = match.group(1)
        elif current is not None:
            logged_in.add(current)
    return logged_in


def is_initiator_name(acl_entry: str) -> bool:
    """ACL entries are initiator names (iqn./eui./naa.) or addresses (ALL, an IP)."""
    return acl_entry.lower().startswith(("iqn.", "eui.", "naa."))


def parse_targets(show: str) -> dict[str, LiveTarget]:
    """Targets by IQN from the output of ``tgtadm --op show --mode target``."""
    targets: dict[str, LiveTarget] = {}
    current: LiveTarget | None = None
    section = ""
    lun = -1
    for line in show.splitlines():
        if line.startswith("Target "):
            head, _, iqn = line.partition(": ")
            current = LiveTarget(int(head.split()[1]), iqn.strip())
            targets[current.iqn] = current
            section = ""
        elif current is None or not line.strip():
            continue
        elif line.startswith("    ") and not line.startswith("     "):
            section = line.strip()  # e.g. "LUN information:"
        elif section == "LUN information:" and line.strip().startswith("LUN: "):
            lun = int(line.split(":", 1)[1])
            current.luns.add(lun)
        elif section == "LUN information:" and line.strip().startswith("Backing store path:"):
            current.backing[lun] = line.split(":", 1)[1].strip()
        elif section == "I_T nexus information:" and line.strip().startswith("I_T nexus:"):
            current.sessions += 1
        elif section == "Account information:" and line.startswith("        "):
            user = line.strip()
            if not user.endswith("(outgoing)"):
                current.accounts.add(user)
        elif section == "ACL information:" and line.startswith("        "):
            current.acl.add(line.strip())
    return targets


class _TgtadmFailed(Exception):
    """tgtadm refused a request; ``message`` is its error text (never contains a secret)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def exists(self) -> bool:
        return "already exists" in self.message

    @property
    def no_target(self) -> bool:
        return "can't find the target" in self.message


class _StaleTid(Exception):
    """The map named a tid tgtd no longer has (tgtd restarted): forget it and start over."""


@dataclass
class _Known:
    tid: int
    chap_users: set[str]


class TgtTargetDriver:
    def __init__(
        self,
        ceph_conf: str,
        pool: str,
        portal: str,
        control: int | None = None,
        iqn_prefix: str = "iqn.2026-11.org.moc.bmi:",
        runner: Runner | None = None,
        rbd_user: str | None = None,
        read_now: bool = True,
    ) -> None:
        """``read_now`` False: tgtd's targets are read on first use, not here."""
        # bsopts are ';'-separated key=value pairs (conf=, id=, cluster=) in tgt-rbd; its
        # id= is librados' id, the user's name without "client.".
        rbd_user = (rbd_user or "").removeprefix("client.")
        for name, value in (("ceph_conf", ceph_conf), ("rbd_user", rbd_user)):
            if ";" in value:
                raise ValueError(f"{name} must not contain ';': {value!r}")
        self._bsopts = f"conf={ceph_conf}" + (f";id={rbd_user}" if rbd_user else "")
        self._pool = pool
        self._portal = portal
        self._prefix = iqn_prefix
        self._base = ["tgtadm", "--lld", "iscsi"]
        if control is not None:
            self._base += ["-C", str(control)]
        self._run_argv = runner or subprocess_runner()
        self._lock = threading.Lock()  # guards the fields below, never held across a create
        self._known: dict[str, _Known] = {}
        self._next_tid = 1
        self._loaded = False
        self._iqn_locks: dict[str, list] = {}  # iqn -> [Lock, users]
        if not read_now:
            return
        try:
            self._refresh()
        except Unavailable as e:
            # The server may start before tgtd; the map is read on first use instead.
            log.warning("tgtd not reachable yet, reading its targets later: %s", e.message)

    # --- TargetDriver ---------------------------------------------------------------------

    def create_export(self, spec: TargetSpec) -> None:
        self._check(spec)
        self._ensure_loaded()
        with self._iqn_lock(spec.iqn):
            self._create_or_retry(spec)

    def _create_or_retry(self, spec: TargetSpec) -> None:
        """Under the IQN's lock."""
        try:
            self._create(spec)
        except _StaleTid:
            self._forget(spec.iqn)
            try:
                self._create(spec)
            except _StaleTid:
                raise FailedPrecondition(f"target {spec.iqn} vanished while being made") \
                    from None

    def remove_export(self, iqn: str) -> None:
        self._ensure_loaded()
        with self._iqn_lock(iqn):
            known = self._known_or_listed(iqn)
            if known is None:
                return
            # Target first, account second: an unbound account is harmless, whereas a target
            # whose account is gone would accept logins without CHAP.
            try:
                self._tgtadm("delete target", ["--op", "delete", "--mode", "target", "--force",
                                               "--tid", str(known.tid)])
            except _TgtadmFailed as e:
                if not e.no_target:
                    raise FailedPrecondition(f"cannot remove target {iqn}: {e.message}") from None
            for user in sorted(known.chap_users):
                self._delete_account(user)
            self._forget(iqn)
            log.info("removed target %s (tid %d)", iqn, known.tid)

    def ensure_exports(
        self,
        specs: Iterable[TargetSpec],
        still_wanted: Callable[[str], bool] | None = None,
    ) -> list[str]:
        specs = list(specs)
        for spec in specs:
            self._check(spec)
        live = self._refresh()
        failures: list[str] = []
        for spec in specs:
            target = live.get(spec.iqn)
            if target is not None and self._complete(target, spec):
                continue
            try:
                with self._iqn_lock(spec.iqn):
                    # A remove_export may have run since specs were read: ask again.
                    if still_wanted is None or still_wanted(spec.iqn):
                        self._create_or_retry(spec)
            except FailedPrecondition as e:  # Unavailable propagates: nothing else would work
                failures.append(e.message)
        wanted = {spec.iqn for spec in specs}
        strays = sorted(iqn for iqn in live if iqn.startswith(self._prefix) and iqn not in wanted)
        if failures:
            raise FailedPrecondition(f"{len(failures)} of {len(specs)} targets could not be "
                                     f"re-created: " + "; ".join(failures))
        return strays

    def list_exports(self) -> list[str]:
        return sorted(iqn for iqn in self._refresh() if iqn.startswith(self._prefix))

    def portals(self) -> list[str]:
        return [self._portal]

    # --- what bmi-gateway needs besides the port ------------------------------------------

    def live_targets(self) -> dict[str, LiveTarget]:
        """Every target tgtd holds now (BMI's or not), with LUNs, CHAP users, ACL, backing
        stores and sessions: one ``tgtadm --op show``."""
        return self._refresh()

    def backing_store(self, spec: TargetSpec) -> str:
        """The backing store path tgtd shows for LUN 1 of ``spec``."""
        return f"{self._pool}/{spec.volume}"

    def config_backing_store(self, spec: TargetSpec) -> str | None:
        """The backing store path tgtd shows for LUN 2 of ``spec`` (None: no LUN 2)."""
        return f"{self._pool}/{spec.config_volume}" if spec.config_volume else None

    def unbind_initiator(self, iqn: str, entry: str) -> None:
        """Take one entry (an initiator name or an address such as ALL) off the ACL."""
        option = "--initiator-name" if is_initiator_name(entry) else "--initiator-address"
        self._unbind(iqn, "ACL entry", ["--mode", "target", option, entry])

    def unbind_account(self, iqn: str, user: str) -> None:
        """Unbind a CHAP user from the target (the account itself stays)."""
        self._unbind(iqn, "CHAP binding", ["--mode", "account", "--user", user])

    def _unbind(self, iqn: str, what: str, args: list[str]) -> None:
        self._ensure_loaded()
        with self._iqn_lock(iqn):
            with self._lock:
                known = self._known.get(iqn)
            if known is None:
                return
            try:
                self._tgtadm(f"unbind {what}", ["--op", "unbind", "--tid", str(known.tid),
                                                  *args])
            except _TgtadmFailed as e:
                if "can't find" not in e.message:
                    raise FailedPrecondition(f"cannot unbind {what} of {iqn}: {e.message}") \
                        from None
            if args[1] == "account":
                with self._lock:
                    known.chap_users.discard(args[-1])

    def has_session(self, iqn: str) -> bool:
        """One `show --mode conn` of this target's tid: cost independent of target count."""
        self._ensure_loaded()
        known = self._known_or_listed(iqn)
        if known is None:
            return False
        try:
            out = self._tgtadm("list connections", ["--op", "show", "--mode", "conn",
                                                    "--tid", str(known.tid)])
        except _TgtadmFailed:
            return False  # the target is gone (tgtd restarted): no session either
        return re.search(r"^\s*Session:", out, re.MULTILINE) is not None

    def sessions(self) -> set[str]:
        """One ``tgtadm --op show --mode target`` (every target: for the periodic sweep)."""
        return parse_sessions(self._tgtadm("list sessions", ["--op", "show", "--mode", "target"]))

    # --- creation -------------------------------------------------------------------------

    def _check(self, spec: TargetSpec) -> None:
        if not spec.iqn.startswith(self._prefix) or spec.iqn == self._prefix:
            raise InvalidArgument(f"target name {spec.iqn!r} is not under {self._prefix!r}")
        for volume in (spec.volume, *([spec.config_volume] if spec.config_volume else [])):
            if not volume or any(c in volume for c in "/@ ,;"):
                raise InvalidArgument(f"bad volume name {volume!r}")
        if not spec.chap_user or not spec.chap_secret or not spec.initiator_iqn:
            raise InvalidArgument(f"target {spec.iqn} needs a CHAP account and an initiator")

    def _create(self, spec: TargetSpec) -> None:
        with self._lock:
            known = self._known.get(spec.iqn)
        made_target = made_account = False
        tid = known.tid if known else 0
        try:
            if known is None:
                tid, made_target = self._new_target(spec.iqn)
            self._step(spec, tid, made_target, "LUN 1", [
                "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(LUN),
                "--bstype", "rbd", "--backing-store", f"{self._pool}/{spec.volume}",
                "--bsopts", self._bsopts])
            if spec.config_volume:
                self._step(spec, tid, made_target, "LUN 2", [
                    "--op", "new", "--mode", "logicalunit", "--tid", str(tid),
                    "--lun", str(CONFIG_LUN), "--bstype", "rbd",
                    "--backing-store", f"{self._pool}/{spec.config_volume}",
                    "--bsopts", self._bsopts])
            made_account = self._new_account(spec)
            # CHAP is bound before the ACL: until the ACL exists nobody may log in at all, so
            # the target is never reachable without CHAP.
            self._step(spec, tid, made_target, "CHAP binding", [
                "--op", "bind", "--mode", "account", "--tid", str(tid), "--user", spec.chap_user])
            self._step(spec, tid, made_target, "initiator ACL", [
                "--op", "bind", "--mode", "target", "--tid", str(tid),
                "--initiator-name", spec.initiator_iqn])
        except BaseException:
            self._roll_back(spec, tid if made_target else 0, made_account)
            raise
        with self._lock:
            self._known.setdefault(spec.iqn, _Known(tid, set())).chap_users.add(spec.chap_user)
        log.info("exported %s/%s as %s (tid %d) to %s%s", self._pool, spec.volume, spec.iqn, tid,
                 spec.initiator_iqn,
                 f", config drive {spec.config_volume} as LUN {CONFIG_LUN}"
                 if spec.config_volume else "")

    def _step(self, spec: TargetSpec, tid: int, made_target: bool, what: str,
              args: list[str]) -> None:
        """One idempotent step: 'already exists' means an earlier call did it."""
        try:
            self._tgtadm(what, args, secret=spec.chap_secret)
        except _TgtadmFailed as e:
            if e.exists:
                return
            if e.no_target and not made_target:
                raise _StaleTid from None
            hint = " (does the volume exist?)" if what.startswith("LUN") else ""
            raise FailedPrecondition(
                f"cannot export {self._pool}/{spec.volume} as {spec.iqn}: {what}: "
                f"{e.message}{hint}") from None

    def _new_target(self, iqn: str) -> tuple[int, bool]:
        """Create the target under a fresh tid: (tid, True), or (tid, False) if it exists."""
        for _ in range(MAX_TID_ATTEMPTS):
            with self._lock:
                tid = self._next_tid
                self._next_tid += 1
            try:
                self._tgtadm("new target", ["--op", "new", "--mode", "target", "--tid", str(tid),
                                            "--targetname", iqn])
            except _TgtadmFailed as e:
                if not e.exists:
                    raise FailedPrecondition(f"cannot create target {iqn}: {e.message}") from None
                # tgtd says "exists" both for a taken tid and a taken name: only another
                # process sharing this tgtd does that, so a one-off full listing is affordable.
                live = self._refresh()
                if iqn in live:
                    return live[iqn].tid, False
                continue
            with self._lock:
                self._known[iqn] = _Known(tid, set())
            return tid, True
        raise FailedPrecondition(f"cannot create target {iqn}: no free tid after "
                                 f"{MAX_TID_ATTEMPTS} attempts")

    def _new_account(self, spec: TargetSpec) -> bool:
        """Create the CHAP account; True if this call made it (and must drop it on failure)."""
        args = ["--op", "new", "--mode", "account", "--user", spec.chap_user,
                "--password", spec.chap_secret]
        try:
            self._tgtadm("CHAP account", args, secret=spec.chap_secret)
            return True
        except _TgtadmFailed as e:
            if not e.exists:
                raise FailedPrecondition(f"cannot create the CHAP account of {spec.iqn}: "
                                         f"{e.message}") from None
        # tgtd shows no passwords and cannot update one: replace the account so the secret is
        # the spec's (deleting also unbinds it; the next step binds it again).
        self._delete_account(spec.chap_user)
        try:
            self._tgtadm("CHAP account", args, secret=spec.chap_secret)
        except _TgtadmFailed as e:
            raise FailedPrecondition(f"cannot create the CHAP account of {spec.iqn}: "
                                     f"{e.message}") from None
        return False

    def _roll_back(self, spec: TargetSpec, made_tid: int, made_account: bool) -> None:
        """Best effort: undo what this create made, keeping the first error for the caller."""
        with contextlib.suppress(BmiError, _TgtadmFailed):
            if made_tid:
                self._tgtadm("delete target", ["--op", "delete", "--mode", "target", "--force",
                                               "--tid", str(made_tid)])
                self._forget(spec.iqn)
        with contextlib.suppress(BmiError, _TgtadmFailed):
            if made_account:
                self._delete_account(spec.chap_user)

    def _delete_account(self, user: str) -> None:
        try:
            self._tgtadm("delete account", ["--op", "delete", "--mode", "account",
                                            "--user", user])
        except _TgtadmFailed as e:
            if "can't find the account" not in e.message:
                raise FailedPrecondition(f"cannot delete CHAP account {user}: {e.message}") \
                    from None

    @staticmethod
    def _complete(target: LiveTarget, spec: TargetSpec) -> bool:
        return (LUN in target.luns and spec.chap_user in target.accounts
                and spec.initiator_iqn in target.acl
                and (not spec.config_volume or CONFIG_LUN in target.luns))

    # --- the map --------------------------------------------------------------------------

    def _refresh(self) -> dict[str, LiveTarget]:
        """Re-read every target from tgtd and make the map match (the only O(n) call)."""
        # The lock is held across the listing so that no create or remove records a change
        # that the (older) listing would then overwrite.
        with self._lock:
            live = parse_targets(self._tgtadm("list targets", ["--op", "show",
                                                               "--mode", "target"]))
            self._known = {iqn: _Known(t.tid, set(t.accounts)) for iqn, t in live.items()}
            self._next_tid = max([self._next_tid, *(t.tid + 1 for t in live.values())])
            self._loaded = True
        return live

    def _known_or_listed(self, iqn: str) -> _Known | None:
        """The map's entry, or (a target another server process sharing this tgtd made
        since the map was read) one fresh listing's."""
        with self._lock:
            known = self._known.get(iqn)
        if known is None:
            self._refresh()
            with self._lock:
                known = self._known.get(iqn)
        return known

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._refresh()

    def _forget(self, iqn: str) -> None:
        with self._lock:
            self._known.pop(iqn, None)

    @contextlib.contextmanager
    def _iqn_lock(self, iqn: str) -> Iterator[None]:
        """Serialises calls for one IQN; calls for different IQNs run in parallel."""
        with self._lock:
            entry = self._iqn_locks.setdefault(iqn, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._iqn_locks[iqn]

    # --- running tgtadm -------------------------------------------------------------------

    def _tgtadm(self, what: str, args: list[str], secret: str | None = None) -> str:
        argv = [*self._base, *args]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tgtadm %s: %s", what, " ".join(_redacted(argv)))
        rc, out, err = self._run_argv(argv)
        if rc == 0:
            return out
        message = (err.strip() or out.strip() or f"exit code {rc}").removeprefix("tgtadm: ")
        if secret:
            message = message.replace(secret, "***")
        if rc < 0 or "tgt daemon" in message:
            raise Unavailable(f"tgtd not reachable ({what}): {message}")
        raise _TgtadmFailed(message)


def _redacted(argv: Sequence[str]) -> list[str]:
    """argv with the value after --password hidden, for logs."""
    return ["***" if i and argv[i - 1] == "--password" else a for i, a in enumerate(argv)]
