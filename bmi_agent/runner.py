"""Runs the agent's commands. Injected everywhere, so unit tests see the exact commands
without running them (tests/unit/test_agent_attach.py uses a recording fake)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str  # stdout and stderr, interleaved

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], result: Result) -> None:
        tail = " ".join(result.output.strip().splitlines()[-3:])
        super().__init__(f"{argv[0]} exited with {result.returncode}: {tail or 'no output'}")
        self.result = result


class Runner(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60,
        check: bool = True,
        secrets: Sequence[str] = (),
    ) -> Result:
        """Run ``argv`` and wait. CommandFailed if ``check`` and it exits non-zero (or
        cannot start, or times out). ``secrets`` are masked wherever the command is logged."""

    def exec(self, argv: Sequence[str]) -> None:
        """Replace this process with ``argv`` (keeps the PID: the pivot runs as PID 1)."""


def masked(argv: Sequence[str], secrets: Sequence[str]) -> str:
    return " ".join("***" if a in secrets and a else a for a in argv)


class SubprocessRunner:
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60,
        check: bool = True,
        secrets: Sequence[str] = (),
    ) -> Result:
        log.debug("run: %s", masked(argv, secrets))
        try:
            done = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            result = Result(done.returncode, done.stdout.decode(errors="replace"))
        except FileNotFoundError:
            result = Result(127, f"{argv[0]}: not found")
        except subprocess.TimeoutExpired as exc:
            output = (exc.output or b"").decode(errors="replace")
            result = Result(124, f"{output}\n{argv[0]}: timed out after {timeout:g}s")
        if check and not result.ok:
            raise CommandFailed(argv, result)
        return result

    def exec(self, argv: Sequence[str]) -> None:
        log.debug("exec: %s", " ".join(argv))
        os.execv(argv[0] if "/" in argv[0] else _which(argv[0]), list(argv))


def _which(name: str) -> str:
    for folder in os.environ.get("PATH", "/sbin:/bin:/usr/sbin:/usr/bin").split(":"):
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(name)
