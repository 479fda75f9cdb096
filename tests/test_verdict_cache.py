"""Remembered acceptances (edge.core.verdict_cache) never outlive what made them true.

A cached verdict is served only for the same chain (by DER), by the same
verifier (one immutable policy set: a reload that changes anything builds a new
one), from its moment until the first instant a time rule could flip it (a
certificate's notAfter, a CRL's nextUpdate, ...), at most a few seconds. Real
certificates and CRLs (edge.pki); times are passed as the verification moment
(`at`), never by mocking the clock.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.core.policies import load_policies
from edge.core.reasons import Reason
from edge.core.trust import PartnerTrust, ServerTrust
from edge.core.trust_verdict import Verdict
from edge.core.verdict_cache import DEFAULT_TTL_S, VerdictCache
from edge.pki import CA, Leaf
from tests.gateway_harness import (
    Pki,
    echo_roundtrip,
    partner_stream,
    start_gateway,
    start_pool,
    stop_edge,
    write_federation,
)

# Whole seconds: certificate and CRL times have no fractions.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SECOND = dt.timedelta(seconds=1)
DAY = dt.timedelta(days=1)


def _partner(folder: Path, domain: str, root: CA, crl: bytes | None = None) -> None:
    (folder / domain).mkdir(parents=True, exist_ok=True)
    (folder / domain / "root.pem").write_bytes(root.cert_pem())
    if crl is not None:
        (folder / domain / "issuing.crl").write_bytes(crl)


def _trust(folder: Path) -> PartnerTrust:
    snapshot = load_policies(folder)
    assert not snapshot.broken, snapshot.problems
    return PartnerTrust(snapshot)


def _fresh(chain: tuple[x509.Certificate, ...]) -> list[x509.Certificate]:
    """The same chain parsed again from DER, as a new connection hands it in."""
    return [
        x509.load_der_x509_certificate(c.public_bytes(serialization.Encoding.DER)) for c in chain
    ]


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def test_the_same_chain_is_answered_from_the_cache(tmp_path: Path) -> None:
    root = CA.root("Cache Root")
    issuing = root.intermediate("Cache Issuing")
    _partner(tmp_path, "cache.example", root)
    trust = _trust(tmp_path)
    leaf = issuing.issue(dns=["sip.cache.example"])
    first = trust.verify_client(leaf.chain, at=NOW)
    assert first.accepted and first.partner == "cache.example", first.line
    # The identical object: nothing was verified again (certificates compare by DER).
    assert trust.verify_client(_fresh(leaf.chain), at=NOW + SECOND) is first
    # Never for a moment before the one it was computed for.
    assert trust.verify_client(leaf.chain, at=NOW - SECOND) is not first
    # At most DEFAULT_TTL_S seconds, even with nothing due to change.
    later = NOW + dt.timedelta(seconds=DEFAULT_TTL_S + 1)
    again = trust.verify_client(leaf.chain, at=later)
    assert again.accepted and again is not first


def test_another_partners_chain_is_never_served_from_the_cache(tmp_path: Path) -> None:
    a_root, b_root = CA.root("A Root"), CA.root("B Root")
    _partner(tmp_path, "a.example", a_root)
    _partner(tmp_path, "b.example", b_root)
    trust = _trust(tmp_path)
    a_leaf = a_root.intermediate("A Issuing").issue(dns=["sip.a.example"])
    b_leaf = b_root.intermediate("B Issuing").issue(dns=["sip.b.example"])
    assert trust.verify_client(a_leaf.chain, at=NOW).partner == "a.example"
    b = trust.verify_client(b_leaf.chain, at=NOW)
    assert b.accepted and b.partner == "b.example", b.line
    # A look-alike of A's leaf (same subject, serial, names, validity), signed by
    # someone no partner trusts: its own verdict, not A's cached one.
    stranger = CA.root("Stranger Root")
    forged = _resigned(a_leaf.cert, stranger)
    verdict = trust.verify_client([forged, *a_leaf.chain[1:]], at=NOW + SECOND)
    assert not verdict.accepted
    assert verdict.reason in (Reason.INVALID_CHAIN, Reason.UNKNOWN_CA), verdict.line
    # B's chain with A's leaf in front is yet another key, and not A's verdict.
    mixed = trust.verify_client([a_leaf.cert, *b_leaf.chain[1:]], at=NOW + SECOND)
    assert not mixed.accepted, mixed.line


def _resigned(cert: x509.Certificate, signer: CA) -> x509.Certificate:
    """`cert`'s fields and extensions under another issuer's signature."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            continue
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(signer.key, hashes.SHA256())  # type: ignore[arg-type]


def test_a_cached_acceptance_ends_when_a_certificate_on_its_path_expires(
    tmp_path: Path,
) -> None:
    root = CA.root("Expiring Root")
    issuing = root.intermediate("Expiring Issuing")
    _partner(tmp_path, "expiring.example", root)
    trust = _trust(tmp_path)
    end = NOW + 2 * SECOND
    leaf = issuing.issue(dns=["sip.expiring.example"], not_after=end)
    first = trust.verify_client(leaf.chain, at=NOW)
    assert first.accepted and first.not_after == end, first.line
    assert trust.verify_client(leaf.chain, at=NOW + SECOND) is first
    # Within the cache's few seconds, but past the leaf's notAfter.
    expired = trust.verify_client(leaf.chain, at=end + SECOND)
    assert expired.reason is Reason.EXPIRED, expired.line


def test_a_cached_acceptance_ends_when_its_crl_goes_stale(tmp_path: Path) -> None:
    month_ago = NOW - 30 * DAY
    root = CA.root("Stale Root", not_before=month_ago)
    issuing = root.intermediate("Stale Issuing", not_before=month_ago)
    due = NOW + 2 * SECOND
    crl = issuing.crl(last_update=NOW - DAY, next_update=due)
    _partner(tmp_path, "stale.example", root, _pem(crl))
    trust = _trust(tmp_path)
    leaf = issuing.issue(dns=["sip.stale.example"], not_before=month_ago)
    first = trust.verify_client(leaf.chain, at=NOW)
    assert first.accepted, first.line
    assert trust.verify_client(leaf.chain, at=NOW + SECOND) is first
    # The CRL's nextUpdate passed within the cache's few seconds: fails closed.
    stale = trust.verify_client(leaf.chain, at=due + SECOND)
    assert stale.reason is Reason.CRL_UNAVAILABLE, stale.line


def test_a_revocation_after_caching_is_refused_by_the_reloaded_verifier(
    tmp_path: Path,
) -> None:
    root = CA.root("Revoking Root")
    issuing = root.intermediate("Revoking Issuing")
    _partner(tmp_path, "revoking.example", root)
    before = _trust(tmp_path)
    leaf = issuing.issue(dns=["sip.revoking.example"])
    assert before.verify_client(leaf.chain, at=NOW).accepted
    _partner(tmp_path, "revoking.example", root, _pem(issuing.crl([leaf.cert.serial_number])))
    after = _trust(tmp_path)
    verdict = after.verify_client(leaf.chain, at=NOW + SECOND)
    assert verdict.reason is Reason.REVOKED, verdict.line


def test_server_verdicts_are_cached_per_name(tmp_path: Path) -> None:
    root = CA.root("Enterprise Root")
    member = root.intermediate("Enterprise Issuing").issue(dns=["fe1.corp.test"])
    trust = ServerTrust([root.cert])
    first = trust.verify_server(member.chain, "fe1.corp.test", at=NOW)
    assert first.accepted, first.line
    assert trust.verify_server(_fresh(member.chain), "fe1.corp.test", at=NOW + SECOND) is first
    other = trust.verify_server(member.chain, "fe2.corp.test", at=NOW + SECOND)
    assert other.reason is Reason.NAME_MISMATCH, other.line


def test_the_cache_keeps_acceptances_only_and_is_bounded() -> None:
    root = CA.root("Unit Root")
    leaves: list[Leaf] = [root.issue(dns=[f"n{i}.example"]) for i in range(3)]
    accepted = [Verdict(True, None, "ok", "p", (leaf.cert, root.cert)) for leaf in leaves]
    refused = Verdict(False, Reason.REVOKED, "no", "p", (leaves[0].cert, root.cert))
    cache = VerdictCache(size=2)
    cache.put("refused", refused, NOW)
    assert cache.get("refused", NOW) is None
    for i, verdict in enumerate(accepted):
        cache.put(i, verdict, NOW)
    assert len(cache) == 2
    assert cache.get(0, NOW) is None  # the oldest went first
    assert cache.get(2, NOW + SECOND) is accepted[2]
    # A boundary (e.g. a CRL's nextUpdate) one second ahead ends an entry there.
    bounded = VerdictCache([NOW + SECOND])
    bounded.put("k", accepted[0], NOW)
    assert bounded.get("k", NOW) is accepted[0]
    assert bounded.get("k", NOW + SECOND) is None


async def test_a_partner_revoked_after_its_chain_was_cached_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    """Through the gateway: two connections (the second answered from the cache),
    then a CRL revoking the leaf is dropped in; the next handshake is refused."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            pool = await start_pool(nursery, pki, ("fe1.corp.test",))
            config = write_federation(
                tmp_path,
                pki,
                [(h, p) for h, p, _ in pool],
                extra="[policies]\npoll_interval_s = 0.2\n",
                policies={"fabrikam.com": 'domains = ["fabrikam.com"]\n'},
            )
            edge = await start_gateway(nursery, config)
            leaf = pki.fabrikam.issue(dns=["sip.fabrikam.com"])
            for payload in (b"first", b"cached"):
                stream, _ = await partner_stream(edge, pki, leaf)
                assert await echo_roundtrip(stream, payload) == payload
                await stream.aclose()
            crl = pki.fabrikam.crl([leaf.cert.serial_number])
            folder = tmp_path / "federation_policies" / "fabrikam.com"
            (folder / "fabrikam.crl").write_bytes(_pem(crl))
            await edge.wait_for(
                lambda e: e["event"] == "policies_reloaded" and e.get("changed") == ["fabrikam.com"]
            )
            stream, port = await partner_stream(edge, pki, leaf)
            try:
                await stream.send_all(b"x")
                with trio.move_on_after(5):
                    assert await stream.receive_some(10) == b""
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await stream.aclose()
            refused = await edge.event_for_port(port, "connection_rejected")
            assert refused["reason"] == "revoked"
            assert await stop_edge(edge) == 0
            nursery.cancel_scope.cancel()


def test_verify_callback_certificates_are_interned_within_bounds() -> None:
    from OpenSSL import crypto

    from edge import tls

    root = CA.root("Intern Root")
    small = root.issue(dns=["sip.intern.example"]).cert
    # Any peer may send a big certificate: it is parsed, never kept.
    big = root.issue(dns=[f"n{i}.{'x' * 40}.example" for i in range(100)]).cert
    assert len(big.public_bytes(serialization.Encoding.DER)) > tls._MAX_INTERNED_DER
    first = tls._interned(crypto.X509.from_cryptography(small))
    assert first == small
    assert tls._interned(crypto.X509.from_cryptography(small)) is first
    again = tls._interned(crypto.X509.from_cryptography(big))
    assert again == big
    assert tls._interned(crypto.X509.from_cryptography(big)) is not again
    assert all(len(der) <= tls._MAX_INTERNED_DER for der in tls._INTERNED)
    assert len(tls._INTERNED) <= tls._MAX_INTERNED
