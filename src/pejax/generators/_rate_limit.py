"""Client-side request and token rate limits (token buckets for asyncio).

A bucket refills continuously at ``per_minute / 60`` units a second up to one second's worth (``burst``). A
request may start when the bucket is not in debt; it then takes its cost, possibly leaving the bucket in debt,
and the next request waits until the debt is repaid. So the long-run rate never exceeds the limit and a single
request larger than one second's worth (a long prompt under a tokens-per-minute limit) still goes through.

Token costs are not known before the answer: a request reserves an estimate (its prompt length / 4 plus its
``max_tokens``) and :meth:`RateLimiter.settle` corrects the bucket with the tokens the server reports.
"""

from __future__ import annotations

import asyncio
import math
import time


class _Bucket:
    def __init__(self, per_minute: float, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_time(self) -> float:
        self._refill()
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class RateLimiter:
    """Limits requests and tokens per minute across all concurrent requests of one generator.

    Args:
      requests_per_minute: at most this many requests a minute (``None``: no limit).
      tokens_per_minute: at most this many prompt + completion tokens a minute (``None``: no limit).
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        for name, v in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if v is not None and (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ValueError(f"{name} must be a positive number or None (no limit), got {v!r}.")
        self._requests = None if requests_per_minute is None else _Bucket(requests_per_minute)
        self._tokens = None if tokens_per_minute is None else _Bucket(tokens_per_minute)
        self._lock: asyncio.Lock | None = None
        self.waited_s = 0.0

    async def acquire(self, tokens: float) -> None:
        """Waits until one request of about ``tokens`` tokens may start, then takes its cost."""
        if self._requests is None and self._tokens is None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # first come, first served
            while True:
                wait = max(
                    0.0 if self._requests is None else self._requests.wait_time(),
                    0.0 if self._tokens is None else self._tokens.wait_time(),
                )
                if wait <= 0:
                    break
                self.waited_s += wait
                await asyncio.sleep(wait)
            if self._requests is not None:
                self._requests.take(1.0)
            if self._tokens is not None:
                self._tokens.take(float(tokens))

    def settle(self, estimated: float, actual: float) -> None:
        """Corrects the token bucket once the server has reported a request's real token count."""
        if self._tokens is not None:
            self._tokens.take(float(actual) - float(estimated))

    def reset_loop(self) -> None:
        """Forgets the asyncio lock (each generator call runs its own event loop)."""
        self._lock = None
