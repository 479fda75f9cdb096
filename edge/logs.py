"""The audit log: one JSON object per line on stdout (or text for people).

Owns the shape of log events. Every connection ends with exactly one
``connection_closed`` or ``connection_rejected`` event (the gateway makes sure
of that; this module only writes). Must never receive private keys or payload
bytes: callers pass names, numbers, subjects and fingerprints only, and this
module refuses ``bytes`` values so a payload cannot slip in by accident.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from typing import Any, Literal, TextIO

LogFormat = Literal["json", "text"]

__all__ = ["EventLog", "LogFormat"]


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
        record: dict[str, Any] = {"ts": _now_iso(), "event": name, **self.context}
        for key, value in fields.items():
            if isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"log field {key!r} is bytes: payloads never go to the log")
            record[key] = value
        self.emit(record)

    def emit(self, record: dict[str, Any]) -> None:
        """Write an already-built event (a worker's, forwarded by the supervisor)."""
        name = str(record.get("event", ""))
        if self._sink is not None:
            self._sink(record)
        if not self.enabled:
            return
        if self.format == "json":
            line = json.dumps(record, separators=(",", ":"), default=str)
        else:
            rest = " ".join(
                f"{k}={_text_value(v)}" for k, v in record.items() if k not in ("ts", "event")
            )
            line = f"{record['ts']} {name} {rest}".rstrip()
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout gone (a closed pipe): keep relaying rather than crash.
            self.enabled = False


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text
