"""The edge's own SIP answers, sans-I/O: RFC 3261 section 8.2.6 responses and safe log text.

Owns: building the response the edge sends itself when it refuses a request
(status line, the request's Via/From/To/Call-ID/CSeq copied, a To tag, a
399 Warning naming our reason code), and `safe_text`, the one safe way to put
peer-controlled SIP text into a log line or label.

Must never: import trio, socket, anything that does I/O or any shell module;
raise on peer input; echo a line break or any header the peer did not send
(other than our To tag and Warning); copy peer text into a log unescaped.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from edge.core.sip_identity import TOKEN, Head, Message, has_tag

__all__ = ["REASON_PHRASES", "build_response", "safe_text"]

_UNSAFE_IN_HEADER = re.compile(r"[\x00\r\n]")

REASON_PHRASES: Final[dict[int, str]] = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Request Entity Too Large",
    480: "Temporarily Unavailable",
    503: "Service Unavailable",
    513: "Message Too Large",
}


def build_response(
    request: Message | Head,
    status_code: int,
    reason_code: str,
    *,
    to_tag: str | None = None,
    warn_agent: str = "edge",
) -> bytes | None:
    """The edge's own response to `request` (RFC 3261 section 8.2.6), or None.

    None when there must be no answer (an ACK, a response) or none can be
    built (a Via, From, To, Call-ID or CSeq is missing). `reason_code` is one
    of ours (a `Reason` value) and goes into a Warning header (399, RFC 3261
    section 20.43); nothing else the peer did not send is added.
    """
    head = request.head if isinstance(request, Message) else request
    if head.method is None or head.method == "ACK":
        return None
    headers = head.headers
    vias = headers.get_all("via")
    one = {name: headers.get_all(name) for name in ("from", "to", "call-id", "cseq")}
    if not vias or any(len(values) != 1 for values in one.values()):
        return None
    copied = [*vias, *(values[0] for values in one.values())]
    if any(_UNSAFE_IN_HEADER.search(value) for value in copied):
        return None  # best-effort heads may hold bare CR/LF: never echo a line break
    to = one["to"][0]
    if not has_tag(to):
        to = f"{to};tag={to_tag or secrets.token_hex(8)}"
    phrase = REASON_PHRASES.get(status_code, "Error")
    lines = [f"SIP/2.0 {status_code} {phrase}"]
    lines.extend(f"Via: {via}" for via in vias)
    lines.append(f"From: {one['from'][0]}")
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {one['call-id'][0]}")
    lines.append(f"CSeq: {one['cseq'][0]}")
    if TOKEN.fullmatch(warn_agent) and TOKEN.fullmatch(reason_code):
        lines.append(f'Warning: 399 {warn_agent} "{reason_code}"')
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


# --- logging ---------------------------------------------------------------------------

_SAFE_LIMIT = 80


def safe_text(value: object, limit: int = _SAFE_LIMIT) -> str:
    """A short printable form of peer-controlled text for a log line or label.

    Printable ASCII only (anything else becomes `\\xNN`/`\\uNNNN`), quotes and
    backslashes escaped, cut at `limit` characters with a marker saying so.
    """
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    cut = len(text) > limit
    text = text[:limit]
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        out = text
    else:
        out = text.replace("\\", "\\\\").replace('"', '\\"')
        out = out.encode("ascii", "backslashreplace").decode("ascii")
        out = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in out)
        if len(out) > 4 * limit:  # escapes grow the text; the bound still holds
            out, cut = out[: 4 * limit], True
    return f"{out}...(cut)" if cut else out
