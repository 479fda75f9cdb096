"""Prometheus metrics and the small HTTP endpoint that serves them.

Owns the metric names, types and labels (docs/reference/metrics.md), and the
``/metrics``, ``/healthz`` and ``/readyz`` endpoint, served from the trio
event loop with h11 (sans-I/O HTTP/1.1) so no HTTP is parsed by hand.

Must never let an unbounded value into a label: the ``partner`` label only
takes configured partner ids or ``unknown`` (callers pass ``partner_label()``),
reason labels come from ``edge.core.reasons.Reason``, and pool/member labels from
the configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
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
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from edge.version import build_info

__all__ = [
    "UNKNOWN_PARTNER",
    "LiveSeriesCollector",
    "Metrics",
    "forget_process",
    "serve_metrics",
]

UNKNOWN_PARTNER = "unknown"

# Handshakes take milliseconds (a full MTLS handshake is ~2-5 ms of CPU here)
# up to the handshake timeout.
_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Federation connections live from seconds to many hours.
_CONNECTION_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """Every metric of docs/reference/metrics.md, registered once on ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.handshakes = Counter(
            "edge_handshakes_total",
            "Admissions by outcome: ok, or the reason code of the refusal; direction "
            "inbound (partners) or outbound (pool members going to partners)",
            ["listener", "partner", "result", "direction"],
            registry=registry,
        )
        self.connections_active = Gauge(
            "edge_connections_active",
            "Relayed connections open now",
            ["listener", "partner", "direction"],
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
            ["listener", "partner", "direction"],
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
        self.partner_state = Gauge(
            "edge_partner_state",
            "1 for each configured partner, labelled with its state (enabled, disabled, "
            "broken): the broken-partner alert names the partner",
            ["partner", "state"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.build_info = Gauge(
            "edge_build_info",
            "Always 1; the labels say which edge, Python and OpenSSL are running",
            ["version", "python", "openssl"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.build_info.labels(**build_info()).set(1)
        self.tcp_probes = Counter(
            "edge_tcp_probes_total",
            "Connections closed before sending any byte (load-balancer TCP checks); "
            "counted here, not logged",
            ["listener"],
            registry=registry,
        )
        self.sip_messages = Counter(
            "edge_sip_messages_total",
            'SIP messages on protocol="sip" listeners (keep-alives not counted): '
            "relayed, or the reason code of the refusal",
            ["listener", "partner", "direction", "result"],
            registry=registry,
        )
        # Label sets each reload-dependent gauge was last given by
        # ``replace_series`` (so a partner or root that disappears loses its series).
        self._series: dict[Gauge, set[tuple[str, ...]]] = {}
        # In a --workers worker, where the live-series list goes (see
        # LiveSeriesCollector); None in a single process.
        self._live_file = _live_file_of(os.getpid())

    def replace_series(self, gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Make ``gauge`` hold exactly ``values`` (label values -> value).

        Sets every new value first, then removes the label sets that are gone,
        so a scrape never misses a series that still exists. Only for gauges
        whose every series comes from here (expiry, CRL, partner states).
        """
        old = self._series.get(gauge, set())
        if self._live_file is not None:
            # New series are listed before they are written, and the gone ones
            # stay listed until they are removed: a scrape never misses one.
            self._series[gauge] = old | set(values)
            self._write_live_series()
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for labels in old - values.keys():
            if self._live_file is None:
                gauge.remove(*labels)
            # In multiprocess mode remove() cannot delete a sample from the
            # worker's mmap file (prometheus-client warns and keeps it): the
            # live-series list below is what hides it from the scrape.
        self._series[gauge] = set(values)
        if self._live_file is not None:
            self._write_live_series()

    def _write_live_series(self) -> None:
        assert self._live_file is not None
        doc = {
            gauge._name: [dict(zip(gauge._labelnames, labels, strict=True)) for labels in series]
            for gauge, series in self._series.items()
        }
        tmp = self._live_file.with_name(self._live_file.name + ".tmp")
        with contextlib.suppress(OSError):  # a full disk must not stop a reload
            tmp.write_text(json.dumps(doc, sort_keys=True))
            tmp.replace(self._live_file)  # atomic: the collector never reads half a file

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ----------------------------------------------------------------------
# --workers: series a reload removed must leave the scrape
#
# prometheus-client's multiprocess mode cannot delete a sample: a worker's
# ``gauge.remove()`` leaves it in the worker's mmap file until the worker
# exits, so a removed partner's expiry series would stay (and could fire a
# false expiry alert) until a restart. Each worker therefore also writes the
# label sets its reload-dependent gauges hold now (``live_series_<pid>.json``
# in the multiprocess folder), and the supervisor's collector drops the
# samples of those gauges that no live worker lists.

_LIVE_PREFIX = "live_series_"


def _live_file_of(pid: int) -> Path | None:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) / f"{_LIVE_PREFIX}{pid}.json" if folder else None


def forget_process(pid: int, path: str | Path) -> None:
    """Drop a dead worker's live-series list (call next to ``mark_process_dead``)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(path) / f"{_LIVE_PREFIX}{pid}.json").unlink()


class LiveSeriesCollector(Collector):
    """``MultiProcessCollector`` without the series no live worker still holds."""

    def __init__(self, path: str | Path, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._path = Path(path)
        self._inner = MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]
        if registry is not None:
            registry.register(self)

    def _live(self) -> dict[str, set[frozenset[tuple[str, str]]]]:
        live: dict[str, set[frozenset[tuple[str, str]]]] = {}
        for file in self._path.glob(f"{_LIVE_PREFIX}*.json"):
            try:
                doc = json.loads(file.read_text())
            except (OSError, ValueError):
                continue  # being replaced: the next scrape reads it
            for name, series in doc.items():
                live.setdefault(name, set()).update(frozenset(s.items()) for s in series)
        return live

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        for metric in self._inner.collect():  # type: ignore[no-untyped-call]
            keep = live.get(metric.name)
            if keep is not None:
                metric.samples = [s for s in metric.samples if frozenset(s.labels.items()) in keep]
            yield metric


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
