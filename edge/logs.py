"""The audit log: one JSON object per line on stdout (or text for people).

Owns the shape of log events: ``ts``, ``level`` (info, warning, error: decided
per event name in ``LEVELS``, one table), ``event``, then flat fields. Every
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

LogFormat = Literal["json", "text"]

__all__ = ["LEVELS", "EventLog", "LogFormat", "level_of"]

Level = Literal["info", "warning", "error"]

# The level of every event that is not "info" (the default): one table, so an
# operator's filter (level != "info") and the code agree. Errors need a person
# (the gateway or a reload did not do what was asked); warnings are one
# connection, member or fetch going wrong while the gateway works on.
LEVELS: dict[str, Level] = {
    "startup_failed": "error",
    "internal_error": "error",
    "reload_failed": "error",
    "policies_reload_failed": "error",
    "config_reload_failed": "error",
    "accept_error": "error",
    "worker_exited": "error",
    "worker_killed": "error",
    "connection_rejected": "warning",
    "partner_problem": "warning",
    "pool_member_down": "warning",
    "upstream_error": "warning",
    "dns_error": "warning",
    "crl_fetch_failed": "warning",
    "drain_timeout": "warning",
    "worker_output": "warning",
    "config_warning": "warning",
    "sip_rejected": "warning",
}


def level_of(name: str) -> Level:
    """The level of event ``name`` (``info`` unless ``LEVELS`` says otherwise)."""
    return LEVELS.get(name, "info")


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
