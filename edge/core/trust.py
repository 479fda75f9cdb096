"""Certificate verification and partner authorization: who is this peer, and may it in?

Owns: the single decision "is this certificate chain accepted, for which
partner, and if not, why" (DESIGN.md, "Partner rules" and "Reason codes"),
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
2. *Chain.* For each candidate, OpenSSL builds and checks the path against
   that partner's anchors alone (signatures, validity at the given time,
   basicConstraints, path length). OpenSSL's error code becomes a reason code.
   `PARTIAL_CHAIN` is set: any CA certificate in a partner folder is an anchor,
   so an operator may pin a partner's issuing CA instead of a public root. We
   never set OpenSSL's CRL flags (one missing CRL would fail every chain).
3. *Names.* Among the partners whose chain verified, keep those with a leaf
   name inside one of their domains (DNS SANs, `sip:` URI SANs, the CN only
   when there is no SAN extension).
4. *Purpose.* The leaf's extendedKeyUsage must include clientAuth, or be
   absent; an issuing CA's EKU, when present, must allow it too; the leaf must
   not itself be a CA. Then more than one named partner is `ambiguous_partner`
   (a configuration overlap the operator must fix; disabled partners count,
   so disabling one never silently re-routes a certificate to another).
5. *Authorization* of the one partner: disabled is `partner_disabled`; then
   revocation by that partner's CRLs, checked here in Python over the verified
   path (see `_revocation_problem`).
When nothing is accepted the most specific failure wins: a candidate whose
names match explains its own failure (an expired chain to the right root is
`expired`), otherwise a chain that verified but matched no name is
`name_mismatch`, otherwise the most specific chain error (`expired`,
`not_yet_valid`, `invalid_chain` over `unknown_ca`).

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
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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
    # An issuing CA restricted by EKU (CA/Browser Forum practice) restricts its leaves.
    for ca in path[1:-1]:
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
        except ValueError as exc:
            return f"certificate at depth {depth} has a malformed extension: {exc}"
    return None


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


def _names_match(names: Sequence[str], policy: PartnerPolicy) -> str | None:
    for name in names:
        domain = name_in_domains(name, policy.domains)
        if domain is not None:
            return f"{name} in {domain}"
    return None


# --- revocation ----------------------------------------------------------------------


class _PartnerEntry:
    """One partner's prebuilt verification state."""

    def __init__(self, policy: PartnerPolicy, cache: _X509Cache) -> None:
        self.policy = policy
        self.store = _build_store(policy.roots, cache, None)
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
        # Anchor subject -> partner ids, in sorted order (deterministic reporting).
        self._by_subject: dict[x509.Name, tuple[str, ...]] = {}
        for pid, entry in self._entries.items():
            for root in entry.policy.roots:
                ids = self._by_subject.get(root.subject, ())
                if pid not in ids:
                    self._by_subject[root.subject] = (*ids, pid)

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
            entry = self._entries[pid]
            result = _verify_chain(entry.store_at(at, self._cache), chain, self._cache, when)
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

        any_path = next(iter(verified.values()))
        problem = _purpose_problem(any_path, ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
        if problem is not None:
            return _reject(Reason.BAD_PURPOSE, problem, chain=any_path)

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
        return _accept(f"{how}; anchor {anchor}", pid, path)

    def _best_chain_failure(self, failures: list[tuple[str, _ChainResult]]) -> Verdict:
        pid, result = max(
            failures,
            key=lambda f: _SPECIFICITY.get(f[1].reason or Reason.INVALID_CHAIN, 1),
        )
        assert result.reason is not None
        detail = result.detail
        if result.reason is not Reason.UNKNOWN_CA:
            detail = f"{detail} (against partner {pid}'s roots)"
        else:
            detail = f"{detail}; not trusted by partner {pid}'s roots"
        return _reject(result.reason, detail)

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
        return _reject(
            Reason.NAME_MISMATCH,
            f"leaf {_subject(leaf)} names [{shown}], none inside the domains of the "
            f"partner(s) whose root verified it: {'; '.join(parts)}",
            chain=next(iter(verified.values())),
        )


class ServerTrust:
    """Server-purpose verification: a pool member (or a partner's edge) we connect to."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self.roots = tuple(roots)
        self._cache = _X509Cache()
        self._store = _build_store(self.roots, self._cache, None)

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
        result = _verify_chain(store, chain, self._cache, when)
        if not result.ok:
            assert result.reason is not None
            return _reject(result.reason, result.detail)
        path = result.path
        problem = _purpose_problem(path, ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
        if problem is not None:
            return _reject(Reason.BAD_PURPOSE, problem, chain=path)
        leaf = path[0]
        wanted = _norm(name)
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


def _san_summary(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subjectAltName (the CN is not used for servers)"
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return "its names are " + (", ".join(names[:8]) if names else "none usable")
