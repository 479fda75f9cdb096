"""Certificate verification and partner authorization: who is this peer, and may it in?

Owns: the single decision "is this certificate chain accepted, for which
partner, and if not, why" (docs/partners.md, "The verifier's rules"),
for partners connecting in (`PartnerTrust.verify_client`) and for servers the
edge connects to (`ServerTrust.verify_server`). A reader looking for why a
partner was rejected finds every rule here.

Must never: do I/O, import trio or sockets, read files (policies arrive as an
immutable `PolicySnapshot`), put key material in a detail string, or trust SNI.
It must never verify a chain against the union of all partners' roots: partner
A's CA must not be able to vouch for partner B.

Theory of operation (client purpose)
------------------------------------
1. *Candidates.* Every trust anchor of every partner is indexed by subject
   name. The partners whose anchors are named as the subject or issuer of any
   certificate the peer sent are the only candidates; with 50 partners a
   verification touches one or two stores, not 50.
2. *Chain.* For each candidate, pyca/cryptography's webpki verifier
   (`cryptography.x509.verification`, a `ClientVerifier` on a `Store` of that
   partner's anchors alone) builds and checks the path: signatures, validity
   at the given time (the anchor's too), basicConstraints, path length, name
   constraints on DNS SANs, and the CA/Browser-Forum profile (AKI/SKI, key
   usage, no v1 CAs, no name constraints on a leaf, well-formed names...).
   Every certificate in a partner folder is an anchor, root or not (pinning).
   Two deliberate exceptions to webpki for end entities (`_EE_POLICY`): the
   subjectAltName may be absent (then the CN names the partner) and
   extendedKeyUsage may be absent (clientAuth or none, step 4).
   pyca reports a failure only as English text, so the *reason code* of a
   failed chain comes from structure (`_diagnose`): OpenSSL's X509_V_ERR code
   for the same chain against the same anchors (`X509StoreContext`:
   `unknown_ca`, `expired`, `not_yet_valid`, `invalid_chain`), else our floor
   and purpose checks, else it is a profile violation only pyca makes
   (`invalid_chain`, pyca's message as detail). No text is ever parsed.
   On the verified path, our own checks: the cryptographic floor
   (`crypto_floor_problem`, `weak_crypto`: no MD5/SHA-1 signature below the
   anchor, RSA >= 2048 bits, EC only P-256/384/521, by OID and key type), and
   name constraints applied to the names the partner rules use beyond DNS
   SANs (`sip:` URI SANs, a SAN-less CN; `_constraint_problem`). A verified
   path is cached per (partner, chain) with its validity window: signatures
   never change, only time does.
3. *Names.* Among the partners whose chain verified, keep those with a leaf
   name inside one of their domains (DNS SANs, `sip:` URI SANs, the CN only
   when there is no SAN extension). The name that matched is the verdict's
   `name`: the identity passed on (PROXY v2 SSL_CN), never the raw CN.
4. *Purpose* (ours, with a reason code): on each named partner's own path, the
   leaf's extendedKeyUsage must include clientAuth, or be absent; every CA on
   that path with an EKU, the anchor included, must allow it too (an
   intermediate another partner pinned as its anchor is still checked); the
   leaf must not itself be a CA. Then more than one named partner is
   `ambiguous_partner` (a configuration overlap the operator must fix;
   disabled partners count, so disabling one never silently re-routes a
   certificate to another).
5. *Authorization* of the one partner: disabled is `partner_disabled`; then
   revocation by that partner's CRLs, checked here in Python over the verified
   path (see `_revocation_problem`).
When nothing is accepted the most specific failure wins: a candidate whose
names match explains its own failure (an expired chain to the right root is
`expired`), otherwise a chain that verified but matched no name is
`name_mismatch`, otherwise the most specific chain error (`revoked`,
`expired`, `not_yet_valid`, `weak_crypto`, `invalid_chain` over `unknown_ca`).
A peer's certificate that cannot be parsed (malformed or duplicate
extension) is `invalid_chain` before any of this.
`Verdict.not_after` is the earliest notAfter over the verified path, anchor
included: an admitted connection must be closed then.

Servers (`ServerTrust`): pyca's `ServerVerifier` (webpki, SAN-only RFC 6125
matching, no CN) on our roots, EKU serverAuth or none; failures get their
reason code the same way (`_diagnose`, then service_identity for
`name_mismatch`), and the same floor.

Which check comes from which library:
  pyca/cryptography verifier: path building, signatures, validity times,
      basicConstraints/pathLen, DNS name constraints, webpki profile.
  OpenSSL (X509StoreContext): only the reason code of a chain pyca refused.
  this module: candidates, partner names (incl. `sip:` and CN rules), purpose,
      the cryptographic floor, name constraints over `sip:`/CN names,
      malformed/duplicate extensions, disabled, ambiguity, revocation.
  service_identity: the server name match used to explain `name_mismatch`.
In TLS (edge/tls.py) OpenSSL checks the same chain once more with every
partner's anchors, only to choose the alert; the verdict is this module's.

Thread safety: the stores and caches are only read, or updated with single
dict operations, so repeated calls from one thread (the trio thread) are safe.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509 import verification as pyca
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from edge.core.names import subject as _subject
from edge.core.policies import PartnerPolicy, PolicySnapshot
from edge.core.reasons import Reason
from edge.core.revocation import CrlSet

__all__ = [
    "MAX_CHAIN_LENGTH",
    "PartnerTrust",
    "ServerTrust",
    "Verdict",
    "crypto_floor_problem",
    "leaf_names",
    "name_in_domains",
    "reason_for_openssl_error",
]


# Leaf plus intermediates a peer may send (real federation chains have 2 to 4).
MAX_CHAIN_LENGTH = 8


@dataclass(frozen=True)
class Verdict:
    """The answer for one chain: accepted (for which partner) or rejected (why)."""

    accepted: bool
    reason: Reason | None  # None exactly when accepted
    detail: str  # for operators: which certificate, what is wrong; never key material
    partner: str | None = None  # the identified partner (client purpose), else None
    # Accepted: the verified path, leaf first, ending with the trust anchor. Rejected
    # after the chain itself verified: that path too (for logs); otherwise empty.
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    # Accepted (client purpose): the leaf name that put it inside the partner's
    # domains (a DNS SAN, the domain of a `sip:` URI SAN, or the CN of a SAN-less
    # leaf), normalized. This, never the raw CN, is the identity passed on.
    name: str | None = None

    @property
    def not_after(self) -> _dt.datetime | None:
        """The earliest notAfter over the verified path, trust anchor included: when
        this verdict stops being true by itself (a live connection admitted under it
        must be closed then). None when no path verified."""
        if not self.chain:
            return None
        return min(c.not_valid_after_utc for c in self.chain)

    @property
    def line(self) -> str:
        """The one-line `edge verify` output."""
        if self.accepted:
            return f"accepted partner={self.partner}" if self.partner else "accepted"
        return f"rejected reason={self.reason}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for `edge verify --json` and structured logs."""
        return {
            "result": "accepted" if self.accepted else "rejected",
            "accepted": self.accepted,
            "reason": None if self.reason is None else str(self.reason),
            "partner": self.partner,
            "detail": self.detail,
            "chain": [
                {
                    "subject": c.subject.rfc4514_string(),
                    "issuer": c.issuer.rfc4514_string(),
                    "not_after": c.not_valid_after_utc.isoformat(),
                    "sha256": c.fingerprint(hashes.SHA256()).hex(),
                }
                for c in self.chain
            ],
        }


def _accept(detail: str, partner: str | None, chain: tuple[x509.Certificate, ...]) -> Verdict:
    return Verdict(True, None, detail, partner, chain)


def _reject(
    reason: Reason,
    detail: str,
    partner: str | None = None,
    chain: tuple[x509.Certificate, ...] = (),
) -> Verdict:
    return Verdict(False, reason, detail, partner, chain)


# --- OpenSSL errors -> reason codes ------------------------------------------------

# X509_V_ERR_* codes (openssl/x509_vfy.h). Anything not listed is invalid_chain:
# the path reached an anchor or got far enough that "unknown CA" would mislead.
_OPENSSL_REASONS: Mapping[int, Reason] = {
    2: Reason.UNKNOWN_CA,  # unable to get issuer certificate
    18: Reason.UNKNOWN_CA,  # self-signed leaf
    19: Reason.UNKNOWN_CA,  # self-signed certificate in chain (untrusted root sent)
    20: Reason.UNKNOWN_CA,  # unable to get local issuer certificate
    21: Reason.UNKNOWN_CA,  # unable to verify the first certificate
    27: Reason.UNKNOWN_CA,  # certificate not trusted
    9: Reason.NOT_YET_VALID,  # certificate is not yet valid
    10: Reason.EXPIRED,  # certificate has expired
    23: Reason.REVOKED,  # certificate revoked (only if CRL flags were ever set)
    3: Reason.CRL_UNAVAILABLE,  # unable to get CRL
    11: Reason.CRL_UNAVAILABLE,  # CRL not yet valid
    12: Reason.CRL_UNAVAILABLE,  # CRL has expired
    26: Reason.BAD_PURPOSE,  # unsupported certificate purpose
}

# How specific a chain-stage failure is; higher wins when candidates disagree.
_SPECIFICITY: Mapping[Reason, int] = {
    Reason.UNKNOWN_CA: 0,
    Reason.INVALID_CHAIN: 1,
    Reason.BAD_PURPOSE: 1,
    Reason.WEAK_CRYPTO: 2,
    Reason.CRL_UNAVAILABLE: 2,
    Reason.NOT_YET_VALID: 3,
    Reason.EXPIRED: 3,
    Reason.REVOKED: 4,
}


def reason_for_openssl_error(code: int) -> Reason:
    """The reason code for an OpenSSL X509_V_ERR_* verification error code."""
    return _OPENSSL_REASONS.get(code, Reason.INVALID_CHAIN)


def _stamp(when: _dt.datetime) -> str:
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _openssl_detail(
    code: int, depth: int, message: str, cert: x509.Certificate | None, at: _dt.datetime
) -> str:
    who = _subject(cert) if cert is not None else f"certificate at depth {depth}"
    role = "leaf" if depth == 0 else f"issuer at depth {depth}"
    if code == 10 and cert is not None:
        return f"{role} {who} expired {_stamp(cert.not_valid_after_utc)} (checked at {_stamp(at)})"
    if code == 9 and cert is not None:
        return (
            f"{role} {who} is not valid before {_stamp(cert.not_valid_before_utc)} "
            f"(checked at {_stamp(at)})"
        )
    if code in (2, 20, 21) and cert is not None:
        return f"{role} {who}: {message} (issuer {cert.issuer.rfc4514_string()})"
    return f"{role} {who}: {message}"


# --- conversion and store helpers ---------------------------------------------------

# Converting a cryptography certificate to pyOpenSSL costs about as much as a quarter
# of a verification; peers present the same chains again and again, and certificates
# hash and compare by their DER, so a bounded cache pays for itself.
_X509_CACHE_SIZE = 4096


class _X509Cache:
    def __init__(self, size: int = _X509_CACHE_SIZE) -> None:
        self._size = size
        self._items: dict[x509.Certificate, crypto.X509] = {}

    def get(self, cert: x509.Certificate) -> crypto.X509:
        found = self._items.get(cert)
        if found is None:
            found = crypto.X509.from_cryptography(cert)
            if len(self._items) >= self._size:
                # Evict the oldest insertion; a dict keeps insertion order.
                del self._items[next(iter(self._items))]
            self._items[cert] = found
        return found


def _build_store(
    anchors: Iterable[x509.Certificate], cache: _X509Cache, at: _dt.datetime | None
) -> crypto.X509Store:
    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(cache.get(anchor))
    # Any CA certificate the operator dropped in is an anchor, root or not (pinning).
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    if at is not None:
        store.set_time(at.astimezone(_dt.UTC).replace(tzinfo=None))
    return store


@dataclass(frozen=True)
class _ChainResult:
    ok: bool
    path: tuple[x509.Certificate, ...] = ()  # verified, leaf first, anchor last
    reason: Reason | None = None
    detail: str = ""


def _verify_chain(
    store: crypto.X509Store,
    chain: Sequence[x509.Certificate],
    cache: _X509Cache,
    at: _dt.datetime,
) -> _ChainResult:
    leaf = cache.get(chain[0])
    untrusted = [cache.get(c) for c in chain[1:]]
    try:
        verified = crypto.X509StoreContext(store, leaf, untrusted).get_verified_chain()
    except crypto.X509StoreContextError as exc:
        code, depth, message = exc.errors[0], exc.errors[1], str(exc.errors[2])
        failing = exc.certificate.to_cryptography() if exc.certificate is not None else None
        return _ChainResult(
            False,
            reason=reason_for_openssl_error(code),
            detail=_openssl_detail(code, depth, message, failing, at),
        )
    # Hand back the caller's own objects where we can (same DER), anchors from the store.
    known = {c: c for c in chain}
    path = tuple(known.get(c := v.to_cryptography(), c) for v in verified)
    return _ChainResult(True, path)


def _purpose_problem(
    path: tuple[x509.Certificate, ...], purpose: x509.ObjectIdentifier, label: str
) -> str | None:
    """Why the verified path may not be used for `purpose`, or None."""
    leaf = path[0]
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return f"leaf {_subject(leaf)} is a CA certificate, not an end-entity certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if purpose not in eku:
            have = ", ".join(_eku_name(o) for o in eku) or "none"
            return f"leaf {_subject(leaf)} extended key usage ({have}) excludes {label}"
    except x509.ExtensionNotFound:
        pass  # no EKU: any purpose (RFC 5280 4.2.1.12)
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        allowed = ku.digital_signature or (
            purpose == ExtendedKeyUsageOID.SERVER_AUTH and (ku.key_encipherment or ku.key_agreement)
        )
        if not allowed:
            return f"leaf {_subject(leaf)} key usage does not allow signing for {label}"
    except x509.ExtensionNotFound:
        pass
    # An issuing CA restricted by EKU (CA/Browser Forum practice) restricts its leaves,
    # the trust anchor included: a partner may pin a restricted intermediate, and
    # another partner's path through it must not skip the check (issue 15).
    for ca in path[1:]:
        try:
            eku = ca.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if purpose not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            return f"issuing CA {_subject(ca)} extended key usage excludes {label}"
    return None


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    return {
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
    }.get(oid, oid.dotted_string)


# --- the cryptographic floor (docs/partners.md) ----------------------------------------

MIN_RSA_BITS = 2048
_ALLOWED_CURVES: Mapping[str, str] = {
    ec.SECP256R1.name: "P-256",
    ec.SECP384R1.name: "P-384",
    ec.SECP521R1.name: "P-521",
}
# Signature algorithms below the floor, by OID (no string matching): MD2/MD5/SHA-1.
_WEAK_SIGNATURES: Mapping[x509.ObjectIdentifier, str] = {
    SignatureAlgorithmOID.RSA_WITH_MD5: "MD5",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID._RSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID.DSA_WITH_SHA1: "SHA-1",
    x509.ObjectIdentifier("1.2.840.113549.1.1.2"): "MD2",
}


def _key_problem(cert: x509.Certificate) -> str | None:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "a public key of an unsupported type"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"an RSA-{key.key_size} key (at least {MIN_RSA_BITS} bits required)"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVES:
            return f"an EC key on curve {key.curve.name} (only P-256, P-384, P-521)"
    elif isinstance(key, dsa.DSAPublicKey):
        return f"a DSA-{key.key_size} key (DSA is not accepted)"
    return None


def _signature_problem(cert: x509.Certificate) -> str | None:
    weak = _WEAK_SIGNATURES.get(cert.signature_algorithm_oid)
    if weak is None:
        try:
            algorithm = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            algorithm = None
        if isinstance(algorithm, hashes.MD5):
            weak = "MD5"
        elif isinstance(algorithm, hashes.SHA1):
            weak = "SHA-1"  # e.g. RSASSA-PSS parameterised with SHA-1
    return None if weak is None else f"a {weak} signature"


def crypto_floor_problem(path: Sequence[x509.Certificate], *, anchored: bool = True) -> str | None:
    """Why `path` (leaf first) is below the cryptographic floor (docs/partners.md), or None.

    Every key counts, the trust anchor's too (a weak root key signs everything
    under it); every signature counts except the anchor's own when `anchored`
    (the last certificate is the anchor: it is trusted as configured, not
    because of its self-signature). The answer names the certificate and what
    was too weak."""
    last = len(path) - 1
    for depth, cert in enumerate(path):
        role = "leaf" if depth == 0 else ("trust anchor" if anchored and depth == last else "CA")
        problem = _key_problem(cert)
        if problem is None and not (anchored and depth == last):
            problem = _signature_problem(cert)
        if problem is not None:
            return f"{role} {_subject(cert)} (depth {depth}) has {problem}"
    return None


# --- name constraints over the names the partner rules use -----------------------------


def _dns_within(name: str, constraint: str) -> bool:
    base = _norm(constraint)
    if not base:
        return True  # an empty dNSName constraint covers every name
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _constraint_problem(path: Sequence[x509.Certificate], names: Sequence[str]) -> str | None:
    """The libraries apply a CA's dNSName constraints to dNSName SANs only; the
    partner rules also use `sip:` URI SANs and a SAN-less CN as domain names, so
    those must obey the same constraints, or a constrained CA could name any
    domain through a URI (issue 15)."""
    for ca in path[1:]:
        try:
            nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        permitted = [g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.DNSName)]
        excluded = [g.value for g in nc.excluded_subtrees or () if isinstance(g, x509.DNSName)]
        for name in names:
            if permitted and not any(_dns_within(name, c) for c in permitted):
                return f"leaf name {name} is outside the permitted names of CA {_subject(ca)}"
            if any(_dns_within(name, c) for c in excluded):
                return f"leaf name {name} is excluded by the name constraints of CA {_subject(ca)}"
    return None


# --- pyca/cryptography's verifier ------------------------------------------------------

# webpki profile checks, with the partner rules' two exceptions for end entities: the
# subjectAltName may be absent (then the CN names the partner) and extendedKeyUsage
# may be absent (clientAuth or none; `_purpose_problem` decides with a reason code).
_EE_POLICY = (
    pyca.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, pyca.Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, pyca.Criticality.AGNOSTIC, None)
)
_CA_POLICY = pyca.ExtensionPolicy.webpki_defaults_ca()
# Servers: SAN required (names are never taken from the CN); serverAuth or no EKU.
_SERVER_EE_POLICY = pyca.ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.ExtendedKeyUsage, pyca.Criticality.AGNOSTIC, None
)


def _pyca_path(
    store: pyca.Store, chain: Sequence[x509.Certificate], at: _dt.datetime
) -> tuple[x509.Certificate, ...] | str:
    """The path pyca's client verifier builds (leaf first, anchor last), or its
    message. The message is only ever shown, never parsed: the reason code of a
    failure comes from OpenSSL's error code (see `_diagnose`)."""
    verifier = (
        pyca.PolicyBuilder()
        .store(store)
        .time(at)
        .max_chain_depth(MAX_CHAIN_LENGTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(chain[0], list(chain[1:]))
    except pyca.VerificationError as exc:
        return _clip(str(exc))
    known = {c: c for c in chain}
    return tuple(known.get(c, c) for c in verified.chain)


def _diagnose(
    store: crypto.X509Store,
    chain: Sequence[x509.Certificate],
    cache: _X509Cache,
    at: _dt.datetime,
    message: str,
    purpose: tuple[x509.ObjectIdentifier, str],
) -> _ChainResult:
    """Why pyca's verifier refused the chain, as a reason code, by structure.

    pyca's `VerificationError` carries only English text, so the reason comes
    from elsewhere: OpenSSL's X509_V_ERR code for the same chain and anchors
    (expired, unknown CA, ...), else our own checks in order (floor, purpose),
    else it is a webpki profile violation OpenSSL does not check (missing AKI, a
    CN outside the SANs, a v1 CA...): `invalid_chain`, with pyca's message."""
    result = _verify_chain(store, chain, cache, at)
    if not result.ok and result.reason is not Reason.INVALID_CHAIN:
        return result
    path = result.path if result.ok else tuple(chain)
    # When OpenSSL failed too, the sent chain's top is an anchor only if self-issued.
    anchored = result.ok or path[-1].subject == path[-1].issuer
    weak = crypto_floor_problem(path, anchored=anchored)
    if weak is not None:
        return _ChainResult(False, reason=Reason.WEAK_CRYPTO, detail=weak)
    if not result.ok:
        return result
    problem = _purpose_problem(path, purpose[0], purpose[1])
    if problem is not None:
        return _ChainResult(False, reason=Reason.BAD_PURPOSE, detail=problem)
    return _ChainResult(
        False,
        reason=Reason.INVALID_CHAIN,
        detail=f"leaf {_subject(chain[0])} fails the certificate profile checks: {message}",
    )


# --- names ---------------------------------------------------------------------------


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _malformed_extensions(chain: Sequence[x509.Certificate]) -> str | None:
    """Why a certificate's extensions cannot be parsed, or None.

    cryptography parses extensions lazily and raises ValueError on malformed
    DER (say, a non-ASCII dNSName); doing it once here turns a hostile
    certificate into an invalid_chain verdict instead of an exception.
    """
    for depth, cert in enumerate(chain):
        try:
            cert.extensions  # noqa: B018 - the parse is the point
        except x509.DuplicateExtension as exc:
            # RFC 5280 4.2: "A certificate MUST NOT include more than one instance
            # of a particular extension."
            return f"certificate at depth {depth} has a duplicate extension {exc.oid.dotted_string}"
        except (ValueError, x509.UnsupportedGeneralNameType) as exc:
            return f"certificate at depth {depth} has a malformed extension: {_clip(str(exc))}"
    return None


def _clip(text: str, limit: int = 200) -> str:
    """A library message made safe for a detail string: printable, bounded."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def leaf_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The names a partner's leaf claims, normalized: DNS SANs, `sip:`/`sips:` URI SANs
    without a user part (RFC 5922 domain certificates), and the CN only when the
    certificate has no SAN extension at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(
            _norm(str(a.value)) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
    names = [_norm(d) for d in san.get_values_for_type(x509.DNSName)]
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        scheme, _, rest = uri.partition(":")
        if scheme.lower() not in ("sip", "sips") or "@" in rest:
            continue  # sip:user@host names a user, not the domain
        host = rest.split(";", 1)[0].split("?", 1)[0]
        if host and ":" not in host:
            names.append(_norm(host))
    return tuple(names)


def name_in_domains(name: str, domains: Iterable[str]) -> str | None:
    """The domain `name` equals or lies under, or None. A wildcard `*.d` counts as a
    name under `d` (every name it covers is); other wildcard forms never match."""
    if name.startswith("*."):
        name = name[2:]
    if "*" in name or not name:
        return None
    for domain in domains:
        if name == domain or name.endswith("." + domain):
            return domain
    return None


def _names_match(names: Sequence[str], policy: PartnerPolicy) -> tuple[str, str] | None:
    """(the leaf name, the partner domain it lies in) for the first name that fits."""
    for name in names:
        domain = name_in_domains(name, policy.domains)
        if domain is not None:
            return name, domain
    return None


# --- revocation ----------------------------------------------------------------------


class _PartnerEntry:
    """One partner's prebuilt verification state."""

    def __init__(self, policy: PartnerPolicy, cache: _X509Cache) -> None:
        self.policy = policy
        self.store = _build_store(policy.roots, cache, None)
        self.pyca_store = pyca.Store(list(policy.roots)) if policy.roots else None
        self.root_labels = {root: _subject(root) for root in policy.roots}
        # Prepared once per policy: CRL signature checks are expensive and never change.
        self.crls = CrlSet(
            policy.crls, [p.name for p in policy.crl_files], extra_signers=policy.roots
        )

    def store_at(self, at: _dt.datetime | None, cache: _X509Cache) -> crypto.X509Store:
        # A store's time is a property of the store; asking about another moment
        # (`edge verify --at`) gets a private store rather than mutating the shared one.
        return self.store if at is None else _build_store(self.policy.roots, cache, at)

    def revocation_problem(
        self, path: tuple[x509.Certificate, ...], at: _dt.datetime
    ) -> tuple[Reason, str] | None:
        """Check each non-anchor certificate of the verified path against this
        partner's CRLs, as `edge.core.revocation` defines it (RFC 5280 6.3: issuer
        and signer, time, critical extensions, scope, newest per scope, deltas).
        A CRL that claims a certificate but cannot be used fails closed."""
        return self.crls.check(path, self.policy.revocation, at)


class PartnerTrust:
    """Client-purpose verification against one `PolicySnapshot`. Build once per
    snapshot; a policy reload builds a new one (stores are never mutated)."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._cache = _X509Cache()
        self._entries: dict[str, _PartnerEntry] = {
            pid: _PartnerEntry(policy, self._cache)
            for pid, policy in sorted(snapshot.partners.items())
        }
        # (partner, chain) -> (verified path, its validity window): signatures and
        # profile never change, only time does (see `_check_chain`).
        self._paths: dict[
            tuple[str, tuple[x509.Certificate, ...]],
            tuple[tuple[x509.Certificate, ...], _dt.datetime, _dt.datetime],
        ] = {}
        # Anchor subject -> partner ids, in sorted order (deterministic reporting).
        self._by_subject: dict[x509.Name, tuple[str, ...]] = {}
        for pid, entry in self._entries.items():
            for root in entry.policy.roots:
                ids = self._by_subject.get(root.subject, ())
                if pid not in ids:
                    self._by_subject[root.subject] = (*ids, pid)

    def clear_verified_paths(self) -> None:
        """Forget every cached verified path (benchmarks: the cost of a new chain)."""
        self._paths.clear()

    @property
    def all_roots(self) -> tuple[x509.Certificate, ...]:
        """Every partner's anchors once each (e.g. for the TLS CertificateRequest CA list)."""
        seen: dict[x509.Certificate, None] = {}
        for entry in self._entries.values():
            for root in entry.policy.roots:
                seen.setdefault(root, None)
        return tuple(seen)

    def _candidates(self, chain: Sequence[x509.Certificate]) -> list[str]:
        found: list[str] = []
        for cert in chain:
            for name in (cert.issuer, cert.subject):
                for pid in self._by_subject.get(name, ()):
                    if pid not in found:
                        found.append(pid)
        return found

    def verify_client(
        self, chain: Sequence[x509.Certificate], *, at: _dt.datetime | None = None
    ) -> Verdict:
        """Accept or reject a partner's chain (leaf first, then what the peer sent)."""
        if not chain:
            return _reject(Reason.NO_CLIENT_CERT, "the peer presented no certificate")
        if len(chain) > MAX_CHAIN_LENGTH:
            # Each certificate may name another partner's root and cost one more
            # verification: bound the work a peer can make us do.
            return _reject(
                Reason.INVALID_CHAIN,
                f"the peer sent {len(chain)} certificates; at most {MAX_CHAIN_LENGTH} are accepted",
            )
        malformed = _malformed_extensions(chain)
        if malformed is not None:
            return _reject(Reason.INVALID_CHAIN, malformed)
        when = at if at is not None else _dt.datetime.now(_dt.UTC)
        leaf = chain[0]
        candidates = self._candidates(chain)
        if not candidates:
            top = chain[-1]
            return _reject(
                Reason.UNKNOWN_CA,
                f"no partner trusts {top.issuer.rfc4514_string()} "
                f"(issuer of {_subject(top)}); leaf {_subject(leaf)}",
            )
        names = leaf_names(leaf)
        verified: dict[str, tuple[x509.Certificate, ...]] = {}
        failures: list[tuple[str, _ChainResult]] = []
        for pid in candidates:
            result = self._check_chain(pid, chain, names, when, at)
            if result.ok:
                verified[pid] = result.path
            else:
                failures.append((pid, result))

        matched = [
            (pid, how)
            for pid in verified
            if (how := _names_match(names, self._entries[pid].policy)) is not None
        ]
        if not verified or not matched:
            # The partner the leaf names explains its own failure best.
            named_failures = [
                (pid, r) for pid, r in failures if _names_match(names, self._entries[pid].policy)
            ]
            if named_failures:
                return self._best_chain_failure(named_failures)
            if verified:
                return self._name_mismatch(leaf, names, verified)
            return self._best_chain_failure(failures)

        # Each named partner's own path: the EKU of every CA on it counts (a path
        # through an intermediate another partner pinned must not skip it).
        for pid, _ in matched:
            problem = _purpose_problem(verified[pid], ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
            if problem is not None:
                return _reject(Reason.BAD_PURPOSE, problem, pid, verified[pid])
        any_path = verified[matched[0][0]]

        if len(matched) > 1:
            ids = ", ".join(pid for pid, _ in matched)
            return _reject(
                Reason.AMBIGUOUS_PARTNER,
                f"leaf {_subject(leaf)} verifies and matches the domains of several partners "
                f"({ids}); give them distinct domains or roots",
                chain=any_path,
            )
        pid, how = matched[0]
        entry = self._entries[pid]
        path = verified[pid]
        if not entry.policy.enabled:
            return _reject(
                Reason.PARTNER_DISABLED,
                f"partner {pid} is disabled in {entry.policy.folder}/policy.toml",
                pid,
                path,
            )
        revoked = entry.revocation_problem(path, when)
        if revoked is not None:
            return _reject(revoked[0], revoked[1], pid, path)
        # Labels precomputed per anchor: formatting names costs as much as a lookup.
        anchor = entry.root_labels.get(path[-1]) or _subject(path[-1])
        return Verdict(True, None, f"{how[0]} in {how[1]}; anchor {anchor}", pid, path, how[0])

    def _check_chain(
        self,
        pid: str,
        chain: Sequence[x509.Certificate],
        names: Sequence[str],
        when: _dt.datetime,
        at: _dt.datetime | None,
    ) -> _ChainResult:
        """One partner's judgement of the chain: path, floor, name constraints.

        A chain that verified once for a partner verifies again as long as the
        moment lies inside its path's validity window (signatures, extensions and
        the partner's anchors are fixed for this snapshot), so successes are
        cached: peers present the same chains again and again."""
        key = (pid, tuple(chain))
        hit = self._paths.get(key)
        if hit is not None and hit[1] <= when <= hit[2]:
            return _ChainResult(True, hit[0])
        entry = self._entries[pid]
        found = (
            _pyca_path(entry.pyca_store, chain, when)
            if entry.pyca_store is not None
            else "no trust anchors"
        )
        if isinstance(found, str):
            return _diagnose(
                entry.store_at(at, self._cache),
                chain,
                self._cache,
                when,
                found,
                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            )
        problem = crypto_floor_problem(found)
        if problem is not None:
            return _ChainResult(False, reason=Reason.WEAK_CRYPTO, detail=problem)
        problem = _constraint_problem(found, names)
        if problem is not None:
            return _ChainResult(False, reason=Reason.INVALID_CHAIN, detail=problem)
        if len(self._paths) >= _X509_CACHE_SIZE:
            del self._paths[next(iter(self._paths))]
        start = max(c.not_valid_before_utc for c in found)
        end = min(c.not_valid_after_utc for c in found)
        self._paths[key] = (found, start, end)
        return _ChainResult(True, found)

    def _best_chain_failure(self, failures: list[tuple[str, _ChainResult]]) -> Verdict:
        pid, result = max(
            failures,
            key=lambda f: _SPECIFICITY.get(f[1].reason or Reason.INVALID_CHAIN, 1),
        )
        assert result.reason is not None
        detail = result.detail
        if result.reason is not Reason.UNKNOWN_CA:
            # The path reached this partner's own roots: the refusal is its (logs
            # and metrics name the partner whose certificate expired, ...).
            return _reject(result.reason, f"{detail} (against partner {pid}'s roots)", pid)
        return _reject(result.reason, f"{detail}; not trusted by partner {pid}'s roots")

    def _name_mismatch(
        self,
        leaf: x509.Certificate,
        names: Sequence[str],
        verified: Mapping[str, tuple[x509.Certificate, ...]],
    ) -> Verdict:
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "none"
        parts = []
        for pid in verified:
            domains = ", ".join(self._entries[pid].policy.domains)
            parts.append(f"{pid} ({domains})")
        # One partner's root verified it: that partner is identified (its admins
        # issued a name outside their domains); several: none is.
        only = next(iter(verified)) if len(verified) == 1 else None
        return _reject(
            Reason.NAME_MISMATCH,
            f"leaf {_subject(leaf)} names [{shown}], none inside the domains of the "
            f"partner(s) whose root verified it: {'; '.join(parts)}",
            only,
            next(iter(verified.values())),
        )


class ServerTrust:
    """Server-purpose verification: a pool member (or a partner's edge) we connect to."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self.roots = tuple(roots)
        self._cache = _X509Cache()
        self._store = _build_store(self.roots, self._cache, None)
        self._pyca_store = pyca.Store(list(self.roots)) if self.roots else None

    def verify_server(
        self,
        chain: Sequence[x509.Certificate],
        name: str,
        *,
        at: _dt.datetime | None = None,
    ) -> Verdict:
        """Chain to our roots, serverAuth (or no EKU), RFC 6125 match of `name` against
        DNS or IP SANs. No SAN never matches; there is no CN fallback."""
        if not chain:
            return _reject(Reason.TLS_ERROR, "the server presented no certificate")
        if not self.roots:
            return _reject(Reason.UNKNOWN_CA, "no roots configured to verify servers")
        malformed = _malformed_extensions(chain)
        if malformed is not None:
            return _reject(Reason.INVALID_CHAIN, malformed)
        when = at if at is not None else _dt.datetime.now(_dt.UTC)
        store = self._store if at is None else _build_store(self.roots, self._cache, at)
        wanted = _norm(name)
        assert self._pyca_store is not None
        found = _pyca_server_path(self._pyca_store, chain, wanted, when)
        if isinstance(found, str):
            # Names are matched below with a reason of their own; whatever else
            # pyca refused gets its reason code from `_diagnose`.
            result = _diagnose(
                store,
                chain,
                self._cache,
                when,
                found,
                (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            )
            if result.reason is Reason.INVALID_CHAIN and _server_name_problem(chain[0], wanted):
                path = _verify_chain(store, chain, self._cache, when).path or tuple(chain)
            else:
                assert result.reason is not None
                return _reject(result.reason, result.detail)
        else:
            path = found
        weak = crypto_floor_problem(path)
        if weak is not None:
            return _reject(Reason.WEAK_CRYPTO, weak, chain=path)
        problem = _purpose_problem(path, ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
        if problem is not None:
            return _reject(Reason.BAD_PURPOSE, problem, chain=path)
        leaf = path[0]
        try:
            try:
                ipaddress.ip_address(wanted)
            except ValueError:
                verify_certificate_hostname(leaf, wanted)
            else:
                verify_certificate_ip_address(leaf, wanted)
        except (VerificationError, CertificateError, ValueError) as exc:
            return _reject(
                Reason.NAME_MISMATCH,
                f"server certificate {_subject(leaf)} is not valid for {name!r}: "
                f"{_san_summary(leaf)} ({type(exc).__name__})",
                chain=path,
            )
        return _accept(f"{_subject(leaf)} valid for {wanted} via {_subject(path[-1])}", None, path)


def _pyca_server_path(
    store: pyca.Store, chain: Sequence[x509.Certificate], name: str, at: _dt.datetime
) -> tuple[x509.Certificate, ...] | str:
    """pyca's server verifier (webpki: SAN-only RFC 6125 matching) or its message."""
    try:
        try:
            subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier = (
            pyca.PolicyBuilder()
            .store(store)
            .time(at)
            .max_chain_depth(MAX_CHAIN_LENGTH)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_SERVER_EE_POLICY)
            .build_server_verifier(subject)  # type: ignore[arg-type]
        )
        verified = verifier.verify(chain[0], list(chain[1:]))
    except (pyca.VerificationError, ValueError) as exc:
        return _clip(str(exc))
    known = {c: c for c in chain}
    return tuple(known.get(c, c) for c in verified)


def _server_name_problem(leaf: x509.Certificate, wanted: str) -> bool:
    try:
        try:
            ipaddress.ip_address(wanted)
        except ValueError:
            verify_certificate_hostname(leaf, wanted)
        else:
            verify_certificate_ip_address(leaf, wanted)
    except (VerificationError, CertificateError, ValueError):
        return True
    return False


def _san_summary(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName (the CN is not used for servers)"
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return "its names are " + (", ".join(names[:8]) if names else "none usable")
