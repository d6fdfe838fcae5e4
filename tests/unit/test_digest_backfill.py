"""The digest backfill: images that cannot be hashed wait, with a growing pause, and
never hold back the images behind them; a failure is logged once, not every poll."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from bmi_server.core.errors import Unavailable
from bmi_server.core.image_digests import DigestBackfill


class _State:
    def __init__(self, ids: list[str]) -> None:
        self.missing = {i: SimpleNamespace(id=i, volume=f"bmi-{i}") for i in ids}
        self.asked: list[int] = []

    def images_missing_digest(self, limit: int) -> list[SimpleNamespace]:
        self.asked.append(limit)
        return list(self.missing.values())[:limit]  # oldest first: insertion order

    def record_image_digest(self, image_id: str, sha256: str) -> bool:
        return self.missing.pop(image_id, None) is not None


class _Store:
    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.hashed: list[str] = []

    def content_digest(self, volume: str) -> str:
        if volume in self.broken:
            raise Unavailable(f"cannot read {volume}")
        self.hashed.append(volume)
        return "0" * 64

    def set_metadata(self, volume: str, metadata: dict) -> None:
        pass


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failing_images_wait_and_do_not_hold_back_the_rest(caplog):
    state = _State([f"bad{i}" for i in range(3)] + [f"ok{i}" for i in range(4)])
    store = _Store({f"bmi-bad{i}" for i in range(3)})
    clock = _Clock()
    backfill = DigestBackfill(state, store, limit=3, retry_seconds=10,
                              max_retry_seconds=25, clock=clock)
    with caplog.at_level(logging.WARNING, logger="bmi_server"):
        assert backfill.run() == 0  # the three oldest fail
        assert backfill.run() == 3  # the next three are not held back by them
        assert backfill.run() == 1
        assert backfill.run() == 0  # only the waiting ones are left: nothing tried
    assert store.hashed == [f"bmi-ok{i}" for i in range(4)]
    warned = [r for r in caplog.records if "could not hash image" in r.getMessage()]
    assert len(warned) == 3  # once each, not once per poll
    # After the pause they are tried again; the pause doubles, up to its bound.
    store.broken = {"bmi-bad0"}
    clock.now += 10
    assert backfill.run() == 2
    assert set(state.missing) == {"bad0"}
    clock.now += 19  # the second pause is 20 s
    assert backfill.run() == 0 and store.hashed.count("bmi-bad0") == 0
    clock.now += 1
    assert backfill.run() == 0  # tried and failed again; next pause 25 s (the bound)
    store.broken = set()
    clock.now += 24
    assert backfill.run() == 0
    clock.now += 1
    assert backfill.run() == 1 and not state.missing


def test_an_image_gone_while_waiting_is_forgotten():
    state = _State(["gone", "ok"])
    backfill = DigestBackfill(state, _Store({"bmi-gone"}), limit=1, retry_seconds=10)
    assert backfill.run() == 0
    assert backfill.run() == 1  # "ok" is asked for past the waiting one
    assert state.asked[-1] == 2
    del state.missing["gone"]  # deleted meanwhile
    assert backfill.run() == 0
    assert backfill.run() == 0 and state.asked[-1] == 1  # no longer asked for
