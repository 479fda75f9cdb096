"""The verification core, as a table: each case is a real chain and one exact verdict.

Every certificate here is built with cryptography (edge.pki); nothing is mocked.
A case's expectation is either "ok:<partner>" or the exact reason code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.core.policies import PolicySnapshot, load_policies
from edge.core.reasons import Reason
from edge.core.trust import PartnerTrust, ServerTrust, Verdict, leaf_names, name_in_domains
from edge.pki import CA, Leaf, certs_pem

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@dataclass
class World:
    """A policies folder with one partner per situation, and the CAs behind them."""

    folder: Path
    snapshot: PolicySnapshot
    trust: PartnerTrust
    fab_root: CA
    fab_issuing: CA
    fab_revoked_issuing: CA
    contoso: CA
    tailspin: CA
    tailspin_issuing: CA
    tailspin_no_crl: CA
    tailspin_stale_crl: CA
    public_root: CA
    public_issuing: CA
    northwind: CA
    woodgrove: CA
    proseware_third: CA
    coffee_root: CA
    coffee_issuing: CA
    relecloud: CA
    trey: CA
    stranger: CA
    revoked_leaf: Leaf


def _write(folder: Path, name: str, data: bytes | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("policies")

    # fabrikam.com: root -> issuing CA; two domains; CRLs from both levels.
    fab_root = CA.root("Fabrikam Root CA")
    fab_issuing = fab_root.intermediate("Fabrikam Issuing CA")
    fab_revoked_issuing = fab_root.intermediate("Fabrikam Old Issuing CA")
    revoked_leaf = fab_issuing.issue(dns=["sip.fabrikam.com"])
    fab = folder / "fabrikam.com"
    _write(fab, "fabrikam-root.pem", fab_root.cert_pem())
    _write(fab, "issuing.crl", _crl_pem(fab_issuing.crl([revoked_leaf.cert.serial_number])))
    # DER CRL from the root, revoking the old issuing CA.
    root_crl = fab_root.crl([fab_revoked_issuing.cert.serial_number])
    _write(fab, "root.crl", root_crl.public_bytes(serialization.Encoding.DER))
    _write(fab, "policy.toml", 'domains = ["fabrikam.com", "Fabrikam.NET."]\n')

    # contoso.com: a bare root, no policy.toml (domain = folder name).
    contoso = CA.root("Contoso Root")
    _write(folder / "contoso.com", "contoso.crt", contoso.cert_pem())

    # tailspin.com: require-crl.
    tailspin = CA.root("Tailspin Root")
    tailspin_issuing = tailspin.intermediate("Tailspin Issuing")
    tailspin_no_crl = tailspin.intermediate("Tailspin Issuing Without CRL")
    tailspin_stale_crl = tailspin.intermediate("Tailspin Issuing Stale CRL")
    ts = folder / "tailspin.com"
    _write(ts, "root.pem", tailspin.cert_pem())
    _write(
        ts,
        "all.crl",
        _crl_pem(tailspin.crl())
        + _crl_pem(tailspin_issuing.crl())
        + _crl_pem(tailspin_stale_crl.crl(last_update=NOW - 30 * DAY, next_update=NOW - 2 * DAY)),
    )
    _write(ts, "policy.toml", 'revocation = "require-crl"\n')

    # A public CA trusted by three partners; names decide.
    public_root = CA.root("Public Trust Root")
    public_issuing = public_root.intermediate("Public Trust TLS CA")
    _write(folder / "litware.com", "public.pem", public_root.cert_pem())
    _write(folder / "litware.com", "policy.toml", 'domains = ["litware.com", "shared.example"]\n')
    _write(folder / "adatum.com", "public.pem", public_root.cert_pem())
    _write(folder / "wingtip.com", "public.pem", public_root.cert_pem())
    _write(folder / "wingtip.com", "policy.toml", 'domains = ["wingtip.com", "shared.example"]\n')

    # northwind.com: disabled.
    northwind = CA.root("Northwind Root")
    _write(folder / "northwind.com", "root.pem", northwind.cert_pem())
    _write(folder / "northwind.com", "policy.toml", "enabled = false\n")

    # woodgrove.com: a DER root.
    woodgrove = CA.root("Woodgrove Root")
    _write(
        folder / "woodgrove.com",
        "root.cer",
        woodgrove.cert.public_bytes(serialization.Encoding.DER),
    )

    # proseware.com: a bundle of three roots in one PEM file.
    proseware = [CA.root(f"Proseware Root {i}") for i in (1, 2, 3)]
    _write(folder / "proseware.com", "bundle.pem", certs_pem([c.cert for c in proseware]))

    # fourthcoffee.com: the operator pinned the issuing CA, not the root.
    coffee_root = CA.root("Fourth Coffee Root")
    coffee_issuing = coffee_root.intermediate("Fourth Coffee Issuing")
    _write(folder / "fourthcoffee.com", "issuing.pem", coffee_issuing.cert_pem())

    # relecloud.com: revocation off, although its CRL revokes everything we test.
    relecloud = CA.root("Relecloud Root")
    _write(folder / "relecloud.com", "root.pem", relecloud.cert_pem())
    _write(folder / "relecloud.com", "policy.toml", 'revocation = "off"\n')

    # treyresearch.net: root with pathlen 0.
    trey = CA.root("Trey Root", path_length=0)
    _write(folder / "treyresearch.net", "root.pem", trey.cert_pem())

    snapshot = load_policies(folder)
    # The only problem: the deliberately stale CRL, a warning.
    assert [p.path.name for p in snapshot.problems] == ["all.crl"]
    assert not snapshot.broken
    w = World(
        folder=folder,
        snapshot=snapshot,
        trust=PartnerTrust(snapshot),
        fab_root=fab_root,
        fab_issuing=fab_issuing,
        fab_revoked_issuing=fab_revoked_issuing,
        contoso=contoso,
        tailspin=tailspin,
        tailspin_issuing=tailspin_issuing,
        tailspin_no_crl=tailspin_no_crl,
        tailspin_stale_crl=tailspin_stale_crl,
        public_root=public_root,
        public_issuing=public_issuing,
        northwind=northwind,
        woodgrove=woodgrove,
        proseware_third=proseware[2],
        coffee_root=coffee_root,
        coffee_issuing=coffee_issuing,
        relecloud=relecloud,
        trey=trey,
        stranger=CA.root("Stranger Root"),
        revoked_leaf=revoked_leaf,
    )
    return w


Case = Callable[[World], tuple[Leaf | tuple[x509.Certificate, ...], dt.datetime | None]]


def _c(
    chain: Leaf | tuple[x509.Certificate, ...], at: dt.datetime | None = None
) -> tuple[Leaf | tuple[x509.Certificate, ...], dt.datetime | None]:
    return chain, at


FAB = ["sip.fabrikam.com"]

CLIENT_CASES: list[tuple[str, Case, str]] = [
    (
        "valid through an intermediate",
        lambda w: _c(w.fab_issuing.issue(dns=FAB)),
        "ok:fabrikam.com",
    ),
    (
        "valid, root also sent",
        lambda w: _c((*w.fab_issuing.issue(dns=FAB).chain, w.fab_root.cert)),
        "ok:fabrikam.com",
    ),
    (
        "leaf directly under root",
        lambda w: _c(w.contoso.issue(dns=["sip.contoso.com"])),
        "ok:contoso.com",
    ),
    ("domain itself", lambda w: _c(w.contoso.issue(dns=["contoso.com"])), "ok:contoso.com"),
    (
        "second domain of partner",
        lambda w: _c(w.fab_issuing.issue(dns=["edge.fabrikam.net"])),
        "ok:fabrikam.com",
    ),
    (
        "upper-case names, trailing dot",
        lambda w: _c(w.fab_issuing.issue(dns=["SIP.FABRIKAM.COM."])),
        "ok:fabrikam.com",
    ),
    (
        "sip URI SAN counts as domain",
        lambda w: _c(w.contoso.issue(uris=["sip:contoso.com"])),
        "ok:contoso.com",
    ),
    (
        "sip URI with user part does not",
        lambda w: _c(w.contoso.issue(uris=["sip:alice@contoso.com"])),
        "name_mismatch",
    ),
    (
        "wildcard SAN under domain",
        lambda w: _c(w.contoso.issue(dns=["*.contoso.com"])),
        "ok:contoso.com",
    ),
    ("expired leaf", lambda w: _c(w.fab_issuing.issue(dns=FAB, not_after=NOW - DAY)), "expired"),
    (
        "expired intermediate",
        lambda w: _c(w.fab_root.intermediate("Old", not_after=NOW - DAY).issue(dns=FAB)),
        "expired",
    ),
    (
        "not yet valid leaf",
        lambda w: _c(w.fab_issuing.issue(dns=FAB, not_before=NOW + DAY)),
        "not_yet_valid",
    ),
    (
        "--at in the past",
        lambda w: _c(w.fab_issuing.issue(dns=FAB), NOW - 30 * DAY),
        "not_yet_valid",
    ),
    ("--at in the future", lambda w: _c(w.fab_issuing.issue(dns=FAB), NOW + 400 * DAY), "expired"),
    (
        "--at inside validity",
        lambda w: _c(w.fab_issuing.issue(dns=FAB), NOW + DAY),
        "ok:fabrikam.com",
    ),
    ("revoked leaf", lambda w: _c(w.revoked_leaf), "revoked"),
    (
        "revoked intermediate (DER CRL)",
        lambda w: _c(w.fab_revoked_issuing.issue(dns=FAB)),
        "revoked",
    ),
    (
        "require-crl with current CRLs",
        lambda w: _c(w.tailspin_issuing.issue(dns=["sip.tailspin.com"])),
        "ok:tailspin.com",
    ),
    (
        "require-crl, missing CRL",
        lambda w: _c(w.tailspin_no_crl.issue(dns=["sip.tailspin.com"])),
        "crl_unavailable",
    ),
    (
        "require-crl, expired CRL",
        lambda w: _c(w.tailspin_stale_crl.issue(dns=["sip.tailspin.com"])),
        "crl_unavailable",
    ),
    (
        "revocation off ignores CRL need",
        lambda w: _c(w.relecloud.issue(dns=["sip.relecloud.com"])),
        "ok:relecloud.com",
    ),
    (
        "serverAuth-only leaf",
        lambda w: _c(w.fab_issuing.issue(dns=FAB, eku=("server",))),
        "bad_purpose",
    ),
    (
        "no EKU is any purpose",
        lambda w: _c(w.fab_issuing.issue(dns=FAB, eku=None)),
        "ok:fabrikam.com",
    ),
    (
        "intermediate without CA bit",
        lambda w: _c(w.fab_root.intermediate("Fake", is_ca=False).issue(dns=FAB)),
        "invalid_chain",
    ),
    (
        "path length exceeded",
        lambda w: _c(
            w.trey.intermediate("T1").intermediate("T2").issue(dns=["sip.treyresearch.net"])
        ),
        "invalid_chain",
    ),
    ("A's CA issuing for B's domain", lambda w: _c(w.contoso.issue(dns=FAB)), "name_mismatch"),
    (
        "suffix attack",
        lambda w: _c(w.fab_issuing.issue(dns=["sip.fabrikam.com.evil.example"])),
        "name_mismatch",
    ),
    ("label boundary", lambda w: _c(w.fab_issuing.issue(dns=["notfabrikam.com"])), "name_mismatch"),
    (
        "CN ignored when SAN present",
        lambda w: _c(w.fab_issuing.issue(dns=["other.example"], common_name="sip.fabrikam.com")),
        "name_mismatch",
    ),
    (
        "CN used when no SAN",
        lambda w: _c(w.fab_issuing.issue(common_name="sip.fabrikam.com", san=False)),
        "ok:fabrikam.com",
    ),
    (
        "CN used when no SAN, wrong",
        lambda w: _c(w.fab_issuing.issue(common_name="sip.evil.example", san=False)),
        "name_mismatch",
    ),
    ("unknown CA", lambda w: _c(w.stranger.issue(dns=FAB)), "unknown_ca"),
    ("missing intermediate", lambda w: _c(w.fab_issuing.issue(dns=FAB).chain[:1]), "unknown_ca"),
    ("self-signed root as leaf from stranger", lambda w: _c((w.stranger.cert,)), "unknown_ca"),
    (
        "expired chain to stranger is unknown_ca",
        lambda w: _c(w.stranger.issue(dns=FAB, not_after=NOW - DAY)),
        "unknown_ca",
    ),
    (
        "shared public root, names pick litware",
        lambda w: _c(w.public_issuing.issue(dns=["sip.litware.com"])),
        "ok:litware.com",
    ),
    (
        "shared public root, names pick adatum",
        lambda w: _c(w.public_issuing.issue(dns=["sip.adatum.com"])),
        "ok:adatum.com",
    ),
    (
        "shared public root, nobody's name",
        lambda w: _c(w.public_issuing.issue(dns=["sip.evil.example"])),
        "name_mismatch",
    ),
    (
        "shared public root, ambiguous",
        lambda w: _c(w.public_issuing.issue(dns=["sip.shared.example"])),
        "ambiguous_partner",
    ),
    (
        "shared public root, expired leaf",
        lambda w: _c(w.public_issuing.issue(dns=["sip.adatum.com"], not_after=NOW - DAY)),
        "expired",
    ),
    (
        "disabled partner",
        lambda w: _c(w.northwind.issue(dns=["sip.northwind.com"])),
        "partner_disabled",
    ),
    ("DER root", lambda w: _c(w.woodgrove.issue(dns=["sip.woodgrove.com"])), "ok:woodgrove.com"),
    (
        "third root of a bundle",
        lambda w: _c(w.proseware_third.issue(dns=["sip.proseware.com"])),
        "ok:proseware.com",
    ),
    (
        "pinned issuing CA (partial chain)",
        lambda w: _c(w.coffee_issuing.issue(dns=["sip.fourthcoffee.com"])),
        "ok:fourthcoffee.com",
    ),
    (
        "leaf is a CA certificate",
        lambda w: _c(w.contoso.intermediate("sip.contoso.com").chain),
        "bad_purpose",
    ),
    ("no client certificate", lambda w: _c(()), "no_client_cert"),
    (
        "overlong chain",
        lambda w: _c((*w.fab_issuing.issue(dns=FAB).chain, *[w.fab_root.cert] * 8)),
        "invalid_chain",
    ),
]


@pytest.mark.parametrize(
    ("make", "expected"),
    [pytest.param(make, expected, id=name) for name, make, expected in CLIENT_CASES],
)
def test_client_case(world: World, make: Case, expected: str) -> None:
    chain_or_leaf, at = make(world)
    chain = chain_or_leaf.chain if isinstance(chain_or_leaf, Leaf) else chain_or_leaf
    verdict = world.trust.verify_client(chain, at=at)
    if expected.startswith("ok:"):
        assert verdict.accepted, verdict.line
        assert verdict.reason is None
        assert verdict.partner == expected[3:]
        assert verdict.line == f"accepted partner={expected[3:]}"
        assert verdict.chain[0] == chain[0]
        assert verdict.chain[-1] in world.snapshot.partners[expected[3:]].roots
    else:
        assert not verdict.accepted
        assert verdict.reason == Reason(expected), verdict.line
        assert verdict.line.startswith(f"rejected reason={expected}: ")


def test_expired_detail_names_certificate(world: World) -> None:
    leaf = world.fab_root.intermediate("Lapsed Issuing", not_after=NOW - DAY).issue(dns=FAB)
    verdict = world.trust.verify_client(leaf.chain)
    assert verdict.reason is Reason.EXPIRED
    assert "Lapsed Issuing" in verdict.detail
    assert "fabrikam.com" in verdict.detail


def test_revoked_detail_names_crl_file(world: World) -> None:
    verdict = world.trust.verify_client(world.revoked_leaf.chain)
    assert verdict.reason is Reason.REVOKED
    assert "issuing.crl" in verdict.detail
    assert verdict.partner == "fabrikam.com"


def test_verdict_json_shape(world: World) -> None:
    verdict = world.trust.verify_client(world.fab_issuing.issue(dns=FAB).chain)
    data = verdict.as_dict()
    assert data["accepted"] is True and data["partner"] == "fabrikam.com"
    assert data["reason"] is None
    assert [c["subject"].split(",")[0] for c in data["chain"]] == [
        "CN=sip.fabrikam.com",
        "CN=Fabrikam Issuing CA",
        "CN=Fabrikam Root CA",
    ]
    rejected = world.trust.verify_client(()).as_dict()
    assert rejected["reason"] == "no_client_cert" and rejected["accepted"] is False


def test_partner_A_root_never_vouches_for_B(world: World) -> None:
    # Contoso's root issues a certificate naming Fabrikam: never accepted as fabrikam.
    verdict = world.trust.verify_client(world.contoso.issue(dns=FAB).chain)
    assert verdict.reason is Reason.NAME_MISMATCH
    assert "contoso.com" in verdict.detail


def test_stale_crl_fails_closed_under_crl_if_present(tmp_path: Path) -> None:
    month_ago = NOW - 30 * DAY
    root = CA.root("Stale Root", not_before=month_ago)
    issuing = root.intermediate("Stale Issuing", not_before=month_ago)
    _write(tmp_path / "stale.example", "root.pem", root.cert_pem())
    _write(
        tmp_path / "stale.example",
        "issuing.crl",
        _crl_pem(issuing.crl(last_update=NOW - 10 * DAY, next_update=NOW - DAY)),
    )
    snapshot = load_policies(tmp_path)
    assert not snapshot.broken  # a stale CRL is a warning at load time
    assert any("stale" in str(p) and not p.fatal for p in snapshot.problems)
    trust = PartnerTrust(snapshot)
    leaf = issuing.issue(dns=["sip.stale.example"], not_before=month_ago)
    verdict = trust.verify_client(leaf.chain)
    assert verdict.reason is Reason.CRL_UNAVAILABLE
    assert "issuing.crl" in verdict.detail
    # Before the CRL went stale, the same chain was fine.
    ok = trust.verify_client(leaf.chain, at=NOW - 2 * DAY)
    assert ok.accepted, ok.line


def test_crl_signed_by_someone_else_fails_closed(tmp_path: Path) -> None:
    root = CA.root("Signed Root")
    issuing = root.intermediate("Signed Issuing")
    leaf = issuing.issue(dns=["sip.signed.example"])
    # An impostor CA with the same name publishes a CRL "revoking" the leaf.
    impostor = CA.root("Signed Issuing")
    _write(tmp_path / "signed.example", "root.pem", root.cert_pem())
    _write(
        tmp_path / "signed.example", "fake.crl", _crl_pem(impostor.crl([leaf.cert.serial_number]))
    )
    trust = PartnerTrust(load_policies(tmp_path))
    # Issue 15: an unusable CRL claiming the leaf is neither "revoked" (a forgery must
    # not revoke) nor "not revoked" (it must not silently pass): crl_unavailable.
    verdict = trust.verify_client(leaf.chain)
    assert verdict.reason == "crl_unavailable"
    assert "fake.crl" in verdict.detail and "signature does not verify" in verdict.detail


def test_broken_partner_kept_from_previous_snapshot_still_verifies(tmp_path: Path) -> None:
    root = CA.root("Reload Root")
    _write(tmp_path / "reload.example", "root.pem", root.cert_pem())
    first = load_policies(tmp_path)
    _write(tmp_path / "reload.example", "new.pem", b"-----BEGIN CERTIFICATE-----\nMIIB")
    second = load_policies(tmp_path, previous=first)
    assert second.broken == {"reload.example"}
    assert second.partners["reload.example"] == first.partners["reload.example"]
    verdict = PartnerTrust(second).verify_client(root.issue(dns=["a.reload.example"]).chain)
    assert verdict.accepted
    fresh = load_policies(tmp_path)
    assert "reload.example" not in fresh.partners
    verdict = PartnerTrust(fresh).verify_client(root.issue(dns=["a.reload.example"]).chain)
    assert verdict.reason is Reason.UNKNOWN_CA


def test_candidates_are_indexed_not_scanned(world: World) -> None:
    # The contoso leaf is only ever checked against contoso's store.
    leaf = world.contoso.issue(dns=["sip.contoso.com"])
    assert world.trust._candidates(leaf.chain) == ["contoso.com"]
    shared = world.public_issuing.issue(dns=["sip.litware.com"])
    assert sorted(world.trust._candidates(shared.chain)) == [
        "adatum.com",
        "litware.com",
        "wingtip.com",
    ]


def test_all_roots_deduplicated(world: World) -> None:
    roots = world.trust.all_roots
    assert len(roots) == len(set(roots))
    assert world.public_root.cert in roots


# --- names ----------------------------------------------------------------------------


def test_leaf_names_and_domain_matching() -> None:
    root = CA.root("Names")
    leaf = root.issue(
        dns=["A.Example.COM."],
        uris=["sip:Example.ORG", "sips:x.example.net;transport=tls", "https://x.example"],
    )
    assert leaf_names(leaf.cert) == ("a.example.com", "example.org", "x.example.net")
    assert name_in_domains("a.example.com", ["example.com"]) == "example.com"
    assert name_in_domains("example.com", ["example.com"]) == "example.com"
    assert name_in_domains("badexample.com", ["example.com"]) is None
    assert name_in_domains("*.example.com", ["example.com"]) == "example.com"
    assert name_in_domains("*.com", ["example.com"]) is None
    assert name_in_domains("f*.example.com", ["example.com"]) is None


# --- server purpose -----------------------------------------------------------------


@pytest.fixture(scope="module")
def enterprise() -> tuple[CA, CA, ServerTrust]:
    root = CA.root("Enterprise Root")
    issuing = root.intermediate("Enterprise Issuing")
    return root, issuing, ServerTrust([root.cert])


ServerCase = Callable[[CA, CA], Leaf]

SERVER_CASES: list[tuple[str, ServerCase, str, str]] = [
    ("exact DNS SAN", lambda r, i: i.issue(dns=["fe1.corp.example"]), "fe1.corp.example", "ok"),
    ("upper-case SAN", lambda r, i: i.issue(dns=["FE1.Corp.Example"]), "fe1.corp.example", "ok"),
    (
        "wildcard left-most label",
        lambda r, i: i.issue(dns=["*.corp.example"]),
        "fe1.corp.example",
        "ok",
    ),
    (
        "wildcard is one label only",
        lambda r, i: i.issue(dns=["*.corp.example"]),
        "a.fe1.corp.example",
        "name_mismatch",
    ),
    (
        "wildcard does not match base",
        lambda r, i: i.issue(dns=["*.corp.example"]),
        "corp.example",
        "name_mismatch",
    ),
    (
        "partial-label wildcard never matches",
        lambda r, i: i.issue(dns=["fe*.corp.example"]),
        "fe1.corp.example",
        "name_mismatch",
    ),
    (
        "other host",
        lambda r, i: i.issue(dns=["fe2.corp.example"]),
        "fe1.corp.example",
        "name_mismatch",
    ),
    ("IPv4 SAN", lambda r, i: i.issue(ips=["10.0.0.11"]), "10.0.0.11", "ok"),
    ("IPv6 SAN", lambda r, i: i.issue(ips=["2001:db8::11"]), "2001:db8::11", "ok"),
    ("IP SAN other address", lambda r, i: i.issue(ips=["10.0.0.11"]), "10.0.0.12", "name_mismatch"),
    (
        "DNS SAN does not match an IP",
        lambda r, i: i.issue(dns=["10.0.0.11.corp.example"]),
        "10.0.0.11",
        "name_mismatch",
    ),
    (
        "no SAN: CN never used",
        lambda r, i: i.issue(common_name="fe1.corp.example", san=False),
        "fe1.corp.example",
        "name_mismatch",
    ),
    (
        "CN ignored when SAN present",
        lambda r, i: i.issue(dns=["fe2.corp.example"], common_name="fe1.corp.example"),
        "fe1.corp.example",
        "name_mismatch",
    ),
    (
        "clientAuth-only",
        lambda r, i: i.issue(dns=["fe1.corp.example"], eku=("client",)),
        "fe1.corp.example",
        "bad_purpose",
    ),
    ("no EKU", lambda r, i: i.issue(dns=["fe1.corp.example"], eku=None), "fe1.corp.example", "ok"),
    (
        "expired",
        lambda r, i: i.issue(dns=["fe1.corp.example"], not_after=NOW - DAY),
        "fe1.corp.example",
        "expired",
    ),
    (
        "untrusted root",
        lambda r, i: CA.root("Evil").issue(dns=["fe1.corp.example"]),
        "fe1.corp.example",
        "unknown_ca",
    ),
]


@pytest.mark.parametrize(
    ("make", "name", "expected"),
    [pytest.param(m, n, e, id=label) for label, m, n, e in SERVER_CASES],
)
def test_server_case(
    enterprise: tuple[CA, CA, ServerTrust], make: ServerCase, name: str, expected: str
) -> None:
    root, issuing, trust = enterprise
    leaf = make(root, issuing)
    verdict: Verdict = trust.verify_server(leaf.chain, name)
    if expected == "ok":
        assert verdict.accepted, verdict.line
        assert verdict.partner is None and verdict.line == "accepted"
        assert verdict.chain[-1] == root.cert
    else:
        assert verdict.reason == Reason(expected), verdict.line


def test_server_at_time(enterprise: tuple[CA, CA, ServerTrust]) -> None:
    _, issuing, trust = enterprise
    leaf = issuing.issue(dns=["fe1.corp.example"])
    assert trust.verify_server(leaf.chain, "fe1.corp.example", at=NOW + 500 * DAY).reason is (
        Reason.EXPIRED
    )
    assert trust.verify_server((), "fe1.corp.example").reason is Reason.TLS_ERROR


# --- issue 15: the cryptographic floor, profile checks, identity edges -----------------

# DER of the signature algorithm OIDs we swap (same length, so the TBS stays well formed).
_OID_RSA_SHA256 = bytes.fromhex("06092a864886f70d01010b")
_WEAK_OIDS = {
    "md5": bytes.fromhex("06092a864886f70d010104"),
    "sha1": bytes.fromhex("06092a864886f70d010105"),
}
# PKCS#1 v1.5 DigestInfo prefixes (RFC 8017, section 9.2, note 1).
_DIGEST_INFO = {
    "md5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
}


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def _rsa_root(common_name: str, bits: int = 2048) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_under(
    issuer: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    dns: str,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    if public_key is None:
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 10 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _resign_weak(cert: x509.Certificate, key: rsa.RSAPrivateKey, digest: str) -> x509.Certificate:
    """`cert` signed again with md5/sha1WithRSAEncryption. cryptography refuses to
    sign with those hashes, so the PKCS#1 v1.5 signature is computed here from the
    key's private numbers: the point is a certificate a careless CA could issue."""
    tbs = cert.tbs_certificate_bytes
    assert _OID_RSA_SHA256 in tbs
    tbs = tbs.replace(_OID_RSA_SHA256, _WEAK_OIDS[digest], 1)
    digest_info = _DIGEST_INFO[digest] + hashlib.new(digest, tbs).digest()
    numbers = key.private_numbers()
    k = (numbers.public_numbers.n.bit_length() + 7) // 8
    encoded = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
    signature = pow(int.from_bytes(encoded, "big"), numbers.d, numbers.public_numbers.n)
    algorithm = _der(0x30, _WEAK_OIDS[digest] + b"\x05\x00")
    bits = _der(0x03, b"\x00" + signature.to_bytes(k, "big"))
    return x509.load_der_x509_certificate(_der(0x30, tbs + algorithm + bits))


def _one_partner(
    tmp_path: Path, domain: str, root: x509.Certificate, extra: str = ""
) -> PartnerTrust:
    _write(tmp_path / domain, "root.pem", certs_pem([root]))
    if extra:
        _write(tmp_path / domain, "policy.toml", extra)
    snapshot = load_policies(tmp_path)
    assert not snapshot.broken, snapshot.problems
    return PartnerTrust(snapshot)


@pytest.mark.parametrize(("digest", "named"), [("md5", "MD5"), ("sha1", "SHA-1")])
def test_weak_signature_below_the_anchor_is_weak_crypto(
    tmp_path: Path, digest: str, named: str
) -> None:
    root, key = _rsa_root("Weak Hash Root")
    trust = _one_partner(tmp_path, "weakhash.example", root)
    good = _leaf_under(root, key, "sip.weakhash.example")
    assert trust.verify_client([good]).accepted  # the same chain, properly signed
    weak = _resign_weak(good, key, digest)
    assert weak.signature_hash_algorithm is not None
    verdict = trust.verify_client([weak])
    assert verdict.reason is Reason.WEAK_CRYPTO, verdict.line
    assert named in verdict.detail


def test_rsa_1024_leaf_is_weak_crypto(tmp_path: Path) -> None:
    root = CA.root("Small Key Root")
    trust = _one_partner(tmp_path, "smallkey.example", root.cert)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    leaf = _leaf_under(root.cert, root.key, "sip.smallkey.example", small.public_key())  # type: ignore[arg-type]
    verdict = trust.verify_client([leaf])
    assert verdict.reason is Reason.WEAK_CRYPTO, verdict.line
    assert "RSA-1024" in verdict.detail


def test_rsa_1024_root_is_weak_crypto(tmp_path: Path) -> None:
    root, key = _rsa_root("Small Root", bits=1024)
    trust = _one_partner(tmp_path, "smallroot.example", root)
    verdict = trust.verify_client([_leaf_under(root, key, "sip.smallroot.example")])
    assert verdict.reason is Reason.WEAK_CRYPTO, verdict.line
    assert "RSA-1024" in verdict.detail


def test_weak_crypto_in_a_server_chain(tmp_path: Path) -> None:
    root, key = _rsa_root("Weak Server Root")
    leaf = _resign_weak(_leaf_under(root, key, "fe1.corp.example"), key, "sha1")
    verdict = ServerTrust([root]).verify_server([leaf], "fe1.corp.example")
    assert verdict.reason is Reason.WEAK_CRYPTO, verdict.line


def _restricted_intermediate(
    root: CA,
    common_name: str,
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
    permitted_dns: list[str] | None = None,
) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        root._builder(name, key.public_key(), None, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if permitted_dns is not None:
        builder = builder.add_extension(
            x509.NameConstraints([x509.DNSName(d) for d in permitted_dns], None), critical=True
        )
    cert = builder.sign(root.key, hashes.SHA256())
    return CA(cert, key, (cert, *root.chain), root.root_cert)


def test_intermediate_eku_checked_even_when_another_partner_pins_it(tmp_path: Path) -> None:
    root = CA.root("Shared EKU Root")
    servers_only = _restricted_intermediate(
        root, "Servers Only CA", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    _write(tmp_path / "alpha.example", "root.pem", root.cert_pem())
    # Another partner pins the restricted intermediate itself.
    _write(tmp_path / "beta.example", "pinned.pem", servers_only.cert_pem())
    trust = PartnerTrust(load_policies(tmp_path))
    leaf = servers_only.issue(dns=["sip.alpha.example"], eku=("client",))
    verdict = trust.verify_client(leaf.chain)
    assert verdict.reason is Reason.BAD_PURPOSE, verdict.line


def test_name_constraints_apply_to_sip_uri_names(tmp_path: Path) -> None:
    root = CA.root("Constrained Root")
    constrained = _restricted_intermediate(root, "Alpha Only CA", permitted_dns=["alpha.example"])
    trust = _one_partner(
        tmp_path, "alpha.example", root.cert, 'domains = ["alpha.example", "beta.example"]\n'
    )
    inside = constrained.issue(uris=["sip:alpha.example"])
    assert trust.verify_client(inside.chain).accepted
    outside = constrained.issue(uris=["sip:beta.example"])
    verdict = trust.verify_client(outside.chain)
    assert verdict.reason is Reason.INVALID_CHAIN, verdict.line
    assert "beta.example" in verdict.detail


def test_duplicated_extension_from_a_stranger_is_a_reason_not_a_crash(world: World) -> None:
    leaf = world.stranger.issue(dns=["sip.fabrikam.com"])
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    aki, ski = bytes.fromhex("0603551d23"), bytes.fromhex("0603551d0e")
    assert der.count(aki) == 1
    twice = x509.load_der_x509_certificate(der.replace(aki, ski))  # two SKI extensions
    with pytest.raises(x509.DuplicateExtension):
        twice.extensions  # noqa: B018
    verdict = world.trust.verify_client([twice, world.stranger.cert])
    assert verdict.reason is Reason.INVALID_CHAIN, verdict.line
    assert "duplicate" in verdict.detail.lower()


def test_verdict_reports_the_earliest_expiry_including_the_root(tmp_path: Path) -> None:
    root = CA.root("Short Root", not_after=NOW + 2 * DAY)
    issuing = root.intermediate("Long Issuing", not_after=NOW + 300 * DAY)
    trust = _one_partner(tmp_path, "short.example", root.cert)
    leaf = issuing.issue(dns=["sip.short.example"], not_after=NOW + 200 * DAY)
    verdict = trust.verify_client(leaf.chain)
    assert verdict.accepted, verdict.line
    assert verdict.not_after == root.cert.not_valid_after_utc
    assert trust.verify_client(leaf.chain, at=NOW + 3 * DAY).reason is Reason.EXPIRED


def test_refusals_after_the_partners_own_root_name_the_partner(world: World) -> None:
    """Issue 16 item 4: when the partner's own root verified the path, the refusal
    carries the partner (logs and metrics label it), and a stranger's never does."""
    expired = world.fab_issuing.issue(dns=FAB, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    cases = {
        Reason.EXPIRED: expired,
        Reason.BAD_PURPOSE: world.fab_issuing.issue(dns=FAB, eku=["server"]),
        Reason.NAME_MISMATCH: world.fab_issuing.issue(dns=["sip.litware.com"]),
    }
    for reason, leaf in cases.items():
        verdict = world.trust.verify_client(leaf.chain)
        assert (verdict.accepted, verdict.reason) == (False, reason), verdict
        assert verdict.partner == "fabrikam.com", (reason, verdict)
    stranger = world.trust.verify_client(world.stranger.issue(dns=FAB).chain)
    assert stranger.reason is Reason.UNKNOWN_CA
    assert stranger.partner is None
