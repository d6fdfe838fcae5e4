"""Keeping secrets at rest to their owner, for bmi-server and bmi-gateway.

The server's state directory holds the catalogue (CHAP secrets in plaintext in SQLite), the
token files and the record of its Ceph client; none of it is any other local user's
business. Both daemons set a private umask before creating anything; files BMI made in
the state directory on an earlier, looser run are tightened at start, and secrets the
operator keeps elsewhere (a token file in /etc/bmi, a TLS key) are only warned about:
their modes are the operator's to choose.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
_SHARED = 0o077  # any permission for group or others


def restrict_umask() -> None:
    """Whatever this process and its children create from now on is private. Called first
    thing: SQLite makes the database's -wal and -shm files later, on demand, and gives them
    the database file's mode, so only a database created private keeps them private."""
    os.umask(PRIVATE_UMASK)


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.lstat().st_mode)
    except FileNotFoundError:
        return None


def tighten(path: Path) -> bool:
    """Take group and other permissions away from a file or directory BMI made, if it has
    any (missing: nothing to do). Never follows a symlink. True if the mode changed."""
    mode = _mode(path)
    if mode is None or path.is_symlink() or not mode & _SHARED:
        return False
    private = mode & ~_SHARED
    try:
        path.chmod(private)
    except OSError as exc:
        log.warning("%s is mode %04o and could not be made %04o: %s", path, mode, private,
                    exc.strerror or exc)
        return False
    log.warning("%s was mode %04o (open to other users); now %04o", path, mode, private)
    return True


def warn_if_shared(what: str, path: Path) -> bool:
    """Log a warning if an operator's secret file gives group or others any access; its
    mode is left as it is. True if it does."""
    mode = _mode(path)
    if mode is None or not mode & _SHARED:
        return False
    log.warning("%s %s is mode %04o: other users can read or change it; chmod 0600 it",
                what, path, mode)
    return True


def prepare_state_dir(state_dir: Path, owned: Iterable[Path],
                      secrets: Iterable[tuple[str, Path]] = ()) -> None:
    """Create ``state_dir`` (0700) or make it 0700; tighten ``owned``, the files and
    directories BMI keeps in it (a directory's files too). ``secrets`` (what, path) are
    tightened inside ``state_dir``, where BMI put them, and only warned about elsewhere."""
    state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    inside = state_dir.resolve()  # the directory itself, if state_dir is a symlink to it
    mode = _mode(inside)
    if mode is not None and mode & (stat.S_ISVTX | 0o002):
        # A shared directory such as /tmp: taking it from other users would break them.
        log.warning("state_dir %s is a shared directory (mode %04o): its files are private, "
                    "but give BMI a directory of its own", state_dir, mode)
    else:
        tighten(inside)
    for path in owned:
        tighten(path)
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                tighten(child)
    for what, path in secrets:
        if path.resolve().is_relative_to(inside):
            tighten(path)
        else:
            warn_if_shared(what, path)
