"""Crash points for fault-injection tests.

A test sets BMI_CRASH_POINT=<name> in a server's environment; when the server reaches
that point it dies at once, as a kill -9 would, so restart-and-reconcile can be tested
at every step of a multi-step operation.
"""

from __future__ import annotations

import os

CRASH_POINT_ENV = "BMI_CRASH_POINT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == name:
        os._exit(137)
