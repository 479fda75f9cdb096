"""Revocation by CRLs, as RFC 5280 section 6.3 means it.

Owns: the one answer to "may this CRL be used for this certificate, and what
does it say", for three callers: the verifier (`edge.core.trust`, once per
verified path, `CrlSet.check`), the folder loader (`edge.core.policies`,
`crl_problems`, which `edge check` prints) and the fetcher (`edge.crlfetch`,
`fetched_crl_problem`, which decides whether a body from the network may
replace the CRL we hold).

Must never: do I/O, import trio, sockets or any shell module, answer "not
revoked" because a CRL it could not use said nothing, or put key material or
unchecked peer bytes in a detail string (names are rendered by cryptography as
RFC 4514 text and cut to a bounded length).

The rules (what an operator sees as "unusable CRL")
---------------------------------------------------
A CRL *claims* a certificate when its issuer name is the certificate's issuer
name and its scope covers it: no Issuing Distribution Point (IDP) extension
means "every certificate of this issuer"; an IDP with a distribution point
name covers only certificates whose CRL Distribution Points (CDP) name it
(a partition: two partitions of one CA each answer only for their own
certificates); onlyContainsUserCerts / onlyContainsCACerts restrict it to
end-entity or CA certificates; onlyContainsAttributeCerts claims nothing.

A claiming CRL is *usable* only if all of these hold, else it is unusable and
the reason is reported:
- it has a nextUpdate (RFC 5280 requires one; without it freshness is unknown);
- it is current: thisUpdate <= now <= nextUpdate;
- it has no critical extension we do not process (we process the critical
  IDP and deltaCRLIndicator); a *critical* CRLNumber is itself invalid
  (RFC 5280 5.2.3) and makes the CRL unusable; no CRL entry carries a critical
  extension other than reasonCode / invalidityDate;
- it is not indirect (IDP indirectCRL, or entries naming a certificateIssuer)
  and does not cover only some reasons (onlySomeReasons): both unsupported;
- its signature verifies with the key of the certificate's issuer (the next
  certificate of the verified path), or of a *delegate*: a certificate with
  the issuer's name, signed by the issuer's own issuer in the same path (so it
  chains to the same root), valid now; whichever signs must have the cRLSign
  key usage when it has a keyUsage extension at all.

Which CRL answers: of the usable complete CRLs claiming a certificate, the
newest of that scope (highest CRLNumber, then latest thisUpdate). An older CRL
never replaces a newer one; the fetcher refuses an older body outright.

Delta CRLs are supported by combining them with their base (RFC 5280 5.2.4):
a delta (deltaCRLIndicator = B) newer than the chosen base (its CRLNumber is
higher) applies only if the base's CRLNumber >= B; the answer is then the
union of both lists minus the delta's removeFromCRL entries. A delta newer
than the base that cannot be applied (its base is missing or older, or the
delta itself is unusable, e.g. stale) makes the answer `crl_unavailable`: a
partner that publishes deltas must keep them fresh, since the newest
revocations live there. A delta alone, without a usable base, is
`crl_unavailable`. Deltas superseded by the base (CRLNumber <= base's) are
ignored. The fetcher only fetches complete CRLs (CDP URLs; a delta served at
a CDP is refused); deltas come from the partner folder.

Verdicts (`CrlSet.check`), for each certificate of the path below the anchor:
- `revocation = "off"`: nothing is checked;
- claiming CRLs exist but none is usable: `crl_unavailable` naming the file
  and why, in both other modes (never "not revoked");
- no claiming CRL at all: `crl_unavailable` under `require-crl`, no
  objection under `crl-if-present`;
- otherwise the answer of the base (plus delta): `revoked` or no objection.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from edge.core.reasons import Reason

__all__ = [
    "CrlProblem",
    "CrlSet",
    "check_revocation",
    "crl_order",
    "crl_problems",
    "fetched_crl_problem",
]

# Critical extensions whose meaning we implement; any other critical one makes a CRL unusable.
_PROCESSED_CRITICAL = frozenset(
    {ExtensionOID.ISSUING_DISTRIBUTION_POINT, ExtensionOID.DELTA_CRL_INDICATOR}
)
_PROCESSED_ENTRY_CRITICAL = frozenset(
    {CRLEntryExtensionOID.CRL_REASON, CRLEntryExtensionOID.INVALIDITY_DATE}
)
_SHA256 = hashes.SHA256()
_MAX_NAME = 200  # characters of a rendered name in a message


def _name(name: x509.Name) -> str:
    try:
        text = name.rfc4514_string() or "(empty name)"
    except ValueError:
        text = "(unprintable name)"
    # Peer-controlled text: no control characters, bounded.
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= _MAX_NAME else text[: _MAX_NAME - 3] + "..."


def _stamp(t: _dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M}Z"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _cdp(cert: x509.Certificate) -> tuple[x509.DistributionPoint, ...]:
    try:
        return tuple(cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
    except (x509.ExtensionNotFound, ValueError):
        return ()


@dataclass(frozen=True)
class _Facts:
    """What a CRL says about itself; computed once per CRL."""

    number: int | None
    delta_base: int | None  # deltaCRLIndicator; None for a complete CRL
    idp: x509.IssuingDistributionPoint | None
    problem: str | None  # why it is unusable whatever the certificate, time and signer


# Facts by CRL fingerprint: a verifier is rebuilt per reload and per fetched CRL, and
# walking a large CRL's entries each time would be waste. Facts are small; bounded.
_FACTS_CACHE: dict[bytes, _Facts] = {}
_FACTS_CACHE_SIZE = 1024


def _facts(crl: x509.CertificateRevocationList) -> _Facts:
    key = crl.fingerprint(_SHA256)
    facts = _FACTS_CACHE.get(key)
    if facts is None:
        facts = _compute_facts(crl)
        if len(_FACTS_CACHE) >= _FACTS_CACHE_SIZE:
            _FACTS_CACHE.pop(next(iter(_FACTS_CACHE)), None)  # oldest first
        _FACTS_CACHE[key] = facts
    return facts


def _compute_facts(crl: x509.CertificateRevocationList) -> _Facts:
    number: int | None = None
    delta_base: int | None = None
    idp: x509.IssuingDistributionPoint | None = None
    try:
        extensions = list(crl.extensions)
    except ValueError as exc:  # duplicated or undecodable extension
        return _Facts(None, None, None, f"has malformed extensions ({_bounded(exc)})")
    problem: str | None = None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.CRLNumber):
            number = value.crl_number
            if ext.critical:
                problem = problem or (
                    "marks its CRLNumber extension critical, which RFC 5280 (5.2.3) forbids"
                )
        elif isinstance(value, x509.DeltaCRLIndicator):
            delta_base = value.crl_number
        elif isinstance(value, x509.IssuingDistributionPoint):
            idp = value
        elif ext.critical and ext.oid not in _PROCESSED_CRITICAL:
            problem = problem or (
                f"has a critical extension this gateway does not process ({ext.oid.dotted_string})"
            )
    if problem is None and crl.next_update_utc is None:
        problem = "has no nextUpdate, so its freshness cannot be judged (RFC 5280 requires one)"
    if problem is None and idp is not None:
        if idp.indirect_crl:
            problem = "is an indirect CRL (it lists other CAs' certificates); not supported"
        elif idp.only_some_reasons:
            problem = "covers only some revocation reasons (onlySomeReasons); not supported"
    if problem is None and delta_base is not None and number is None:
        problem = "is a delta CRL without a CRLNumber"
    if problem is None:
        problem = _entries_problem(crl)
    return _Facts(number, delta_base, idp, problem)


def _entries_problem(crl: x509.CertificateRevocationList) -> str | None:
    try:
        for entry in crl:
            for ext in entry.extensions:
                if ext.oid == CRLEntryExtensionOID.CERTIFICATE_ISSUER:
                    return "is an indirect CRL (an entry names a certificateIssuer); not supported"
                if ext.critical and ext.oid not in _PROCESSED_ENTRY_CRITICAL:
                    return (
                        f"has an entry with a critical extension this gateway does not process "
                        f"({ext.oid.dotted_string})"
                    )
    except ValueError as exc:
        return f"has a malformed entry ({_bounded(exc)})"
    return None


def _bounded(exc: Exception) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in str(exc))
    return text[:120]


def _time_problem(crl: x509.CertificateRevocationList, now: _dt.datetime) -> str | None:
    nxt = crl.next_update_utc
    if crl.last_update_utc > now:
        return f"is not valid yet (thisUpdate {_stamp(crl.last_update_utc)})"
    if nxt is not None and nxt < now:
        return f"is stale (nextUpdate {_stamp(nxt)})"
    return None


def _signer_problem(crl: x509.CertificateRevocationList, signer: x509.Certificate) -> str | None:
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            return f"is signed by {_name(signer.subject)}, which lacks the cRLSign key usage"
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return f"signer {_name(signer.subject)} has malformed extensions"
    try:
        ok = crl.is_signature_valid(signer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return f"signature does not verify with the key of {_name(signer.subject)}"
    return None


def _dp_matches(idp: x509.IssuingDistributionPoint, cert: x509.Certificate) -> bool:
    """RFC 5280 6.3.3 (b)(2)(i): one of the IDP's names is one of the CDP's names."""
    if idp.full_name is None and idp.relative_name is None:
        return True  # scoped by certificate type only
    for point in _cdp(cert):
        if (
            idp.full_name is not None
            and point.full_name is not None
            and set(idp.full_name) & set(point.full_name)
        ):
            return True
        if idp.relative_name is not None and point.relative_name == idp.relative_name:
            return True
    return False


def _claims(facts: _Facts, cert: x509.Certificate) -> bool:
    """Whether a CRL's scope covers ``cert`` (its issuer name is checked by the caller)."""
    idp = facts.idp
    if idp is None:
        return True
    if idp.only_contains_attribute_certs:
        return False
    is_ca = _is_ca(cert)
    if idp.only_contains_user_certs and is_ca:
        return False
    if idp.only_contains_ca_certs and not is_ca:
        return False
    return _dp_matches(idp, cert)


def crl_order(crl: x509.CertificateRevocationList) -> tuple[int, _dt.datetime]:
    """Sort key of CRLs of one scope: CRLNumber, then thisUpdate (newest last)."""
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (x509.ExtensionNotFound, ValueError):
        number = -1
    return (number, crl.last_update_utc)


class _Crl:
    """One CRL with its name for messages and cached judgements."""

    def __init__(self, crl: x509.CertificateRevocationList, name: str) -> None:
        self.crl = crl
        self.name = name
        self.facts = _facts(crl)
        self.order = (
            self.facts.number if self.facts.number is not None else -1,
            crl.last_update_utc,
        )
        # Signature checks hash the whole CRL: their answer never changes, keep it.
        self._signers: dict[x509.Certificate, str | None] = {}
        # cryptography looks serials up linearly; a set makes each handshake O(1).
        self._serials: frozenset[int] | None = None

    def entry(self, serial: int) -> x509.RevokedCertificate | None:
        if self._serials is None:
            try:
                self._serials = frozenset(e.serial_number for e in self.crl)
            except ValueError:
                self._serials = frozenset()
                return _revoked_entry(self.crl, serial)
        return _revoked_entry(self.crl, serial) if serial in self._serials else None

    def signer_problem(self, signer: x509.Certificate) -> str | None:
        if signer not in self._signers:
            self._signers[signer] = _signer_problem(self.crl, signer)
        return self._signers[signer]

    def problem(
        self,
        issuer: x509.Certificate,
        delegates: Sequence[x509.Certificate],
        now: _dt.datetime,
    ) -> str | None:
        """Why this CRL cannot be used for a certificate issued by ``issuer``."""
        if self.facts.problem is not None:
            return self.facts.problem
        late = _time_problem(self.crl, now)
        if late is not None:
            return late
        first = self.signer_problem(issuer)
        if first is None:
            return None
        for delegate in delegates:
            if self.signer_problem(delegate) is None:
                return None
        return first


def _delegates(
    path: Sequence[x509.Certificate],
    index: int,
    extra: Iterable[x509.Certificate],
    now: _dt.datetime,
) -> list[x509.Certificate]:
    """CRL signers other than path[index + 1] allowed for path[index]: same name as the
    issuer, signed by the issuer's issuer in this path (same root), valid now."""
    if index + 2 >= len(path):
        return []
    issuer, grandparent = path[index + 1], path[index + 2]
    found: list[x509.Certificate] = []
    for cand in extra:
        if cand == issuer or cand.subject != issuer.subject or cand in found:
            continue
        if not (cand.not_valid_before_utc <= now <= cand.not_valid_after_utc):
            continue
        try:
            cand.verify_directly_issued_by(grandparent)
        except (ValueError, TypeError, InvalidSignature):
            continue
        found.append(cand)
        if len(found) >= 4:  # bounded work per certificate
            break
    return found


def _revoked_entry(
    crl: x509.CertificateRevocationList, serial: int
) -> x509.RevokedCertificate | None:
    try:
        return crl.get_revoked_certificate_by_serial_number(serial)
    except ValueError:
        return None


def _is_remove(entry: x509.RevokedCertificate) -> bool:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return False
    return reason is x509.ReasonFlags.remove_from_crl


class CrlSet:
    """One partner's CRLs, prepared for checking paths. Build once per policy;
    the caches only grow with single dict operations (safe from one thread)."""

    def __init__(
        self,
        crls: Sequence[x509.CertificateRevocationList],
        names: Sequence[str],
        *,
        extra_signers: Sequence[x509.Certificate] = (),
    ) -> None:
        self._by_issuer: dict[x509.Name, list[_Crl]] = {}
        for crl, name in zip(crls, names, strict=True):
            self._by_issuer.setdefault(crl.issuer, []).append(_Crl(crl, name))
        self._extra = tuple(extra_signers)

    def check(
        self,
        path: Sequence[x509.Certificate],
        mode: str,  # a policies.Revocation (a StrEnum; policies imports this module)
        now: _dt.datetime,
    ) -> tuple[Reason, str] | None:
        """None, or (reason, detail) for the first certificate of ``path`` (leaf
        first, anchor last, already verified) whose revocation status says no."""
        if mode == "off":
            return None
        for index, (cert, issuer) in enumerate(itertools.pairwise(path)):
            problem = self._check_one(path, index, cert, issuer, mode, now)
            if problem is not None:
                return problem
        return None

    def _check_one(
        self,
        path: Sequence[x509.Certificate],
        index: int,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        mode: str,  # a policies.Revocation (a StrEnum; policies imports this module)
        now: _dt.datetime,
    ) -> tuple[Reason, str] | None:
        claiming = [c for c in self._by_issuer.get(cert.issuer, ()) if _claims(c.facts, cert)]
        if not claiming:
            if mode == "require-crl":
                return (
                    Reason.CRL_UNAVAILABLE,
                    f"no CRL of {_name(issuer.subject)} covers {_name(cert.subject)}, and the "
                    "partner's policy is require-crl",
                )
            return None
        delegates = _delegates(path, index, (*path, *self._extra), now)
        problems = {id(c): c.problem(issuer, delegates, now) for c in claiming}
        complete = sorted(
            (c for c in claiming if c.facts.delta_base is None), key=lambda c: c.order
        )
        usable = [c for c in complete if problems[id(c)] is None]
        if not usable:
            if complete:
                bad = complete[-1]
                return (
                    Reason.CRL_UNAVAILABLE,
                    f"CRL {bad.name} covers {_who(cert, issuer)} but is unusable: "
                    f"{problems[id(bad)]}",
                )
            names = ", ".join(c.name for c in claiming[:3])
            return (
                Reason.CRL_UNAVAILABLE,
                f"only delta CRL(s) ({names}) cover {_who(cert, issuer)}; "
                "their base CRL is missing",
            )
        base = usable[-1]
        delta = None
        newer = sorted(
            (
                c
                for c in claiming
                if c.facts.delta_base is not None
                and (
                    base.facts.number is None
                    or (c.facts.number is not None and c.facts.number > base.facts.number)
                )
            ),
            key=lambda c: c.order,
        )
        if newer:
            applicable = [
                c
                for c in newer
                if problems[id(c)] is None
                and base.facts.number is not None
                and c.facts.delta_base is not None
                and c.facts.delta_base <= base.facts.number
            ]
            if not applicable:
                bad = newer[-1]
                held = (
                    f"number {base.facts.number}"
                    if base.facts.number is not None
                    else "without a CRLNumber"
                )
                why = problems[id(bad)] or (
                    f"it needs a base CRL numbered >= {bad.facts.delta_base}, and the newest "
                    f"base here ({base.name}) is {held}"
                )
                why = f"delta CRL {bad.name} covers {_who(cert, issuer)}: {why}"
                return (Reason.CRL_UNAVAILABLE, why)
            delta = applicable[-1]
        if delta is not None:
            entry = delta.entry(cert.serial_number)
            if entry is not None:
                if _is_remove(entry):
                    return None  # taken off the list since the base (e.g. a lifted hold)
                return _revoked(cert, issuer, entry, delta.name)
        entry = base.entry(cert.serial_number)
        if entry is not None:
            return _revoked(cert, issuer, entry, base.name)
        return None


def _who(cert: x509.Certificate, issuer: x509.Certificate) -> str:
    # Rendered only for a refusal: formatting two names costs more than the check.
    return f"{_name(cert.subject)} (issued by {_name(issuer.subject)})"


def _revoked(
    cert: x509.Certificate, issuer: x509.Certificate, entry: x509.RevokedCertificate, name: str
) -> tuple[Reason, str]:
    return (
        Reason.REVOKED,
        f"{_name(cert.subject)} (serial {cert.serial_number:x}) revoked on "
        f"{_stamp(entry.revocation_date_utc)} by CRL {name} of {_name(issuer.subject)}",
    )


def check_revocation(
    path: Sequence[x509.Certificate],
    crls: Sequence[tuple[x509.CertificateRevocationList, str]],
    mode: str,  # a policies.Revocation (a StrEnum; policies imports this module)
    now: _dt.datetime,
) -> tuple[Reason, str] | None:
    """One-shot `CrlSet.check` (tests, `edge verify`); callers that check many paths
    against one policy keep a `CrlSet` to reuse its signature cache."""
    return CrlSet([c for c, _ in crls], [n for _, n in crls]).check(path, mode, now)


# --- the folder loader ---------------------------------------------------------------


_CLOSED = "; the certificates it covers are rejected as crl_unavailable"


@dataclass(frozen=True)
class CrlProblem:
    path: Path
    message: str
    fatal: bool


def crl_problems(
    crls: Sequence[tuple[x509.CertificateRevocationList, Path]],
    roots: Sequence[x509.Certificate],
    now: _dt.datetime,
) -> list[CrlProblem]:
    """What `edge check` says about a partner folder's CRLs.

    All are warnings, not fatal: the partner still loads, and the certificates
    a problem CRL claims are refused as `crl_unavailable` (fail closed) while the
    others keep working. Reported: a CRL that is unusable whatever the
    certificate (malformed or unsupported, see the module rules), one issued
    under the name of a root in the folder but not validly signed by it (or
    whose signer lacks cRLSign), a stale or not yet valid one, a delta whose
    base is not in the folder. A CRL issued by an intermediate is checked in
    full when a chain through that intermediate arrives.
    """
    out: list[CrlProblem] = []
    prepared = [(_Crl(crl, path.name), path) for crl, path in crls]
    for item, path in prepared:
        what = f"CRL of {_name(item.crl.issuer)}"
        if item.facts.delta_base is not None:
            what = f"delta CRL of {_name(item.crl.issuer)} (number {item.facts.number})"
        if item.facts.problem is not None:
            out.append(
                CrlProblem(path, f"{what} is unusable: {item.facts.problem}{_CLOSED}", False)
            )
            continue
        signers = [r for r in roots if r.subject == item.crl.issuer]
        if signers:
            verdicts = [item.signer_problem(r) for r in signers]
            if all(v is not None for v in verdicts):
                out.append(CrlProblem(path, f"{what} is unusable: {verdicts[0]}{_CLOSED}", False))
                continue
        late = _time_problem(item.crl, now)
        if late is not None:
            out.append(
                CrlProblem(
                    path,
                    f"{what} {late}; chains it covers are rejected as crl_unavailable until "
                    "it is replaced",
                    False,
                )
            )
            continue
        base_number = item.facts.delta_base
        if base_number is not None and not any(
            other.facts.delta_base is None
            and other.facts.problem is None
            and other.crl.issuer == item.crl.issuer
            and other.facts.idp == item.facts.idp
            and other.facts.number is not None
            and other.facts.number >= base_number
            for other, _ in prepared
        ):
            out.append(
                CrlProblem(
                    path,
                    f"{what} needs a complete CRL of the same scope numbered >= {base_number} "
                    "in this folder; without it the certificates it covers are rejected as "
                    "crl_unavailable",
                    False,
                )
            )
    return out


# --- the fetcher ---------------------------------------------------------------------


def fetched_crl_problem(
    crl: x509.CertificateRevocationList,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    current: x509.CertificateRevocationList | None,
    now: _dt.datetime,
) -> str | None:
    """Why a CRL fetched from ``cert``'s distribution point may not replace ``current``:
    it must be a usable, complete CRL of ``issuer`` that claims ``cert``, and strictly
    newer than ``current`` (CRLNumber, then thisUpdate). None: accept it."""
    item = _Crl(crl, "fetched")
    if crl.issuer != cert.issuer:
        return f"issued by {_name(crl.issuer)}, not by {_name(cert.issuer)}"
    if item.facts.problem is not None:
        return item.facts.problem
    if item.facts.delta_base is not None:
        return "is a delta CRL, served where a complete CRL is expected"
    if not _claims(item.facts, cert):
        return "its issuing distribution point does not cover the certificate that named it"
    unusable = item.problem(issuer, (), now)
    if unusable is not None:
        return unusable
    if current is not None:
        if crl.fingerprint(_SHA256) == current.fingerprint(_SHA256):
            return None
        if item.order <= crl_order(current):
            mine, theirs = item.order, crl_order(current)
            return (
                f"is not newer than the CRL held (CRLNumber {mine[0]}, thisUpdate "
                f"{_stamp(mine[1])} <= CRLNumber {theirs[0]}, thisUpdate {_stamp(theirs[1])})"
            )
    return None
