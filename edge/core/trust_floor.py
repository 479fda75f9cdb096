"""The chain checks the verifiers share: the cryptographic floor, purpose, and diagnosis.

Owns: the cryptographic floor (`crypto_floor_problem`: key sizes, curves, weak
signature hashes, by OID and key type), the purpose check (`_purpose_problem`:
EKU, key usage, not-a-CA leaf, EKU-restricted CAs), the mapping of OpenSSL's
X509_V_ERR codes to reason codes (`reason_for_openssl_error`) and how specific
each chain failure is, the OpenSSL store and conversion cache used only to
explain a refused chain (`_diagnose`, `_verify_chain`), pyca's webpki extension
policies, and the parse of hostile extensions (`_malformed_extensions`).
`edge.core.trust` (client purpose) and `edge.core.server_trust` (server
purpose) decide with these.

Must never: decide acceptance or a partner by itself (the verifiers do), do
I/O, import trio, sockets, OpenSSL.SSL or any shell module, parse a library's
English message to find a reason code, or put key material in a detail string.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509 import verification as pyca
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID
from OpenSSL import crypto

from edge.core.names import subject as _subject
from edge.core.reasons import Reason

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
