"""edge.sip_relay over real MTLS on 127.0.0.1: SIP text from a partner to a pool and back.

Topology of every test: partner client ==TLS==> [edge: partner side | relay_sip |
pool side] ==TLS==> pool server; both TLS links are real handshakes with
trustme certificates (client certificates required). "Nothing reached the
pool" is proved by sending an allowed message afterwards and seeing it arrive
first.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from edge.core.reasons import Reason
from edge.core.sip import NEED_DATA, FramingError, KeepAlive, Message, SipFramer
from edge.sip_relay import SipMessageResult, SipRejection, SipRelayEnd, relay_sip
from edge.tls import TLSStream, server_context
from tests.conftest import TLSPKI
from tests.test_tls import receive_exactly, tls_pair

TIMEOUT = 20.0
PARTNER_DOMAINS = ("fabrikam.com",)


def sip(
    method: str = "MESSAGE",
    from_host: str = "fabrikam.com",
    *extra: str,
    body: bytes = b"",
    call_id: str = "call-1@fabrikam.com",
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
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SDP = b"v=0\r\no=alice 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"


@dataclass
class Edge:
    partner: TLSStream  # the partner's end (a client)
    pool: TLSStream  # the pool's end (a server)
    messages: list[SipMessageResult] = field(default_factory=list)
    rejections: list[SipRejection] = field(default_factory=list)
    relayed: list[tuple[str, int]] = field(default_factory=list)
    end: SipRelayEnd | None = None
    done: trio.Event = field(default_factory=trio.Event)


@asynccontextmanager
async def edge(
    tls_pki: TLSPKI,
    *,
    max_message_bytes: int = 65535,
    max_headers: int = 200,
    pool_domains: tuple[str, ...] | None = None,
    idle_timeout_s: float = 30.0,
    count_relayed: bool = False,
) -> AsyncIterator[Edge]:
    edge_partner_side, partner = await tls_pair(tls_pki)
    pool, edge_pool_side = await tls_pair(tls_pki)
    box = Edge(partner, pool)

    async def run() -> None:
        try:
            box.end = await relay_sip(
                edge_partner_side,
                edge_pool_side,
                partner_domains=PARTNER_DOMAINS,
                pool_domains=pool_domains,
                idle_timeout_s=idle_timeout_s,
                max_message_bytes=max_message_bytes,
                max_headers=max_headers,
                on_message=box.messages.append,
                on_rejected=box.rejections.append,
                on_relayed=(lambda d, n: box.relayed.append((d, n))) if count_relayed else None,
            )
        finally:
            await edge_partner_side.aclose()
            await edge_pool_side.aclose()
            box.done.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield box
            await partner.aclose()
            await pool.aclose()
            await box.done.wait()


async def read_messages(stream: trio.abc.ReceiveStream, count: int) -> list[Message | KeepAlive]:
    framer = SipFramer()
    out: list[Message | KeepAlive] = []
    for _ in range(10_000):
        if len(out) >= count:
            return out
        event = framer.next_event()
        if event is NEED_DATA:
            chunk = await stream.receive_some()
            assert chunk, f"stream ended after {len(out)} of {count} events"
            framer.feed(chunk)
            continue
        assert not isinstance(event, FramingError), event
        assert isinstance(event, Message | KeepAlive)
        out.append(event)
    raise AssertionError("too many reads")


@pytest.mark.parametrize("method", ["INVITE", "MESSAGE", "SUBSCRIBE", "OPTIONS"])
async def test_allowed_requests_are_relayed_byte_for_byte(tls_pki: TLSPKI, method: str) -> None:
    body = SDP if method == "INVITE" else b""
    extra = ("Event: presence", "Expires: 600") if method == "SUBSCRIBE" else ()
    request = sip(method, "Sip.FABRIKAM.com.", *extra, body=body)
    response = b"SIP/2.0 200 OK\r\n" + request.split(b"\r\n", 1)[1]
    async with edge(tls_pki) as e:
        await e.partner.send_all(request)
        assert await receive_exactly(e.pool, len(request)) == request
        await e.pool.send_all(response)
        assert await receive_exactly(e.partner, len(response)) == response
    assert [(m.direction, m.result, m.method) for m in e.messages] == [
        ("inbound", "relayed", method),
        ("outbound", "relayed", ""),
    ]
    assert e.rejections == []
    assert e.end is not None and e.end.bytes_from_partner == len(request)


async def test_from_of_another_domain_is_answered_403_and_never_reaches_the_pool(
    tls_pki: TLSPKI,
) -> None:
    forged = sip("INVITE", "contoso.com", body=SDP, call_id="forged-1")
    allowed = sip("MESSAGE", "fabrikam.com", call_id="ok-1")
    async with edge(tls_pki) as e:
        await e.partner.send_all(forged)
        (answer,) = await read_messages(e.partner, 1)
        await e.partner.send_all(allowed)
        assert await receive_exactly(e.pool, len(allowed)) == allowed  # first, and only it
    assert isinstance(answer, Message)
    assert answer.head.status_code == 403
    assert answer.headers.get_all("via") == [
        "SIP/2.0/TLS edge.fabrikam.com:5061;branch=z9hG4bK-a1",
        "SIP/2.0/TLS ua.fabrikam.com;branch=z9hG4bK-a0",
    ]
    assert answer.headers.get("cseq") == "42 INVITE"
    assert answer.headers.get("call-id") == "forged-1"
    assert answer.headers.get("from") == '"Alice" <sip:alice@contoso.com>;tag=1928301774'
    assert (answer.headers.get("to") or "").startswith("<sip:bob@contoso.com>;tag=")
    assert answer.headers.get("warning") == '399 edge "sip_domain_mismatch"'
    (rejection,) = e.rejections
    assert rejection == SipRejection(
        "inbound", "sip_domain_mismatch", "INVITE", "forged-1", "contoso.com", 403
    )
    assert [m.result for m in e.messages] == ["sip_domain_mismatch", "relayed"]


async def test_pai_of_another_domain_is_answered_403(tls_pki: TLSPKI) -> None:
    forged = sip("MESSAGE", "fabrikam.com", "P-Asserted-Identity: <sip:ceo@contoso.com>")
    allowed = sip("OPTIONS", "fabrikam.com", "P-Asserted-Identity: <sip:a@fabrikam.com>")
    async with edge(tls_pki) as e:
        # Both in one record: the first is answered, the second relayed alone.
        await e.partner.send_all(forged + allowed)
        (answer,) = await read_messages(e.partner, 1)
        assert await receive_exactly(e.pool, len(allowed)) == allowed
    assert isinstance(answer, Message) and answer.head.status_code == 403
    assert [r.offending_domain for r in e.rejections] == ["contoso.com"]


async def test_ack_failing_the_guard_is_dropped_without_an_answer(tls_pki: TLSPKI) -> None:
    ack = sip("ACK", "contoso.com")
    allowed = sip("MESSAGE")
    async with edge(tls_pki) as e:
        await e.partner.send_all(ack)
        await e.partner.send_all(allowed)
        assert await receive_exactly(e.pool, len(allowed)) == allowed
        await e.pool.send_all(b"\r\n")  # a pong comes back: nothing was sent before it
        assert await receive_exactly(e.partner, 2) == b"\r\n"
    assert [(r.method, r.answered) for r in e.rejections] == [("ACK", None)]


async def test_message_split_across_many_tls_records(tls_pki: TLSPKI) -> None:
    request = sip("INVITE", body=SDP)
    async with edge(tls_pki) as e:
        for i in range(0, len(request), 7):
            await e.partner.send_all(request[i : i + 7])  # one TLS record each
        assert await receive_exactly(e.pool, len(request)) == request
    assert [m.result for m in e.messages] == ["relayed"]


async def test_two_messages_in_one_record_and_content_length_zero(tls_pki: TLSPKI) -> None:
    first, second = sip("MESSAGE", body=b"hello"), sip("OPTIONS")
    assert b"Content-Length: 0\r\n\r\n" in second
    async with edge(tls_pki) as e:
        await e.partner.send_all(first + second)
        assert await receive_exactly(e.pool, len(first + second)) == first + second
    assert [m.method for m in e.messages] == ["MESSAGE", "OPTIONS"]


async def test_relayed_messages_counted_once_per_read_with_on_relayed(tls_pki: TLSPKI) -> None:
    first, second, forged = sip("MESSAGE"), sip("OPTIONS"), sip("MESSAGE", "contoso.com")
    response = b"SIP/2.0 200 OK\r\n" + first.split(b"\r\n", 1)[1]
    async with edge(tls_pki, count_relayed=True) as e:
        await e.partner.send_all(first + second + b"\r\n\r\n")  # one record: one count of 2
        assert (
            await receive_exactly(e.pool, len(first + second) + 4) == first + second + b"\r\n\r\n"
        )
        await e.partner.send_all(forged + first)  # the refusal still reported on its own
        (answer,) = await read_messages(e.partner, 1)
        assert await receive_exactly(e.pool, len(first)) == first
        await e.pool.send_all(response)
        assert await receive_exactly(e.partner, len(response)) == response
    assert isinstance(answer, Message) and answer.head.status_code == 403
    assert e.relayed == [("inbound", 2), ("inbound", 1), ("outbound", 1)]
    assert [(m.direction, m.result) for m in e.messages] == [("inbound", "sip_domain_mismatch")]


async def test_keepalives_pass_through_both_ways(tls_pki: TLSPKI) -> None:
    request = sip()
    async with edge(tls_pki) as e:
        await e.partner.send_all(b"\r\n\r\n")
        assert await receive_exactly(e.pool, 4) == b"\r\n\r\n"
        await e.pool.send_all(b"\r\n")
        assert await receive_exactly(e.partner, 2) == b"\r\n"
        await e.partner.send_all(b"\r\n\r\n" + request + b"\r\n\r\n")
        assert await receive_exactly(e.pool, len(request) + 8) == (
            b"\r\n\r\n" + request + b"\r\n\r\n"
        )
    assert [m.result for m in e.messages] == ["relayed"]  # keep-alives are not messages


async def expect_answer_then_close(
    e: Edge, status: int | None, reason: Reason, check: Callable[[bytes], None] | None = None
) -> None:
    data = bytearray()
    try:
        for _ in range(1000):
            chunk = await e.partner.receive_some()
            if not chunk:
                break
            data += chunk
    except trio.BrokenResourceError:
        assert status is None  # a reset is fine only when no answer is expected
    if status is None:
        assert data == b""
    else:
        assert data.startswith(f"SIP/2.0 {status} ".encode())
        assert f'Warning: 399 edge "{reason}"'.encode() in data
    await e.done.wait()
    assert e.end is not None and e.end.end == reason
    assert e.rejections and e.rejections[-1].reason == reason
    assert e.messages[-1].result == reason
    # The pool got nothing of it: its stream just ends.
    assert await e.pool.receive_some() == b""


async def test_oversized_message_gets_413_then_close(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki, max_message_bytes=1024) as e:
        await e.partner.send_all(sip("MESSAGE", body=b"x" * 2000))
        await expect_answer_then_close(e, 413, Reason.SIP_TOO_LARGE)


async def test_endless_head_is_cut_at_the_bound(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki, max_message_bytes=4096) as e:
        await e.partner.send_all(b"INVITE sip:bob@contoso.com SIP/2.0\r\nVia: SIP/2.0/TLS a\r\n")
        sent = 0
        with trio.move_on_after(5):
            try:
                for _ in range(10_000):  # would be 10 MB; the edge cuts it at 4 kB
                    await e.partner.send_all(b"X-Junk: " + b"a" * 1000 + b"\r\n")
                    sent += 1
            except trio.BrokenResourceError:
                pass  # the edge closed on us, as it should
        assert sent < 10_000
        # No From/To/CSeq readable before the cut: no answer can be built.
        await expect_answer_then_close(e, None, Reason.SIP_TOO_LARGE)
    assert e.rejections[-1].answered is None


async def test_too_many_headers_gets_513(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki, max_headers=20) as e:
        await e.partner.send_all(sip("MESSAGE", "fabrikam.com", *[f"X-H{i}: v" for i in range(20)]))
        await expect_answer_then_close(e, 513, Reason.SIP_TOO_LARGE)


async def test_missing_content_length_gets_400_then_close(tls_pki: TLSPKI) -> None:
    request = sip().replace(b"Content-Length: 0\r\n", b"")
    async with edge(tls_pki) as e:
        await e.partner.send_all(request)
        await expect_answer_then_close(e, 400, Reason.SIP_MALFORMED)


async def test_bad_start_line_closes_without_an_answer(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki) as e:
        await e.partner.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await expect_answer_then_close(e, None, Reason.SIP_MALFORMED)


async def test_pool_side_is_framed_and_guarded_when_asked(tls_pki: TLSPKI) -> None:
    """Outbound use: the pool may speak only for our own domains."""
    ours = sip("MESSAGE", "contoso.com")
    theirs = sip("MESSAGE", "fabrikam.com", call_id="spoof")
    async with edge(tls_pki, pool_domains=("contoso.com",)) as e:
        await e.pool.send_all(theirs + ours)
        (answer,) = await read_messages(e.pool, 1)
        assert await receive_exactly(e.partner, len(ours)) == ours
    assert isinstance(answer, Message) and answer.head.status_code == 403
    assert [(r.direction, r.call_id) for r in e.rejections] == [("outbound", "spoof")]


async def test_idle_timeout_ends_the_relay(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki, idle_timeout_s=0.2) as e:
        await e.partner.send_all(sip())
        await receive_exactly(e.pool, len(sip()))
        await e.done.wait()
    assert e.end is not None and e.end.end == "idle_timeout"


async def test_clean_close_reports_who_closed_first(tls_pki: TLSPKI) -> None:
    async with edge(tls_pki) as e:
        await e.partner.send_all(sip())
        await receive_exactly(e.pool, len(sip()))
        await e.partner.send_eof()
        assert await e.pool.receive_some() == b""
        await e.pool.send_eof()
        await e.done.wait()
    assert e.end is not None and e.end.end == "partner_closed"


needs_sipsak = pytest.mark.skipif(shutil.which("sipsak") is None, reason="sipsak not installed")


# --- a real SIP user agent -----------------------------------------------------------------
#
# Debian's sipsak 0.9.8.1 (GnuTLS build) cannot present a client certificate
# (the binary has no call that loads one), so the partner leg here is one-way
# TLS; the pool leg stays MTLS. sipsak also checks the server certificate
# against "host:port", which no certificate can match, hence
# --tls-ignore-cert-failure (the test is about the relay, not sipsak's check).
# Its TLS receive path reports "select returned error" after reading our
# answer, so the assertions are on what the pool and the edge saw.

SIPSAK_REQUEST = (
    "OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bK-sipsak1\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@{host}>;tag=abc1\r\n"
    "To: <sip:bob@contoso.com>\r\n"
    "Call-ID: sipsak-1@fabrikam.com\r\n"
    "CSeq: 1 OPTIONS\r\n"
    "Content-Length: 0\r\n\r\n"
)


async def run_sipsak(
    tls_pki: TLSPKI, tmp_path: Path, from_host: str
) -> tuple[list[Message], list[SipRejection]]:
    request_file = tmp_path / "request.sip"
    request_file.write_bytes(SIPSAK_REQUEST.format(host=from_host).encode())
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    pool, edge_pool_side = await tls_pair(tls_pki)
    rejections: list[SipRejection] = []
    at_pool: list[Message] = []

    async def edge() -> None:
        tcp = await listeners[0].accept()
        ctx = server_context(tls_pki.server.chain, tls_pki.server.key, require_client_cert=False)
        partner = TLSStream(tcp, ctx, server_side=True)
        try:
            await partner.do_handshake()
            await relay_sip(
                partner,
                edge_pool_side,
                partner_domains=PARTNER_DOMAINS,
                idle_timeout_s=5,
                on_rejected=rejections.append,
            )
        finally:
            await partner.aclose()
            await edge_pool_side.aclose()

    async def pool_side() -> None:
        framer = SipFramer()
        for _ in range(100):
            try:
                chunk = await pool.receive_some()
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            framer.feed(chunk)
            event = framer.next_event()
            if isinstance(event, Message):
                at_pool.append(event)
                keep = [
                    f"{name}: {value}"
                    for name, value in event.headers
                    if name in ("via", "from", "to", "call-id", "cseq")
                ]
                answer = "\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0"]) + "\r\n\r\n"
                await pool.send_all(answer.encode())

    sipsak = [
        "sipsak",
        "--transport=tls",
        "--tls-ca-cert",
        str(tls_pki.root_file),
        "--tls-ignore-cert-failure",
        "-f",
        str(request_file),
        "-s",
        f"sip:bob@127.0.0.1:{port}",
    ]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edge)
            nursery.start_soon(pool_side)
            with trio.move_on_after(10):
                await trio.run_process(
                    sipsak, capture_stdout=True, capture_stderr=True, check=False
                )
    for listener in listeners:
        await listener.aclose()
    await pool.aclose()
    return at_pool, rejections


@needs_sipsak
async def test_sipsak_request_is_relayed_byte_for_byte(tls_pki: TLSPKI, tmp_path: Path) -> None:
    at_pool, rejections = await run_sipsak(tls_pki, tmp_path, "fabrikam.com")
    assert rejections == []
    (request,) = at_pool
    sent = SIPSAK_REQUEST.format(host="fabrikam.com").encode()
    first, rest = sent.split(b"\r\n", 1)
    # sipsak puts its own Via on top; every other byte is the file's, unchanged.
    assert request.raw.startswith(first + b"\r\nVia: SIP/2.0/TLS ")
    assert request.raw.endswith(b"\r\n" + rest)
    assert len(request.headers.get_all("via")) == 2


@needs_sipsak
async def test_sipsak_forged_from_never_reaches_the_pool(tls_pki: TLSPKI, tmp_path: Path) -> None:
    at_pool, rejections = await run_sipsak(tls_pki, tmp_path, "contoso.com")
    assert at_pool == []
    assert [(r.reason, r.method, r.offending_domain, r.answered) for r in rejections] == [
        ("sip_domain_mismatch", "OPTIONS", "contoso.com", 403)
    ]
