"""Load-balancer TCP probes: connections closed before sending a single byte.

Owns the classification "did the peer send any byte before closing?". A TCP
health check (HAProxy ``check``, AWS NLB, keepalived) connects and closes
without a ClientHello; each one used to end as a ``tls_error`` rejection in
the log. The gateway asks ``closed_before_sending`` first, counts a probe in
``edge_tcp_probes_total{listener}`` and logs nothing for it.

The test is a ``MSG_PEEK`` of one byte on the accepted socket: it waits for
the first byte or the end of the stream and leaves the byte in the kernel
buffer for the TLS handshake, so nothing is consumed or parsed here.

Must never: consume, read or log a payload byte; wait without the caller's
timeout around it (a silent peer is the handshake timeout's business).
"""

from __future__ import annotations

import socket

import trio

__all__ = ["closed_before_sending"]


async def closed_before_sending(stream: trio.abc.Stream) -> bool:
    """True if the peer ended the connection (FIN or RST) before sending any byte.

    Returns False as soon as one byte is waiting (the byte stays unread), and
    on any other socket error (the handshake will then fail and be reported as
    usual), or for a stream that is not a socket. Call it inside the
    handshake timeout.
    """
    if not isinstance(stream, trio.SocketStream):
        return False
    try:
        first = await stream.socket.recv(1, socket.MSG_PEEK)
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return True  # a reset before a byte: the other common probe style
    except OSError:
        return False
    return first == b""
