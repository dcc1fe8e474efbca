"""Failed-login limiter: a sliding window of failures per key (client IP, user name).

In memory only: a restart forgets it, which costs a guesser nothing they could not get
by waiting out the window anyway.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

MAX_KEYS = 10000  # bound memory under a spray of names/addresses


class LoginLimiter:
    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300.0,
        ip_max_failures: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.ip_max_failures = ip_max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _limit(self, key: str) -> int:
        return self.ip_max_failures if key.startswith("ip:") else self.max_failures

    def retry_after(self, keys: Iterable[str]) -> float:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = self.clock()
        wait = 0.0
        for key in keys:
            times = self._recent(key, now)
            if times is not None and len(times) >= self._limit(key):
                wait = max(wait, times[0] + self.window_s - now)
        return wait

    def failed(self, keys: Iterable[str]) -> None:
        now = self.clock()
        if len(self._failures) >= MAX_KEYS:
            self._prune(now)
        for key in keys:
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while len(times) > self._limit(key):
                times.popleft()

    def succeeded(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] + self.window_s <= now:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) >= MAX_KEYS:  # still full of fresh keys: drop the oldest half
            oldest = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in oldest[: MAX_KEYS // 2]:
                del self._failures[key]
