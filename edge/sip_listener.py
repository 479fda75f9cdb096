"""The relay room of a `protocol = "sip"` listener: edge.sip_relay with the gateway's rules.

Owns what a SIP listener adds around `edge.sip_relay.relay_sip` for one
admitted partner connection: the domains the partner may speak for (its
policy in the current snapshot, so a reload that takes a domain away applies
to live connections), the `[sip]` bounds and the idle
timeout, the `edge_sip_messages_total` counts and the `sip_rejected` events
(docs/architecture.md, "SIP listeners").

Must never: close the streams or log the connection's end (edge.admission
does, as for any relay), let a peer string into a metric label (the
`partner` label is the caller's configured id or `unknown`; directions and
results are ours), or log a field relay_sip has not sanitized.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from edge.core.config import Listener
from edge.core.snapshot import Snapshot
from edge.current import Current
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.relay import RelayControl, RelayOutcome
from edge.sip_relay import SipMessageResult, SipRejection, SipRelayEnd, relay_sip
from edge.tls import TLSStream

__all__ = ["RelayFunction", "SipPeer", "relay_sip_listener", "sip_relay_for"]


class _LiveDomains(Collection[str]):
    """The domains `partner` may speak for in the snapshot `current` returns,
    looked up again only when the snapshot object changed (a reload)."""

    __slots__ = ("_current", "_domains", "_listener", "_partner", "_seen")

    def __init__(self, current: Callable[[], Snapshot], listener: Listener, partner: str) -> None:
        self._current = current
        self._listener = listener
        self._partner = partner
        self._seen: Snapshot | None = None
        self._domains: tuple[str, ...] = ()

    def _now(self) -> tuple[str, ...]:
        snapshot = self._current()
        if snapshot is not self._seen:
            trust = snapshot.folder_of(self._listener)
            policies = trust.policies.partners if trust is not None else {}
            policy = policies.get(self._partner)
            # Fail closed: no policy (a partner removed; its connection is being
            # closed) means no domain.
            self._domains = tuple(policy.domains) if policy is not None else ()
            self._seen = snapshot
        return self._domains

    def __contains__(self, item: object) -> bool:
        return item in self._now()

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


# Log fields clipped as edge.admission clips its own.
_MAX_DETAIL = 2048


@dataclass(frozen=True)
class SipPeer:
    """Who is on the partner side: its id, its metrics label, its address."""

    partner: str | None
    label: str  # a configured partner id or `unknown` (edge.admission.partner_label)
    peer: str


# The shape of edge.relay.relay, so admission picks one of two relays and
# calls it the same way.
RelayFunction = Callable[..., Awaitable[RelayOutcome]]


def sip_relay_for(
    current: Callable[[], Current],
    metrics: Metrics,
    log: EventLog,
    listener: Listener,
    who: SipPeer,
) -> RelayFunction:
    """A relay with edge.relay.relay's signature that relays SIP for `who`;
    `current` returns the gateway's current state (its snapshot changes on reload)."""

    async def run(
        a: TLSStream,
        b: TLSStream,
        *,
        idle_timeout_s: float,
        names: tuple[str, str] = ("partner", "pool"),
        on_bytes_from_a: Callable[[int], None],
        on_bytes_from_b: Callable[[int], None],
        control: RelayControl,
    ) -> RelayOutcome:
        # relay_sip names its sides partner and pool, as admission does.
        assert names == ("partner", "pool")
        end = await relay_sip_listener(
            lambda: current().snapshot,
            metrics,
            log,
            listener,
            who,
            a,
            b,
            idle_timeout_s=idle_timeout_s,
            on_bytes_from_partner=on_bytes_from_a,
            on_bytes_to_partner=on_bytes_from_b,
            control=control,
        )
        return RelayOutcome(end.end, end.detail)

    return run


async def relay_sip_listener(
    current: Callable[[], Snapshot],
    metrics: Metrics,
    log: EventLog,
    listener: Listener,
    who: SipPeer,
    partner: TLSStream,
    upstream: TLSStream,
    *,
    idle_timeout_s: float,
    on_bytes_from_partner: Callable[[int], None],
    on_bytes_to_partner: Callable[[int], None],
    control: RelayControl,
) -> SipRelayEnd:
    """Relay SIP between an admitted partner and its pool member until the end."""
    snapshot = current()  # the bounds stay those the connection started with
    # The partner's domains in the current snapshot, not the admitting one: a
    # reload that takes a domain away applies to the next request.
    domains = _LiveDomains(current, listener, who.partner or "")
    # Children by (direction, result), each bound on first use: a labels()
    # lookup per message would cost more than framing it (bounded: two
    # directions, four results). Relayed messages are counted once per read.
    counters: dict[tuple[str, str], Any] = {}

    def counter(direction: str, result: str) -> Any:
        found = counters.get((direction, result))
        if found is None:
            label = "from_partner" if direction == "inbound" else "to_partner"
            found = metrics.sip_messages.labels(listener.name, who.label, label, result)
            counters[(direction, result)] = found
        return found

    def on_relayed(direction: str, count: int) -> None:
        counter(direction, "relayed").inc(count)

    def on_message(result: SipMessageResult) -> None:
        counter(result.direction, result.result).inc()

    def on_rejected(rej: SipRejection) -> None:
        detail = rej.detail
        if len(detail) > _MAX_DETAIL:
            detail = f"{detail[:_MAX_DETAIL]}... ({len(detail) - _MAX_DETAIL} more characters)"
        log.event(
            "sip_rejected",
            listener=listener.name,
            peer=who.peer,
            partner=who.label,
            method=rej.method,
            call_id=rej.call_id,
            offending_domain=rej.offending_domain,
            reason=rej.reason,
            answered=rej.answered,
            detail=detail,
        )

    return await relay_sip(
        partner,
        upstream,
        partner_domains=domains,
        idle_timeout_s=idle_timeout_s,
        max_message_bytes=snapshot.config.sip.max_message_bytes,
        max_headers=snapshot.config.sip.max_headers,
        on_message=on_message,
        on_rejected=on_rejected,
        on_relayed=on_relayed,
        on_bytes_from_partner=on_bytes_from_partner,
        on_bytes_to_partner=on_bytes_to_partner,
        control=control,
    )
