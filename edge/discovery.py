"""Where a partner's edge is: DNS SRV, then A/AAAA, with a bounded TTL cache.

Owns the DNS half of outbound federation (docs/architecture.md ("Outbound federation")):
the `_sipfederationtls._tcp.<domain>` SRV lookup, the A/AAAA lookups of each
target, caching each answer for its TTL (a bounded cache: a member that asks
for many names cannot grow memory without limit), and turning a partner plus
the domain its SNI lay in into the ordered list of (host, port) targets to try.

Must never: decide trust (a DNS answer only says where to dial: the partner's
edge must still present a certificate for the dialled host under that
partner's roots, `edge.core.outbound.PartnerEdgeTrust`), dial anything itself,
or follow an SRV target outside the partner's domains (the core filters them,
this module logs them as `srv_target_ignored`). Every lookup has a deadline.

The resolver is the same one `edge.pools` builds (the `[dns]` nameservers,
else the system's): one factory, so both paths honour one `[dns]` section.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
import trio

from edge.core.config import Dns
from edge.core.outbound import (
    MAX_SRV_RECORDS,
    SrvRecord,
    filter_targets,
    order_srv,
    srv_name,
)
from edge.core.policies import PartnerPolicy
from edge.dnslookup import LookupFailed, make_resolver  # one resolver factory (see docstring)
from edge.logs import EventLog

__all__ = ["Discovery", "DiscoveryFailed", "Target", "partner_targets"]

# One query's whole budget (retries across nameservers included).
LOOKUP_TIMEOUT_S = 5.0
# Cache bounds: a TTL of a day must not pin a stale answer; entries are few per partner.
_MAX_TTL_S = 3600.0
# NXDOMAIN or "no record of that type": remembered this long (RFC 2308 would use
# the SOA minimum; a fixed short time keeps a fixed partner reachable soon).
_NEGATIVE_TTL_S = 30.0
_DEFAULT_MAX_ENTRIES = 4096
# Addresses tried per target (IPv4 first, then IPv6).
_MAX_ADDRESSES = 8


class DiscoveryFailed(Exception):
    """No answer usable for dialling; `str()` is an operator's detail."""


@dataclass(frozen=True)
class Target:
    """One place to dial: the host name the certificate must match, and the port."""

    host: str
    port: int
    srv: bool  # found by SRV (False: the static `edge`)


@dataclass
class _Entry:
    expires: float
    value: tuple[object, ...] | None  # None: a cached negative answer
    detail: str = ""


class Discovery:
    """DNS lookups for outbound dials, each answer cached for its TTL.

    `clock` is trio.current_time by default (tests may use trio's MockClock).
    """

    def __init__(
        self,
        settings: Dns,
        *,
        max_entries: int = _DEFAULT_MAX_ENTRIES,
        timeout_s: float = LOOKUP_TIMEOUT_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._settings = settings
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._max_entries = max(1, max_entries)
        self._timeout_s = timeout_s
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self.queries = 0  # sent to a name server (for tests and debugging)

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            try:
                self._resolver = make_resolver(self._settings)
            except LookupFailed as exc:
                raise DiscoveryFailed(str(exc)) from None
        return self._resolver

    def _remember(self, key: tuple[str, str], entry: _Entry) -> None:
        if entry.expires <= self._clock():
            return  # TTL 0: never cached
        if key not in self._cache and len(self._cache) >= self._max_entries:
            now = self._clock()
            for old in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[old]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]  # oldest insertion
        self._cache[key] = entry

    async def _lookup(self, name: str, rdtype: str) -> tuple[object, ...]:
        key = (name, rdtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached.expires > now:
            await trio.lowlevel.checkpoint()
            if cached.value is None:
                raise DiscoveryFailed(cached.detail)
            return cached.value
        self.queries += 1
        try:
            answer = await self._get_resolver().resolve(
                name, rdtype, lifetime=self._timeout_s, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            detail = f"{name}: no such name (NXDOMAIN)"
            self._remember(key, _Entry(now + _NEGATIVE_TTL_S, None, detail))
            raise DiscoveryFailed(detail) from None
        except dns.resolver.LifetimeTimeout:
            raise DiscoveryFailed(
                f"{name} {rdtype}: no answer within {self._timeout_s:g}s"
            ) from None
        except dns.exception.DNSException as exc:
            raise DiscoveryFailed(f"{name} {rdtype}: {exc}") from None
        if answer.rrset is None:
            detail = f"{name}: no {rdtype} record"
            self._remember(key, _Entry(now + _NEGATIVE_TTL_S, None, detail))
            raise DiscoveryFailed(detail)
        values: tuple[object, ...]
        if rdtype == "SRV":
            values = tuple(
                SrvRecord(
                    int(r.priority),
                    int(r.weight),
                    int(r.port),
                    r.target.to_text(omit_final_dot=True).lower(),
                )
                for r in list(answer.rrset)[:MAX_SRV_RECORDS]
            )
        else:
            values = tuple(str(r.address) for r in list(answer.rrset)[:_MAX_ADDRESSES])
        ttl = min(float(answer.rrset.ttl), _MAX_TTL_S)
        self._remember(key, _Entry(now + ttl, values))
        return values

    async def srv(self, name: str) -> tuple[SrvRecord, ...]:
        """The SRV records of `name` (RFC 2782's "." target, "decidedly not
        available", dropped). Raises DiscoveryFailed."""
        records = await self._lookup(name, "SRV")
        return tuple(r for r in records if isinstance(r, SrvRecord) and r.target not in ("", "."))

    async def addresses(self, host: str) -> tuple[str, ...]:
        """IPv4 then IPv6 addresses of `host`; raises DiscoveryFailed when neither."""
        found: list[str] = []
        problems: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found += [str(a) for a in await self._lookup(host, rdtype)]
            except DiscoveryFailed as exc:
                problems.append(str(exc))
        if not found:
            raise DiscoveryFailed("; ".join(dict.fromkeys(problems)))
        return tuple(found[:_MAX_ADDRESSES])


async def partner_targets(
    policy: PartnerPolicy,
    domain: str,
    discovery: Discovery,
    *,
    rng: random.Random | None = None,
    log: EventLog | None = None,
) -> list[Target]:
    """Where to dial `policy`'s partner for a destination in `domain`, in order:
    its static `edge`, else the SRV targets of `_sipfederationtls._tcp.<domain>`
    inside its domains (RFC 2782 order). Raises DiscoveryFailed when none."""
    if policy.edge is not None:
        await trio.lowlevel.checkpoint()
        return [Target(policy.edge[0], policy.edge[1], srv=False)]
    name = srv_name(domain)
    records = await discovery.srv(name)
    kept, ignored = filter_targets(records, policy)
    for record in ignored:
        if log is not None:
            log.event(
                "srv_target_ignored",
                partner=policy.id,
                srv=name,
                target=record.target[:253],
                port=record.port,
                detail="the target is outside the partner's domains (and is not its edge)",
            )
    if not kept:
        raise DiscoveryFailed(
            f"{name}: no SRV target inside the partner's domains"
            + (f" ({len(ignored)} ignored)" if ignored else "")
        )
    return [Target(r.target, r.port, srv=True) for r in order_srv(kept, rng)]
