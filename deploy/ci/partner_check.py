#!/usr/bin/env python3
"""Checks that deploy/ci/container-test.sh runs from the host against the
gateway in the container: what a partner, a monitoring system and an operator
see from outside.

    partner_check.py relay --edge 127.0.0.1:15061 --dir RUN/partners --partner fabrikam.example \\
        --expect relayed [--within 20]
    partner_check.py http http://127.0.0.1:19464/readyz --expect 200
    partner_check.py find-event --event connection_rejected --peer-port 40000 \\
        --field reason=unknown_ca < container.log
    partner_check.py metric http://127.0.0.1:19464/metrics 'edge_policy_reloads_total{result="ok"}'
    partner_check.py drain --edge ... --dir ... --partner ... --stop-cmd '...' --logs-cmd '...'

Every check prints one line saying what it saw and exits 0 when that is what
was expected, 1 otherwise (2: usage). Only loopback addresses are used by the
test; nothing here trusts more than RUN/partners/edge-ca.pem.

`relay` is a partner: it presents RUN/partners/PARTNER.pem/.key, verifies the
edge against RUN/partners/edge-ca.pem for the name edge.example, sends a line
and waits for the echo from the pool behind the gateway. "relayed" means the
echo came back intact; "refused" means the connection ended without it (the
gateway rejects after the TLS handshake, so a refusal is a closed stream, and
the gateway's own reason code is checked from its log with find-event).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edge.demo import connect_partner
from edge.tls import TLSStream, client_context

EDGE_NAME = "edge.example"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Partner:
    def __init__(self, folder: Path, partner: str) -> None:
        ca = x509.load_pem_x509_certificates((folder / "edge-ca.pem").read_bytes())
        chain = x509.load_pem_x509_certificates((folder / f"{partner}.pem").read_bytes())
        key = load_pem_private_key((folder / f"{partner}.key").read_bytes(), password=None)
        self.name = partner
        self.context = client_context(ca, chain, key)  # type: ignore[arg-type]

    async def connect(self, edge: tuple[str, int]) -> tuple[TLSStream, int]:
        stream = await connect_partner(*edge, self.context, EDGE_NAME)
        return stream, stream.transport_stream.socket.getsockname()[1]  # type: ignore[attr-defined]


async def echo(stream: TLSStream, payload: bytes, timeout: float = 5) -> bytes:
    got = b""
    with trio.move_on_after(timeout):
        await stream.send_all(payload)
        while len(got) < len(payload):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
    return got


async def relay_once(partner: Partner, edge: tuple[str, int]) -> tuple[str, int, str]:
    """('relayed' | 'refused', local port, detail)."""
    payload = f"hello from {partner.name} at {time.time():.3f}\n".encode()
    port = 0
    try:
        with trio.fail_after(10):
            stream, port = await partner.connect(edge)
        try:
            got = await echo(stream, payload)
        finally:
            await stream.aclose()
    except trio.TooSlowError:
        return "refused", port, "no handshake within 10 s"
    except Exception as exc:  # any failure to get the echo back is a refusal, with its detail
        return "refused", port, f"{type(exc).__name__}: {exc}"
    if got == payload:
        return "relayed", port, f"{len(payload)} bytes echoed by the pool"
    return "refused", port, f"connection ended after {len(got)} of {len(payload)} bytes echoed"


async def cmd_relay(args: argparse.Namespace) -> int:
    partner = Partner(args.dir, args.partner)
    edge = _address(args.edge)
    started = trio.current_time()
    deadline = started + args.within
    attempts = 0
    while True:
        attempts += 1
        outcome, port, detail = await relay_once(partner, edge)
        if outcome == args.expect or trio.current_time() >= deadline:
            break
        await trio.sleep(0.5)
    ok = outcome == args.expect
    took = trio.current_time() - started
    tries = f" after {attempts} attempt(s) in {took:.1f} s" if args.within else ""
    print(
        f"{'ok' if ok else 'FAIL'}: {args.partner}: {outcome}{tries} (expected {args.expect}); "
        f"{detail}; local port {port}"
    )
    return 0 if ok else 1


def cmd_http(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.url, timeout=5) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        print(f"FAIL: {args.url}: {exc}")
        return 1
    ok = status == args.expect
    text = body.decode("utf-8", "replace").strip().splitlines()[:1]
    print(f"{'ok' if ok else 'FAIL'}: GET {args.url}: HTTP {status} {text[0] if text else ''}")
    return 0 if ok else 1


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def _matches(event: dict[str, object], args: argparse.Namespace) -> bool:
    if event.get("event") != args.event:
        return False
    if args.peer_port and not str(event.get("peer", "")).endswith(f":{args.peer_port}"):
        return False
    for field in args.field:
        key, _, value = field.partition("=")
        if str(event.get(key)) != value:
            return False
    return True


def cmd_find_event(args: argparse.Namespace) -> int:
    found = [e for e in _events(sys.stdin.read()) if _matches(e, args)]
    if not found:
        peer = [f"peer *:{args.peer_port}"] if args.peer_port else []
        wanted = " ".join([args.event, *args.field, *peer])
        print(f"FAIL: no log event {wanted}")
        return 1
    event = found[-1]
    keys = {"event", "partner", "reason", "detail", "member", "end", "why", "result", "added"}
    keys |= {"active_connections"}
    shown = {k: v for k, v in event.items() if k in keys}
    print(f"ok: logged {json.dumps(shown, sort_keys=True)}")
    return 0


def metric_value(url: str, series: str) -> float | None:
    """The value of one exposition line (`name{labels}` exactly as exposed), or None."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def cmd_metric(args: argparse.Namespace) -> int:
    try:
        value = metric_value(args.url, args.series)
    except OSError as exc:
        print(f"FAIL: {args.url}: {exc}")
        return 1
    print(f"{args.series} {value if value is not None else 'absent'}")
    return 0 if value is not None else 1


async def cmd_drain(args: argparse.Namespace) -> int:
    """Hold a relayed connection, stop the container, prove the connection still
    works while the gateway drains, close it, and expect a quick exit 0."""
    partner = Partner(args.dir, args.partner)
    stream, port = await partner.connect(_address(args.edge))
    first = await echo(stream, b"before stop\n")
    if first != b"before stop\n":
        print(f"FAIL: drain: the held connection did not relay before the stop ({first!r})")
        return 1
    started = time.monotonic()
    # Its output is shown only if it fails (podman prints the container name,
    # and on these machines a harmless complaint about systemd timers).
    stop = await trio.lowlevel.open_process(
        shlex.split(args.stop_cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    logs: str = ""
    with trio.move_on_after(15):
        while '"shutdown_started"' not in logs:
            await trio.sleep(0.2)
            done = await trio.run_process(
                shlex.split(args.logs_cmd), capture_stdout=True, capture_stderr=True, check=False
            )
            logs = done.stdout.decode("utf-8", "replace")
    if '"shutdown_started"' not in logs:
        print("FAIL: drain: no shutdown_started in the log within 15 s of the stop")
        return 1
    second = await echo(stream, b"during drain\n")
    await stream.aclose()
    with trio.move_on_after(args.within):
        await stop.wait()
    elapsed = time.monotonic() - started
    if stop.returncode is None:
        stop.kill()
        print(f"FAIL: drain: the stop command did not finish within {args.within:g} s")
        return 1
    assert stop.stdout is not None
    stop_output = (await stop.stdout.receive_some(65536)).decode("utf-8", "replace").strip()
    relayed = second == b"during drain\n"
    ok = relayed and stop.returncode == 0
    if stop.returncode != 0:
        print(f"{args.stop_cmd}: {stop_output}")
    print(
        f"{'ok' if ok else 'FAIL'}: drain: held connection (local port {port}) "
        f"{'still relayed' if relayed else 'was cut'} after SIGTERM; "
        f"stop command exited {stop.returncode} {elapsed:.1f} s after the stop began"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def partner_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--edge", required=True, help="the federation listener, ADDRESS:PORT")
        p.add_argument("--dir", type=Path, required=True, help="make-certs.py's partners/ folder")
        p.add_argument("--partner", required=True, help="e.g. fabrikam.example")

    relay = sub.add_parser("relay", help="connect as a partner and expect relayed or refused")
    partner_args(relay)
    relay.add_argument("--expect", choices=("relayed", "refused"), required=True)
    relay.add_argument("--within", type=float, default=0, help="retry for up to this many seconds")

    http = sub.add_parser("http", help="GET a URL and expect a status")
    http.add_argument("url")
    http.add_argument("--expect", type=int, default=200)

    find = sub.add_parser("find-event", help="find a JSON log event on stdin")
    find.add_argument("--event", required=True)
    find.add_argument("--peer-port", type=int, default=0)
    find.add_argument("--field", action="append", default=[], metavar="KEY=VALUE")

    metric = sub.add_parser("metric", help="print one series' value from /metrics")
    metric.add_argument("url")
    metric.add_argument("series", help='e.g. edge_policy_reloads_total{result="ok"}')

    drain = sub.add_parser("drain", help="stop the container while a connection is open")
    partner_args(drain)
    drain.add_argument("--stop-cmd", required=True)
    drain.add_argument("--logs-cmd", required=True)
    drain.add_argument("--within", type=float, default=40)

    args = parser.parse_args(argv)
    if args.command == "relay":
        return trio.run(cmd_relay, args)
    if args.command == "drain":
        return trio.run(cmd_drain, args)
    if args.command == "http":
        return cmd_http(args)
    if args.command == "metric":
        return cmd_metric(args)
    return cmd_find_event(args)


if __name__ == "__main__":
    sys.exit(main())
