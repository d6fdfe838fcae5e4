"""Token buckets by key, with an injected clock."""

from __future__ import annotations

import pytest
from fakes import SecondsClock

from bmi_server.core.rate_limit import TokenBuckets


@pytest.fixture
def clock() -> SecondsClock:
    return SecondsClock()


def test_a_burst_is_admitted_then_refused_with_the_wait(clock):
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token back at 2 a second
    clock.now += 0.25
    assert buckets.take("a") == pytest.approx(0.25)  # the refusal took nothing
    clock.now += 0.25
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)


def test_refill_is_capped_at_the_burst(clock):
    buckets = TokenBuckets(rate=1.0, burst=2, clock=clock)
    buckets.take("a")
    clock.now += 3600
    assert [buckets.take("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert buckets.take("a") > 0


def test_keys_do_not_share_buckets(clock):
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_memory_is_bounded_and_least_recently_used_keys_go_first(clock):
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert buckets.take("a") > 0  # "a" is now the most recently used
    for n in range(10_000):
        buckets.take(f"storm-{n}")
        assert len(buckets) <= 3
    assert len(buckets) == 3
    assert buckets.take("a") == 0.0  # forgotten: a full bucket again


def test_a_key_in_use_is_kept_while_others_pass_through(clock):
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=2, clock=clock)
    buckets.take("hammer")
    for n in range(100):
        assert buckets.take("hammer") > 0  # still limited: it stays most recently used
        buckets.take(f"other-{n}")


def test_rate_zero_means_no_limit(clock):
    buckets = TokenBuckets(rate=0, burst=0, clock=clock)
    assert all(buckets.take("a") == 0.0 for _ in range(1000))
    assert len(buckets) == 0


def test_bad_parameters():
    with pytest.raises(ValueError, match="burst"):
        TokenBuckets(rate=1.0, burst=0)
    with pytest.raises(ValueError, match="max_keys"):
        TokenBuckets(rate=1.0, burst=1, max_keys=0)


def test_a_clock_going_backwards_adds_no_tokens(clock):
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take("a")
    clock.now -= 100
    assert buckets.take("a") > 0
