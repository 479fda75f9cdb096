"""The snapshot: everything the running gateway decides with, as one immutable value.

Owns: the ``Snapshot`` (the configuration, the partner policies of every
policies folder the listeners name, the CRLs fetched from distribution points,
and what is derived from them: one ``PartnerTrust`` per folder, the
``ServerTrust`` for pool members), ``build_snapshot`` which does every
cross-check between those inputs, and ``diff`` which says what changed between
two snapshots and whether the change applies live or needs a restart.

``edge check``, ``edge verify`` and ``edge run`` all go through
``build_snapshot``, so whatever one reports broken the others report the same
way: a partner whose ``policy.toml`` names a pool ``edge.toml`` does not define
is broken for all of them (never "enabled, then ``internal_error`` on every
connection").

Must never: read a file, a socket or the clock of the event loop (the inputs
are loaded by the caller: ``load_config``, ``load_policies``, the CRL
fetcher), mutate a snapshot once built (a reload builds a new one and the
shell swaps it in one assignment), or decide trust itself (``edge.core.trust``
does; this module only builds the verifiers from the checked policies).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge.core.config import Config, Listener
from edge.core.policies import (
    PartnerPolicy,
    PolicyProblem,
    PolicySnapshot,
    resolve_domain_conflicts,
)
from edge.core.trust import PartnerTrust, ServerTrust

__all__ = [
    "Change",
    "FetchedCrls",
    "FolderTrust",
    "Snapshot",
    "build_snapshot",
    "carry_running",
    "classify",
    "diff",
    "policy_folders",
]

# partner id -> (CRL, the cache file it came from), as edge.crlfetch.CrlFetcher.crls() gives.
FetchedCrls = Mapping[str, Sequence[tuple[x509.CertificateRevocationList, Path]]]


@dataclass(frozen=True)
class FolderTrust:
    """One policies folder: what it holds, what the gateway uses, and the verifier."""

    folder: Path
    # Exactly what the folder holds (a reload keeps last good policies from it).
    loaded: PolicySnapshot
    # What the verifier uses: ``loaded`` after the cross-checks, plus fetched CRLs.
    policies: PolicySnapshot
    verifier: PartnerTrust = field(compare=False, repr=False)

    def policy(self, partner: str) -> PartnerPolicy | None:
        return self.policies.partners.get(partner)


@dataclass(frozen=True)
class Snapshot:
    """Configuration + partners + fetched CRLs + what derives from them; never mutated."""

    config: Config
    folders: Mapping[Path, FolderTrust]  # read-only; one per policies folder
    fetched_crls: FetchedCrls
    # Problems of the configuration as a whole (address clashes): the gateway
    # must not start with any. Partner problems live in each folder's policies.
    problems: tuple[str, ...]
    # Pool members are verified against the internal roots by this one decision.
    server_trust: ServerTrust = field(compare=False, repr=False)

    def folder_of(self, listener: Listener) -> FolderTrust | None:
        return self.folders.get(listener.policies) if listener.policies is not None else None

    def partner_summary(self) -> dict[str, int]:
        """Partners by state over every folder (kept-last-good broken counts as broken)."""
        counts = {"enabled": 0, "disabled": 0, "broken": 0}
        for trust in self.folders.values():
            for state, n in trust.policies.state_counts().items():
                counts[state] = counts.get(state, 0) + n
        return counts

    def partner_states(self) -> dict[str, str]:
        """Every configured partner id -> its state (broken wins over a folder's other view)."""
        states: dict[str, str] = {}
        for trust in self.folders.values():
            for pid, state in trust.policies.partner_states().items():
                if states.get(pid) != "broken":
                    states[pid] = state
        return states

    @property
    def partner_problems(self) -> tuple[PolicyProblem, ...]:
        return tuple(p for t in self.folders.values() for p in t.policies.problems)


def policy_folders(config: Config) -> tuple[Path, ...]:
    """The policies folders the mtls and outbound listeners name, in order, once each."""
    return tuple(
        dict.fromkeys(
            lst.policies for lst in config.listeners if lst.mode != "tls" and lst.policies
        )
    )


def build_snapshot(
    config: Config,
    loaded: Mapping[Path, PolicySnapshot],
    fetched_crls: FetchedCrls | None = None,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Cross-check the inputs and build the snapshot (pure; CPU only).

    ``loaded``: each folder of ``policy_folders(config)`` as ``load_policies``
    read it. ``previous``: verifiers of unchanged folders are reused from it.
    Cross-checks: a partner's ``pool`` must be defined in ``edge.toml`` (else
    the partner is broken, and not served); a domain claimed by two enabled
    partners of one folder is an error and only the partner that held it first
    keeps it (``resolve_domain_conflicts``); one claimed by partners of two
    different folders (two listeners) is a warning on the second; a listener
    or the metrics endpoint on an address another one already uses is a
    problem of the configuration.
    """
    fetched: FetchedCrls = types.MappingProxyType(dict(fetched_crls or {}))
    domain_owner: dict[str, str] = {}
    folders: dict[Path, FolderTrust] = {}
    # The listeners' folders first, then any other (``edge check --policies``).
    for folder in dict.fromkeys((*policy_folders(config), *loaded)):
        base = loaded.get(folder)
        if base is None:
            continue
        # Within one folder a domain has one owner: the partner that held it in
        # the previous snapshot (else the first by id) keeps it, the other is broken.
        held = previous.folders.get(folder) if previous is not None else None
        resolved = resolve_domain_conflicts(base, held.policies if held is not None else None)
        checked = _cross_check(resolved, config, domain_owner)
        effective = _with_fetched_crls(checked, fetched)
        reuse = previous.folders.get(folder) if previous is not None else None
        if reuse is not None and reuse.policies == effective:
            verifier = reuse.verifier
        else:
            verifier = PartnerTrust(effective)
        folders[folder] = FolderTrust(folder, base, effective, verifier)
    if previous is not None and previous.config.identity == config.identity:
        server_trust = previous.server_trust
    else:
        server_trust = ServerTrust(config.identity.internal_root_certs)
    return Snapshot(
        config=config,
        folders=types.MappingProxyType(folders),
        fetched_crls=fetched,
        problems=_address_clashes(config),
        server_trust=server_trust,
    )


def _cross_check(
    snapshot: PolicySnapshot, config: Config, domain_owner: dict[str, str]
) -> PolicySnapshot:
    """``snapshot`` with what only the whole configuration can tell added."""
    partners = dict(snapshot.partners)
    problems = list(snapshot.problems)
    broken = set(snapshot.broken)
    for pid, policy in sorted(snapshot.partners.items()):
        if policy.pool is not None and policy.pool not in config.pools:
            known = ", ".join(sorted(config.pools)) or "none"
            problems.append(
                PolicyProblem(
                    pid,
                    policy.folder / "policy.toml",
                    f"pool: no pool named {policy.pool!r} in the configuration (pools: {known})",
                )
            )
            broken.add(pid)
            del partners[pid]  # never served: its connections would have nowhere to go
            continue
        key = f"{snapshot.folder}"
        for domain in policy.domains:
            owner = domain_owner.setdefault(domain, f"{key}\0{pid}")
            if owner != f"{key}\0{pid}" and not owner.startswith(f"{key}\0"):
                other = owner.split("\0", 1)[1]
                problems.append(
                    PolicyProblem(
                        pid,
                        policy.folder,
                        f"domain {domain!r} is also claimed by partner {other!r}: "
                        "either partner's CAs may vouch for it",
                        fatal=False,
                    )
                )
    if partners == dict(snapshot.partners) and len(problems) == len(snapshot.problems):
        return snapshot
    return dataclasses.replace(
        snapshot,
        partners=types.MappingProxyType(partners),
        problems=tuple(problems),
        broken=frozenset(broken),
    )


def _with_fetched_crls(base: PolicySnapshot, fetched: FetchedCrls) -> PolicySnapshot:
    """``base`` with the CRLs fetched from distribution points added."""
    if not any(pid in base.partners for pid in fetched):
        return base
    partners = dict(base.partners)
    for pid, crls in fetched.items():
        policy = partners.get(pid)
        if policy is not None:
            partners[pid] = dataclasses.replace(
                policy,
                crls=policy.crls + tuple(crl for crl, _ in crls),
                crl_files=policy.crl_files + tuple(path for _, path in crls),
            )
    return dataclasses.replace(base, partners=types.MappingProxyType(partners))


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Would binding both fail? Same port, and same host or a wildcard covering it."""
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a == 0 or port_b == 0 or port_a != port_b:
        return False  # port 0: the kernel picks a free port each
    if host_a == host_b:
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(host_a), ipaddress.ip_address(host_b)
    except ValueError:
        return False  # a name: the kernel will tell at bind time
    if ip_a.version == ip_b.version:
        return ip_a.is_unspecified or ip_b.is_unspecified
    # "::" also takes IPv4 on Linux (IPV6_V6ONLY is off by default).
    v6 = ip_a if ip_a.version == 6 else ip_b
    return v6.is_unspecified


def _address_clashes(config: Config) -> tuple[str, ...]:
    bound: list[tuple[str, tuple[str, int]]] = [
        (f"listener {lst.name!r}", (lst.host, lst.port)) for lst in config.listeners
    ]
    if config.metrics is not None:
        bound.append(("metrics", (config.metrics.host, config.metrics.port)))
    problems = []
    for i, (who, address) in enumerate(bound):
        for other, other_address in bound[:i]:
            # Two listeners on one exact address are already named by load_config.
            exact_pair = address == other_address and who != "metrics"
            if _overlap(address, other_address) and not exact_pair:
                problems.append(
                    f"{config.path}: {who} address {address[0]}:{address[1]} clashes "
                    f"with {other} on {other_address[0]}:{other_address[1]}"
                )
    return tuple(problems)


# ----------------------------------------------------------------------
# What changed, and what a change takes

Effect = Literal["live", "restart", "derived"]

# Every field of a Snapshot, by path from the snapshot ("*" is any mapping key
# or sequence index). The longest matching prefix classifies a changed leaf:
# "live" changes are applied by the running gateway, "restart" ones are logged
# as needing a restart (the running values stay), "derived" ones follow from
# other fields and are not reported themselves. tests/test_snapshot.py walks
# the dataclass fields recursively and fails on any path not covered here.
_EFFECTS: dict[str, tuple[Effect, str]] = {
    "config.path": ("restart", "path"),
    "config.identity": ("live", "identity"),
    "config.listeners": ("restart", "listeners"),
    "config.pools": ("restart", "pools"),
    "config.metrics": ("restart", "metrics"),
    "config.limits": ("live", "limits"),
    "config.policies": ("live", "policies"),
    "config.dns": ("live", "dns"),
    # The gateway hands every reloaded [revocation] to its CRL fetcher
    # (edge.crlfetch CrlFetcher.configure): fetch = false stops fetching at once.
    "config.revocation": ("live", "revocation"),
    "config.sip": ("restart", "sip"),
    "config.tls": ("restart", "tls"),
    "config.warnings": ("derived", "warnings"),
    "folders": ("live", "partners"),
    "folders.*.verifier": ("derived", ""),
    # When a folder was read is not what it holds.
    "folders.*.loaded.loaded_at": ("derived", ""),
    "folders.*.policies.loaded_at": ("derived", ""),
    "fetched_crls": ("live", "crls"),
    "problems": ("derived", ""),
    "server_trust": ("derived", ""),
}


def classify(path: str) -> tuple[Effect, str] | None:
    """The effect of a change at ``path`` (dotted, "*" for keys), or None if unknown."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        found = _EFFECTS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class Change:
    """What differs between two snapshots, by the names ``config_reloaded`` logs."""

    applied: tuple[str, ...]  # taken into use live
    needs_restart: tuple[str, ...]  # logged; the running values stay until a restart

    def __bool__(self) -> bool:
        return bool(self.applied or self.needs_restart)


def diff(old: Snapshot, new: Snapshot) -> Change:
    """Every field that differs between ``old`` and ``new``, classified (pure)."""
    changed: list[str] = []
    _walk(old, new, "", changed)
    applied: dict[str, None] = {}
    restart: dict[str, None] = {}
    for path in changed:
        effect, name = classify(path) or ("restart", path)  # unknown: fail safe
        if effect == "live":
            applied.setdefault(name, None)
        elif effect == "restart":
            restart.setdefault(name, None)
    return Change(tuple(applied), tuple(restart))


def carry_running(running: Config, loaded: Config) -> Config:
    """``loaded`` with every field that needs a restart kept as ``running`` has it.

    The snapshot then says what the gateway really runs with (a changed
    ``[[listeners]]`` is not bound until a restart, so it is not in it).
    """
    keep = {
        f.name: getattr(running, f.name)
        for f in dataclasses.fields(Config)
        if (classify(f"config.{f.name}") or ("restart", ""))[0] == "restart"
    }
    return dataclasses.replace(loaded, **keep)


def _same_leaf(a: Any, b: Any) -> bool:
    if a is b:
        return True
    public = getattr(a, "public_key", None)
    if callable(public) and hasattr(a, "private_bytes") and hasattr(b, "public_key"):
        # Private keys compare by their public half (never by secret bytes).
        der = Encoding.DER
        fmt = PublicFormat.SubjectPublicKeyInfo
        return bool(public().public_bytes(der, fmt) == b.public_key().public_bytes(der, fmt))
    try:
        return bool(a == b)
    except Exception:  # an uncomparable value: count it as changed
        return False


def _walk(a: Any, b: Any, path: str, out: list[str]) -> None:
    """Append the dotted path of every leaf that differs (dataclasses by every field,
    ``compare=False`` ones included; mappings by key; sequences by index)."""
    prefix = f"{path}." if path else ""
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
        for f in dataclasses.fields(a):
            _walk(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}", out)
        return
    if classify(path) == ("derived", ""):
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            out.append(f"{prefix}*")
            return
        for key in a:
            _walk(a[key], b[key], f"{prefix}*", out)
        return
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        if len(a) != len(b):
            out.append(f"{prefix}*")
            return
        for x, y in zip(a, b, strict=True):
            _walk(x, y, f"{prefix}*", out)
        return
    if not _same_leaf(a, b):
        out.append(path)
