"""Prometheus metrics and the small HTTP endpoint that serves them.

Owns the metric names, types and labels of DESIGN.md's table, and the
``/metrics``, ``/healthz`` and ``/readyz`` endpoint, served from the trio
event loop with h11 (sans-I/O HTTP/1.1) so no HTTP is parsed by hand.

Must never let an unbounded value into a label: the ``partner`` label only
takes configured partner ids or ``unknown`` (callers pass ``partner_label()``),
reason labels come from ``edge.core.reasons.Reason``, and pool/member labels from
the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import h11
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["UNKNOWN_PARTNER", "Metrics", "serve_metrics"]

UNKNOWN_PARTNER = "unknown"

# Handshakes take milliseconds (a full MTLS handshake is ~2-5 ms of CPU here)
# up to the handshake timeout.
_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Federation connections live from seconds to many hours.
_CONNECTION_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """Every metric of DESIGN.md, registered once on ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.handshakes = Counter(
            "edge_handshakes_total",
            "Partner admissions by outcome: ok, or the reason code of the refusal",
            ["listener", "partner", "result"],
            registry=registry,
        )
        self.connections_active = Gauge(
            "edge_connections_active",
            "Relayed connections open now",
            ["listener", "partner"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.bytes = Counter(
            "edge_bytes_total",
            "Application bytes relayed",
            ["listener", "partner", "direction"],
            registry=registry,
        )
        self.connection_duration = Histogram(
            "edge_connection_duration_seconds",
            "Lifetime of relayed connections",
            ["listener", "partner"],
            buckets=_CONNECTION_BUCKETS,
            registry=registry,
        )
        self.handshake_duration = Histogram(
            "edge_handshake_duration_seconds",
            "Partner TLS handshake plus authorization time",
            ["listener"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.upstream_connect_duration = Histogram(
            "edge_upstream_connect_duration_seconds",
            "TCP connect plus MTLS handshake to a pool member",
            ["pool"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "edge_upstream_errors_total",
            "Failed attempts to reach a pool member",
            ["pool", "member", "reason"],
            registry=registry,
        )
        self.pool_member_up = Gauge(
            "edge_pool_member_up",
            "1 while the member is in rotation (health checks and real traffic agree it works)",
            ["pool", "member"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "edge_certificate_expiry_timestamp_seconds",
            "notAfter of each configured certificate, Unix time",
            ["role", "partner", "subject"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.crl_next_update = Gauge(
            "edge_crl_next_update_timestamp_seconds",
            "nextUpdate of each partner CRL, Unix time",
            ["partner", "issuer"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.policy_reloads = Counter(
            "edge_policy_reloads_total",
            "Policy loads by result",
            ["result"],
            registry=registry,
        )
        # Both results exist from the start, so increase(...{result="error"})
        # has a zero to rise from and an alert can fire on the first error.
        for result in ("ok", "error"):
            self.policy_reloads.labels(result)
        self.partners = Gauge(
            "edge_partners",
            "Configured partners by state",
            ["state"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        # Label sets each reload-dependent gauge was last given by
        # ``replace_series`` (so a partner or root that disappears loses its series).
        self._series: dict[Gauge, set[tuple[str, ...]]] = {}

    def replace_series(self, gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Make ``gauge`` hold exactly ``values`` (label values -> value).

        Sets every new value first, then removes the label sets that are gone,
        so a scrape never misses a series that still exists. Only for gauges
        whose every series comes from here (expiry, CRL, partner states).
        """
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for labels in self._series.get(gauge, set()) - values.keys():
            gauge.remove(*labels)
        self._series[gauge] = set(values)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ----------------------------------------------------------------------
# The endpoint

_MAX_REQUEST_BYTES = 16 * 1024
_REQUEST_TIMEOUT_S = 10.0
_PHRASES = {
    200: b"OK",
    404: b"Not Found",
    405: b"Method Not Allowed",
    503: b"Service Unavailable",
}


class Renderer(Protocol):
    """Anything that renders the exposition text: one registry, or all workers'."""

    def render(self) -> bytes: ...


async def _handle(
    stream: trio.SocketStream,
    metrics: Renderer,
    readiness: Callable[[], tuple[bool, str]],
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(_REQUEST_TIMEOUT_S):
            event: object = h11.NEED_DATA
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(4096))
                    continue
                break
            if not isinstance(event, h11.Request):
                return
            target = event.target.split(b"?", 1)[0]
            status, body, ctype = 404, b"not found\n", "text/plain; charset=utf-8"
            if event.method not in (b"GET", b"HEAD"):
                status, body = 405, b"method not allowed\n"
            elif target == b"/metrics":
                status, body, ctype = 200, metrics.render(), CONTENT_TYPE_LATEST
            elif target == b"/healthz":
                status, body = 200, b"ok\n"
            elif target == b"/readyz":
                ready, why = readiness()
                status, body = (200, b"ready\n") if ready else (503, why.encode() + b"\n")
            headers = [
                ("content-type", ctype),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            response = h11.Response(status_code=status, headers=headers, reason=_PHRASES[status])
            out = conn.send(response) or b""
            if event.method != b"HEAD":
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
    except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(
    listeners: Iterable[trio.SocketListener],
    metrics: Renderer,
    readiness: Callable[[], tuple[bool, str]],
) -> None:
    """Serve the endpoint on already-bound listeners until cancelled."""

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, metrics, readiness)

    await trio.serve_listeners(handler, list(listeners))
