"""What the outbound SIP router asks the shell to do, sans-I/O: actions and the edge's answers.

Owns: the action types `SipRouter` returns (`OpenPartner`, `SendToPartner`,
`SendToPool`, `ClosePartner`, `ClosePool`, `Report`), `Actions`, the ordered
list one router call builds (adjacent sends to one connection merged into one
write), and the answers the router writes into it: RFC 5626 pongs, the edge's
own 400/403/404/503 responses and the `Report` each refused message gets.

Must never: import trio, socket, anything that does I/O or any shell module;
decide where a message goes (the router does); put peer text into a `Report`
unsanitized (everything passes `safe_text`); rewrite a relayed message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edge.core.reasons import Reason
from edge.core.sip import FramingError, Head, KeepAlive, Message, build_response, safe_text

__all__ = [
    "Action",
    "Actions",
    "ClosePartner",
    "ClosePool",
    "Direction",
    "OpenPartner",
    "Report",
    "SendToPartner",
    "SendToPool",
    "describe",
]

Direction = Literal["inbound", "outbound"]  # inbound: partner -> pool


@dataclass(frozen=True, slots=True)
class OpenPartner:
    """Open (discover, dial, verify) a connection to `partner`; `host` chose it."""

    partner: str
    host: str


@dataclass(frozen=True, slots=True)
class SendToPartner:
    partner: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToPool:
    data: bytes


@dataclass(frozen=True, slots=True)
class ClosePartner:
    partner: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClosePool:
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    """One message's fate. Strings are sanitized (`safe_text`); `partner` is a
    configured id or "unknown". `result` is "relayed" or a reason code;
    `answered` the status the edge sent back itself, if any."""

    direction: Direction  # inbound: partner -> pool
    partner: str
    result: str
    method: str = ""
    call_id: str = ""
    offending_domain: str = ""
    answered: int | None = None
    detail: str = ""

    @property
    def rejected(self) -> bool:
        return self.result != "relayed"


Action = OpenPartner | SendToPartner | SendToPool | ClosePartner | ClosePool | Report


@dataclass
class _Send:
    key: str | None  # None: the pool; else a partner id
    parts: list[bytes]


class Actions:
    """Actions in order, merging adjacent sends to the same connection.

    A send's key is None for the pool, else a partner id. The answer helpers
    below append the edge's own response (if one can be built) and the
    message's `Report`.
    """

    def __init__(self) -> None:
        self.items: list[Action | _Send] = []

    def send(self, key: str | None, data: bytes) -> None:
        last = self.items[-1] if self.items else None
        if isinstance(last, _Send) and last.key == key:
            last.parts.append(data)
        else:
            self.items.append(_Send(key, [data]))

    def add(self, action: Action) -> None:
        if isinstance(action, Report) and self.items and isinstance(self.items[-1], _Send):
            # Reports carry no bytes: keep the send open for merging by
            # putting the report before it (the shell reports before sending).
            self.items.insert(len(self.items) - 1, action)
            return
        self.items.append(action)

    def done(self) -> list[Action]:
        out: list[Action] = []
        for item in self.items:
            if isinstance(item, _Send):
                data = item.parts[0] if len(item.parts) == 1 else b"".join(item.parts)
                out.append(SendToPool(data) if item.key is None else SendToPartner(item.key, data))
            else:
                out.append(item)
        return out

    def keepalive(self, key: str | None, event: KeepAlive, crlfs: int) -> int:
        crlfs += len(event.raw) // 2
        while crlfs >= 2:
            self.send(key, b"\r\n")  # RFC 5626 pong
            crlfs -= 2
        return crlfs

    def answer(
        self,
        direction: Direction,
        partner: str,
        message: Message,
        reason: str,
        status: int,
        reply_to: str | None,
        *,
        offending: str = "",
        detail: str = "",
    ) -> None:
        answer = build_response(message, status, reason)
        if answer is not None:
            self.send(reply_to, answer)
        method, call_id = describe(message.head)
        self.add(
            Report(
                direction,
                partner,
                reason,
                method,
                call_id,
                safe_text(offending),
                status if answer is not None else None,
                detail,
            )
        )

    def reject(
        self,
        direction: Direction,
        partner: str,
        message: Message,
        verdict: tuple[Reason, str],
        *,
        reply_to: str | None,
    ) -> None:
        reason, offending = verdict
        status = 403 if reason is Reason.SIP_DOMAIN_MISMATCH else 400
        self.answer(
            direction, partner, message, reason.value, status, reply_to, offending=offending
        )

    def unavailable(self, partner: str, message: Message, reason: str, detail: str = "") -> None:
        self.answer("outbound", partner, message, reason, 503, None, detail=detail)

    def framing_error(self, reply_to: str | None, partner: str, error: FramingError) -> None:
        answer = (
            build_response(error.head, error.status_code, error.reason.value)
            if error.head is not None
            else None
        )
        if answer is not None:
            self.send(reply_to, answer)
        method, call_id = describe(error.head)
        self.add(
            Report(
                "outbound" if reply_to is None else "inbound",
                partner,
                error.reason.value,
                method,
                call_id,
                "",
                error.status_code if answer is not None else None,
                error.detail,
            )
        )


def describe(head: Head | None) -> tuple[str, str]:
    """(method, Call-ID) of a head, sanitized for a `Report`."""
    if head is None:
        return "", ""
    return safe_text(head.method or "", 32), safe_text(head.headers.get("call-id") or "")
