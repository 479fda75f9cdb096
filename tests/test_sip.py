"""edge.core.sip: the SIP framer, identity guard and the edge's own answers (pure, no I/O).

Table tests pin each framing rule and reason code; hypothesis checks that
any split of a valid stream yields the same messages and that mutated
streams never raise and always end in messages or a reason code.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.core.reasons import Reason
from edge.core.sip import (
    NEED_DATA,
    FramingError,
    KeepAlive,
    Message,
    NeedData,
    SipFramer,
    build_response,
    check_request,
    header_uri,
    safe_text,
    split_values,
    uri_domain,
)

Event = Message | KeepAlive | FramingError


def sip(
    start: str = "MESSAGE sip:bob@fabrikam.com SIP/2.0",
    *headers: str,
    body: bytes = b"",
    length: bool = True,
) -> bytes:
    """A SIP message with the usual mandatory headers unless `headers` are given."""
    lines = list(headers) or [
        "Via: SIP/2.0/TLS pool.contoso.com:5061;branch=z9hG4bK776asdhds",
        "Max-Forwards: 70",
        'From: "Alice" <sip:alice@contoso.com>;tag=1928301774',
        "To: <sip:bob@fabrikam.com>",
        "Call-ID: a84b4c76e66710@pool.contoso.com",
        "CSeq: 314159 MESSAGE",
    ]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([start, *lines]) + "\r\n\r\n").encode() + body


def events(data: bytes | list[bytes], **bounds: int) -> list[Event]:
    framer = SipFramer(**bounds)
    out: list[Event] = []
    chunks = [data] if isinstance(data, bytes) else data
    for chunk in chunks:
        framer.feed(chunk)
        for _ in range(10_000):  # bounded: each event consumes bytes or ends the stream
            event = framer.next_event()
            if isinstance(event, NeedData):
                break
            out.append(event)
            if isinstance(event, FramingError):
                return out
    return out


def raws(result: list[Event]) -> bytes:
    assert not any(isinstance(e, FramingError) for e in result), result
    return b"".join(e.raw for e in result if not isinstance(e, FramingError))


def only_error(data: bytes | list[bytes], **bounds: int) -> FramingError:
    result = events(data, **bounds)
    assert result and isinstance(result[-1], FramingError), result
    return result[-1]


# --- framing -----------------------------------------------------------------------------


def test_one_message_raw_bytes_are_the_bytes_received() -> None:
    data = sip(body=b"hello")
    (msg,) = events(data)
    assert isinstance(msg, Message)
    assert msg.raw == data
    assert msg.body == b"hello"
    assert msg.method == "MESSAGE"
    assert msg.head.request_uri == "sip:bob@fabrikam.com"
    assert msg.headers.get("call-id") == "a84b4c76e66710@pool.contoso.com"


def test_response_start_line() -> None:
    (msg,) = events(sip("SIP/2.0 200 OK"))
    assert isinstance(msg, Message)
    assert not msg.is_request
    assert msg.head.status_code == 200
    assert msg.head.reason_phrase == "OK"


@pytest.mark.parametrize(
    ("compact", "full"),
    [
        ("f", "From"),
        ("t", "To"),
        ("i", "Call-ID"),
        ("l", "Content-Length"),
        ("v", "Via"),
        ("m", "Contact"),
        ("c", "Content-Type"),
        ("k", "Supported"),
        ("s", "Subject"),
        ("e", "Content-Encoding"),
        ("o", "Event"),
        ("r", "Refer-To"),
        ("b", "Referred-By"),
        ("u", "Allow-Events"),
        ("x", "Session-Expires"),
    ],
)
def test_compact_forms_and_case(compact: str, full: str) -> None:
    value = "0" if compact == "l" else "x-value"
    data = sip(
        "OPTIONS sip:fabrikam.com SIP/2.0",
        f"{compact.upper() if compact != 'l' else compact}: {value}",
        *(["Content-Length: 0"] if compact != "l" else []),
        length=False,
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    assert msg.headers.get(full) == value
    assert msg.headers.get(full.upper()) == value
    assert msg.headers.get(compact) == value


def test_folding_is_unfolded_and_colon_spacing() -> None:
    data = sip(
        "MESSAGE sip:bob@fabrikam.com SIP/2.0",
        "Subject : I know you're there,\r\n  pick up the phone\r\n\tand talk to me!",
        "Content-Length:0",
        length=False,
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    assert msg.headers.get("subject") == ("I know you're there, pick up the phone and talk to me!")
    assert msg.raw == data


def test_several_values_in_one_header_and_across_headers() -> None:
    data = sip(
        "MESSAGE sip:bob@fabrikam.com SIP/2.0",
        "Via: SIP/2.0/TLS a;branch=z9hG4bK1, SIP/2.0/TLS b;branch=z9hG4bK2",
        "v: SIP/2.0/TLS c;branch=z9hG4bK3",
        'Contact: "Doe, John" <sip:j@a.com;x=1,2>, <sip:k@b.com>',
        "Content-Length: 0",
        length=False,
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    assert msg.headers.values("via") == [
        "SIP/2.0/TLS a;branch=z9hG4bK1",
        "SIP/2.0/TLS b;branch=z9hG4bK2",
        "SIP/2.0/TLS c;branch=z9hG4bK3",
    ]
    assert msg.headers.values("m") == ['"Doe, John" <sip:j@a.com;x=1,2>', "<sip:k@b.com>"]
    assert split_values('"a\\", b" <sip:x>, y') == ['"a\\", b" <sip:x>', "y"]


def test_content_length_zero_and_two_messages_in_one_chunk() -> None:
    first, second = sip(), sip("SIP/2.0 180 Ringing", body=b"v=0\r\n")
    result = events(first + second)
    assert [e.raw for e in result if isinstance(e, Message)] == [first, second]
    assert isinstance(result[0], Message) and result[0].body == b""


def test_body_may_hold_crlfcrlf_and_a_fake_message() -> None:
    body = b"\r\n\r\nINVITE sip:x SIP/2.0\r\n\r\n"
    data = sip(body=body) + sip()
    result = events(data)
    assert len(result) == 2
    assert isinstance(result[0], Message) and result[0].body == body


def test_keepalives_pass_through_as_raw_bytes() -> None:
    msg = sip()
    result = events([b"\r\n\r\n", msg, b"\r\n", b"\r", b"\n", msg])
    kinds = [type(e).__name__ for e in result]
    assert kinds == ["KeepAlive", "Message", "KeepAlive", "KeepAlive", "Message"]
    assert raws(result) == b"\r\n\r\n" + msg + b"\r\n\r\n" + msg


def test_byte_by_byte() -> None:
    data = sip(body=b"x" * 10) + b"\r\n\r\n" + sip()
    result = events([data[i : i + 1] for i in range(len(data))])
    assert raws(result) == data
    assert sum(isinstance(e, Message) for e in result) == 2


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (sip(length=False), Reason.SIP_MALFORMED),  # no Content-Length on a stream
        (sip("HELLO"), Reason.SIP_MALFORMED),
        (sip("INVITE sip:x SIP/3.0"), Reason.SIP_MALFORMED),
        (sip("SIP/2.0 99 Low"), Reason.SIP_MALFORMED),
        (sip("INVITE  sip:x SIP/2.0"), Reason.SIP_MALFORMED),
        (b"\r\n\r\nGARBAGE\r\n\r\n", Reason.SIP_MALFORMED),
        (sip("OPTIONS sip:x SIP/2.0", "Content-Length: -1", length=False), Reason.SIP_MALFORMED),
        (sip("OPTIONS sip:x SIP/2.0", "Content-Length: 1e3", length=False), Reason.SIP_MALFORMED),
        (
            sip("OPTIONS sip:x SIP/2.0", "l: 0", "Content-Length: 0", length=False),
            Reason.SIP_MALFORMED,
        ),
        (
            sip("OPTIONS sip:x SIP/2.0", "Content-Length: 99999999999999999999", length=False),
            Reason.SIP_TOO_LARGE,
        ),
        (
            sip("OPTIONS sip:x SIP/2.0", "Content-Length: 70000", length=False),
            Reason.SIP_TOO_LARGE,
        ),
        (sip("OPTIONS sip:x SIP/2.0", "No colon here", "l: 0", length=False), Reason.SIP_MALFORMED),
        (sip("OPTIONS sip:x SIP/2.0", ": empty name", "l: 0", length=False), Reason.SIP_MALFORMED),
        (sip("OPTIONS sip:x SIP/2.0", " folded first", "l: 0", length=False), Reason.SIP_MALFORMED),
        (b"OPTIONS sip:x SIP/2.0\r\nl: 0\nX: y\r\n\r\n", Reason.SIP_MALFORMED),  # bare LF
        (b"OPTIONS sip:x SIP/2.0\r\nl: 0\rX: y\r\n\r\n", Reason.SIP_MALFORMED),  # bare CR
        (b"\rX", Reason.SIP_MALFORMED),
    ],
)
def test_bad_input_gives_the_reason_code(data: bytes, reason: Reason) -> None:
    error = only_error(data)
    assert error.reason is reason


def test_too_many_headers() -> None:
    headers = [f"X-H{i}: {i}" for i in range(10)]
    assert isinstance(events(sip("OPTIONS sip:x SIP/2.0", *headers), max_headers=11)[0], Message)
    error = only_error(sip("OPTIONS sip:x SIP/2.0", *headers), max_headers=10)
    assert error.reason is Reason.SIP_TOO_LARGE
    assert error.status_code == 513


def test_oversized_head_is_cut_at_the_bound_without_crlfcrlf() -> None:
    framer = SipFramer(max_message_bytes=1000)
    framer.feed(b"INVITE sip:x SIP/2.0\r\n")
    error = None
    for _ in range(10_000):  # a peer sending 10 MB, 1 kB at a time
        framer.feed(b"X-Junk: " + b"a" * 990 + b"\r\n")
        assert framer.buffered <= 1000 + 1000
        event = framer.next_event()
        if isinstance(event, FramingError):
            error = event
            break
    assert error is not None and error.reason is Reason.SIP_TOO_LARGE
    framer.feed(b"more" * 1000)
    assert framer.buffered == 0
    assert framer.next_event() is error  # sticky


def test_body_over_the_bound_is_413_with_a_head_to_answer() -> None:
    data = sip(body=b"x" * 2000)
    error = only_error(data, max_message_bytes=1000)
    assert error.reason is Reason.SIP_TOO_LARGE
    assert error.status_code == 413
    assert error.head is not None
    answer = build_response(error.head, error.status_code, error.reason)
    assert answer is not None and answer.startswith(b"SIP/2.0 413 ")


def test_malformed_with_readable_headers_can_be_answered_400() -> None:
    error = only_error(sip(length=False))
    assert error.status_code == 400 and error.head is not None
    answer = build_response(error.head, 400, error.reason)
    assert answer is not None and b'Warning: 399 edge "sip_malformed"' in answer


def test_messages_before_an_error_are_delivered() -> None:
    result = events(sip() + b"BAD LINE\r\n\r\n")
    assert isinstance(result[0], Message)
    assert isinstance(result[1], FramingError) and result[1].reason is Reason.SIP_MALFORMED


# --- property tests ------------------------------------------------------------------------

_tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
    max_size=40,
)


@st.composite
def valid_message(draw: st.DrawFn) -> bytes:
    request = draw(st.booleans())
    start = (
        f"{draw(st.sampled_from(['INVITE', 'MESSAGE', 'SUBSCRIBE', 'OPTIONS', 'BYE']))} "
        f"sip:{draw(_tokens)}@{draw(_tokens)}.com SIP/2.0"
        if request
        else f"SIP/2.0 {draw(st.integers(100, 699))} {draw(_tokens)}"
    )
    headers = [
        f"{draw(st.sampled_from(['X-', 'Via', 'v', 'From', 'f', 'Subject']))}{draw(_tokens)}: "
        f"{draw(_value).strip()}"
        for _ in range(draw(st.integers(0, 6)))
    ]
    if draw(st.booleans()) and headers:
        headers[-1] += "\r\n " + draw(_tokens)  # a folded continuation
    body = draw(st.binary(max_size=200))
    name = draw(st.sampled_from(["Content-Length", "content-length", "l", "L"]))
    headers.insert(draw(st.integers(0, len(headers))), f"{name}: {len(body)}")
    return ("\r\n".join([start, *headers]) + "\r\n\r\n").encode() + body


@st.composite
def stream(draw: st.DrawFn) -> list[bytes]:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from([b"\r\n", b"\r\n\r\n"])))
        parts.append(draw(valid_message()))
    return parts


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[last:point])
        last = point
    return chunks


def summary(result: list[Event]) -> list[bytes]:
    """Messages as their raw bytes, adjacent keep-alives merged (their split is free)."""
    out: list[bytes] = []
    keep = b""
    for event in result:
        assert not isinstance(event, FramingError), event
        if isinstance(event, KeepAlive):
            keep += event.raw
            continue
        if keep:
            out.append(keep)
            keep = b""
        out.append(event.raw)
    if keep:
        out.append(keep)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=stream(), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_gives_the_same_messages(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole = summary(events(data))
    assert b"".join(whole) == data
    assert [m for m in whole if not m.startswith(b"\r\n")] == [
        p for p in parts if not p.startswith(b"\r\n")
    ]
    assert summary(events(split(data, cuts))) == whole


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=stream(),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 4), st.binary(max_size=6)), max_size=6
    ),
)
def test_mutated_streams_never_raise(
    parts: list[bytes], cuts: list[int], edits: list[tuple[int, int, bytes]]
) -> None:
    data = bytearray(b"".join(parts))
    for at, drop, insert in edits:
        at %= len(data) + 1
        data[at : at + drop] = insert
    framer = SipFramer(max_message_bytes=400, max_headers=8)
    delivered = 0
    for chunk in split(bytes(data), cuts):
        framer.feed(chunk)
        for _ in range(10_000):
            event = framer.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, FramingError):
                assert event.reason in (Reason.SIP_MALFORMED, Reason.SIP_TOO_LARGE)
                assert event.status_code in (400, 413, 513)
                assert "\n" not in event.detail
                if event.head is not None:
                    build_response(event.head, event.status_code, event.reason)
                    check_request(event.head, ["contoso.com"])
                return
            assert isinstance(event, Message | KeepAlive)
            delivered += len(event.raw)
            if isinstance(event, Message):
                check_request(event, ["contoso.com"])
                build_response(event, 403, Reason.SIP_DOMAIN_MISMATCH)
        assert framer.buffered <= 400 + len(chunk)
    assert delivered + framer.buffered == len(data)


# --- identities and the guard --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "uri"),
    [
        ('"Alice" <sip:alice@contoso.com>;tag=1', "sip:alice@contoso.com"),
        ("<sip:alice@contoso.com;transport=tls>", "sip:alice@contoso.com;transport=tls"),
        ("sip:alice@contoso.com;tag=1", "sip:alice@contoso.com"),
        ('"a <b> c" <sip:x@y.com>', "sip:x@y.com"),
        ('"unterminated <sip:x@y.com>', None),
        ("<sip:x@y.com", None),
        ('"x" sip:y@z.com', None),
    ],
)
def test_header_uri(value: str, uri: str | None) -> None:
    assert header_uri(value) == uri


@pytest.mark.parametrize(
    ("uri", "domain"),
    [
        ("sip:alice@contoso.com", ("sip", "contoso.com")),
        ("sips:alice@Sip.Contoso.COM.:5061;transport=tls", ("sips", "sip.contoso.com")),
        ("sip:contoso.com", ("sip", "contoso.com")),
        ("sip:alice:secret@contoso.com:5060", ("sip", "contoso.com")),
        ("sip:a;b=c@contoso.com", ("sip", "contoso.com")),
        ("sip:bob@[2001:DB8::1]:5061", ("sip", "[2001:db8::1]")),
        ("sip:bob@[2001:db8::1", ("sip", None)),
        ("sip:bob@192.0.2.1", ("sip", "192.0.2.1")),
        ("sip:a@evil.com@contoso.com", ("sip", None)),
        ("sip:a@contoso.com:port", ("sip", None)),
        ("sip:a@con_toso.com", ("sip", None)),
        ("tel:+1-201-555-0123", ("tel", None)),
        ("tel:7042;phone-context=Contoso.com", ("tel", "contoso.com")),
        ("tel:7042;phone-context=+1-201", ("tel", None)),
        ("mailto:a@contoso.com", ("mailto", None)),
        ("contoso.com", ("", None)),
    ],
)
def test_uri_domain(uri: str, domain: tuple[str, str | None]) -> None:
    assert uri_domain(uri) == domain


def request(*identity: str) -> Message:
    data = sip(
        "INVITE sip:bob@fabrikam.com SIP/2.0",
        "Via: SIP/2.0/TLS edge.contoso.com;branch=z9hG4bK1",
        *identity,
        "To: <sip:bob@fabrikam.com>",
        "Call-ID: c1",
        "CSeq: 1 INVITE",
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    return msg


DOMAINS = ("contoso.com",)


@pytest.mark.parametrize(
    ("identity", "verdict"),
    [
        (["From: <sip:a@contoso.com>;tag=1"], None),
        (["f: sip:a@SIP.contoso.com.;tag=1"], None),
        (["From: <sips:a@contoso.com:5061>;tag=1"], None),
        (["From: <sip:a@fabrikam.com>;tag=1"], ("sip_domain_mismatch", "fabrikam.com")),
        (["From: <sip:a@contoso.com.evil.net>"], ("sip_domain_mismatch", "contoso.com.evil.net")),
        (["From: <sip:a@notcontoso.com>"], ("sip_domain_mismatch", "notcontoso.com")),
        (["From: <sip:a@[2001:db8::1]>"], ("sip_domain_mismatch", "[2001:db8::1]")),
        (["From: <tel:+12015550123>;tag=1"], ("sip_domain_mismatch", "(none)")),
        (["From: <tel:7042;phone-context=contoso.com>;tag=1"], None),
        (["From: <tel:7042;phone-context=fabrikam.com>"], ("sip_domain_mismatch", "fabrikam.com")),
        (["From: <sip:a@contoso.com", "X: y"], ("sip_domain_mismatch", "(none)")),
        ([], ("sip_malformed", "(none)")),
        (["From: <sip:a@contoso.com>", "From: <sip:a@contoso.com>"], ("sip_malformed", "(none)")),
        (
            ["From: <sip:a@contoso.com>", "P-Asserted-Identity: <sip:ceo@fabrikam.com>"],
            ("sip_domain_mismatch", "fabrikam.com"),
        ),
        (
            ["From: <sip:a@contoso.com>", "p-asserted-identity: <sip:a@contoso.com>, <tel:+1555>"],
            None,
        ),
        (
            ["From: <sip:a@contoso.com>", "P-Asserted-Identity: <tel:+1555>"],
            ("sip_domain_mismatch", "(none)"),
        ),
        (
            [
                "From: <sip:a@contoso.com>",
                "P-Asserted-Identity: <sip:a@contoso.com>",
                "P-Asserted-Identity: sip:b@fabrikam.com",
            ],
            ("sip_domain_mismatch", "fabrikam.com"),
        ),
        (
            ["From: <sip:a@contoso.com>", "P-Asserted-Identity: <mailto:a@contoso.com>"],
            ("sip_domain_mismatch", "(none)"),
        ),
    ],
)
def test_check_request(identity: list[str], verdict: tuple[str, str] | None) -> None:
    assert check_request(request(*identity), DOMAINS) == verdict


def test_responses_are_not_guarded() -> None:
    (msg,) = events(sip("SIP/2.0 200 OK"))
    assert isinstance(msg, Message)
    assert check_request(msg, ("example.org",)) is None


# --- the edge's own answers ------------------------------------------------------------------


def test_403_copies_via_from_callid_cseq_and_tags_to() -> None:
    data = sip(
        "INVITE sip:bob@contoso.com SIP/2.0",
        "Via: SIP/2.0/TLS p1.fabrikam.com;branch=z9hG4bKa",
        "v: SIP/2.0/TLS p2.fabrikam.com;branch=z9hG4bKb, SIP/2.0/TLS p3;branch=z9hG4bKc",
        'f: "Mallory" <sip:ceo@contoso.com>;tag=abc',
        "t: <sip:bob@contoso.com>",
        "i: call-1@fabrikam.com",
        "CSeq: 7 INVITE",
        "Content-Length: 0",
        length=False,
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    answer = build_response(msg, 403, Reason.SIP_DOMAIN_MISMATCH, to_tag="edge1")
    assert answer is not None
    (reply,) = events(answer)
    assert isinstance(reply, Message)
    assert reply.head.status_code == 403 and reply.head.reason_phrase == "Forbidden"
    assert reply.headers.get_all("via") == [
        "SIP/2.0/TLS p1.fabrikam.com;branch=z9hG4bKa",
        "SIP/2.0/TLS p2.fabrikam.com;branch=z9hG4bKb, SIP/2.0/TLS p3;branch=z9hG4bKc",
    ]
    assert reply.headers.get("from") == '"Mallory" <sip:ceo@contoso.com>;tag=abc'
    assert reply.headers.get("to") == "<sip:bob@contoso.com>;tag=edge1"
    assert reply.headers.get("call-id") == "call-1@fabrikam.com"
    assert reply.headers.get("cseq") == "7 INVITE"
    assert reply.headers.get("warning") == '399 edge "sip_domain_mismatch"'
    assert reply.headers.get("content-length") == "0" and reply.body == b""


def test_existing_to_tag_is_kept() -> None:
    msg = request("From: <sip:a@x.com>;tag=1")
    data = msg.raw.replace(b"To: <sip:bob@fabrikam.com>", b"To: <sip:bob@fabrikam.com>;TAG=9")
    (tagged,) = events(data)
    assert isinstance(tagged, Message)
    answer = build_response(tagged, 404, Reason.UNKNOWN_DESTINATION)
    assert answer is not None and b"To: <sip:bob@fabrikam.com>;TAG=9\r\n" in answer


def test_no_answer_to_ack_to_a_response_or_without_mandatory_headers() -> None:
    (ack,) = events(sip("ACK sip:bob@fabrikam.com SIP/2.0"))
    (ok,) = events(sip("SIP/2.0 200 OK"))
    (bare,) = events(sip("OPTIONS sip:x SIP/2.0", "From: <sip:a@b.com>", "l: 0", length=False))
    for msg in (ack, ok, bare):
        assert isinstance(msg, Message)
        assert build_response(msg, 403, Reason.SIP_DOMAIN_MISMATCH) is None


def test_safe_text_is_short_and_printable() -> None:
    assert safe_text("contoso.com") == "contoso.com"
    hostile = 'a"\r\n\x00\u202e\udc80' + "x" * 500
    text = safe_text(hostile)
    assert text.isascii() and text.isprintable()
    assert "\n" not in text and '"' not in text.replace('\\"', "")
    assert len(text) < 400 and text.endswith("...(cut)")
    assert safe_text(b"\xff\xfe") == "\\ufffd\\ufffd"


def test_non_ascii_heads_are_read_case_insensitively() -> None:
    data = sip(
        "MESSAGE sip:bob@fabrikam.com SIP/2.0",
        "Via: SIP/2.0/TLS a;branch=z9hG4bK1",
        'FROM: "J\u00fcrgen \u0130" <sip:j@Contoso.com>;tag=1',
        "t: <sip:bob@fabrikam.com>",
        "i: c1",
        "CSeq: 1 MESSAGE",
    )
    (msg,) = events(data)
    assert isinstance(msg, Message)
    assert msg.headers.get("f") == '"J\u00fcrgen \u0130" <sip:j@Contoso.com>;tag=1'
    assert msg.headers.get("content-length") == "0"
    assert check_request(msg, ("contoso.com",)) is None
    answer = build_response(msg, 403, Reason.SIP_DOMAIN_MISMATCH)
    assert answer is not None and '"J\u00fcrgen \u0130"'.encode() in answer


# --- the fast paths decide as the strict ones ------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "OPTIONS sip:x SIP/2.0\r\nX: a\rb\r\nl: 0\r\n",  # bare CR in a value
        "OPTIONS sip:x SIP/2.0\r\nX: ab\r\r\nl: 0\r\n",  # bare CR before the CRLF
        "OPTIONS sip:x SIP/2.0\r\nX: a\nb\r\nl: 0\r\n",  # bare LF in a value
        "OPTIONS sip:x SIP/2.0\r\nX: a\r\n\nl: 0\r\n",  # bare LF starting a line
        "OPTIONS sip:x\r SIP/2.0\r\nl: 0\r\n",  # bare CR in the start line
        "SIP/2.0 200 O\rK\r\nl: 0\r\n",  # bare CR in the reason phrase
        "OPTIONS sip:x SIP/2.0\r\n folded: first\r\nl: 0\r\n",
        "OPTIONS sip:x SIP/2.0\r\nNo colon\r\nl: 0\r\n",
        "OPTIONS sip:x SIP/2.0\r\n: empty name\r\nl: 0\r\n",
        "OPTIONS sip:x SIP/2.0\r\nl: 0\r\nContent-Length: 0\r\n",  # two lengths
        "OPTIONS sip:x SIP/2.0\r\nl: 0\r\n 1\r\n",  # a folded length
        "OPTIONS sip:x SIP/2.0\r\nl: 00000000000\r\n",  # 11 digits: the strict path
        "OPTIONS sip:x SIP/2.0\r\nl: \u0661\r\n",  # a non-ASCII digit
        "OPTIONS sip:\u00e9 SIP/2.0\r\nl: 0\r\n",  # not ASCII: the strict path
        "OPTIONS  sip:x SIP/2.0\r\nl: 0\r\n",
        "SIP/2.0 099 Low\r\nl: 0\r\n",
    ],
)
def test_fast_head_parse_leaves_the_unusual_to_the_strict_one(text: str) -> None:
    from edge.core.sip_framing import _parse_head_fast

    assert _parse_head_fast(text, 200) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=valid_message(),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.integers(0, 3),
            st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\xc3\xa9", b"x", b""]),
        ),
        max_size=4,
    ),
    max_headers=st.integers(1, 8),
)
def test_fast_head_parse_agrees_with_the_strict_one(
    message: bytes, edits: list[tuple[int, int, bytes]], max_headers: int
) -> None:
    """`_parse_head_fast` only ever answers what `_parse_head` answers (or defers to it)."""
    from edge.core.sip_framing import _HeadProblem, _parse_head, _parse_head_fast

    head = bytearray(message[: message.find(b"\r\n\r\n") + 2])
    for at, drop, insert in edits:
        at %= len(head) + 1
        head[at : at + drop] = insert
    text = bytes(head).decode("utf-8", "surrogateescape")
    fast = _parse_head_fast(text, max_headers)
    if fast is None:
        return
    strict = _parse_head(text[:-2], max_headers)
    assert not isinstance(strict, _HeadProblem), (text, strict)
    pairs = text.count("\r\n")
    assert text.count("\r") == pairs and text.count("\n") == pairs  # no bare CR or LF
    (fast_head, fast_length), (strict_head, strict_length) = fast, strict
    assert fast_length == strict_length
    assert (fast_head.start_line, fast_head.method, fast_head.request_uri) == (
        strict_head.start_line,
        strict_head.method,
        strict_head.request_uri,
    )
    assert (fast_head.status_code, fast_head.reason_phrase) == (
        strict_head.status_code,
        strict_head.reason_phrase,
    )
    assert list(fast_head.headers) == list(strict_head.headers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    identity=st.lists(
        st.tuples(
            st.sampled_from(["From", "f", "FROM", "P-Asserted-Identity", "p-asserted-identity"]),
            st.sampled_from(
                [
                    "<sip:a@Contoso.COM>;tag=1",
                    '"A, B" <sips:x@SIP.contoso.com.:5061>',
                    "sip:a@fabrikam.com;tag=2",
                    "<tel:+1555>",
                    "<TEL:7042;Phone-Context=CONTOSO.com>",
                    "<sip:a@[2001:DB8::1]>",
                    '"Q\\"<" <sip:q@contoso.com>',
                    "<sip:a@contoso.com>, <tel:+1>",
                    "<sip:a@contoso.com\r\n  >",
                    "<mailto:a@contoso.com>",
                    "",
                ]
            ),
        ),
        max_size=4,
    )
)
def test_guard_reads_ascii_and_non_ascii_heads_alike(identity: list[tuple[str, str]]) -> None:
    """check_request reads an ASCII head from its lowercased block, any other head
    through `Headers.get_all`: both give the same verdict for the same identities."""
    lines = [f"{name}: {value}" for name, value in identity]
    ascii_msg = request(*lines)
    other = request(*lines, "Subject: \u00e9t\u00e9")  # not ASCII: the other path
    assert ascii_msg.headers.lowered() and not other.headers.lowered()
    assert check_request(ascii_msg, DOMAINS) == check_request(other, DOMAINS)
