"""Token buckets by key (a node's MAC, a source address), in bounded memory.

Each key's bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second;
a request takes one token or is refused with the seconds until one is back. Only the
``max_keys`` most recently used buckets are kept: a forgotten key starts again with a
full bucket, which is what a bucket left alone long enough would hold anyway, so memory
stays bounded however many keys ever asked, at the price of letting a key that returns
after more than ``max_keys`` others a fresh burst.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 16384,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate`` <= 0: no limit (every request is admitted, nothing is kept)."""
        if rate > 0 and burst < 1:
            raise ValueError("a rate limit needs a burst of at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        # key -> (tokens, when they were counted), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Takes a token for ``key``: 0.0 if admitted, else the seconds until one is back
        (nothing is taken from a refused request)."""
        if not self.limited:
            return 0.0
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            if not wait:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait
