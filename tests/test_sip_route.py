"""edge.core.sip_route: the outbound SIP fan-out state machine (pure; no sockets, no clock)."""

from __future__ import annotations

from edge.core.sip import NEED_DATA, Message, SipFramer
from edge.core.sip_route import (
    Action,
    ClosePartner,
    ClosePool,
    OpenPartner,
    Report,
    SendToPartner,
    SendToPool,
    SipRouter,
)

OURS = ("contoso.com",)
PARTNERS = {"fabrikam": ("fabrikam.com",), "adatum": ("adatum.com", "sip.fabrikam.com")}


def sip(
    target: str = "sip:a@fabrikam.com",
    *,
    method: str = "MESSAGE",
    from_host: str = "contoso.com",
    call_id: str = "c1",
    status: int | None = None,
    body: bytes = b"",
) -> bytes:
    start = f"SIP/2.0 {status} X" if status else f"{method} {target} SIP/2.0"
    lines = [
        start,
        "Via: SIP/2.0/TLS pool.contoso.com;branch=z9hG4bK1",
        f"From: <sip:u@{from_host}>;tag=1",
        f"To: <{target}>",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def router(**kw: object) -> SipRouter:
    return SipRouter(our_domains=OURS, partners=PARTNERS, **kw)  # type: ignore[arg-type]


def sends(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Report)]


def reports(actions: list[Action]) -> list[tuple[str, str, str]]:
    return [(a.direction, a.partner, a.result) for a in actions if isinstance(a, Report)]


def answer_of(data: bytes) -> Message:
    framer = SipFramer()
    framer.feed(data)
    event = framer.next_event()
    assert isinstance(event, Message), event
    assert framer.next_event() is NEED_DATA
    return event


def test_requests_fan_out_by_request_uri_and_answers_come_back() -> None:
    r = router()
    to_f = sip("sip:a@fabrikam.com", call_id="cf")
    to_a = sip("sip:b@ADATUM.com.", call_id="ca")
    actions = r.pool_data(to_f + to_a)
    assert sends(actions) == [
        OpenPartner("fabrikam", "fabrikam.com"),
        OpenPartner("adatum", "adatum.com"),
    ]
    assert r.connections == {"fabrikam": False, "adatum": False}
    actions = r.partner_opened("fabrikam")
    assert sends(actions) == [SendToPartner("fabrikam", to_f)]
    assert reports(actions) == [("outbound", "fabrikam", "relayed")]
    assert sends(r.partner_opened("adatum")) == [SendToPartner("adatum", to_a)]
    ok_f, ok_a = sip(status=200, call_id="cf"), sip(status=200, call_id="ca")
    assert sends(r.partner_data("fabrikam", ok_f[:10])) == []
    actions = r.partner_data("fabrikam", ok_f[10:])
    assert sends(actions) == [SendToPool(ok_f)]
    assert reports(actions) == [("inbound", "fabrikam", "relayed")]
    assert sends(r.partner_data("adatum", ok_a)) == [SendToPool(ok_a)]
    # Now open: the next requests go straight out, two in one write.
    again = sip("sip:c@fabrikam.com", call_id="cf2")
    assert sends(r.pool_data(again + again)) == [SendToPartner("fabrikam", again + again)]


def test_longest_domain_wins() -> None:
    r = router()
    actions = r.pool_data(sip("sip:x@sip.fabrikam.com"))
    assert sends(actions) == [OpenPartner("adatum", "sip.fabrikam.com")]


def test_unknown_destination_is_answered_404_and_nothing_opens() -> None:
    r = router()
    actions = r.pool_data(sip("sip:x@example.org", call_id="u1"))
    (send,) = sends(actions)
    assert isinstance(send, SendToPool)
    answer = answer_of(send.data)
    assert answer.head.status_code == 404
    assert answer.headers.get("warning") == '399 edge "unknown_destination"'
    assert answer.headers.get("call-id") == "u1"
    assert reports(actions) == [("outbound", "unknown", "unknown_destination")]
    assert r.connections == {}
    # tel: and IP Request-URIs prove no partner either; an ACK is never answered.
    assert sends(r.pool_data(sip("tel:+15550100"))) != []
    assert sends(r.pool_data(sip("sip:x@[2001:db8::1]", method="ACK"))) == []


def test_guard_on_our_domains_answers_403_to_the_pool() -> None:
    r = router()
    actions = r.pool_data(sip(from_host="fabrikam.com", call_id="spoof"))
    (send,) = sends(actions)
    assert isinstance(send, SendToPool)
    assert answer_of(send.data).head.status_code == 403
    (report,) = [a for a in actions if isinstance(a, Report)]
    assert (report.result, report.offending_domain, report.call_id) == (
        "sip_domain_mismatch",
        "fabrikam.com",
        "spoof",
    )
    assert r.connections == {}


def test_failed_open_answers_every_waiting_request_503_with_the_reason() -> None:
    r = router()
    first, second = sip(call_id="w1"), sip(call_id="w2")
    ack = sip(method="ACK", call_id="w3")
    r.pool_data(first)
    r.pool_data(second + ack)
    actions = r.partner_failed("fabrikam", "partner_untrusted", "unknown_ca")
    (send,) = sends(actions)
    assert isinstance(send, SendToPool)
    framer = SipFramer()
    framer.feed(send.data)
    answers = [framer.next_event() for _ in range(2)]
    assert framer.next_event() is NEED_DATA  # the ACK got no answer
    assert [
        (a.head.status_code, a.headers.get("call-id")) for a in answers if isinstance(a, Message)
    ] == [
        (503, "w1"),
        (503, "w2"),
    ]
    assert b'Warning: 399 edge "partner_untrusted"' in send.data
    assert reports(actions) == [("outbound", "fabrikam", "partner_untrusted")] * 3
    # The next request tries again.
    assert sends(r.pool_data(sip())) == [OpenPartner("fabrikam", "fabrikam.com")]


def test_queue_is_bounded() -> None:
    r = router(max_queued_messages=2)
    r.pool_data(sip(call_id="q1") + sip(call_id="q2"))
    actions = r.pool_data(sip(call_id="q3"))
    (send,) = sends(actions)
    assert isinstance(send, SendToPool) and answer_of(send.data).head.status_code == 503
    assert reports(actions) == [("outbound", "fabrikam", "over_limit")]
    assert len(sends(r.partner_opened("fabrikam"))) == 1


def test_trust_withdrawn_closes_and_later_requests_get_503() -> None:
    r = router()
    r.pool_data(sip())
    r.partner_opened("fabrikam")
    actions = r.trust_withdrawn("fabrikam", "partner_disabled")
    assert actions == [ClosePartner("fabrikam", "partner_disabled")]
    actions = r.pool_data(sip("sip:z@fabrikam.com", call_id="late"))
    (send,) = sends(actions)
    assert isinstance(send, SendToPool)
    assert answer_of(send.data).head.status_code == 503
    assert b'"partner_disabled"' in send.data
    # Data from the closed connection is ignored; re-listing the partner reopens.
    assert r.partner_data("fabrikam", sip(status=200)) == []
    r.set_partners(PARTNERS)
    assert sends(r.pool_data(sip())) == [OpenPartner("fabrikam", "fabrikam.com")]


def test_in_dialog_request_follows_the_call_id() -> None:
    r = router()
    r.pool_data(sip(method="INVITE", call_id="dlg"))
    r.partner_opened("fabrikam")
    bye = sip("sip:a@192.0.2.7:5061;transport=tls", method="BYE", call_id="dlg")
    assert sends(r.pool_data(bye)) == [SendToPartner("fabrikam", bye)]


def test_partner_requests_are_guarded_and_responses_routed_by_call_id() -> None:
    r = router()
    r.pool_data(sip(call_id="x"))
    r.partner_opened("fabrikam")
    r.pool_data(sip("sip:b@adatum.com", call_id="y"))
    r.partner_opened("adatum")
    notify = sip("sip:u@contoso.com", method="NOTIFY", from_host="fabrikam.com", call_id="n1")
    assert sends(r.partner_data("fabrikam", notify)) == [SendToPool(notify)]
    forged = sip("sip:u@contoso.com", method="MESSAGE", from_host="adatum.com", call_id="n2")
    actions = r.partner_data("fabrikam", forged)
    (send,) = sends(actions)
    assert isinstance(send, SendToPartner) and send.partner == "fabrikam"
    assert answer_of(send.data).head.status_code == 403
    # The pool's 200 for n1 goes back to fabrikam; adatum cannot take n1 over.
    hijack = sip("sip:u@contoso.com", method="MESSAGE", from_host="adatum.com", call_id="n1")
    assert sends(r.partner_data("adatum", hijack)) == [SendToPool(hijack)]
    ok = sip(status=200, call_id="n1")
    assert sends(r.pool_data(ok)) == [SendToPartner("fabrikam", ok)]
    stray = sip(status=200, call_id="nobody")
    actions = r.pool_data(stray)
    assert sends(actions) == [] and reports(actions) == [
        ("outbound", "unknown", "unknown_destination")
    ]


def test_keepalives_are_answered_at_the_edge() -> None:
    r = router()
    assert r.pool_data(b"\r\n\r\n") == [SendToPool(b"\r\n")]
    assert r.pool_data(b"\r\n") == []
    assert r.pool_data(b"\r\n") == [SendToPool(b"\r\n")]
    r.pool_data(sip())
    r.partner_opened("fabrikam")
    assert r.partner_data("fabrikam", b"\r\n\r\n") == [SendToPartner("fabrikam", b"\r\n")]


def test_malformed_pool_input_answers_then_closes_everything() -> None:
    r = router()
    r.pool_data(sip())
    r.partner_opened("fabrikam")
    bad = sip(call_id="m1").replace(b"Content-Length: 0\r\n", b"")
    actions = r.pool_data(bad)
    assert [type(a) for a in sends(actions)] == [SendToPool, ClosePartner, ClosePool]
    send = sends(actions)[0]
    assert isinstance(send, SendToPool) and answer_of(send.data).head.status_code == 400
    assert reports(actions) == [("outbound", "unknown", "sip_malformed")]
    assert r.closed and r.pool_data(sip()) == []


def test_oversized_partner_input_closes_that_partner_only() -> None:
    r = router(max_message_bytes=500)
    r.pool_data(sip())
    r.partner_opened("fabrikam")
    actions = r.partner_data("fabrikam", sip(status=200, body=b"x" * 600))
    assert ClosePartner("fabrikam", "sip_too_large") in actions
    assert reports(actions) == [("inbound", "fabrikam", "sip_too_large")]
    assert not r.closed
    assert sends(r.pool_data(sip())) == [OpenPartner("fabrikam", "fabrikam.com")]


def test_pool_closed_closes_every_partner_connection() -> None:
    r = router()
    r.pool_data(sip() + sip("sip:b@adatum.com"))
    r.partner_opened("fabrikam")
    assert sorted(r.pool_closed(), key=repr) == [
        ClosePartner("adatum", "pool_closed"),
        ClosePartner("fabrikam", "pool_closed"),
    ]
    assert r.connections == {}


def test_withdrawn_after_a_reload_dropped_the_partner_still_answers_503() -> None:
    # The documented order: set_partners (the reload), then trust_withdrawn.
    r = router()
    r.pool_data(sip())
    r.partner_opened("fabrikam")
    r.set_partners({"adatum": PARTNERS["adatum"]})
    assert r.trust_withdrawn("fabrikam", "unknown_destination") == [
        ClosePartner("fabrikam", "unknown_destination")
    ]
    (send,) = sends(r.pool_data(sip("sip:z@fabrikam.com", call_id="late")))
    assert isinstance(send, SendToPool)
    assert answer_of(send.data).head.status_code == 503
    assert b'"unknown_destination"' in send.data
