"""Revocation as RFC 5280 section 6.3 means it (issue 15), with real CRLs.

Each "Why" case goes through the whole core: a partner folder on disk,
`load_policies`, `PartnerTrust.verify_client`, and `edge check` for the
problems an operator must see. The CRLs are built here with cryptography.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.cli import main as edge_main
from edge.core.policies import load_policies
from edge.core.revocation import CrlSet, crl_order, fetched_crl_problem
from edge.core.trust import PartnerTrust
from edge.pki import CA, Leaf

NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
URL_A = "http://crl.partner.example/part-a.crl"
URL_B = "http://crl.partner.example/part-b.crl"
CLOSED = "; the certificates it covers are rejected as crl_unavailable"


def make_crl(
    ca: CA,
    revoked: Sequence[int | tuple[int, x509.ReasonFlags]] = (),
    *,
    number: int | None = 1,
    this: dt.datetime | None = None,
    nxt: dt.datetime | None = None,
    delta_of: int | None = None,
    idp_url: str | None = None,
    indirect: bool = False,
    critical_number: bool = False,
    critical_unknown: bool = False,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> x509.CertificateRevocationList:
    """A CRL in ``ca``'s name, signed by ``ca`` unless ``signer`` is given."""
    this = this if this is not None else NOW - HOUR
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(this)
        .next_update(nxt if nxt is not None else NOW + 7 * DAY)
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=critical_number)
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    if idp_url is not None or indirect:
        builder = builder.add_extension(
            x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier(idp_url)] if idp_url else None,
                relative_name=None,
                only_contains_user_certs=False,
                only_contains_ca_certs=False,
                only_some_reasons=None,
                indirect_crl=indirect,
                only_contains_attribute_certs=False,
            ),
            critical=True,
        )
    if critical_unknown:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
            critical=True,
        )
    for item in revoked:
        serial, reason = item if isinstance(item, tuple) else (item, None)
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    key = signer if signer is not None else ca.key
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def partner(
    tmp_path: Path,
    root: CA,
    files: dict[str, bytes],
    policy: str = "",
    name: str = "partner.example",
) -> Path:
    folder = tmp_path / "policies" / name
    folder.mkdir(parents=True)
    (folder / "root.pem").write_bytes(root.cert_pem())
    (folder / "policy.toml").write_text(f'domains = ["partner.example"]\n{policy}')
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return tmp_path / "policies"


def verdict_of(policies: Path, leaf: Leaf) -> tuple[str | None, str]:
    verdict = PartnerTrust(load_policies(policies)).verify_client(leaf.chain)
    return (None if verdict.accepted else str(verdict.reason)), verdict.detail


def edge_check(policies: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = edge_main(["check", "--policies", str(policies)])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    return code, [line for line in lines if line.startswith(("error:", "warning:"))]


def issuing_ca(root: CA, name: str, *, crl_sign: bool = True) -> CA:
    """An issuing CA whose keyUsage has cRLSign or not."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return CA(cert, key, (cert, *root.chain), root.root_cert)


@pytest.fixture
def root() -> CA:
    return CA.root("Partner Root")


@pytest.fixture
def issuing(root: CA) -> CA:
    return issuing_ca(root, "Partner Issuing")


# --- base + delta -----------------------------------------------------------------------


def test_delta_is_combined_with_its_base(tmp_path: Path, root: CA, issuing: CA) -> None:
    in_base = issuing.issue(dns=["a.partner.example"])
    in_delta = issuing.issue(dns=["b.partner.example"])
    lifted = issuing.issue(dns=["c.partner.example"])
    clean = issuing.issue(dns=["d.partner.example"])
    base = make_crl(
        issuing,
        [
            in_base.cert.serial_number,
            (lifted.cert.serial_number, x509.ReasonFlags.certificate_hold),
        ],
        number=10,
        this=NOW - 2 * HOUR,
    )
    delta = make_crl(
        issuing,
        [
            in_delta.cert.serial_number,
            (lifted.cert.serial_number, x509.ReasonFlags.remove_from_crl),
        ],
        number=11,
        delta_of=10,
    )
    policies = partner(tmp_path, root, {"base.crl": pem(base), "delta.crl": pem(delta)})
    # Before issue 15 the newer delta replaced the base: in_base was accepted.
    assert verdict_of(policies, in_base)[0] == "revoked"
    reason, detail = verdict_of(policies, in_delta)
    assert reason == "revoked" and "delta.crl" in detail
    assert verdict_of(policies, lifted)[0] is None  # removeFromCRL in the delta
    assert verdict_of(policies, clean)[0] is None


def test_delta_whose_base_is_missing_fails_closed(
    tmp_path: Path, root: CA, issuing: CA, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    base = make_crl(issuing, [], number=10, this=NOW - 2 * HOUR)
    delta = make_crl(issuing, [], number=13, delta_of=12)  # needs base >= 12
    policies = partner(tmp_path, root, {"base.crl": pem(base), "delta.crl": pem(delta)})
    reason, detail = verdict_of(policies, leaf)
    assert reason == "crl_unavailable"
    assert "delta CRL delta.crl" in detail and "numbered >= 12" in detail
    # A root's delta alone is reported by `edge check`.
    root_delta = make_crl(root, [], number=5, delta_of=4)
    other = partner(tmp_path / "x", root, {"delta.crl": pem(root_delta)})
    code, problems = edge_check(other, capsys)
    assert code == 1
    assert problems == [
        f"warning: {other}/partner.example/delta.crl: delta CRL of "
        f"{root.cert.subject.rfc4514_string()} (number 5) needs a complete CRL of the same "
        "scope numbered >= 4 in this folder; without it the certificates it covers are "
        "rejected as crl_unavailable"
    ]


# --- partitions (Issuing Distribution Point) -----------------------------------------------


def test_two_partitions_each_answer_for_their_own_certificates(
    tmp_path: Path, root: CA, issuing: CA, capsys: pytest.CaptureFixture[str]
) -> None:
    in_a = issuing.issue(dns=["a.partner.example"], crl_url=URL_A)
    in_b = issuing.issue(dns=["b.partner.example"], crl_url=URL_B)
    clean_a = issuing.issue(dns=["c.partner.example"], crl_url=URL_A)
    part_a = make_crl(issuing, [in_a.cert.serial_number], number=7, idp_url=URL_A, this=NOW - DAY)
    part_b = make_crl(issuing, [in_b.cert.serial_number], number=8, idp_url=URL_B)
    policies = partner(tmp_path, root, {"a.crl": pem(part_a), "b.crl": pem(part_b)})
    # Before issue 15 the newest file (partition B) answered for everyone: in_a passed.
    reason, detail = verdict_of(policies, in_a)
    assert reason == "revoked" and "a.crl" in detail
    assert verdict_of(policies, in_b)[0] == "revoked"
    assert verdict_of(policies, clean_a)[0] is None
    # A certificate without a distribution point is in neither partition: require-crl
    # refuses it, crl-if-present lets it through.
    no_cdp = issuing.issue(dns=["e.partner.example"])
    assert verdict_of(policies, no_cdp)[0] is None
    strict = partner(
        tmp_path / "s",
        root,
        {"a.crl": pem(part_a), "b.crl": pem(part_b)},
        'revocation = "require-crl"\n',
    )
    assert verdict_of(strict, no_cdp)[0] == "crl_unavailable"
    assert edge_check(policies, capsys) == (0, [])


# --- unusable CRLs fail closed ---------------------------------------------------------------


def test_wrong_signer_fails_closed_and_is_an_edge_check_error(
    tmp_path: Path, root: CA, issuing: CA, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    impostor = ec.generate_private_key(ec.SECP256R1())
    forged = make_crl(issuing, [], signer=impostor)
    policies = partner(tmp_path, root, {"issuing.crl": pem(forged)})
    # Before: ignored, so "not revoked" under crl-if-present.
    reason, detail = verdict_of(policies, leaf)
    assert reason == "crl_unavailable"
    assert detail == (
        f"CRL issuing.crl covers {leaf.cert.subject.rfc4514_string()} (issued by "
        f"{issuing.cert.subject.rfc4514_string()}) but is unusable: signature does not "
        f"verify with the key of {issuing.cert.subject.rfc4514_string()}"
    )
    # Under the name of a root in the folder, `edge check` names the file and why.
    forged_root = make_crl(root, [], signer=impostor)
    other = partner(tmp_path / "r", root, {"root.crl": pem(forged_root)})
    code, problems = edge_check(other, capsys)
    name = root.cert.subject.rfc4514_string()
    assert code == 1
    assert problems == [
        f"warning: {other}/partner.example/root.crl: CRL of {name} is unusable: signature "
        f"does not verify with the key of {name}{CLOSED}"
    ]


def test_signer_without_crl_sign_is_unusable(
    tmp_path: Path, root: CA, capsys: pytest.CaptureFixture[str]
) -> None:
    no_crl_sign = issuing_ca(root, "Issuing Without cRLSign", crl_sign=False)
    leaf = no_crl_sign.issue(dns=["a.partner.example"])
    crl = make_crl(no_crl_sign, [])
    policies = partner(tmp_path, root, {"issuing.crl": pem(crl)})
    reason, detail = verdict_of(policies, leaf)
    assert reason == "crl_unavailable"
    assert detail.endswith("which lacks the cRLSign key usage")
    # The same CA pinned in the folder: `edge check` sees it at once.
    pinned = tmp_path / "pinned"
    folder = partner(pinned, no_crl_sign, {"issuing.crl": pem(crl)})
    code, problems = edge_check(folder, capsys)
    name = no_crl_sign.cert.subject.rfc4514_string()
    assert code == 1
    assert problems == [
        f"warning: {folder}/partner.example/issuing.crl: CRL of {name} is unusable: is "
        f"signed by {name}, which lacks the cRLSign key usage{CLOSED}"
    ]


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        pytest.param(
            {"critical_unknown": True},
            "has a critical extension this gateway does not process (1.3.6.1.4.1.55555.1)",
            id="critical-unknown-extension",
        ),
        pytest.param(
            {"critical_number": True},
            "marks its CRLNumber extension critical, which RFC 5280 (5.2.3) forbids",
            id="critical-crlnumber",
        ),
        pytest.param(
            {"indirect": True},
            "is an indirect CRL (it lists other CAs' certificates); not supported",
            id="indirect",
        ),
    ],
)
def test_unsupported_crl_fails_closed_and_is_an_edge_check_error(
    tmp_path: Path,
    root: CA,
    issuing: CA,
    capsys: pytest.CaptureFixture[str],
    kwargs: dict[str, bool],
    why: str,
) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    policies = partner(tmp_path, root, {"issuing.crl": pem(make_crl(issuing, [], **kwargs))})
    reason, detail = verdict_of(policies, leaf)
    assert reason == "crl_unavailable"
    assert detail.endswith(f"but is unusable: {why}")
    other = partner(tmp_path / "r", root, {"root.crl": pem(make_crl(root, [], **kwargs))})
    code, problems = edge_check(other, capsys)
    assert code == 1
    assert problems == [
        f"warning: {other}/partner.example/root.crl: CRL of "
        f"{root.cert.subject.rfc4514_string()} is unusable: {why}{CLOSED}"
    ]


def test_stale_crl_is_a_warning_and_fails_closed(
    tmp_path: Path, root: CA, issuing: CA, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    stale = make_crl(root, [], this=NOW - 9 * DAY, nxt=NOW - 2 * DAY)
    policies = partner(tmp_path, root, {"root.crl": pem(stale)})
    assert verdict_of(policies, leaf)[0] == "crl_unavailable"  # the issuing CA's status
    code, problems = edge_check(policies, capsys)
    assert code == 1
    assert len(problems) == 1
    assert problems[0].startswith(f"warning: {policies}/partner.example/root.crl: CRL of ")
    assert "is stale (nextUpdate" in problems[0]


def test_revocation_off_checks_nothing(tmp_path: Path, root: CA, issuing: CA) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    forged = make_crl(issuing, [leaf.cert.serial_number], critical_unknown=True)
    policies = partner(tmp_path, root, {"i.crl": pem(forged)}, 'revocation = "off"\n')
    assert verdict_of(policies, leaf)[0] is None


# --- newest per scope ------------------------------------------------------------------------


def test_higher_crl_number_wins_over_later_this_update(root: CA, issuing: CA) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    newer = make_crl(issuing, [leaf.cert.serial_number], number=5, this=NOW - 3 * HOUR)
    older = make_crl(issuing, [], number=4, this=NOW - HOUR)  # re-signed later, older number
    assert crl_order(newer) > crl_order(older)
    crls = CrlSet([older, newer], ["older.crl", "newer.crl"])
    problem = crls.check(leaf.chain, "crl-if-present", NOW)
    assert problem is not None and problem[0] == "revoked" and "newer.crl" in problem[1]


def test_delegated_crl_signer_chaining_to_the_same_root(root: CA, issuing: CA) -> None:
    leaf = issuing.issue(dns=["a.partner.example"])
    path = (leaf.cert, issuing.cert, root.cert)
    # The CA's new key (same name, certified by the same root) signs the CRL.
    renewed = issuing_ca(root, "Partner Issuing")
    crl = make_crl(issuing, [leaf.cert.serial_number], signer=renewed.key)
    alone = CrlSet([crl], ["new-key.crl"]).check(path, "crl-if-present", NOW)
    assert alone is not None and alone[0] == "crl_unavailable"
    with_delegate = CrlSet([crl], ["new-key.crl"], extra_signers=[renewed.cert])
    problem = with_delegate.check(path, "crl-if-present", NOW)
    assert problem is not None and problem[0] == "revoked"
    # A same-named certificate from another root is no delegate.
    stranger = issuing_ca(CA.root("Partner Root"), "Partner Issuing")
    forged = make_crl(issuing, [], signer=stranger.key)
    other = CrlSet([forged], ["x.crl"], extra_signers=[stranger.cert])
    assert other.check(path, "crl-if-present", NOW) == (
        "crl_unavailable",
        f"CRL x.crl covers {leaf.cert.subject.rfc4514_string()} (issued by "
        f"{issuing.cert.subject.rfc4514_string()}) but is unusable: signature does not "
        f"verify with the key of {issuing.cert.subject.rfc4514_string()}",
    )


# --- what the fetcher may accept ---------------------------------------------------------------


def test_fetched_crl_acceptance(root: CA, issuing: CA) -> None:
    leaf = issuing.issue(dns=["a.partner.example"], crl_url=URL_A)
    cert, parent = leaf.cert, issuing.cert
    current = make_crl(issuing, [leaf.cert.serial_number], number=5)
    assert fetched_crl_problem(current, cert, parent, None, NOW) is None
    assert fetched_crl_problem(current, cert, parent, current, NOW) is None  # unchanged
    newer = make_crl(issuing, [leaf.cert.serial_number], number=6)
    assert fetched_crl_problem(newer, cert, parent, current, NOW) is None
    older = make_crl(issuing, [], number=4, this=NOW - HOUR / 2)
    problem = fetched_crl_problem(older, cert, parent, current, NOW)
    assert problem is not None and problem.startswith("is not newer than the CRL held")
    delta = make_crl(issuing, [], number=7, delta_of=5)
    assert fetched_crl_problem(delta, cert, parent, current, NOW) == (
        "is a delta CRL, served where a complete CRL is expected"
    )
    impostor = make_crl(issuing, [], number=9, signer=ec.generate_private_key(ec.SECP256R1()))
    problem = fetched_crl_problem(impostor, cert, parent, current, NOW)
    assert problem is not None and problem.startswith("signature does not verify")
    other_partition = make_crl(issuing, [], number=9, idp_url=URL_B)
    problem = fetched_crl_problem(other_partition, cert, parent, current, NOW)
    assert problem is not None and "does not cover" in problem
    from_root = make_crl(root, [], number=9)
    problem = fetched_crl_problem(from_root, cert, parent, current, NOW)
    assert problem is not None and problem.startswith("issued by")
