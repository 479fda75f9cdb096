"""Outbound federation decisions: may this pool member go out, to which partner, how.

Owns the sans-I/O half of docs/architecture.md ("Outbound federation") (pool -> partner):
- *who asks*: `authorize_member` accepts a pool member only when its verified
  chain ends at one of `internal_roots` and a DNS or IP subject alternative
  name equals the topology `host` of a member of one of the outbound
  listener's pools (`not_in_topology` otherwise);
- *where to*: `destination` maps the SNI the member sent to one enabled partner
  (`unknown_destination` otherwise);
- *how to get there*: `reach` says whether a partner is dialled at its static
  `edge` or found by DNS SRV, `order_srv` orders SRV records as RFC 2782 says
  and `filter_targets` drops SRV targets outside the partner's domains;
- *whether the far end is that partner*: `PartnerEdgeTrust.verify` is the one
  decision on a partner edge's server certificate (that partner's roots
  alone, serverAuth or no EKU, the dialled name against SANs only, then the
  partner's CRLs under its revocation setting).

Must never: do I/O or import trio, sockets, dnspython or a shell module; let a
DNS answer decide trust (DNS only says where to dial: the member's certificate
names its topology host, the partner's certificate names the dialled host
under the partner's own roots); trust SNI for anything but choosing the
destination; verify a partner's edge against any other partner's roots.

Theory: SNI names the destination and nothing else. A member that sends
`sip.fabrikam.com` asks to reach partner fabrikam.com; the edge then proves
both ends itself (the member by its certificate and the topology, the
partner's edge by its certificate and fabrikam's roots). A forged SNI can
at worst choose which *verified* partner an authorized member reaches.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import ipaddress
import itertools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.core.config import Pool
from edge.core.policies import PartnerPolicy, PolicySnapshot, Revocation
from edge.core.reasons import Reason
from edge.core.trust import MAX_CHAIN_LENGTH, ServerTrust, Verdict

__all__ = [
    "MAX_SRV_RECORDS",
    "SRV_SERVICE",
    "Destination",
    "MemberVerdict",
    "PartnerEdgeTrust",
    "Reach",
    "Refusal",
    "SrvRecord",
    "authorize_member",
    "destination",
    "filter_targets",
    "normalize_sni",
    "order_srv",
    "reach",
    "reachable_partners",
    "srv_name",
]

# Lync / Skype for Business federation: the partner's Access Edge.
SRV_SERVICE = "_sipfederationtls._tcp"
# An SRV answer bigger than this is a mistake or an attack; the rest is ignored.
MAX_SRV_RECORDS = 64
# RFC 1035: a name is at most 253 characters in text form.
_MAX_NAME = 253
_SNI_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _printable(text: str, limit: int = 80) -> str:
    """Peer-controlled text made safe for a detail string: bounded, no control bytes."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


# --- who asks: the pool member ------------------------------------------------------


@dataclass(frozen=True)
class MemberVerdict:
    """A pool member accepted (its topology host and pool) or rejected (why)."""

    accepted: bool
    reason: Reason | None  # None exactly when accepted
    detail: str
    host: str | None = None  # the topology host the certificate names
    pool: str | None = None  # the pool that lists it


def _member_reject(reason: Reason, detail: str) -> MemberVerdict:
    return MemberVerdict(False, reason, detail)


def _subject(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return "(unreadable subject)"
    if cns:
        return f"CN={_printable(str(cns[0].value), 64)}"
    return "(no CN)"


def _san_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """DNS SANs (normalized) and IP SANs (compressed text); no SAN: none (no CN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [_norm(d) for d in san.get_values_for_type(x509.DNSName)]
    ips = [ip.compressed for ip in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def _host_key(host: str) -> str:
    """A topology host as SANs are compared: IP addresses compressed, names normalized."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return _norm(host)


def authorize_member(
    verified_chain: Sequence[x509.Certificate],
    internal_roots: Sequence[x509.Certificate],
    pools: Iterable[Pool],
) -> MemberVerdict:
    """May the pool member that presented this chain use the outbound listener?

    `verified_chain` is the chain the TLS layer verified against
    `internal_roots` (leaf first, anchor last; an outbound listener's server
    context makes OpenSSL do that in the handshake). It is checked again here
    so a misbuilt context fails closed. `pools` are the listener's pools; only
    their listed members' `host` names count (SRV-discovered members do not:
    a DNS answer never grants trust).
    """
    if not verified_chain:
        return _member_reject(Reason.NO_CLIENT_CERT, "the pool member presented no certificate")
    leaf, anchor = verified_chain[0], verified_chain[-1]
    if anchor not in internal_roots:
        return _member_reject(
            Reason.UNKNOWN_CA,
            f"the chain of {_subject(leaf)} does not end at one of internal_roots",
        )
    try:
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            return _member_reject(
                Reason.BAD_PURPOSE,
                f"pool member {_subject(leaf)} extended key usage excludes clientAuth",
            )
        dns, ips = _san_names(leaf)
    except ValueError as exc:
        return _member_reject(Reason.INVALID_CHAIN, f"malformed extension: {_printable(str(exc))}")
    hosts: dict[str, str] = {}
    for pool in pools:
        for member in pool.members:
            hosts.setdefault(_host_key(member.host), pool.name)
    # Exact equality only: a wildcard SAN is not a topology host name.
    for name in (*dns, *ips):
        if name in hosts:
            return MemberVerdict(True, None, f"{name} in pool {hosts[name]}", name, hosts[name])
    shown = [*dns[:5], *ips[:3]]
    names = ", ".join(_printable(n, 64) for n in shown) or "none"
    return _member_reject(
        Reason.NOT_IN_TOPOLOGY,
        f"pool member {_subject(leaf)} names [{names}]; none is the host of a member of "
        f"pools {', '.join(sorted(set(hosts.values()))) or '(none)'}",
    )


# --- where to: the destination partner ------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """The partner the member asked for: its id, the domain its SNI lies in, the SNI."""

    partner: str
    domain: str
    name: str


@dataclass(frozen=True)
class Refusal:
    """Why no destination (`unknown_destination`), with an operator's detail."""

    reason: Reason
    detail: str


def normalize_sni(sni: str | None) -> str | None:
    """The SNI as a lowercase DNS name, or None when absent or not a DNS name."""
    if sni is None:
        return None
    name = _norm(sni)
    if not name or len(name) > _MAX_NAME or not name.isascii():
        return None
    labels = name.split(".")
    if len(labels) < 2 or not all(_SNI_LABEL.match(label) for label in labels):
        return None
    return name


def destination(sni: str | None, snapshot: PolicySnapshot) -> Destination | Refusal:
    """The enabled partner whose domains hold `sni` (the longest matching domain wins;
    two partners claiming the same domain is refused rather than guessed)."""
    name = normalize_sni(sni)
    if name is None:
        detail = (
            "the pool member sent no SNI"
            if sni is None
            else f"the SNI {_printable(sni)} is not a DNS name"
        )
        return Refusal(Reason.UNKNOWN_DESTINATION, detail)
    best: list[tuple[str, str]] = []
    disabled: list[str] = []
    for pid, policy in sorted(snapshot.partners.items()):
        for domain in policy.domains:
            if name == domain or name.endswith("." + domain):
                if not policy.enabled:
                    disabled.append(pid)
                    continue
                if not best or len(domain) > len(best[0][1]):
                    best = [(pid, domain)]
                elif len(domain) == len(best[0][1]) and pid != best[0][0]:
                    best.append((pid, domain))
    if not best:
        why = f" (partner {', '.join(disabled)} is disabled)" if disabled else ""
        return Refusal(
            Reason.UNKNOWN_DESTINATION,
            f"{name} is inside no enabled partner's domains{why}",
        )
    if len(best) > 1:
        ids = ", ".join(pid for pid, _ in best)
        return Refusal(
            Reason.UNKNOWN_DESTINATION,
            f"{name} is inside the domain {best[0][1]} of several partners ({ids}); "
            "give them distinct domains",
        )
    pid, domain = best[0]
    return Destination(pid, domain, name)


# --- how to get there: static edge or DNS SRV -------------------------------------------


@dataclass(frozen=True)
class Reach:
    """How a partner is dialled: its static `edge`, else the SRV names of its domains."""

    partner: str
    edge: tuple[str, int] | None
    srv_names: tuple[str, ...]

    @property
    def line(self) -> str:
        """What `edge check` prints."""
        if self.edge is not None:
            host, port = self.edge
            shown = f"[{host}]" if ":" in host else host
            return f"static edge {shown}:{port}"
        return "DNS SRV " + ", ".join(self.srv_names)


def srv_name(domain: str) -> str:
    """The SRV name a partner's edge is published under for one of its domains."""
    return f"{SRV_SERVICE}.{domain}"


def reach(policy: PartnerPolicy, domain: str | None = None) -> Reach:
    """How `policy`'s partner is reached (for `domain`, when given, only its SRV name)."""
    domains = (domain,) if domain is not None else policy.domains
    return Reach(policy.id, policy.edge, tuple(srv_name(d) for d in domains))


@dataclass(frozen=True)
class SrvRecord:
    """One SRV answer: lower priority first, weight shares within a priority."""

    priority: int
    weight: int
    port: int
    target: str  # lowercase, no trailing dot


def order_srv(records: Iterable[SrvRecord], rng: random.Random | None = None) -> list[SrvRecord]:
    """RFC 2782 order: priority ascending; within one priority, a weighted random
    order. As the RFC says: the remaining records are listed with the weight-0
    ones first, a number is drawn uniformly from 0 to the sum of their weights
    inclusive, and the first record whose running sum reaches it goes next. A
    weight-0 record is thus chosen only by drawing 0 (rarely, when others have
    weight) and always when all left have weight 0. `rng`: tests pass a seeded one.
    """
    chooser = rng if rng is not None else random.SystemRandom()
    result: list[SrvRecord] = []
    kept = sorted(records, key=lambda r: r.priority)[:MAX_SRV_RECORDS]
    for _, group in itertools.groupby(kept, key=lambda r: r.priority):
        left = sorted(group, key=lambda r: r.weight != 0)  # weight 0 first, stable
        while left:
            total = sum(r.weight for r in left)
            draw = chooser.randint(0, total)
            running = 0
            for index, record in enumerate(left):
                running += record.weight
                if running >= draw:
                    result.append(left.pop(index))
                    break
    return result


def filter_targets(
    records: Iterable[SrvRecord], policy: PartnerPolicy
) -> tuple[list[SrvRecord], list[SrvRecord]]:
    """(kept, ignored): a target must lie inside the partner's domains or equal its
    static `edge` host. A DNS answer pointing elsewhere is ignored (and logged by
    the shell), so a spoofed SRV record cannot make us dial an arbitrary host
    that a careless public CA certified."""
    kept: list[SrvRecord] = []
    ignored: list[SrvRecord] = []
    edge_host = policy.edge[0] if policy.edge is not None else None
    for record in records:
        target = _norm(record.target)
        inside = target == edge_host or any(
            target == d or target.endswith("." + d) for d in policy.domains
        )
        (kept if inside and record.port > 0 else ignored).append(
            dataclasses.replace(record, target=target)
        )
    return kept, ignored


# --- whether the far end is that partner ------------------------------------------------


def _crl_covers(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return True
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if idp.only_contains_user_certs and is_ca:
        return False
    if idp.only_contains_ca_certs and not is_ca:
        return False
    return not (idp.only_some_reasons or idp.indirect_crl or idp.only_contains_attribute_certs)


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _stamp(when: _dt.datetime) -> str:
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _revocation(
    policy: PartnerPolicy, path: Sequence[x509.Certificate], at: _dt.datetime
) -> tuple[Reason, str] | None:
    """The partner's CRLs over a verified path, with the inbound rules of
    edge.core.trust: a CRL counts when issued by the certificate's issuer (name
    and signature) and covering it; require-crl wants one per issuer; a CRL
    that is not current fails closed in both modes.

    TODO(issue 15): trust.py's rewrite gives `edge verify --purpose server
    --partner P` the partner's CRLs; when it exposes that, call it and drop this.
    """
    if policy.revocation is Revocation.OFF:
        return None
    by_issuer: dict[x509.Name, list[tuple[x509.CertificateRevocationList, str]]] = {}
    for one, source in zip(policy.crls, policy.crl_files, strict=True):
        by_issuer.setdefault(one.issuer, []).append((one, source.name))
    for cert, issuer in itertools.pairwise(path):
        candidates = [
            (crl, file)
            for crl, file in by_issuer.get(cert.issuer, ())
            if _crl_covers(crl, cert) and _signed_by(crl, issuer)
        ]
        if not candidates:
            if policy.revocation is Revocation.REQUIRE_CRL:
                return (
                    Reason.CRL_UNAVAILABLE,
                    f"no CRL from {_subject(issuer)} (issuer of {_subject(cert)}) in partner "
                    f"{policy.id}'s folder, and its policy is require-crl",
                )
            continue
        current = [
            (crl, file)
            for crl, file in candidates
            if crl.last_update_utc <= at
            and crl.next_update_utc is not None
            and at <= crl.next_update_utc
        ]
        if not current:
            file = max(candidates, key=lambda c: c[0].last_update_utc)[1]
            return (
                Reason.CRL_UNAVAILABLE,
                f"CRL {file} of {_subject(issuer)} is not current at {_stamp(at)}",
            )
        crl, file = max(current, key=lambda c: c[0].last_update_utc)
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            return (
                Reason.REVOKED,
                f"{_subject(cert)} (serial {cert.serial_number:x}) revoked on "
                f"{_stamp(entry.revocation_date_utc)} by CRL {file} of {_subject(issuer)}",
            )
    return None


class PartnerEdgeTrust:
    """Server-purpose verification of partners' edges for one `PolicySnapshot`.

    One `ServerTrust` per partner, over that partner's roots alone, built on
    first use; a reload builds a new `PartnerEdgeTrust` (nothing is mutated).
    `edge verify --purpose server --partner P --name HOST` must decide through
    `verify` too (one implementation).
    """

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._trust: dict[str, ServerTrust] = {}

    def verify(
        self,
        partner: str,
        chain: Sequence[x509.Certificate],
        name: str,
        *,
        at: _dt.datetime | None = None,
    ) -> Verdict:
        """Is `chain` (leaf first, as the server sent it) partner's edge at `name`?"""
        policy = self.snapshot.partners.get(partner)
        if policy is None:
            return Verdict(False, Reason.UNKNOWN_CA, f"no partner {partner!r} in the policies")
        if len(chain) > MAX_CHAIN_LENGTH:
            # Each certificate costs work in path building: bound what a peer can make us do.
            return Verdict(
                False,
                Reason.INVALID_CHAIN,
                f"the server sent {len(chain)} certificates; at most {MAX_CHAIN_LENGTH} "
                "are accepted",
                partner,
            )
        trust = self._trust.get(partner)
        if trust is None:
            trust = self._trust[partner] = ServerTrust(policy.roots)
        verdict = trust.verify_server(chain, name, at=at)
        if not verdict.accepted:
            return dataclasses.replace(verdict, partner=partner)
        when = at if at is not None else _dt.datetime.now(_dt.UTC)
        revoked = _revocation(policy, verdict.chain, when)
        if revoked is not None:
            return Verdict(False, revoked[0], revoked[1], partner, verdict.chain)
        return dataclasses.replace(verdict, partner=partner)


def reachable_partners(snapshot: PolicySnapshot) -> frozenset[str]:
    """The partners an outbound connection may (still) go to: loaded and enabled.
    After a reload, live connections to any other partner are withdrawn."""
    return frozenset(pid for pid, policy in snapshot.partners.items() if policy.enabled)
