"""Partner names on a leaf: which names it claims, and which domain they fall in.

Owns: the names the partner rules read from a leaf (`leaf_names`: DNS SANs,
`sip:`/`sips:` URI SANs without a user part, the CN only when there is no SAN
extension), matching a name to a partner's domains (`name_in_domains`,
wildcards), and a CA's dNSName name constraints applied to those names beyond
DNS SANs (`_constraint_problem`).

Must never: decide acceptance (`edge.core.trust` does), do I/O, import trio,
sockets or any shell module, or take a name from anywhere but a parsed
certificate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from edge.core.names import subject as _subject
from edge.core.policies import PartnerPolicy


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


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
