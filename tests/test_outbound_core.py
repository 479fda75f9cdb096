"""edge.core.outbound: the sans-I/O decisions of outbound federation, in microseconds."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from edge.core.config import Member, Pool
from edge.core.outbound import (
    Destination,
    PartnerEdgeTrust,
    Refusal,
    SrvRecord,
    authorize_member,
    destination,
    filter_targets,
    normalize_sni,
    order_srv,
    reach,
    reachable_partners,
)
from edge.core.policies import PolicySnapshot, load_policies
from edge.core.reasons import Reason
from edge.pki import CA


@pytest.fixture(scope="module")
def cas() -> dict[str, CA]:
    return {
        "enterprise": CA.root("Enterprise Root"),
        "fabrikam": CA.root("Fabrikam Root"),
        "litware": CA.root("Litware Root"),
    }


POOLS = [
    Pool("frontend", (Member("fe1.corp.test", None, 5061), Member("10.0.0.12", None, 5061))),
    Pool("other", (Member("fe9.corp.test", None, 5061),)),
]


def _snapshot(folder: Path, cas: dict[str, CA], policies: dict[str, str]) -> PolicySnapshot:
    for pid, text in policies.items():
        d = folder / pid
        d.mkdir(parents=True, exist_ok=True)
        root = cas["litware"] if pid.startswith("litware") else cas["fabrikam"]
        (d / "root.pem").write_bytes(root.cert_pem())
        (d / "policy.toml").write_text(text)
    return load_policies(folder)


# --- member authorization --------------------------------------------------------------


def test_member_named_in_topology_is_accepted(cas: dict[str, CA]) -> None:
    ent = cas["enterprise"]
    leaf = ent.issue(dns=["FE1.corp.test."], eku=["client"])
    verdict = authorize_member((leaf.cert, ent.cert), [ent.cert], POOLS[:1])
    assert verdict.accepted and (verdict.host, verdict.pool) == ("fe1.corp.test", "frontend")
    by_ip = ent.issue(ips=["10.0.0.12"], eku=None)
    verdict = authorize_member((by_ip.cert, ent.cert), [ent.cert], POOLS[:1])
    assert verdict.accepted and verdict.host == "10.0.0.12"


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        ({"dns": ["fe2.corp.test"]}, Reason.NOT_IN_TOPOLOGY),  # not a member at all
        ({"dns": ["fe9.corp.test"]}, Reason.NOT_IN_TOPOLOGY),  # a member of another pool
        ({"dns": ["*.corp.test"]}, Reason.NOT_IN_TOPOLOGY),  # wildcards are no topology host
        ({"dns": ["fe1.corp.test"], "san": False}, Reason.NOT_IN_TOPOLOGY),  # CN only
        ({"dns": ["fe1.corp.test"], "eku": ["server"]}, Reason.BAD_PURPOSE),
    ],
)
def test_member_refusals(cas: dict[str, CA], names: dict[str, object], reason: Reason) -> None:
    ent = cas["enterprise"]
    leaf = ent.issue(**names)  # type: ignore[arg-type]
    verdict = authorize_member((leaf.cert, ent.cert), [ent.cert], POOLS[:1])
    assert (verdict.accepted, verdict.reason) == (False, reason)


def test_member_chain_must_end_at_internal_roots(cas: dict[str, CA]) -> None:
    fab = cas["fabrikam"]
    leaf = fab.issue(dns=["fe1.corp.test"])
    verdict = authorize_member((leaf.cert, fab.cert), [cas["enterprise"].cert], POOLS)
    assert verdict.reason is Reason.UNKNOWN_CA
    assert authorize_member((), [cas["enterprise"].cert], POOLS).reason is Reason.NO_CLIENT_CERT


# --- destination --------------------------------------------------------------------------


def test_destination_from_sni(tmp_path: Path, cas: dict[str, CA]) -> None:
    snap = _snapshot(
        tmp_path,
        cas,
        {
            "fabrikam.com": 'domains = ["fabrikam.com", "fabrikam.net"]\n',
            "fabrikam-eu": 'domains = ["eu.fabrikam.com"]\n',
            "litware.com": "enabled = false\n",
        },
    )
    assert destination("SIP.Fabrikam.NET.", snap) == Destination(
        "fabrikam.com", "fabrikam.net", "sip.fabrikam.net"
    )
    # The most specific domain wins.
    assert destination("sip.eu.fabrikam.com", snap) == Destination(
        "fabrikam-eu", "eu.fabrikam.com", "sip.eu.fabrikam.com"
    )
    for sni, words in (
        (None, "no SNI"),
        ("sip.litware.com", "disabled"),
        ("fabrikam.com.evil.example", "no enabled partner"),
        ("sip\r\nx.fabrikam.com", "not a DNS name"),
        ("x" * 300, "not a DNS name"),
    ):
        refusal = destination(sni, snap)
        assert isinstance(refusal, Refusal)
        assert refusal.reason is Reason.UNKNOWN_DESTINATION
        assert words in refusal.detail
        assert "\r" not in refusal.detail and len(refusal.detail) < 200
    assert reachable_partners(snap) == {"fabrikam.com", "fabrikam-eu"}


def test_two_partners_claiming_a_domain_is_refused(tmp_path: Path, cas: dict[str, CA]) -> None:
    snap = _snapshot(
        tmp_path,
        cas,
        {"a-fab": 'domains = ["fabrikam.com"]\n', "b-fab": 'domains = ["fabrikam.com"]\n'},
    )
    refusal = destination("sip.fabrikam.com", snap)
    assert isinstance(refusal, Refusal) and "several partners (a-fab, b-fab)" in refusal.detail


def test_normalize_sni() -> None:
    assert normalize_sni("Sip.Fabrikam.com.") == "sip.fabrikam.com"
    for bad in ("", "localhost", "a..b", "-a.b", "bü.example", "a b.example"):
        assert normalize_sni(bad) is None


# --- SRV ----------------------------------------------------------------------------------


def test_srv_priority_first_then_weights() -> None:
    records = [
        SrvRecord(20, 0, 5061, "c.fabrikam.com"),
        SrvRecord(10, 30, 5061, "a.fabrikam.com"),
        SrvRecord(10, 10, 5061, "b.fabrikam.com"),
    ]
    rng = random.Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = order_srv(records, rng)
        assert order[-1].target == "c.fabrikam.com"  # priority 20 after every 10
        assert {r.target for r in order[:2]} == {"a.fabrikam.com", "b.fabrikam.com"}
        firsts[order[0].target] += 1
    # Weights 30:10 -> a first about 3/4 of the time (RFC 2782; draw 0..40 inclusive).
    assert 0.70 < firsts["a.fabrikam.com"] / 4000 < 0.80


def test_srv_weight_zero() -> None:
    rng = random.Random(3)
    zero = SrvRecord(10, 0, 5061, "z.fabrikam.com")
    heavy = SrvRecord(10, 100, 5061, "h.fabrikam.com")
    firsts = Counter(order_srv([heavy, zero], rng)[0].target for _ in range(2000))
    # Weight 0 goes first only when 0 is drawn out of 0..100: rarely, but possible.
    assert firsts["z.fabrikam.com"] < 100
    only_zero = [SrvRecord(5, 0, 5061, f"{c}.fabrikam.com") for c in "abc"]
    assert sorted(r.target for r in order_srv(only_zero, rng)) == [
        "a.fabrikam.com",
        "b.fabrikam.com",
        "c.fabrikam.com",
    ]
    assert order_srv([], rng) == []


def test_srv_targets_outside_the_partner_are_ignored(tmp_path: Path, cas: dict[str, CA]) -> None:
    snap = _snapshot(
        tmp_path,
        cas,
        {"fabrikam.com": 'domains = ["fabrikam.com"]\nedge = "edge.hosting.example:5061"\n'},
    )
    policy = snap.partners["fabrikam.com"]
    kept, ignored = filter_targets(
        [
            SrvRecord(1, 1, 5061, "SIP.fabrikam.com."),
            SrvRecord(1, 1, 5061, "edge.hosting.example"),
            SrvRecord(1, 1, 5061, "fabrikam.com.evil.example"),
            SrvRecord(1, 1, 5061, "evilfabrikam.com"),
            SrvRecord(1, 1, 0, "sip2.fabrikam.com"),
        ],
        policy,
    )
    assert [r.target for r in kept] == ["sip.fabrikam.com", "edge.hosting.example"]
    assert [r.target for r in ignored] == [
        "fabrikam.com.evil.example",
        "evilfabrikam.com",
        "sip2.fabrikam.com",
    ]


def test_reach_lines(tmp_path: Path, cas: dict[str, CA]) -> None:
    snap = _snapshot(
        tmp_path,
        cas,
        {
            "fabrikam.com": 'domains = ["fabrikam.com", "fabrikam.net"]\n',
            "litware.com": 'edge = "[2001:db8::1]:5061"\n',
        },
    )
    assert reach(snap.partners["fabrikam.com"]).line == (
        "DNS SRV _sipfederationtls._tcp.fabrikam.com, _sipfederationtls._tcp.fabrikam.net"
    )
    assert reach(snap.partners["litware.com"]).line == "static edge [2001:db8::1]:5061"


# --- the partner's edge certificate --------------------------------------------------------


def test_partner_edge_verdicts(tmp_path: Path, cas: dict[str, CA]) -> None:
    fab = cas["fabrikam"]
    good = fab.issue(dns=["sip.fabrikam.com"], eku=["server"])
    revoked = fab.issue(dns=["sip2.fabrikam.com"], eku=["server"])
    client_only = fab.issue(dns=["sip.fabrikam.com"], eku=["client"])
    other = cas["litware"].issue(dns=["sip.fabrikam.com"], eku=["server"])
    _snapshot(tmp_path, cas, {"fabrikam.com": "", "litware.com": ""})
    (tmp_path / "fabrikam.com" / "root.crl").write_bytes(
        fab.crl([revoked.cert.serial_number]).public_bytes(Encoding.PEM)
    )
    snap = load_policies(tmp_path)
    assert not snap.problems
    trust = PartnerEdgeTrust(snap)
    ok = trust.verify("fabrikam.com", good.chain, "sip.fabrikam.com")
    assert ok.accepted and ok.partner == "fabrikam.com" and ok.chain[-1] == fab.cert
    for chain, name, reason in (
        (other.chain, "sip.fabrikam.com", Reason.UNKNOWN_CA),  # litware's root vouches: no
        (good.chain, "sip3.fabrikam.com", Reason.NAME_MISMATCH),
        (revoked.chain, "sip2.fabrikam.com", Reason.REVOKED),
        (client_only.chain, "sip.fabrikam.com", Reason.BAD_PURPOSE),
    ):
        verdict = trust.verify("fabrikam.com", chain, name)
        assert (verdict.accepted, verdict.reason) == (False, reason), verdict.detail
    assert trust.verify("nobody", good.chain, "sip.fabrikam.com").reason is Reason.UNKNOWN_CA
    long_chain = (good.cert,) + (fab.cert,) * 20
    assert trust.verify("fabrikam.com", long_chain, "sip.fabrikam.com").reason is (
        Reason.INVALID_CHAIN
    )
