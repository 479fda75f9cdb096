"""SIP over a stream, sans-I/O: the public face of the framer, identities and answers.

Owns: nothing of its own; it re-exports the names the relay, the router and
the tests import, from the three modules that own them:
- `edge.core.sip_framing`: `SipFramer`, its events and bounds (RFC 3261
  sections 7 and 18.3, RFC 5626 keep-alives);
- `edge.core.sip_identity`: the message model (`Head`, `Message`, `Headers`),
  header values, URI hosts and the guard `check_request`;
- `edge.core.sip_answers`: the edge's own responses (RFC 3261 section 8.2.6)
  and `safe_text` for log lines.

Must never: import trio, socket, anything that does I/O or any shell module;
grow logic of its own (put it in the module that owns the concern).
"""

from __future__ import annotations

from edge.core.sip_answers import REASON_PHRASES, build_response, safe_text
from edge.core.sip_framing import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_MESSAGE_BYTES,
    NEED_DATA,
    Event,
    FramingError,
    KeepAlive,
    NeedData,
    SipFramer,
)
from edge.core.sip_identity import (
    COMPACT_FORMS,
    NO_DOMAIN,
    Head,
    Headers,
    Message,
    canonical_name,
    check_request,
    header_uri,
    split_values,
    uri_domain,
)

__all__ = [
    "COMPACT_FORMS",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NEED_DATA",
    "NO_DOMAIN",
    "REASON_PHRASES",
    "Event",
    "FramingError",
    "Head",
    "Headers",
    "KeepAlive",
    "Message",
    "NeedData",
    "SipFramer",
    "build_response",
    "canonical_name",
    "check_request",
    "header_uri",
    "safe_text",
    "split_values",
    "uri_domain",
]
