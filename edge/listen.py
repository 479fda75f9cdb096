"""Listening: bind every listener (and the metrics endpoint), accept connections.

Owns the listening sockets: binding each ``[[listeners]]`` address (or, in a
``--workers`` worker, the concrete address the supervisor reserved, with
``SO_REUSEPORT``), the metrics endpoint's sockets, the accept loops (which
survive running out of file descriptors: they log ``accept_error`` and back
off), and the printable form of the addresses bound.

Must never: read from an accepted connection (``edge.admission`` does, one
task per connection), or leave a socket open when binding fails part way.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from edge.core.config import Config, Listener, bind_error
from edge.logs import EventLog

__all__ = ["Bound", "StartupError", "accept_loop", "bind", "format_address"]

# Accept errors that say "out of resources right now": wait, then accept again.
_TRANSIENT_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
_ACCEPT_BACKOFF_S = 0.1


class StartupError(Exception):
    """The gateway cannot start (bind failure, unreadable policies folder)."""


@dataclass
class Bound:
    """The sockets of one gateway: per listener name, and the metrics endpoint's."""

    listeners: dict[str, list[trio.SocketListener]] = field(default_factory=dict)
    metrics: list[trio.SocketListener] = field(default_factory=list)

    def addresses(self) -> dict[str, list[str]]:
        """Listener name (and "metrics") -> the addresses really bound."""
        out = {
            name: [format_address(s.socket.getsockname()) for s in socks]
            for name, socks in self.listeners.items()
        }
        if self.metrics:
            out["metrics"] = [format_address(s.socket.getsockname()) for s in self.metrics]
        return out

    async def aclose_listeners(self) -> None:
        for socks in self.listeners.values():
            for sock in socks:
                await sock.aclose()


def format_address(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def bind(config: Config, worker_listen: dict[str, tuple[str, int]] | None) -> Bound:
    """Bind every listener and the metrics endpoint; StartupError if one fails.

    ``worker_listen``: in a ``--workers`` worker, where each listener binds
    (with SO_REUSEPORT); its metrics are served by the supervisor.
    """
    bound = Bound()
    # What is being bound, for the error message: the address and its purpose.
    host, port, what = "", 0, ""
    try:
        for listener in config.listeners:
            host, port, what = listener.host, listener.port, f"listener {listener.name}"
            if worker_listen is not None:
                host, port = worker_listen[listener.name]
                bound.listeners[listener.name] = [await _reuse_port_listener(host, port)]
                continue
            bound.listeners[listener.name] = await trio.open_tcp_listeners(port, host=host)
        if config.metrics is not None and worker_listen is None:
            host, port, what = config.metrics.host, config.metrics.port, "metrics"
            bound.metrics = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        await bound.aclose_listeners()
        raise StartupError(bind_error(host, port, what, exc)) from exc
    return bound


async def accept_loop(
    listener: Listener,
    sock: trio.SocketListener,
    nursery: trio.Nursery,
    handle: Callable[[Listener, trio.SocketStream], Awaitable[None]],
    log: EventLog,
    *,
    outbound: Callable[[Listener, trio.SocketStream], Awaitable[None]] | None = None,
) -> None:
    """Accept until cancelled; each connection is ``handle``'d in ``nursery``
    (on a ``mode = "outbound"`` listener: ``outbound``, edge.outbound_listener)."""
    if listener.mode == "outbound":
        # Pool members going out never take the inbound (mtls/tls) path.
        if outbound is None:
            raise StartupError(f"listener {listener.name}: no outbound handler to serve it")
        handle = outbound
    while True:
        try:
            stream = await sock.accept()
        except OSError as exc:
            if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                log.event("accept_error", listener=listener.name, error=exc.strerror)
                await trio.sleep(_ACCEPT_BACKOFF_S)
                continue
            raise
        nursery.start_soon(handle, listener, stream)


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listener sharing its port with the other workers (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)
