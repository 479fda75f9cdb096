"""SIP message model and identities, sans-I/O: headers, URIs and the domain guard.

Owns: the parsed form of one SIP message (`Head`, `Message`, `Headers` with
compact forms, RFC 3261 section 7.3), splitting header values, reading the URI
of a name-addr/addr-spec value, the host or domain a `sip:`/`sips:`/`tel:` URI
proves, and the guard decision `check_request`: may this peer speak for the
domains its request claims.

Must never: import trio, socket, anything that does I/O or any shell module;
raise on peer input (an unreadable value proves nothing and the guard fails
closed); modify a message (a `Message` carries the exact bytes received).

Identities (`check_request`) and the `tel:` decision
----------------------------------------------------
From and P-Asserted-Identity are name-addr (`"Name" <uri>;params`) or
addr-spec (`uri;params`, where every `;param` belongs to the header). A
`sip:`/`sips:` URI proves the domain of its host. A `tel:` URI names a number,
not a domain: it proves the domain of its `phone-context` parameter when that
is a domain name (RFC 3966 section 5.1.5), and nothing otherwise. The guard
fails closed:
- `From` must prove a domain inside the allowed domains; a `tel:` without a
  domain context, another scheme, or an unreadable URI is a mismatch.
- Every `P-Asserted-Identity` URI that proves a domain must prove one inside
  the allowed domains. A domain-less `tel:` is accepted only beside a URI in
  the same request that proved an allowed domain (RFC 3325 allows one `sip:`
  and one `tel:` identity); a PAI made only of domain-less `tel:` URIs, any
  other scheme, or an unreadable value is a mismatch.
- Every request is checked, in-dialog ones included: in every request `From`
  names the sender (RFC 3261 section 12.2.1.1 sets it to the local URI).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Final

from edge.core.reasons import Reason
from edge.core.trust import name_in_domains

__all__ = [
    "COMPACT_FORMS",
    "CONTENT_LENGTH",
    "NO_DOMAIN",
    "TOKEN",
    "Head",
    "Headers",
    "Message",
    "canonical_name",
    "check_request",
    "has_tag",
    "header_uri",
    "split_values",
    "uri_domain",
]

# RFC 3261 section 7.3.3 plus the compact forms registered since (RFC 3265, 3515,
# 3892, 4028, 3841...). Keys and values are lowercase.
COMPACT_FORMS: Final[dict[str, str]] = {
    "f": "from",
    "t": "to",
    "i": "call-id",
    "l": "content-length",
    "v": "via",
    "m": "contact",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "r": "refer-to",
    "b": "referred-by",
    "u": "allow-events",
    "x": "session-expires",
}


# An RFC 3261 token (method names, header names, Warning agents).
TOKEN: Final = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Dot-separated _HOST_LABELs, checked in one call.
_HOST_NAME = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")


class Headers:
    """Header fields in arrival order: (lowercase full name, unfolded value).

    Lookups accept any case and compact forms (`get("f")` is `get("From")`).
    Built over the validated header block (every line `name: value` or a
    continuation, each ending CRLF) and parsed lazily: a lookup is one regex
    search over the block, and the full list is built only when iterated, so
    a relayed message costs no per-header Python work.
    """

    __slots__ = ("_block", "_fields", "_lower")

    def __init__(self, block: str, lower: str | None = None) -> None:
        self._block = block
        self._fields: tuple[tuple[str, str], ...] | None = None
        # "\n" + block, lowercased; "" if not ASCII. The framer passes it
        # when it has made it already.
        self._lower = lower

    @classmethod
    def from_fields(cls, fields: list[tuple[str, str]]) -> Headers:
        return cls("".join(f"{name}: {value}\r\n" for name, value in fields))

    def _all(self) -> tuple[tuple[str, str], ...]:
        if self._fields is None:
            self._fields = tuple(
                (canonical_name(m.group(1)), _unfold(m.group(2)))
                for m in _FIELD.finditer(self._block)
            )
        return self._fields

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"Headers({len(self)} fields)"

    def lowered(self) -> str:
        """The block after a newline, lowercased; "" when the block is not ASCII."""
        if self._lower is None:
            block = "\n" + self._block
            # Case-sensitive search of the lowercased block (same offsets for
            # ASCII), then values cut from the original: much faster than
            # IGNORECASE with an anchor alternative at every position.
            self._lower = block.lower() if block.isascii() else ""
        return self._lower

    def _matches(self, name: str) -> Iterator[re.Match[str]]:
        lower = self._lower if self._lower is not None else self.lowered()
        if lower:
            return _lookup(name).finditer(lower)
        return _lookup(name, ignore_case=True).finditer("\n" + self._block)

    def get_all(self, name: str) -> list[str]:
        """Every field named `name`, in order, one string per header line."""
        block = self._block
        return [_unfold(block[m.start(1) - 1 : m.end(1) - 1]) for m in self._matches(name)]

    def get(self, name: str) -> str | None:
        """The first field named `name`, or None."""
        for m in self._matches(name):
            return _unfold(self._block[m.start(1) - 1 : m.end(1) - 1])
        return None

    def values(self, name: str) -> list[str]:
        """Every value of `name`: the fields' comma-separated values, split."""
        out: list[str] = []
        for value in self.get_all(name):
            out.extend(split_values(value))
        return out


# One field of a validated block: name, then the value with its continuations.
_FIELD = re.compile(r"([^:\r\n \t]+)[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")
_FOLD = re.compile(r"[ \t]*\r\n[ \t]+")
_LOOKUPS: dict[tuple[str, bool], re.Pattern[str]] = {}


def _unfold(value: str) -> str:
    # Folding: the line break and the whitespace around it become one space.
    return _FOLD.sub(" ", value).rstrip(" \t") if "\r\n" in value else value.rstrip(" \t")


def _lookup(name: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """A regex finding the values of `name` (full or compact form) in "\\n" + block,
    lowercased unless `ignore_case`."""
    pattern = _LOOKUPS.get((name, ignore_case))
    if pattern is None:
        key = canonical_name(name)
        names = [key] + [short for short, full in COMPACT_FORMS.items() if full == key]
        alternatives = "|".join(re.escape(n) for n in names)
        pattern = re.compile(
            rf"\n(?:{alternatives})[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
            re.IGNORECASE if ignore_case else 0,
        )
        if len(_LOOKUPS) < 256:  # names come from our code, but stay bounded anyway
            _LOOKUPS[(name, ignore_case)] = pattern
    return pattern


# Head and Message are built once per relayed message, so they are plain
# slotted dataclasses, not frozen ones: a frozen dataclass's __init__ calls
# object.__setattr__ per field and costs four times as much (bench/README.md,
# "sip_relay.py"). Nothing assigns to them after the framer builds them.


@dataclass(slots=True)
class Head:
    """A start line and its headers. Exactly one of `method` / `status_code` is set."""

    start_line: str
    method: str | None  # requests: the method as sent (case-sensitive, RFC 3261 7.1)
    request_uri: str | None
    status_code: int | None  # responses
    reason_phrase: str | None
    headers: Headers

    @property
    def is_request(self) -> bool:
        return self.method is not None


@dataclass(slots=True, eq=False)
class Message:
    """One whole SIP message: `raw` is every byte received for it, unchanged."""

    raw: bytes
    head: Head
    body_offset: int  # raw[body_offset:] is the body (Content-Length bytes)

    @property
    def is_request(self) -> bool:
        return self.head.method is not None

    @property
    def method(self) -> str | None:
        return self.head.method

    @property
    def headers(self) -> Headers:
        return self.head.headers

    @property
    def body(self) -> bytes:
        return self.raw[self.body_offset :]


# --- header helpers -------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Lowercase full header name: `F` -> `from`, `Call-ID` -> `call-id`."""
    lower = name.lower()
    return COMPACT_FORMS.get(lower, lower)


# Content-Length values of a lowercased block (the framer's fast path), and
# the guard's identities.
CONTENT_LENGTH: Final = _lookup("content-length")
_FROM_VALUES: Final = _lookup("from")
_PAI_VALUES: Final = _lookup("p-asserted-identity")


def split_values(value: str) -> list[str]:
    """Split one header value on commas outside quoted strings and `<...>`."""
    if "," not in value:
        return [value.strip()] if value.strip() else []
    out: list[str] = []
    depth_angle = False
    quoted = False
    escaped = False
    begin = 0
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth_angle = True
        elif ch == ">":
            depth_angle = False
        elif ch == "," and not depth_angle:
            part = value[begin:i].strip()
            if part:
                out.append(part)
            begin = i + 1
    part = value[begin:].strip()
    if part:
        out.append(part)
    return out


# Up to the first '<' outside a quoted string (RFC 3261 quoted-pair escapes
# inside). Possessive: runs are consumed whole and never given back (no run or
# quoted string can end at a '<' in another way), so the scan is linear and a
# C loop per run.
_NAME_ADDR_OPEN = re.compile(r'(?:[^"<]++|"(?:[^"\\]++|\\[\s\S])*+")*+<')
# The whole value when every quoted string in it is closed.
_QUOTES_CLOSED = re.compile(r'(?:[^"]++|"(?:[^"\\]++|\\[\s\S])*+")*+')


def _split_name_addr(value: str) -> tuple[str, str] | None:
    """(URI, header params) of a name-addr or addr-spec value, or None if unreadable."""
    value = value.strip()
    opened = _NAME_ADDR_OPEN.match(value)
    if opened is not None:
        i = opened.end() - 1
        close = value.find(">", i + 1)
        if close < 0:
            return None
        return value[i + 1 : close].strip(), value[close + 1 :]
    # No '<' outside a quoted string: an addr-spec, or a quote left open.
    if not value or _QUOTES_CLOSED.fullmatch(value) is None:
        return None
    # addr-spec: a URI holding ';' must be in <...> (RFC 3261 section 20), so every
    # ';' here starts a header parameter.
    uri, _, params = value.partition(";")
    if " " in uri.strip() or '"' in uri:
        return None
    return uri.strip(), ";" + params if params else ""


def header_uri(value: str) -> str | None:
    """The URI of a From/To/Contact/P-Asserted-Identity value, or None if unreadable."""
    parts = _split_name_addr(value)
    return parts[0] if parts else None


def has_tag(value: str) -> bool:
    parts = _split_name_addr(value)
    if parts is None:
        return False
    return any(param.split("=", 1)[0].strip().lower() == "tag" for param in parts[1].split(";"))


def _normalize_host(host: str) -> str | None:
    """A lowercase host without trailing dot: a DNS name, IPv4, or [IPv6]; else None."""
    host = host.lower()
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    host = host[:-1] if host.endswith(".") else host
    if not host or len(host) > 253 or not host.isascii():
        return None
    if _HOST_NAME.fullmatch(host):
        return host
    return None


def _sip_host(rest: str) -> str | None:
    """The host of the part of a sip:/sips: URI after the scheme."""
    if rest.count("@") > 1:
        return None  # ambiguous to some parsers: prove nothing
    hostport = rest.rpartition("@")[2]
    for stop in (";", "?"):
        hostport = hostport.split(stop, 1)[0]
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            return None
        host, port = hostport[: close + 1], hostport[close + 1 :]
    else:
        host, colon, port_text = hostport.partition(":")
        port = colon + port_text
    if port and not (port.startswith(":") and _PORT.fullmatch(port[1:])):
        return None
    return _normalize_host(host)


def _tel_domain(rest: str) -> str | None:
    """The domain of a tel: URI's phone-context (RFC 3966), None if it names none."""
    for param in rest.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "phone-context":
            value = value.strip()
            if value.startswith("+"):
                return None  # a global-number-digits context names no domain
            return _normalize_host(value)
    return None


def uri_domain(uri: str) -> tuple[str, str | None]:
    """(scheme, host) of a URI: the host a sip:/sips: URI names, or the domain of a
    tel: URI's phone-context; None when the URI proves no domain."""
    # A partner's From URIs repeat (its users, every request of a dialog):
    # remembered, short ones only, so the cache stays under ~1 MB.
    if len(uri) <= _CACHED_URI_CHARS:
        return _uri_domain_cached(uri)
    return _uri_domain(uri)


_CACHED_URI_CHARS = 256


def _uri_domain(uri: str) -> tuple[str, str | None]:
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.strip().lower()
    if not colon:
        return "", None
    if scheme in ("sip", "sips"):
        return scheme, _sip_host(rest)
    if scheme == "tel":
        return scheme, _tel_domain(rest)
    return scheme, None


_uri_domain_cached = functools.lru_cache(maxsize=4096)(_uri_domain)


# --- the guard ------------------------------------------------------------------------

NO_DOMAIN: Final = "(none)"  # offending "domain" when the URI proves none


def _inside(host: str | None, domains: Collection[str]) -> bool:
    if host is None or host.startswith("["):
        return False
    return name_in_domains(host, domains) is not None


def check_request(message: Message | Head, domains: Collection[str]) -> tuple[Reason, str] | None:
    """None if the request's identities lie inside `domains`, else (reason, offending).

    `domains` are normalized (lowercase, no trailing dot). `offending` is the
    host that fell outside, or `"(none)"` when a URI proves no domain; pass it
    through `safe_text` before logging. Responses are not checked (None).
    """
    head = message.head if isinstance(message, Message) else message
    if head.method is None:
        return None
    headers = head.headers
    lower = headers.lowered()
    if lower:
        # An ASCII head: the values are read from the lowercased block in one
        # C call each. Lowercase changes no character these checks split on,
        # and everything they compare (scheme, host, parameter names) is
        # compared lowercased anyway, so the verdict is that of the original
        # values (tests/test_sip.py checks both paths agree).
        froms = _FROM_VALUES.findall(lower)
        pai_fields = _PAI_VALUES.findall(lower) if "p-asserted-identity" in lower else []
    else:
        froms = headers.get_all("from")
        pai_fields = headers.get_all("p-asserted-identity")
    if len(froms) != 1:
        return Reason.SIP_MALFORMED, NO_DOMAIN  # none, or two: which would the pool read?
    value = froms[0]
    # header_uri strips the value, so only a folded one needs _unfold here.
    uri = header_uri(_unfold(value) if "\r\n" in value else value)
    host = uri_domain(uri)[1] if uri is not None else None
    if not _inside(host, domains):
        return Reason.SIP_DOMAIN_MISMATCH, host or NO_DOMAIN
    if not pai_fields:
        return None
    pai = [part for field in pai_fields for part in split_values(_unfold(field))]
    if not pai:
        return None
    proved = False
    for value in pai:
        uri = header_uri(value)
        if uri is None:
            return Reason.SIP_DOMAIN_MISMATCH, NO_DOMAIN
        scheme, host = uri_domain(uri)
        if host is not None:
            if not _inside(host, domains):
                return Reason.SIP_DOMAIN_MISMATCH, host
            proved = True
        elif scheme != "tel":
            return Reason.SIP_DOMAIN_MISMATCH, NO_DOMAIN
    if not proved:
        return Reason.SIP_DOMAIN_MISMATCH, NO_DOMAIN
    return None
