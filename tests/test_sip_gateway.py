"""SIP listeners end to end: a partner, the real gateway, a real SIP pool member (issue 18).

Topology of every test: partner client ==MTLS==> gateway (`protocol = "sip"`
listener, run in this process by `start_gateway`) ==MTLS==> `SipPool`, a pool
member that records every byte it receives and answers each request with a
200 built from it (a CRLFCRLF ping with a CRLF pong). Certificates come from
the harness PKI. "Nothing reached the pool" is proved by sending an allowed
message afterwards and seeing exactly its bytes, and only them, arrive.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import trio

from edge.core.sip import FramingError, KeepAlive, Message, NeedData, SipFramer
from edge.pki import Leaf
from edge.tls import TLSStream, server_context
from tests.gateway_harness import (
    InProcessEdge,
    Pki,
    partner_stream,
    sample,
    scrape,
    start_gateway,
    stop_edge,
    write_federation,
)

TIMEOUT = 30.0
POOL_HOST = "fe1.corp.test"
FAST_POLL = "[policies]\npoll_interval_s = 0.2\n"
SMALL_SIP = "[sip]\nmax_message_bytes = 1024\n"
SDP = b"v=0\r\no=alice 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def sip(
    method: str = "MESSAGE",
    from_host: str = "fabrikam.com",
    *extra: str,
    body: bytes = b"",
    call_id: str = "call-1@fabrikam.com",
    content_length: bool = True,
) -> bytes:
    lines = [
        f"{method} sip:bob@contoso.com SIP/2.0",
        "Via: SIP/2.0/TLS edge.fabrikam.com:5061;branch=z9hG4bK-a1",
        "Via: SIP/2.0/TLS ua.fabrikam.com;branch=z9hG4bK-a0",
        "Max-Forwards: 70",
        f'From: "Alice" <sip:alice@{from_host}>;tag=1928301774',
        "To: <sip:bob@contoso.com>",
        f"Call-ID: {call_id}",
        f"CSeq: 42 {method}",
        *extra,
    ]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def pool_answer(request: Message) -> bytes:
    """What `SipPool` answers to `request`: a 200 with its dialog headers copied."""
    h = request.headers
    lines = [
        "SIP/2.0 200 OK",
        *(f"Via: {via}" for via in h.get_all("via")),
        f"From: {h.get('from')}",
        f"To: {h.get('to')};tag=pool-1",
        f"Call-ID: {h.get('call-id')}",
        f"CSeq: {h.get('cseq')}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse(data: bytes) -> list[Message]:
    framer = SipFramer()
    framer.feed(data)
    out: list[Message] = []
    for _ in range(len(data) + 1):
        event = framer.next_event()
        if isinstance(event, NeedData | FramingError):
            break
        if isinstance(event, Message):
            out.append(event)
    return out


class SipPool:
    """An MTLS SIP server: records what arrives, answers requests and pings."""

    def __init__(self, pki: Pki) -> None:
        leaf = pki.member_leaf(POOL_HOST)
        self.context = server_context(
            leaf.chain, leaf.key, require_client_cert=True, client_roots=[pki.enterprise.cert]
        )
        self.received = bytearray()
        self.connections = 0
        self._changed = trio.Event()

    async def wait_received(self, n: int, timeout: float = 10) -> bytes:
        with trio.fail_after(timeout):
            while len(self.received) < n:
                await self._changed.wait()
        return bytes(self.received)

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, self.context, server_side=True)
        try:
            with trio.move_on_after(10):
                await stream.do_handshake()
            if not stream.handshake_done:
                return
            self.connections += 1
            framer = SipFramer()
            for _ in range(100_000):
                data = await stream.receive_some(65536)
                if not data:
                    break
                self.received += data
                self._changed.set()
                self._changed = trio.Event()
                framer.feed(data)
                out: list[bytes] = []
                for _ in range(len(data) + 1):
                    event = framer.next_event()
                    if isinstance(event, NeedData | FramingError):
                        break
                    if isinstance(event, KeepAlive) and b"\r\n\r\n" in event.raw:
                        out.append(b"\r\n")  # RFC 5626 pong
                    elif isinstance(event, Message) and event.method not in (None, "ACK"):
                        out.append(pool_answer(event))
                if out:
                    await stream.send_all(b"".join(out))
        except (*_GONE, OSError):
            pass
        finally:
            await stream.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)


async def start_sip_edge(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, extra: str = ""
) -> tuple[InProcessEdge, SipPool]:
    pool = SipPool(pki)
    port = await nursery.start(pool.serve)
    config = write_federation(tmp_path, pki, [(POOL_HOST, port)], extra=extra)
    text = config.read_text()
    assert text.count('mode = "mtls"\n') == 1
    config.write_text(text.replace('mode = "mtls"\n', 'mode = "mtls"\nprotocol = "sip"\n'))
    return await start_gateway(nursery, config), pool


def fabrikam(pki: Pki) -> Leaf:
    return pki.fabrikam.issue(dns=["sip.fabrikam.com"])


async def receive_exactly(stream: TLSStream, n: int, timeout: float = 10) -> bytes:
    got = b""
    with trio.fail_after(timeout):
        while len(got) < n:
            chunk = await stream.receive_some(65536)
            assert chunk, f"stream ended after {len(got)} of {n} bytes"
            got += chunk
    return got


async def receive_messages(stream: TLSStream, count: int, timeout: float = 10) -> list[Message]:
    got = b""
    with trio.fail_after(timeout):
        while len(parse(got)) < count:
            chunk = await stream.receive_some(65536)
            assert chunk, f"stream ended after {len(parse(got))} of {count} messages"
            got += chunk
    messages = parse(got)
    assert len(messages) == count and b"".join(m.raw for m in messages) == got
    return messages


async def receive_to_end(stream: TLSStream, timeout: float = 10) -> bytes:
    """Everything until the gateway closes the connection."""
    got = b""
    with trio.fail_after(timeout):
        for _ in range(10_000):
            try:
                chunk = await stream.receive_some(65536)
            except _GONE:
                break
            if not chunk:
                break
            got += chunk
    return got


def sip_count(samples: Any, direction: str, result: str) -> float | None:
    return sample(
        samples,
        "edge_sip_messages_total",
        listener="federation",
        partner="fabrikam.com",
        direction=direction,
        result=result,
    )


def without_ts(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "ts"}


async def closed_event(edge: InProcessEdge, stream: TLSStream, port: int) -> dict[str, Any]:
    with contextlib.suppress(*_GONE):
        await stream.aclose()
    return await edge.event_for_port(port, "connection_closed")


def rejections(edge: InProcessEdge) -> list[dict[str, Any]]:
    return [without_ts(e) for e in edge.events if e["event"] == "sip_rejected"]


# --- allowed traffic ----------------------------------------------------------------------


async def test_requests_from_own_domain_are_relayed_byte_for_byte(tmp_path: Path, pki: Pki) -> None:
    requests = [
        sip("INVITE", "fabrikam.com", "Contact: <sip:alice@ua.fabrikam.com;transport=tls>",
            "Content-Type: application/sdp", body=SDP, call_id="inv@fabrikam.com"),
        sip("MESSAGE", "sip.fabrikam.com", "Content-Type: text/plain", body=b"hello bob",
            call_id="msg@fabrikam.com"),
        sip("SUBSCRIBE", "fabrikam.com", "Event: presence", "Expires: 3600",
            call_id="sub@fabrikam.com"),
        sip("OPTIONS", "FABRIKAM.com.", "Accept: application/sdp", call_id="opt@fabrikam.com"),
    ]  # fmt: skip
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, pool = await start_sip_edge(nursery, tmp_path, pki)
            stream, port = await partner_stream(edge, pki, fabrikam(pki))
            sent = b""
            answers = b""
            for request in requests:
                await stream.send_all(request)
                sent += request
                # Exactly the partner's bytes, and only them, reached the pool.
                assert await pool.wait_received(len(sent)) == sent
                expected = pool_answer(parse(request)[0])
                assert await receive_exactly(stream, len(expected)) == expected
                answers += expected
            samples = await scrape(edge)
            assert sip_count(samples, "from_partner", "relayed") == 4
            assert sip_count(samples, "to_partner", "relayed") == 4
            assert sip_count(samples, "from_partner", "sip_domain_mismatch") is None
            labels = {"listener": "federation", "partner": "fabrikam.com"}
            assert sample(samples, "edge_bytes_total", direction="from_partner", **labels) == len(
                sent
            )
            assert sample(samples, "edge_bytes_total", direction="to_partner", **labels) == len(
                answers
            )
            await stream.send_eof()
            assert await receive_to_end(stream) == b""
            closed = await closed_event(edge, stream, port)
            assert closed["end"] == "partner_closed"
            assert (closed["bytes_from_partner"], closed["bytes_to_partner"]) == (
                len(sent),
                len(answers),
            )
            assert rejections(edge) == []
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_split_records_two_in_one_record_and_keepalives(tmp_path: Path, pki: Pki) -> None:
    invite = sip("INVITE", "fabrikam.com", "Content-Type: application/sdp", body=SDP)
    first = sip("MESSAGE", call_id="m1@fabrikam.com", body=b"one")
    second = sip("OPTIONS", call_id="m2@fabrikam.com")  # Content-Length: 0
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, pool = await start_sip_edge(nursery, tmp_path, pki)
            stream, port = await partner_stream(edge, pki, fabrikam(pki))
            # One message, one byte per TLS record (each send_all is one record).
            for i in range(len(invite)):
                await stream.send_all(invite[i : i + 1])
            assert await pool.wait_received(len(invite)) == invite
            expected = pool_answer(parse(invite)[0])
            assert await receive_exactly(stream, len(expected)) == expected
            # Two messages in one record: both relayed, both answered.
            await stream.send_all(first + second)
            assert await pool.wait_received(len(invite + first + second)) == invite + first + second
            expected = pool_answer(parse(first)[0]) + pool_answer(parse(second)[0])
            assert await receive_exactly(stream, len(expected)) == expected
            # An RFC 5626 ping passes to the pool, its pong comes back.
            await stream.send_all(b"\r\n\r\n")
            sent = invite + first + second + b"\r\n\r\n"
            assert await pool.wait_received(len(sent)) == sent
            assert await receive_exactly(stream, 2) == b"\r\n"
            samples = await scrape(edge)  # keep-alives are not messages
            assert sip_count(samples, "from_partner", "relayed") == 3
            assert sip_count(samples, "to_partner", "relayed") == 3
            closed = await closed_event(edge, stream, port)
            assert closed["bytes_from_partner"] == len(sent)
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


# --- the guard ----------------------------------------------------------------------------


async def _forged_request_is_answered_403(
    tmp_path: Path, pki: Pki, forged: bytes, method: str, offending: str
) -> None:
    allowed = sip("MESSAGE", call_id="after@fabrikam.com", body=b"ok")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, pool = await start_sip_edge(nursery, tmp_path, pki)
            stream, port = await partner_stream(edge, pki, fabrikam(pki))
            await stream.send_all(forged)
            (answer,) = await receive_messages(stream, 1)
            request = parse(forged)[0]
            assert answer.head.status_code == 403
            assert answer.headers.get_all("via") == request.headers.get_all("via")
            for name in ("from", "call-id", "cseq"):
                assert answer.headers.get_all(name) == request.headers.get_all(name)
            to = answer.headers.get("to")
            assert to is not None and to.startswith(f"{request.headers.get('to')};tag=")
            assert answer.headers.get("content-length") == "0"
            # Nothing of the forged request reached the pool: the next allowed
            # message is the first and only thing it sees.
            await stream.send_all(allowed)
            assert await pool.wait_received(len(allowed)) == allowed
            expected = pool_answer(parse(allowed)[0])
            assert await receive_exactly(stream, len(expected)) == expected
            assert bytes(pool.received) == allowed
            assert rejections(edge) == [
                {
                    "level": "warning",
                    "event": "sip_rejected",
                    "listener": "federation",
                    "peer": f"127.0.0.1:{port}",
                    "partner": "fabrikam.com",
                    "method": method,
                    "call_id": request.headers.get("call-id"),
                    "offending_domain": offending,
                    "reason": "sip_domain_mismatch",
                    "answered": 403,
                    "detail": "",
                }
            ]
            samples = await scrape(edge)
            assert sip_count(samples, "from_partner", "sip_domain_mismatch") == 1
            assert sip_count(samples, "from_partner", "relayed") == 1
            assert sip_count(samples, "to_partner", "relayed") == 1
            closed = await closed_event(edge, stream, port)
            # The edge's own answer is not relayed traffic.
            assert closed["bytes_from_partner"] == len(allowed)
            assert closed["bytes_to_partner"] == len(expected)
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_from_of_another_partner_domain_is_answered_403(tmp_path: Path, pki: Pki) -> None:
    forged = sip("INVITE", "litware.com", body=SDP, call_id="forged@litware.com")
    await _forged_request_is_answered_403(tmp_path, pki, forged, "INVITE", "litware.com")


async def test_pai_of_another_domain_is_answered_403(tmp_path: Path, pki: Pki) -> None:
    forged = sip(
        "MESSAGE",
        "fabrikam.com",
        "P-Asserted-Identity: <sip:ceo@contoso.com>",
        body=b"wire the money",
        call_id="pai@fabrikam.com",
    )
    await _forged_request_is_answered_403(tmp_path, pki, forged, "MESSAGE", "contoso.com")


# --- bad input: answered, then closed ----------------------------------------------------


async def _bad_input_closes(
    tmp_path: Path, pki: Pki, data: bytes, status: int, reason: str
) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, pool = await start_sip_edge(nursery, tmp_path, pki, extra=SMALL_SIP)
            stream, port = await partner_stream(edge, pki, fabrikam(pki))
            await stream.send_all(data)
            answers = parse(await receive_to_end(stream))
            assert [a.head.status_code for a in answers] == [status]
            assert answers[0].headers.get("call-id") == "bad@fabrikam.com"
            closed = await closed_event(edge, stream, port)
            assert closed["end"] == reason
            assert closed["bytes_from_partner"] == 0
            assert bytes(pool.received) == b""
            (rejected,) = rejections(edge)
            assert {k: rejected[k] for k in ("reason", "answered", "method", "call_id")} == {
                "reason": reason,
                "answered": status,
                "method": "MESSAGE",
                "call_id": "bad@fabrikam.com",
            }
            samples = await scrape(edge)
            assert sip_count(samples, "from_partner", reason) == 1
            assert sip_count(samples, "from_partner", "relayed") is None
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()
    return rejected


async def test_body_over_max_message_bytes_is_answered_413(tmp_path: Path, pki: Pki) -> None:
    data = sip("MESSAGE", call_id="bad@fabrikam.com", body=b"x" * 2000)
    rejected = await _bad_input_closes(tmp_path, pki, data, 413, "sip_too_large")
    assert "max_message_bytes=1024" in rejected["detail"]


async def test_head_over_max_message_bytes_is_answered_513(tmp_path: Path, pki: Pki) -> None:
    data = sip("MESSAGE", "fabrikam.com", "Subject: " + "y" * 1100, call_id="bad@fabrikam.com")
    rejected = await _bad_input_closes(tmp_path, pki, data, 513, "sip_too_large")
    assert "max_message_bytes=1024" in rejected["detail"]


async def test_missing_content_length_is_answered_400(tmp_path: Path, pki: Pki) -> None:
    data = sip("MESSAGE", call_id="bad@fabrikam.com", content_length=False)
    rejected = await _bad_input_closes(tmp_path, pki, data, 400, "sip_malformed")
    assert rejected["detail"] == "no Content-Length (required on a stream)"


# --- live trust ---------------------------------------------------------------------------


async def test_removed_partner_sip_connection_is_closed(tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, _pool = await start_sip_edge(nursery, tmp_path, pki, extra=FAST_POLL)
            stream, port = await partner_stream(edge, pki, fabrikam(pki))
            request = sip("OPTIONS")
            await stream.send_all(request)
            expected = pool_answer(parse(request)[0])
            assert await receive_exactly(stream, len(expected)) == expected
            shutil.rmtree(tmp_path / "federation_policies" / "fabrikam.com")
            closed = await edge.event_for_port(port, "connection_closed")
            assert closed["end"] == "trust_withdrawn"
            assert closed["reason"] == "unknown_ca"
            assert closed["partner"] == "fabrikam.com"
            assert await receive_to_end(stream) == b""
            with contextlib.suppress(*_GONE):
                await stream.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


async def test_a_domain_taken_away_on_reload_applies_to_live_connections(
    tmp_path: Path, pki: Pki
) -> None:
    """A reload that narrows a partner's domains (its certificate still inside
    them, so the connection stays) guards the next request of a live SIP
    connection with the new domains, not the ones it was admitted with."""
    policy = tmp_path / "federation_policies" / "fabrikam.com" / "policy.toml"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            edge, pool = await start_sip_edge(nursery, tmp_path, pki, extra=FAST_POLL)
            policy.write_text('domains = ["fabrikam.com", "fabrikam.net"]\n')
            await edge.wait_for(lambda e: e["event"] == "policies_reloaded")
            stream, _port = await partner_stream(edge, pki, fabrikam(pki))
            first = sip("MESSAGE", "fabrikam.net", call_id="one@fabrikam.net", body=b"1")
            await stream.send_all(first)
            expected = pool_answer(parse(first)[0])
            assert await receive_exactly(stream, len(expected)) == expected
            reloads = sum(e["event"] == "policies_reloaded" for e in edge.events)
            policy.write_text('domains = ["fabrikam.com"]\n')
            await edge.wait_for(
                lambda _e: sum(e["event"] == "policies_reloaded" for e in edge.events) > reloads
            )
            second = sip("MESSAGE", "fabrikam.net", call_id="two@fabrikam.net", body=b"2")
            await stream.send_all(second)
            (answer,) = await receive_messages(stream, 1)
            assert answer.head.status_code == 403
            # The 403 may reach us before the edge has logged it.
            await edge.wait_for(lambda _e: bool(rejections(edge)))
            (rejected,) = rejections(edge)
            assert rejected["reason"] == "sip_domain_mismatch"
            assert rejected["offending_domain"] == "fabrikam.net"
            assert bytes(pool.received) == first  # the second never reached the pool
            assert not [e for e in edge.events if e["event"] == "connection_closed"]
            with contextlib.suppress(*_GONE):
                await stream.aclose()
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()
