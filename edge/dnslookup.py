"""DNS lookups for pool discovery: SRV targets and A/AAAA addresses, with their TTLs.

Owns talking to the name servers (``[dns]`` of the current snapshot, read at
each lookup, else the system's resolv.conf) through dnspython on trio, and
turning their answers or failures into plain values or ``LookupFailed``.

Must never: decide trust (an answer only says where to dial; the member's
certificate must still name its topology host), cache beyond what the pool
shell asks for (``edge.pools`` honours each TTL), or wait without a deadline
(every query has ``_DNS_LIFETIME_S``).
"""

from __future__ import annotations

from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import trio

from edge.core.config import Dns

__all__ = ["DnsLookups", "LookupFailed", "make_resolver"]

# One query's whole budget.
_DNS_LIFETIME_S = 5.0
# A NOERROR answer with no record of one type carries no TTL we keep.
_NEGATIVE_TTL_S = 30.0
# An SRV answer bigger than this is a mistake or an attack; the rest is ignored.
_MAX_SRV_TARGETS = 64


class LookupFailed(Exception):
    """No usable answer; the message says which name and why (for ``dns_error``)."""


class DnsLookups:
    """Lookups against the name servers ``settings()`` names at the moment of each."""

    def __init__(self, settings: Callable[[], Dns]) -> None:
        self._settings = settings
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._resolver_settings: Dns | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        settings = self._settings()
        if self._resolver is None or settings != self._resolver_settings:
            self._resolver = make_resolver(settings)
            self._resolver_settings = settings
        return self._resolver

    async def srv(self, name: str) -> tuple[list[tuple[int, int, int, str]], float]:
        """(priority, weight, port, target) records, at most _MAX_SRV_TARGETS; and the TTL."""
        answer = await self._query(name, "SRV")
        if answer is None or answer.rrset is None:
            raise LookupFailed(f"no SRV record for {name}")
        records: list[tuple[int, int, int, str]] = []
        for rdata in list(answer.rrset)[:_MAX_SRV_TARGETS]:
            target = rdata.target.to_text(omit_final_dot=True)
            if target in ("", "."):  # RFC 2782: "service decidedly not available"
                continue
            records.append((int(rdata.priority), int(rdata.weight), int(rdata.port), target))
        return records, float(answer.rrset.ttl)

    async def addresses(self, name: str) -> tuple[tuple[str, ...], float]:
        """A then AAAA addresses of ``name`` (IPv4 first), and the shortest TTL."""
        results: dict[str, dns.resolver.Answer | None] = {}

        async def one(rdtype: str) -> None:
            try:
                results[rdtype] = await self._query(name, rdtype)
            except LookupFailed as exc:
                results[rdtype] = None
                errors.append(str(exc))

        errors: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "A")
            nursery.start_soon(one, "AAAA")
        addresses: list[str] = []
        ttls: list[float] = []
        for rdtype in ("A", "AAAA"):  # IPv4 first: most DMZ networks route it
            answer = results.get(rdtype)
            if answer is None:
                continue
            if answer.rrset is None:
                ttls.append(_NEGATIVE_TTL_S)
                continue
            ttls.append(float(answer.rrset.ttl))
            addresses.extend(rdata.address for rdata in answer.rrset)
        if not addresses:
            raise LookupFailed("; ".join(errors) or f"no A or AAAA record for {name}")
        return tuple(addresses), min(ttls)

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """One lookup; None for "the name exists but has no such record"."""
        try:
            resolver = self._get_resolver()
            return await resolver.resolve(
                name,
                rdtype,
                lifetime=_DNS_LIFETIME_S,
                raise_on_no_answer=False,
                search=False,
            )
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(f"{name}: no such name (NXDOMAIN)") from None
        except dns.resolver.LifetimeTimeout:
            raise LookupFailed(f"{name} {rdtype}: no answer within {_DNS_LIFETIME_S:g}s") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{name} {rdtype}: {exc}") from None


def make_resolver(settings: Dns) -> dns.asyncresolver.Resolver:
    """The configured name servers, else the system's (raises LookupFailed)."""
    try:
        if not settings.nameservers:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in settings.nameservers
            ]
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"no DNS resolver configured: {exc}") from None
    resolver.cache = None  # TTLs are honoured here, per pool
    return resolver
