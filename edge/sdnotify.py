"""systemd readiness: the sd_notify datagram protocol over ``$NOTIFY_SOCKET``.

Owns: sending ``READY=1``, ``RELOADING=1`` (with ``MONOTONIC_USEC=``),
``STOPPING=1`` and ``STATUS=...`` to the socket systemd names in
``$NOTIFY_SOCKET`` (``Type=notify`` units, deploy/systemd/edge.service).
Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

Written by hand on purpose: the protocol is one AF_UNIX datagram per message
(sd_notify(3)); ``sdnotify`` on PyPI has had no release since 2017 (no types,
swallows every exception with a bare ``except``), and ``systemd-python`` /
``cysystemd`` need libsystemd headers or a compiled extension, which the
container image and the wheels do not have.

Must never: raise into the gateway (a notify failure is reported once by the
caller's return value, never fatal), block (the socket is non-blocking), or
send anything but these fixed keys and a status text stripped of newlines.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]

_MAX_STATUS = 200  # a status line is for `systemctl status`, not a log


class Notifier:
    """One notifier per process; ``address`` defaults to ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None) -> None:
        raw = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        # "@name" is a Linux abstract socket: the name starts with a NUL byte.
        self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        self.enabled = bool(raw) and (raw.startswith(("/", "@")))

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated ``KEY=VALUE`` fields; True if sent."""
        if not self.enabled:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError:
            return False  # systemd gone or socket full: readiness is best effort
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        # systemd >= 253 (Type=notify-reload and ExecReload) wants the monotonic
        # time with RELOADING=1 so it can tell this reload from an older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))


def _status(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    # One line: a newline would start a forged KEY=VALUE field.
    clean = "".join(ch if ch.isprintable() else " " for ch in text)[:_MAX_STATUS]
    return (f"STATUS={clean}",)
