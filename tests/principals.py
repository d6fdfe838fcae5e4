"""Callers the unit tests act as (a module of its own: `conftest` is ambiguous between
tests/unit and tests/integration when both are collected)."""

from __future__ import annotations

from bmi_server.core.models import Principal

ADMIN = Principal(name="root", is_admin=True)
ALICE = Principal(name="alice", project="alice")
BOB = Principal(name="bob", project="bob")
