"""The audit log: one JSON object per line on stdout (or text for people).

Owns the shape of log events: ``ts``, ``level`` (info, warning, error: decided
per event name in the event registry, `edge.events`), ``event``, then flat fields. Every
connection ends with exactly one ``connection_closed`` or
``connection_rejected`` event (the gateway makes sure of that; this module
only writes), except a load-balancer TCP probe, which is only counted.
Must never receive private keys or payload bytes: callers pass names,
numbers, subjects and fingerprints only, and this module refuses ``bytes``
values so a payload cannot slip in by accident.

Must never let a field forge a line: JSON escapes control characters by
itself, and the text format escapes every non-printable character (newline,
carriage return, ESC, DEL, C1 controls, U+2028...) as ``\\xNN``/``\\uNNNN``
and quotes any value holding one, a space, a quote or a backslash, so a
stranger's certificate subject stays inside its one ``key=value``.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO

from edge.events import Level
from edge.events import level_of as _registered_level

LogFormat = Literal["json", "text"]

__all__ = ["EventLog", "LogFormat", "level_of"]


def level_of(name: str) -> Level:
    """The level of event ``name``: the one table is the event registry (edge.events).

    An event nobody registered logs as ``error``: it is a bug worth a look, and
    tests/test_docs.py fails on it before it ships.
    """
    return _registered_level(name)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    """Writes events; each is a name plus flat fields.

    ``sink``: an extra callable that receives every event dict (used by
    ``edge demo`` to read the gateway's verdicts, and by tests).
    """

    def __init__(
        self,
        fmt: LogFormat = "json",
        stream: TextIO | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.format: LogFormat = fmt
        self._stream = stream if stream is not None else sys.stdout
        self._sink = sink
        self.enabled = True
        # Fields added to every event (e.g. the worker number in --workers mode).
        self.context: dict[str, Any] = {}

    def event(self, name: str, /, **fields: Any) -> None:
        record: dict[str, Any] = {
            "ts": _now_iso(),
            "level": level_of(name),
            "event": name,
            **self.context,
        }
        for key, value in fields.items():
            if isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"log field {key!r} is bytes: payloads never go to the log")
            record[key] = value
        self.emit(record)

    def emit(self, record: dict[str, Any]) -> None:
        """Write an already-built event (a worker's, forwarded by the supervisor)."""
        name = str(record.get("event", ""))
        if "level" not in record:  # a record built elsewhere (a worker's output)
            record = {"level": level_of(name), **record}
        if self._sink is not None:
            self._sink(record)
        if not self.enabled:
            return
        if self.format == "json":
            line = json.dumps(record, separators=(",", ":"), default=str)
        else:
            rest = " ".join(
                f"{_escape(k)}={_text_value(v)}"
                for k, v in record.items()
                if k not in ("ts", "level", "event")
            )
            level = _escape(str(record["level"]))
            line = f"{_escape(str(record.get('ts', '')))} {level} {_escape(name)} {rest}".rstrip()
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout gone (a closed pipe): keep relaying rather than crash.
            self.enabled = False


def _escape(text: str) -> str:
    """``text`` with every non-printable character as a visible escape."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


_NEEDS_QUOTES = frozenset(' "\\')


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and text.isprintable() and not _NEEDS_QUOTES.intersection(text):
        return text
    # Backslash first, so an escape written by a stranger cannot pass for ours.
    return '"' + _escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
