"""Outbound SIP fan-out, sans-I/O: one pool connection, one connection per partner.

Owns: the routing decisions of an outbound `protocol = "sip"` listener
(docs/architecture.md "SIP listeners", issue 21): which partner each request from the
pool goes to (its Request-URI host inside a partner's domains), when a
partner connection must be opened or closed, what waits while one opens,
where bytes from a partner go back (the pool connection that owns it), and
which requests the edge answers itself (403 `sip_domain_mismatch`, 404
`unknown_destination`, 503 naming why a partner cannot be used).

Must never: do I/O, resolve or verify anything (the shell opens, verifies and
reports back with `partner_opened` / `partner_failed`), rewrite a relayed
message, queue without bound, or route a message it could not frame.

Theory of operation
-------------------
One `SipRouter` per pool connection. The shell feeds it events (bytes from
the pool, bytes from partner P, P opened / failed / closed / trust withdrawn,
the pool closed) and performs the actions each call returns, in order:
`OpenPartner`, `SendToPartner`, `SendToPool`, `ClosePartner`, `ClosePool`,
plus `Report` (one per message, for `edge_sip_messages_total` and the
`sip_rejected` log). Adjacent sends to one connection are merged into one
action, so a read holding several messages becomes one write.

Routing, and what cannot be routed:
- A request from the pool must pass the guard for our own `[sip] domains`,
  then goes to the partner whose domains hold its Request-URI host (the
  longest matching domain wins; two partners with the same domain: neither).
  A request whose Request-URI names no partner (an in-dialog request sent to
  a Contact address) follows its Call-ID, if a request with that Call-ID was
  already routed to or received from a partner. Otherwise: 404
  `unknown_destination`. ACKs are never answered, only dropped.
- Requests for a partner whose connection is opening wait in a bounded queue
  (`max_queued_messages`, `max_queued_bytes`; over it: 503 `over_limit`). If
  the open fails, each waiting request gets 503 naming the shell's reason
  (`partner_unreachable`, `partner_untrusted`...).
- Whatever a partner sends back (responses, in-dialog requests, RFC 5923
  requests over the connection we opened) goes to the pool byte for byte;
  its requests pass the same guard for that partner's domains as on an
  inbound listener. A response from the pool goes to the partner that sent a
  request with its Call-ID; Call-IDs are remembered first-come (a partner
  cannot take over another's dialog by reusing its Call-ID) in a bounded LRU.
- Keep-alives end at the edge: a CRLFCRLF ping on either connection is
  answered with a CRLF pong on that connection, never forwarded (the hops
  behind it are different connections).
- Trust withdrawn: the partner's connection is closed, waiting requests get
  503 with the shell's reason, and later requests for its domains get the
  same 503 until `set_partners` lists the partner again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from edge.core.reasons import Reason
from edge.core.sip import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_MESSAGE_BYTES,
    FramingError,
    KeepAlive,
    Message,
    NeedData,
    SipFramer,
    check_request,
    uri_domain,
)
from edge.core.sip_actions import (
    Action,
    Actions,
    ClosePartner,
    ClosePool,
    OpenPartner,
    Report,
    SendToPartner,
    SendToPool,
    describe,
)

__all__ = [
    "Action",
    "ClosePartner",
    "ClosePool",
    "OpenPartner",
    "Report",
    "SendToPartner",
    "SendToPool",
    "SipRouter",
]

UNKNOWN = "unknown"  # the partner label when a message belongs to no partner


@dataclass
class _Partner:
    framer: SipFramer
    open: bool = False
    queue: list[Message] = field(default_factory=list)
    queued_bytes: int = 0
    crlfs: int = 0  # CRLFs seen in the current keep-alive run


class _CallIds:
    """Call-ID -> the partner it belongs to: first come, bounded LRU.

    A partner cannot take over another's dialog by reusing its Call-ID: only
    the owner's messages refresh an entry.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()

    def owner(self, call_id: str | None) -> str | None:
        return self._owners.get(call_id) if call_id is not None else None

    def remember(self, message: Message, partner: str) -> None:
        call_id = message.headers.get("call-id")
        if call_id is None:
            return
        owner = self._owners.get(call_id)
        if owner is None:
            self._owners[call_id] = partner
            while len(self._owners) > self.limit:
                self._owners.popitem(last=False)
        elif owner == partner:
            self._owners.move_to_end(call_id)


def _owner(host: str | None, table: Mapping[str, Collection[str]]) -> str | None:
    """The partner whose domains hold `host` (longest domain wins; a tie: none)."""
    if host is None or host.startswith("["):
        return None
    best: tuple[int, str] | None = None
    tie = False
    for pid, domains in table.items():
        for domain in domains:
            if host == domain or host.endswith("." + domain):
                if best is None or len(domain) > best[0]:
                    best, tie = (len(domain), pid), False
                elif len(domain) == best[0] and pid != best[1]:
                    tie = True
    if best is None or tie:
        return None
    return best[1]


class SipRouter:
    """The fan-out of one pool connection (see the module docstring)."""

    def __init__(
        self,
        *,
        our_domains: Collection[str],
        partners: Mapping[str, Collection[str]],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_queued_messages: int = 64,
        max_queued_bytes: int = 256 * 1024,
        max_call_ids: int = 4096,
        guard_partners: bool = True,
    ) -> None:
        self.our_domains = tuple(our_domains)
        self.max_message_bytes = max_message_bytes
        self.max_headers = max_headers
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.max_call_ids = max_call_ids
        self.guard_partners = guard_partners
        self._partners: dict[str, tuple[str, ...]] = {}
        self._departed: dict[str, tuple[str, ...]] = {}  # dropped by a reload, still connected
        self._withdrawn: dict[str, tuple[tuple[str, ...], str]] = {}  # id -> (domains, reason)
        self._conns: dict[str, _Partner] = {}
        self._call_ids = _CallIds(max_call_ids)
        self._pool = SipFramer(max_message_bytes=max_message_bytes, max_headers=max_headers)
        self._pool_crlfs = 0
        self.closed = False
        self.set_partners(partners)

    # --- configuration -----------------------------------------------------------------

    def set_partners(self, partners: Mapping[str, Collection[str]]) -> None:
        """The enabled partners and their domains (after a policy reload too).

        A partner no longer listed keeps its live connection until the shell
        calls `trust_withdrawn` (the shell decides, from the live re-check).
        """
        # A dropped partner with a live connection keeps its domains until the shell
        # withdraws it, so its later requests get 503 (not 404) after that.
        self._departed = {
            pid: domains
            for pid, domains in {**self._departed, **self._partners}.items()
            if pid in self._conns and pid not in partners
        }
        self._partners = {pid: tuple(domains) for pid, domains in partners.items()}
        for pid in list(self._withdrawn):
            if pid in self._partners:
                del self._withdrawn[pid]

    @property
    def connections(self) -> dict[str, bool]:
        """Partner connections this router holds: id -> open (False: opening)."""
        return {pid: conn.open for pid, conn in self._conns.items()}

    # --- events from the shell ---------------------------------------------------------

    def pool_data(self, data: bytes | bytearray | memoryview) -> list[Action]:
        out = Actions()
        if self.closed:
            return []
        self._pool.feed(data)
        for _ in range(self._pool.buffered + 1):
            event = self._pool.next_event()
            if isinstance(event, NeedData):
                break
            if isinstance(event, KeepAlive):
                self._pool_crlfs = out.keepalive(None, event, self._pool_crlfs)
                continue
            self._pool_crlfs = 0
            if isinstance(event, FramingError):
                out.framing_error(None, UNKNOWN, event)
                for pid in list(self._conns):
                    self._drop_partner(out, pid, event.reason.value, answer=False)
                out.add(ClosePool(event.reason.value, event.detail))
                self.closed = True
                break
            assert isinstance(event, Message)
            if event.is_request:
                self._pool_request(out, event)
            else:
                self._pool_response(out, event)
        return out.done()

    def pool_closed(self) -> list[Action]:
        """The pool connection ended: every partner connection it owns closes."""
        out = Actions()
        for pid in list(self._conns):
            self._drop_partner(out, pid, "pool_closed", answer=False)
        self.closed = True
        return out.done()

    def partner_data(self, partner: str, data: bytes | bytearray | memoryview) -> list[Action]:
        conn = self._conns.get(partner)
        if conn is None or not conn.open or self.closed:
            return []  # a late read after we closed it: nothing to route
        out = Actions()
        conn.framer.feed(data)
        for _ in range(conn.framer.buffered + 1):
            event = conn.framer.next_event()
            if isinstance(event, NeedData):
                break
            if isinstance(event, KeepAlive):
                conn.crlfs = out.keepalive(partner, event, conn.crlfs)
                continue
            conn.crlfs = 0
            if isinstance(event, FramingError):
                out.framing_error(partner, partner, event)
                self._drop_partner(out, partner, event.reason.value, answer=False)
                break
            assert isinstance(event, Message)
            method, call_id = describe(event.head)
            if event.is_request:
                domains = self._partners.get(partner)
                if self.guard_partners:
                    # A partner no longer listed proves no domain: fail closed.
                    verdict = check_request(event, domains or ())
                    if verdict is not None:
                        out.reject("inbound", partner, event, verdict, reply_to=partner)
                        continue
                self._call_ids.remember(event, partner)
            out.send(None, event.raw)
            out.add(Report("inbound", partner, "relayed", method, call_id))
        return out.done()

    def partner_opened(self, partner: str) -> list[Action]:
        conn = self._conns.get(partner)
        if conn is None or conn.open:
            return []
        conn.open = True
        out = Actions()
        for message in conn.queue:
            out.send(partner, message.raw)
            method, call_id = describe(message.head)
            out.add(Report("outbound", partner, "relayed", method, call_id))
        conn.queue.clear()
        conn.queued_bytes = 0
        return out.done()

    def partner_failed(self, partner: str, reason: str, detail: str = "") -> list[Action]:
        """Opening failed (`partner_unreachable`, `partner_untrusted`...): 503 each waiter."""
        out = Actions()
        if partner in self._conns:
            self._drop_partner(out, partner, reason, answer=True, close=False, detail=detail)
        return out.done()

    def partner_closed(self, partner: str) -> list[Action]:
        """The partner connection ended; the next request to it opens a new one."""
        out = Actions()
        if partner in self._conns:
            self._drop_partner(
                out, partner, "partner_unreachable", answer=True, close=False, detail="closed"
            )
        return out.done()

    def trust_withdrawn(self, partner: str, reason: str) -> list[Action]:
        """The partner's trust is gone (removed, disabled, re-check failed): close its
        connection and answer its requests 503 `reason` from now on."""
        domains = self._partners.pop(partner, None) or self._departed.pop(partner, None)
        if domains is None and partner in self._withdrawn:
            domains = self._withdrawn[partner][0]
        self._withdrawn[partner] = (domains or (), reason)
        out = Actions()
        if partner in self._conns:
            self._drop_partner(out, partner, reason, answer=True)
        return out.done()

    # --- routing -------------------------------------------------------------------------

    def _pool_request(self, out: Actions, message: Message) -> None:
        head = message.head
        verdict = check_request(message, self.our_domains)
        if verdict is not None:
            out.reject("outbound", UNKNOWN, message, verdict, reply_to=None)
            return
        host = uri_domain(head.request_uri or "")[1]
        partner = _owner(host, {p: d for p, d in self._partners.items()})
        if partner is None:
            withdrawn = _owner(host, {p: d for p, (d, _) in self._withdrawn.items()})
            if withdrawn is not None:
                out.unavailable(withdrawn, message, self._withdrawn[withdrawn][1])
                return
            call_id = head.headers.get("call-id")
            partner = self._call_ids.owner(call_id)
            if partner is not None and partner in self._withdrawn:
                out.unavailable(partner, message, self._withdrawn[partner][1])
                return
            if partner is not None and partner not in self._partners:
                partner = None
        if partner is None:
            out.answer(
                "outbound",
                UNKNOWN,
                message,
                Reason.UNKNOWN_DESTINATION.value,
                404,
                None,
                offending=host or "",
            )
            return
        self._call_ids.remember(message, partner)
        conn = self._conns.get(partner)
        method, call_id = describe(head)
        if conn is None:
            conn = self._conns[partner] = _Partner(
                SipFramer(max_message_bytes=self.max_message_bytes, max_headers=self.max_headers)
            )
            out.add(OpenPartner(partner, host or ""))
        if conn.open:
            out.send(partner, message.raw)
            out.add(Report("outbound", partner, "relayed", method, call_id))
            return
        if (
            len(conn.queue) >= self.max_queued_messages
            or conn.queued_bytes + len(message.raw) > self.max_queued_bytes
        ):
            out.unavailable(partner, message, Reason.OVER_LIMIT.value, "queue full")
            return
        conn.queue.append(message)
        conn.queued_bytes += len(message.raw)
        # Reported when it leaves the queue (relayed, or answered 503).

    def _pool_response(self, out: Actions, message: Message) -> None:
        call_id = message.headers.get("call-id")
        partner = self._call_ids.owner(call_id)
        conn = self._conns.get(partner) if partner is not None else None
        _, shown = describe(message.head)
        if partner is None or conn is None or not conn.open:
            out.add(
                Report(
                    "outbound",
                    partner or UNKNOWN,
                    Reason.UNKNOWN_DESTINATION.value,
                    "",
                    shown,
                    detail="a response for no open partner connection; dropped",
                )
            )
            return
        out.send(partner, message.raw)
        out.add(Report("outbound", partner, "relayed", "", shown))

    def _drop_partner(
        self,
        out: Actions,
        partner: str,
        reason: str,
        *,
        answer: bool,
        close: bool = True,
        detail: str = "",
    ) -> None:
        conn = self._conns.pop(partner)
        if answer:
            for message in conn.queue:
                out.unavailable(partner, message, reason, detail)
        if close:
            out.add(ClosePartner(partner, reason))
