"""SIP over a stream, sans-I/O: a message framer, identity checks and the edge's own answers.

Owns: turning the bytes of one TLS/TCP stream into SIP events (RFC 3261
sections 7 and 18.3, RFC 5626 keep-alives), reading the identities a request
claims (`From`, `P-Asserted-Identity`), the guard decision "may this peer speak
for that domain", the responses the edge builds itself (RFC 3261 section
8.2.6) and the one safe way to put peer-controlled SIP text into a log line.

Must never: import trio, socket or anything that does I/O; raise on peer
input (every problem is an event carrying a reason code); buffer more than
`max_message_bytes` of one message; rewrite a relayed message (a `Message`
carries the exact bytes received, and the relay sends those).

Theory of operation
-------------------
`SipFramer` works like h11: the caller `feed()`s whatever arrived and then
pulls events with `next_event()` until it returns `NEED_DATA`. Bytes live in
one bytearray; the framer keeps an offset to the start of the current message
instead of deleting consumed bytes message by message, and compacts once per
`NEED_DATA`, so a chunk holding ten messages costs one memmove, not ten. The
search for the blank line that ends the head resumes where the previous
search stopped, so a head arriving one byte per TLS record is scanned once.
Each message costs one copy (its `raw` bytes) plus the decoding of its head.

Framing rules, and why they are strict:
- Lines end with CRLF only. A bare CR or LF in a head is `sip_malformed`:
  a pool that accepts bare LF would otherwise see a different message
  boundary than we do, and that difference is exactly how a forbidden request
  is smuggled past a guard.
- `Content-Length` (or `l`) is required on a stream and must appear once;
  two of them are `sip_malformed` for the same reason.
- Over `max_message_bytes` (head plus declared body) or `max_headers` header
  fields: `sip_too_large`. The head is cut at the bound, never buffered further.
- Runs of CRLF between messages are keep-alives (RFC 5626 ping CRLFCRLF, pong
  CRLF): reported as `KeepAlive` with their raw bytes, to be passed through.
  How a run is split into `KeepAlive` events depends on how the bytes arrived;
  their concatenation does not.
- After an error the framer is finished: `next_event()` returns the same
  `FramingError` again and `feed()` drops its input.

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
import secrets
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Final

from edge.core.reasons import Reason
from edge.core.trust import name_in_domains

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NEED_DATA",
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

DEFAULT_MAX_MESSAGE_BYTES: Final = 65535
DEFAULT_MAX_HEADERS: Final = 200

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

# A Content-Length with more digits than this is over any sane bound already.
_MAX_LENGTH_DIGITS = 10
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_REQUEST_LINE = re.compile(r"([A-Za-z0-9.!%*_+`'~-]+) (\S+) ([Ss][Ii][Pp]/2\.0)")
_STATUS_LINE = re.compile(r"[Ss][Ii][Pp]/2\.0 ([1-6][0-9][0-9])(?: (.*))?")
_DIGITS = re.compile(r"[0-9]+")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Dot-separated _HOST_LABELs, checked in one call.
_HOST_NAME = re.compile(r"(?:(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_UNSAFE_IN_HEADER = re.compile(r"[\x00\r\n]")
# A whole header block: fields (token, optional whitespace, colon, value) with
# their continuation lines, every line ending CRLF. Bare CR/LF are excluded
# before this runs, so `[^\r\n]` is "any character of the line".
_BLOCK = re.compile(r"(?:[A-Za-z0-9.!%*_+`'~-]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")


# --- events ---------------------------------------------------------------------------


class NeedData:
    """`next_event()` has nothing more until the next `feed()`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Headers:
    """Header fields in arrival order: (lowercase full name, unfolded value).

    Lookups accept any case and compact forms (`get("f")` is `get("From")`).
    Built over the validated header block (every line `name: value` or a
    continuation, each ending CRLF) and parsed lazily: a lookup is one regex
    search over the block, and the full list is built only when iterated, so
    a relayed message costs no per-header Python work.
    """

    __slots__ = ("_block", "_fields", "_lower")

    def __init__(self, block: str) -> None:
        self._block = block
        self._fields: tuple[tuple[str, str], ...] | None = None
        self._lower: str | None = None  # "\n" + block, lowercased; "" if not ASCII

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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True, eq=False)
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


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """One or more CRLFs between messages (RFC 5626 ping/pong); relay as is."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class FramingError:
    """The stream cannot be framed any further.

    `head` is what could be read of the offending message (None if not even
    its start line): enough, when it is a request, for `build_response`.
    `detail` is ours (it never quotes the peer's bytes) and safe to log.
    """

    reason: Reason  # SIP_MALFORMED or SIP_TOO_LARGE
    detail: str
    head: Head | None
    status_code: int  # what to answer when a response can be built (400, 413, 513)


Event = Message | KeepAlive | FramingError | NeedData


# --- the framer -----------------------------------------------------------------------


class SipFramer:
    """Bytes of one stream in, SIP events out (see the module docstring)."""

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        if max_message_bytes < 64 or max_headers < 1:
            raise ValueError("max_message_bytes must be >= 64 and max_headers >= 1")
        self.max_message_bytes = max_message_bytes
        self.max_headers = max_headers
        self._buf = bytearray()
        self._start = 0  # offset of the current message in _buf
        self._scan = 0  # where the search for CRLFCRLF resumes
        self._pending: tuple[Head, int, int] | None = None  # head, body offset, total length
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned in an event."""
        return len(self._buf) - self._start

    @property
    def error(self) -> FramingError | None:
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is None:
            self._buf += data

    def next_event(self) -> Event:
        if self._error is not None:
            return self._error
        event = self._next()
        if event is NEED_DATA:
            # Compact once per NEED_DATA rather than once per message.
            if self._start:
                del self._buf[: self._start]
                self._scan -= self._start
                self._start = 0
        elif isinstance(event, FramingError):
            self._error = event
            self._buf = bytearray()
            self._start = self._scan = 0
        return event

    def _take(self, end: int) -> bytes:
        buf = self._buf
        if self._start == 0 and end == len(buf):
            raw = bytes(buf)  # the usual case: one read held exactly one message
        else:
            with memoryview(buf) as view:
                raw = view[self._start : end].tobytes()
        self._start = self._scan = end
        return raw

    def _next(self) -> Event:
        buf = self._buf
        start = self._start
        if self._pending is not None:
            head, body_offset, total = self._pending
            if len(buf) - start < total:
                return NEED_DATA
            self._pending = None
            return Message(self._take(start + total), head, body_offset)
        if len(buf) == start:
            return NEED_DATA
        if buf[start] == 0x0D:  # CR: a keep-alive run, or the start of one
            end = start
            while buf.startswith(b"\r\n", end):
                end += 2
            if end > start:
                return KeepAlive(self._take(end))
            if len(buf) - start < 2:
                return NEED_DATA
            return self._fail(Reason.SIP_MALFORMED, "a bare CR between messages", None, 400)
        limit = start + self.max_message_bytes
        found = buf.find(b"\r\n\r\n", max(self._scan, start), limit)
        if found < 0:
            if len(buf) >= limit:
                return self._fail(
                    Reason.SIP_TOO_LARGE,
                    f"no end of headers within max_message_bytes={self.max_message_bytes}",
                    self._best_effort_head(start, limit),
                    513,
                )
            self._scan = max(start, len(buf) - 3)
            return NEED_DATA
        return self._frame_head(start, found)

    def _frame_head(self, start: int, found: int) -> Event:
        buf = self._buf
        head_end = found + 4
        # A CR or LF outside a CRLF pair: fail closed (see module docstring).
        pairs = buf.count(b"\r\n", start, found)
        if buf.count(b"\r", start, found) != pairs or buf.count(b"\n", start, found) != pairs:
            return self._fail(
                Reason.SIP_MALFORMED,
                "a bare CR or LF in the headers",
                self._best_effort_head(start, found),
                400,
            )
        # A slice copy of a head is cheaper than a memoryview export and release.
        text = buf[start:found].decode("utf-8", "surrogateescape")
        parsed = _parse_head(text, self.max_headers)
        if isinstance(parsed, _HeadProblem):
            status = 513 if parsed.reason is Reason.SIP_TOO_LARGE else 400
            return self._fail(parsed.reason, parsed.detail, parsed.partial, status)
        head, length = parsed
        total = head_end - start + length
        if total > self.max_message_bytes:
            return self._fail(
                Reason.SIP_TOO_LARGE,
                f"message of {total} bytes over max_message_bytes={self.max_message_bytes}",
                head,
                413 if head_end - start <= self.max_message_bytes else 513,
            )
        body_offset = head_end - start
        if len(buf) - start < total:
            self._pending = (head, body_offset, total)
            self._scan = head_end
            return NEED_DATA
        return Message(self._take(start + total), head, body_offset)

    def _best_effort_head(self, start: int, end: int) -> Head | None:
        """The head as far as it can be read, to answer the request if possible."""
        with memoryview(self._buf) as view:
            text = str(view[start:end], "utf-8", "surrogateescape")
        text = text[: text.rfind("\r\n")] if "\r\n" in text else ""
        parsed = _parse_head(text, self.max_headers, lenient=True)
        if isinstance(parsed, _HeadProblem):
            return parsed.partial
        return parsed[0]

    def _fail(self, reason: Reason, detail: str, head: Head | None, status: int) -> FramingError:
        return FramingError(reason, detail, head, status)


@dataclass(frozen=True, slots=True)
class _HeadProblem:
    reason: Reason
    detail: str
    partial: Head | None


def _parse_start_line(line: str) -> tuple[str | None, str | None, int | None, str | None] | None:
    if line[:4].upper() == "SIP/":
        status = _STATUS_LINE.fullmatch(line)
        if status is None:
            return None
        return None, None, int(status.group(1)), status.group(2) or ""
    request = _REQUEST_LINE.fullmatch(line)
    if request is None:
        return None
    return request.group(1), request.group(2), None, None


def _parse_head(
    text: str, max_headers: int, *, lenient: bool = False
) -> tuple[Head, int] | _HeadProblem:
    """Parse a head (no final CRLFCRLF). Returns the head and its Content-Length.

    The fast path checks the whole header block with one regex and counts
    fields by counting line starts; only a bad block (or `lenient`, the best
    effort for an answer) walks the lines to say what is wrong and keep what
    can be read.
    """
    first, sep, rest = text.partition("\r\n")
    start = _parse_start_line(first)
    if start is None:
        return _HeadProblem(Reason.SIP_MALFORMED, "the start line is not SIP/2.0", None)
    method, uri, status, phrase = start
    block = rest + "\r\n" if sep else ""
    if lenient or not _BLOCK.fullmatch(block):
        return _parse_head_slowly(first, start, block, max_headers, lenient=lenient)
    count = block.count("\r\n") - block.count("\r\n ") - block.count("\r\n\t")
    headers = Headers(block)
    head = Head(first, method, uri, status, phrase, headers)
    if count > max_headers:
        return _HeadProblem(
            Reason.SIP_TOO_LARGE, f"more than max_headers={max_headers} header fields", head
        )
    # The usual case in one regex call: exactly one unfolded, plain-digits
    # Content-Length in an ASCII head. Anything else takes `_content_length`,
    # which says exactly what is wrong.
    lower = headers.lowered()
    if lower:
        lengths = _CONTENT_LENGTH.findall(lower)
        if len(lengths) == 1 and "\r\n" not in lengths[0]:
            raw = lengths[0].rstrip(" \t")
            if raw.isdigit() and len(raw.lstrip("0")) <= _MAX_LENGTH_DIGITS:
                return head, int(raw)
    return _content_length(head)


def _parse_head_slowly(
    first: str,
    start: tuple[str | None, str | None, int | None, str | None],
    block: str,
    max_headers: int,
    *,
    lenient: bool,
) -> tuple[Head, int] | _HeadProblem:
    method, uri, status, phrase = start
    fields: list[list[str]] = []
    problem: tuple[Reason, str] | None = None
    for line in block.split("\r\n")[:-1]:
        if line[:1] in (" ", "\t"):
            if not fields:
                problem = problem or (Reason.SIP_MALFORMED, "a continuation line with no header")
                continue
            fields[-1][1] = fields[-1][1] + " " + line.strip(" \t")
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _TOKEN.fullmatch(name):
            problem = problem or (Reason.SIP_MALFORMED, "a header line without a valid name:")
            continue
        if len(fields) >= max_headers:
            problem = problem or (
                Reason.SIP_TOO_LARGE,
                f"more than max_headers={max_headers} header fields",
            )
            break
        fields.append([name, value.strip(" \t")])
    headers = Headers.from_fields([(f[0], f[1]) for f in fields])
    head = Head(first, method, uri, status, phrase, headers)
    if problem is not None and not lenient:
        return _HeadProblem(problem[0], problem[1], head)
    return _content_length(head)


def _content_length(head: Head) -> tuple[Head, int] | _HeadProblem:
    lengths = head.headers.get_all("content-length")
    if not lengths:
        return _HeadProblem(Reason.SIP_MALFORMED, "no Content-Length (required on a stream)", head)
    if len(lengths) > 1:
        return _HeadProblem(Reason.SIP_MALFORMED, "more than one Content-Length", head)
    raw = lengths[0]
    if not _DIGITS.fullmatch(raw):
        return _HeadProblem(Reason.SIP_MALFORMED, "Content-Length is not a number", head)
    if len(raw.lstrip("0")) > _MAX_LENGTH_DIGITS:
        return _HeadProblem(Reason.SIP_TOO_LARGE, "Content-Length is absurdly large", head)
    return head, int(raw)


# --- header helpers -------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Lowercase full header name: `F` -> `from`, `Call-ID` -> `call-id`."""
    lower = name.lower()
    return COMPACT_FORMS.get(lower, lower)


# Content-Length values of a lowercased block (see _parse_head).
_CONTENT_LENGTH = _lookup("content-length")


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
# inside). What it matches, the character loop below would find the same way;
# whatever it does not match (addr-spec, unclosed quote) takes the loop.
_NAME_ADDR_OPEN = re.compile(r'(?:[^"<]|"(?:[^"\\]|\\[\s\S])*")*<')


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
    quoted = False
    escaped = False
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
            close = value.find(">", i + 1)
            if close < 0:
                return None
            return value[i + 1 : close].strip(), value[close + 1 :]
    if quoted or not value:
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


def _has_tag(value: str) -> bool:
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
    froms = head.headers.get_all("from")
    if len(froms) != 1:
        return Reason.SIP_MALFORMED, NO_DOMAIN  # none, or two: which would the pool read?
    uri = header_uri(froms[0])
    host = uri_domain(uri)[1] if uri is not None else None
    if not _inside(host, domains):
        return Reason.SIP_DOMAIN_MISMATCH, host or NO_DOMAIN
    pai = head.headers.values("p-asserted-identity")
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


# --- the edge's own answers -----------------------------------------------------------

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
    if not _has_tag(to):
        to = f"{to};tag={to_tag or secrets.token_hex(8)}"
    phrase = REASON_PHRASES.get(status_code, "Error")
    lines = [f"SIP/2.0 {status_code} {phrase}"]
    lines.extend(f"Via: {via}" for via in vias)
    lines.append(f"From: {one['from'][0]}")
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {one['call-id'][0]}")
    lines.append(f"CSeq: {one['cseq'][0]}")
    if _TOKEN.fullmatch(warn_agent) and _TOKEN.fullmatch(reason_code):
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
