"""SIP over a stream, sans-I/O: the framer that turns bytes into SIP events.

Owns: turning the bytes of one TLS/TCP stream into SIP events (RFC 3261
sections 7 and 18.3, RFC 5626 keep-alives): `SipFramer`, its events
(`Message`, `KeepAlive`, `FramingError`, `NEED_DATA`) and its bounds
(`max_message_bytes`, `max_headers`).

Must never: import trio, socket, anything that does I/O or any shell module;
raise on peer input (every problem is an event carrying a reason code); buffer
more than `max_message_bytes` of one message; rewrite a relayed message (a
`Message` carries the exact bytes received, and the relay sends those).

Theory of operation
-------------------
`SipFramer` works like h11: the caller `feed()`s whatever arrived and then
pulls events with `next_event()` until it returns `NEED_DATA`, or takes them
all at once with `events()` (the same framing, one call per read). A read fed
while nothing is held is kept as the caller's `bytes` object, uncopied, and a
message is a slice of it (the whole read when it holds one message); only a
message that straddles reads is gathered in a bytearray. The framer keeps an
offset to the start of the current message instead of deleting consumed
bytes message by message, and compacts once per `NEED_DATA`. The search for
the blank line that ends the head resumes where the previous search stopped,
so a head arriving one byte per TLS record is scanned once. A head is decoded
once and, in the usual case, checked by one regex (`_parse_head_fast`); what
that path does not vouch for is decided by the strict one (`_parse_head`),
which names the problem.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from edge.core.reasons import Reason
from edge.core.sip_identity import CONTENT_LENGTH, TOKEN, Head, Headers, Message

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NEED_DATA",
    "Event",
    "FramingError",
    "KeepAlive",
    "NeedData",
    "SipFramer",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 65535
DEFAULT_MAX_HEADERS: Final = 200

# A Content-Length with more digits than this is over any sane bound already.
_MAX_LENGTH_DIGITS = 10
_REQUEST_LINE = re.compile(r"([A-Za-z0-9.!%*_+`'~-]+) (\S+) ([Ss][Ii][Pp]/2\.0)")
_STATUS_LINE = re.compile(r"[Ss][Ii][Pp]/2\.0 ([1-6][0-9][0-9])(?: (.*))?")
_DIGITS = re.compile(r"[0-9]+")
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
        # What was fed and not yet consumed: the caller's bytes object when a
        # read starts clean (no copy), a bytearray once a message straddles reads.
        self._buf: bytes | bytearray = b""
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
        if self._error is not None:
            return
        if self._start == len(self._buf):
            # Nothing held: keep the caller's bytes as they are (no copy), so
            # a message that fills the read is the read itself (`_take`).
            self._buf = data if type(data) is bytes else bytes(data)
            self._start = self._scan = 0
            return
        if type(self._buf) is bytes:
            self._buf = bytearray(self._buf)
        self._buf += data

    def next_event(self) -> Event:
        if self._error is not None:
            return self._error
        event = self._next()
        if event is None:
            self._compact()
            return NEED_DATA
        if type(event) is FramingError:
            self._failed(event)
        return event

    def events(self) -> list[Message | KeepAlive | FramingError]:
        """What `next_event` would return until `NEED_DATA`, as one list.

        The same framing (both call `_next`), one call per read instead of
        one per message; a `FramingError` is the last item, and sticky.
        """
        if self._error is not None:
            return [self._error]
        out: list[Message | KeepAlive | FramingError] = []
        for _ in range(len(self._buf) - self._start + 1):  # each event consumes >= 1 byte
            event = self._next()
            if event is None:
                break
            out.append(event)
            if type(event) is FramingError:
                self._failed(event)
                return out
        self._compact()
        return out

    def _compact(self) -> None:
        # Once per NEED_DATA rather than once per message.
        start = self._start
        if start:
            buf = self._buf
            if isinstance(buf, bytearray):
                del buf[:start]
            else:
                self._buf = buf[start:]
            self._scan -= start
            self._start = 0

    def _failed(self, error: FramingError) -> None:
        self._error = error
        self._buf = b""
        self._start = self._scan = 0

    def _take(self, end: int) -> bytes:
        buf = self._buf
        if type(buf) is bytes:
            # A slice of the bytes fed; the whole of them is the same object.
            raw = buf[self._start : end]
        else:
            with memoryview(buf) as view:
                raw = view[self._start : end].tobytes()
        self._start = self._scan = end
        return raw

    def _next(self) -> Message | KeepAlive | FramingError | None:
        """The next event, or None for NEED_DATA (the one framing of both APIs)."""
        buf = self._buf
        start = self._start
        if self._pending is not None:
            head, body_offset, total = self._pending
            if len(buf) - start < total:
                return None
            self._pending = None
            return Message(self._take(start + total), head, body_offset)
        if len(buf) == start:
            return None
        if buf[start] == 0x0D:  # CR: a keep-alive run, or the start of one
            end = start
            while buf.startswith(b"\r\n", end):
                end += 2
            if end > start:
                return KeepAlive(self._take(end))
            if len(buf) - start < 2:
                return None
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
            return None
        return self._frame_head(start, found)

    def _frame_head(self, start: int, found: int) -> Message | FramingError | None:
        buf = self._buf
        head_end = found + 4
        # The head with the CRLF of its last line: the usual head is read by
        # one pass (`_parse_head_fast`); anything it does not vouch for takes
        # the strict path below, which decides exactly as before it existed.
        text = buf[start : found + 2].decode("utf-8", "surrogateescape")
        fast = _parse_head_fast(text, self.max_headers)
        if fast is not None:
            head, length = fast
        else:
            # A CR or LF outside a CRLF pair: fail closed (see module docstring).
            pairs = buf.count(b"\r\n", start, found)
            if buf.count(b"\r", start, found) != pairs or buf.count(b"\n", start, found) != pairs:
                return self._fail(
                    Reason.SIP_MALFORMED,
                    "a bare CR or LF in the headers",
                    self._best_effort_head(start, found),
                    400,
                )
            parsed = _parse_head(text[:-2], self.max_headers)
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
            return None
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


# The fast path's head in one regex: a start line of either form, then
# header lines that are each `token [WSP] :` or a continuation, each ending
# CRLF. It is `_REQUEST_LINE`, `_STATUS_LINE` and `_BLOCK`, with a line's
# `[^\r\n]*` (a set test per character) spelt `(?=[^\r]*+\r\n).*`: two
# tight C loops, one stopping at the first CR (which must start a CRLF), one
# at the first LF (which must end one), so no bare CR or LF can match.
# Possessive repeats give nothing back: the scan stays linear.
_TOKEN_CHAR = r"[A-Za-z0-9.!%*_+`'~-]"
_LINE_REST = r"(?=[^\r]*+\r\n).*\r\n"
_HEAD_FAST = re.compile(
    rf"(?:({_TOKEN_CHAR}+) (\S+) [Ss][Ii][Pp]/2\.0"
    r"|[Ss][Ii][Pp]/2\.0 ([1-6][0-9][0-9])(?: ([^\r\n]*))?)\r\n()"
    rf"(?:{_TOKEN_CHAR}++[ \t]*+:{_LINE_REST}(?:[ \t]{_LINE_REST})*+)*+"
)


def _parse_head_fast(text: str, max_headers: int) -> tuple[Head, int] | None:
    """The usual head in a few C calls, or None for the strict path to decide.

    `text` is the head up to and including the CRLF of its last line. It
    returns a result only where `_parse_head` would return the same one:
    every CR and LF paired, a valid start line, every header line a field or
    a continuation, at most `max_headers` fields, and one plain-digits
    `Content-Length` in an ASCII head. Anything else (errors included)
    returns None.
    """
    parsed = _HEAD_FAST.fullmatch(text)
    if parsed is None or not text.isascii():
        return None
    block_at = parsed.end(5)
    # A field line is at least 4 characters ("x:" CRLF): short blocks are
    # within the bound without counting; others count lines (continuations
    # included, so over-counting only sends a head to the strict path).
    if (len(text) - block_at) // 4 > max_headers and text.count("\n") - 1 > max_headers:
        return None
    lower = text[block_at - 1 :].lower()  # "\n" + the block, as Headers keeps it
    lengths = CONTENT_LENGTH.findall(lower)
    if len(lengths) != 1:
        return None
    raw = lengths[0].rstrip(" \t")
    if not raw.isdigit() or len(raw) > _MAX_LENGTH_DIGITS:
        return None  # folded, not digits, or long (maybe zero-padded): strict path
    headers = Headers(text[block_at:], lower)
    method = parsed.group(1)
    if method is not None:
        head = Head(text[: block_at - 2], method, parsed.group(2), None, None, headers)
    else:
        status = int(parsed.group(3))
        head = Head(text[: block_at - 2], None, None, status, parsed.group(4) or "", headers)
    return head, int(raw)


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
        lengths = CONTENT_LENGTH.findall(lower)
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
        if not colon or not TOKEN.fullmatch(name):
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
