"""What each reason code means, where it appears and what the operator does.

Owns: the operator-facing description of every `edge.core.reasons.Reason`
member and of the per-attempt upstream reasons, kept beside the codes (a
separate module so that adding a code and describing it are two small edits
that never collide). `python -m edge.docs` renders
docs/reference/reason-codes.md from it; tests/test_docs.py fails when a code
has no description.

Must never: define a code (that is `edge.core.reasons`), or import anything
outside `edge.core` and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edge.core.reasons import Reason

__all__ = [
    "DESCRIPTIONS",
    "HANDSHAKE",
    "OUTBOUND",
    "PLACES",
    "RELOAD",
    "SIP",
    "UPSTREAM",
    "UPSTREAM_ATTEMPT_REASONS",
    "ReasonDoc",
]


@dataclass(frozen=True)
class ReasonDoc:
    """One code, explained: `where` names the places (keys of PLACES) it appears."""

    meaning: str
    where: tuple[str, ...]
    action: str


# The places a code can appear.
HANDSHAKE = "handshake"
UPSTREAM = "upstream"
RELOAD = "reload"
OUTBOUND = "outbound"
SIP = "sip"
PLACES: Mapping[str, str] = {
    SIP: "a SIP message refused on a SIP listener: the `sip_rejected` log event, "
    "`edge_sip_messages_total{result}`, and `connection_closed` `end` for the codes that "
    "close the connection",
    OUTBOUND: "a pool member's connection through an outbound listener refused or ended: "
    "`connection_rejected` / `connection_closed` with `direction` = `outbound`, "
    "`edge_handshakes_total{listener=<the outbound listener>, result}`",
    HANDSHAKE: "a connection refused before relaying: the `connection_rejected` log event, "
    "`edge_handshakes_total{result}`, and `edge verify` output for chain and name codes",
    UPSTREAM: "one failed attempt to reach a pool member: the `upstream_error` and "
    "`pool_member_down` log events, `edge_upstream_errors_total{reason}`",
    RELOAD: "a live connection closed because trust was withdrawn (a reload, a CRL passing "
    "its next update, a chain expiring): `connection_closed` with `end` = "
    "`trust_withdrawn` and this code in `reason`",
}

DESCRIPTIONS: Mapping[Reason, ReasonDoc] = {
    Reason.NO_CLIENT_CERT: ReasonDoc(
        "The client sent no certificate on an mtls listener.",
        (HANDSHAKE,),
        "A partner misconfiguration or a scanner. Nothing to do unless it is a partner you "
        "expect: then its server must present its certificate.",
    ),
    Reason.UNKNOWN_CA: ReasonDoc(
        "The chain reaches no root trusted for any partner (after a reload: the partner's "
        "folder was removed or its root replaced).",
        (HANDSHAKE, RELOAD),
        "A stranger, or a partner whose new CA is not in its folder yet: get its new root, "
        "run `edge verify` on their chain, add the root to its folder.",
    ),
    Reason.EXPIRED: ReasonDoc(
        "A certificate of the chain (leaf or issuer) is past its notAfter.",
        (HANDSHAKE, RELOAD),
        "Ask the partner to renew. If many partners fail at once, check the edge's clock.",
    ),
    Reason.NOT_YET_VALID: ReasonDoc(
        "A certificate of the chain is before its notBefore.",
        (HANDSHAKE, RELOAD),
        "Usually a clock: check the edge's time (NTP), then the partner's issuance date.",
    ),
    Reason.REVOKED: ReasonDoc(
        "A CRL (in the partner's folder, or fetched) lists a certificate of the chain.",
        (HANDSHAKE, RELOAD),
        "Expected after a revocation; otherwise ask the partner which certificate replaced it.",
    ),
    Reason.CRL_UNAVAILABLE: ReasonDoc(
        "The partner's CRL for an issuer is past its nextUpdate, or missing under `require-crl`.",
        (HANDSHAKE, RELOAD),
        "Refresh the CRL in the partner's folder (or look for `crl_fetch_failed` when "
        "`[revocation] fetch` is on). Alerts: EdgeCrlNearNextUpdate, EdgeCrlPastNextUpdate.",
    ),
    Reason.BAD_PURPOSE: ReasonDoc(
        "The leaf's extended key usage excludes the purpose (clientAuth for partners).",
        (HANDSHAKE, RELOAD),
        "The partner needs a certificate with clientAuth in its extended key usage (or none).",
    ),
    Reason.INVALID_CHAIN: ReasonDoc(
        "The chain reaches a trusted root but is malformed: a bad signature, an issuer that "
        "is not a CA, a path length exceeded.",
        (HANDSHAKE, RELOAD),
        "Send the partner the log line's `detail`; the chain must be fixed on its side.",
    ),
    Reason.NAME_MISMATCH: ReasonDoc(
        "The chain is trusted, but the leaf names no domain of that partner.",
        (HANDSHAKE, RELOAD),
        "A partner's new host name: add its domain to `domains` in its policy.toml. A CA "
        "vouching for someone else's name: leave it refused.",
    ),
    Reason.AMBIGUOUS_PARTNER: ReasonDoc(
        "The chain and names fit more than one partner; the gateway refuses to guess.",
        (HANDSHAKE, RELOAD),
        "Make the partners' `domains` disjoint, or pin each partner's issuing CA instead of a "
        "shared public root.",
    ),
    Reason.PARTNER_DISABLED: ReasonDoc(
        "The partner is `enabled = false` in its policy.toml.",
        (HANDSHAKE, RELOAD),
        "Intended. Set `enabled = true` to readmit it.",
    ),
    Reason.OVER_LIMIT: ReasonDoc(
        "A connection limit was hit: total, handshakes in progress, per source, source rate, "
        "or per partner.",
        (HANDSHAKE,),
        "The `detail` names the limit. Raise it (or the partner's `max_connections`) if the "
        "load is legitimate; otherwise it is the limit working.",
    ),
    Reason.HANDSHAKE_TIMEOUT: ReasonDoc(
        "No authorized handshake within `handshake_timeout_s` of accept.",
        (HANDSHAKE,),
        "Slow links or a slow-loris client. Raise `handshake_timeout_s` only for a known slow "
        "partner network.",
    ),
    Reason.TLS_ERROR: ReasonDoc(
        "The TLS handshake failed: no shared version or cipher, a bad record, EOF.",
        (HANDSHAKE,),
        "The client is too old (TLS 1.2 with ECDHE and AEAD is the minimum) or not speaking "
        "TLS; the `detail` has OpenSSL's words.",
    ),
    Reason.NO_UPSTREAM: ReasonDoc(
        "No pool member could be connected to and verified for this connection (or none has "
        "an address, or all are at `max_connections`).",
        (HANDSHAKE,),
        "Read the `upstream_error` lines just before it (connect_failed, upstream_timeout, "
        "upstream_tls_error) and the pool health panels; fix the members or the network.",
    ),
    Reason.UPSTREAM_UNTRUSTED: ReasonDoc(
        "A pool member presented a certificate not issued under `internal_roots`, or not "
        "naming its topology host.",
        (HANDSHAKE, UPSTREAM),
        "Treat it as a possible DNS hijack until proven otherwise; if a member's certificate "
        "was just renewed, fix that certificate.",
    ),
    Reason.SHUTTING_DOWN: ReasonDoc(
        "The gateway was draining and the connection was not admitted before the deadline.",
        (HANDSHAKE,),
        "Expected during a shutdown or a rollout.",
    ),
    Reason.INTERNAL_ERROR: ReasonDoc(
        "A bug in the gateway ended this one connection (never the process).",
        (HANDSHAKE,),
        "Report it with the `internal_error` log line (it names the exception and where).",
    ),
    Reason.PARTNER_CHANGED: ReasonDoc(
        "After a reload, a live connection's chain identifies another partner than the one "
        "it was admitted as.",
        (RELOAD,),
        "Expected after renaming a partner folder; the partner reconnects under its new id.",
    ),
    Reason.SIP_DOMAIN_MISMATCH: ReasonDoc(
        "On a SIP listener, a request's From (or P-Asserted-Identity) host lies outside the "
        "sender's domains (a partner's inbound, `[sip] domains` outbound); the edge answered "
        "403 itself and the request never reached the other side.",
        (SIP,),
        "If the partner is legitimate, add the domain to its `domains` in policy.toml; "
        "otherwise this is a partner trying to speak for someone else: tell its admins.",
    ),
    Reason.SIP_MALFORMED: ReasonDoc(
        "On a SIP listener, the stream could not be read as SIP (bad start line, header "
        "without a name, missing or duplicated Content-Length, bare CR or LF); answered 400 "
        "where possible, then the connection was closed.",
        (SIP,),
        "A broken or hostile peer; the `sip_rejected` log line says what was wrong.",
    ),
    Reason.SIP_TOO_LARGE: ReasonDoc(
        "On a SIP listener, a message exceeded `[sip] max_message_bytes` or `max_headers`; "
        "answered 413/513 where possible, then the connection was closed.",
        (SIP,),
        "Raise the `[sip]` bounds only if a legitimate peer needs it.",
    ),
    Reason.WEAK_CRYPTO: ReasonDoc(
        "A certificate in the chain is below the cryptographic floor: an MD5 or SHA-1 "
        "signature below the trust anchor, an RSA key under 2048 bits, or an EC curve other "
        "than P-256, P-384, P-521; `detail` names which.",
        (HANDSHAKE, UPSTREAM),
        "Ask the partner (or the owner of the pool member's certificate) to reissue with "
        "SHA-256 or better and a 2048-bit RSA or P-256 key; never lower the floor.",
    ),
    Reason.NOT_IN_TOPOLOGY: ReasonDoc(
        "A client of an outbound listener presented an enterprise certificate that names no "
        "topology host of the listener's `pools`.",
        (OUTBOUND,),
        "Add the server to a pool's `members` (its certificate must name that `host`), or "
        "find out who holds an enterprise certificate and is not a pool member.",
    ),
    Reason.UNKNOWN_DESTINATION: ReasonDoc(
        "An outbound connection sent no SNI, or a name inside no enabled partner's domains; "
        "on reload, the partner of a live outbound connection was removed.",
        (OUTBOUND, RELOAD),
        "Add a partner folder for that domain, or fix the internal server's next-hop name.",
    ),
    Reason.PARTNER_UNREACHABLE: ReasonDoc(
        "No edge of the partner answered: no static `edge`, no usable SRV target, or every "
        "target refused or timed out.",
        (OUTBOUND,),
        "Check the partner's `edge` key or its `_sipfederationtls._tcp` SRV records and your "
        "[dns] servers; ask the partner whether its edge is up.",
    ),
    Reason.PARTNER_UNTRUSTED: ReasonDoc(
        "The partner's edge presented a certificate that the partner's own roots, CRLs and "
        "the dialled host name do not accept; `detail` carries the verifier's reason code.",
        (OUTBOUND, RELOAD),
        "Run `edge verify THEIR-CHAIN.pem --purpose server --partner P --name HOST`; add the "
        "partner's current root, or ask the partner to fix its certificate.",
    ),
}

# Reasons of one failed attempt to reach a pool member that are not Reason
# members: they never refuse a partner by themselves (the next member is tried;
# the partner sees `no_upstream` only when every attempt failed).
UPSTREAM_ATTEMPT_REASONS: Mapping[str, ReasonDoc] = {
    "connect_failed": ReasonDoc(
        "The TCP connect to a member failed (refused, unreachable).",
        (UPSTREAM,),
        "Is the member running, and reachable from the edge (firewall, network policy)?",
    ),
    "upstream_timeout": ReasonDoc(
        "Connect plus handshake to a member took longer than `handshake_timeout_s`.",
        (UPSTREAM,),
        "An overloaded member or a filtering firewall; look at the upstream connect latency.",
    ),
    "upstream_tls_error": ReasonDoc(
        "The member's TLS handshake failed for a reason other than trust (no shared cipher, "
        "it refused the edge's internal certificate).",
        (UPSTREAM,),
        "Check the member's TLS settings and that it trusts the edge's internal certificate.",
    ),
}
