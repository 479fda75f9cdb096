"""Admission limits per client source: concurrent connections and a rate.

Owns the decision "may one more connection from this source start now?",
before a single handshake byte is spent. Pure: time is passed in, nothing here
sleeps, reads a clock or touches a socket, so it is tested without one.

Sources are client IP addresses; IPv6 addresses are grouped by /64, since one
host usually owns a whole /64 and could otherwise rotate through it to dodge
every per-source limit.

The rate is a token bucket per source: ``burst`` tokens, refilled at ``rate``
per second, one token per new connection. Memory stays bounded under an
address-spraying flood: idle sources whose bucket is full again are forgotten
(they are indistinguishable from new ones), and when ``max_tracked`` sources
are still being tracked a new source is refused (fail closed) rather than
letting the table grow without bound.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

__all__ = ["SourceLimits", "source_key"]

# A refill that is exactly due must count despite float rounding
# (0.1 s at 10/s is 0.999... tokens).
_EPSILON = 1e-9


@functools.lru_cache(maxsize=4096)  # twice per connection (admit, release); bounded
def source_key(address: str) -> str:
    """The key limits are counted under: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    last: float
    active: int = 0


class SourceLimits:
    """Concurrent connections per source and new connections per second."""

    def __init__(
        self,
        *,
        max_per_source: int,
        rate_per_s: float,
        burst: int,
        max_tracked: int = 100_000,
    ) -> None:
        if max_per_source < 1 or rate_per_s <= 0 or burst < 1 or max_tracked < 1:
            raise ValueError("limits must be positive")
        self.max_per_source = max_per_source
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_tracked = max_tracked
        self._buckets: dict[str, _Bucket] = {}
        self._admits_since_prune = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, address: str, now: float) -> str | None:
        """None when admitted (call ``release`` when it ends), else why not."""
        key = source_key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._admits_since_prune += 1
            if len(self._buckets) >= self.max_tracked or self._admits_since_prune > 1024:
                self.prune(now)
            if len(self._buckets) >= self.max_tracked:
                return (
                    f"tracking {self.max_tracked} sources already (an address-spraying "
                    "flood?); refusing new sources until some go idle"
                )
            bucket = _Bucket(tokens=self.burst, last=now)
            self._buckets[key] = bucket
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.last) * self.rate)
            bucket.last = now
        if bucket.active >= self.max_per_source:
            return f"source {key} has {bucket.active} connections (max_connections_per_source)"
        if bucket.tokens < 1.0 - _EPSILON:
            return (
                f"source {key} opens connections faster than "
                f"{self.rate:g}/s (burst {self.burst:g}) (new_connections_per_source_per_s)"
            )
        bucket.tokens -= 1.0
        bucket.active += 1
        return None

    def release(self, address: str) -> None:
        bucket = self._buckets.get(source_key(address))
        if bucket is not None and bucket.active > 0:
            bucket.active -= 1

    def prune(self, now: float) -> None:
        """Forget idle sources whose bucket has refilled (they hold no state)."""
        self._admits_since_prune = 0
        full_after = self.burst / self.rate
        stale = [
            key
            for key, b in self._buckets.items()
            if b.active == 0 and (now - b.last) >= full_after - (b.tokens / self.rate)
        ]
        for key in stale:
            del self._buckets[key]
