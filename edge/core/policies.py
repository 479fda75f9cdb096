"""Partner policies: the `federation_policies/` folder read into an immutable snapshot.

Owns: the on-disk layout of partner folders (DESIGN.md, "Partner policy
folder"), parsing of each partner's roots, CRLs and `policy.toml`, and the
judgement of which partners are loaded, disabled or broken. One partner's
mistakes never stop another partner from loading.

Must never: decide whether a certificate chain is accepted (that is
`edge.core.trust`), touch sockets or import trio, or mutate a snapshot once built.
A reload builds a new `PolicySnapshot` beside the old one; the caller swaps it.

A partner is either a folder (`fabrikam.com/` holding roots, CRLs and an
optional `policy.toml`) or one file, `fabrikam.com.toml`, holding the
`policy.toml` keys plus `roots` (PEM text) and optionally `crls` (PEM text).
The single-file form exists for Kubernetes: a ConfigMap cannot hold folders,
but one ConfigMap can hold every partner as a flat key, and updating it is an
atomic `..data` swap that the running gateway picks up live.

What counts as a problem (every problem names the file and what is wrong):
- fatal (the partner is `broken`): an unreadable or unparsable file, a
  `policy.toml` with an unknown key or a wrong type, a "root" that is not a CA
  certificate, a PEM root file holding a private key, no usable root at all;
- warnings (the partner still loads): a file with an extension we do not read
  (`root.pem.txt`: a typo we refuse to ignore silently), a sub-folder, a root
  already expired, `require-crl` with no CRL, and every CRL problem of
  `edge.core.revocation.crl_problems`: an unusable CRL (no nextUpdate, unknown
  critical extension, critical CRLNumber, indirect, signature or cRLSign
  failing against a root in the folder), a stale or not yet valid CRL, a delta
  without its base. A CRL problem never breaks the partner: the certificates
  that CRL covers are refused as `crl_unavailable`, the others still work.
`edge check` reports both and exits 1 on either.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from edge.core.revocation import crl_problems

__all__ = [
    "CRL_SUFFIXES",
    "POLICY_FILE",
    "RESERVED_PARTNER_IDS",
    "ROOT_SUFFIXES",
    "SINGLE_FILE_SUFFIX",
    "PartnerPolicy",
    "PolicyFolderError",
    "PolicyProblem",
    "PolicySnapshot",
    "Revocation",
    "is_ignored_name",
    "load_policies",
    "normalize_domain",
]

ROOT_SUFFIXES = frozenset({".pem", ".crt", ".cer"})
CRL_SUFFIXES = frozenset({".crl"})
POLICY_FILE = "policy.toml"
# "unknown" is the metrics label for connections that matched no partner; a partner
# with that id would make two different things indistinguishable on dashboards.
RESERVED_PARTNER_IDS = frozenset({"unknown"})

_POLICY_KEYS = ("domains", "enabled", "pool", "max_connections", "revocation")
# A single-file partner (`ID.toml` at the top of the policies folder) adds these.
_SINGLE_FILE_KEYS = ("roots", "crls")
SINGLE_FILE_SUFFIX = ".toml"
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class Revocation(enum.StrEnum):
    """How a partner's CRLs are applied to its chains."""

    # Check a CRL when the folder has one for the issuer; a stale one fails closed.
    CRL_IF_PRESENT = "crl-if-present"
    # Every issuer in the path must have a current CRL in the folder.
    REQUIRE_CRL = "require-crl"
    # Never consult CRLs for this partner.
    OFF = "off"


class PolicyFolderError(Exception):
    """The policies folder itself is missing or unreadable (nothing can load)."""


@dataclass(frozen=True)
class PartnerPolicy:
    """One partner, as loaded from `FOLDER/<id>/`."""

    id: str  # the folder name; also the `partner` metrics label
    folder: Path
    domains: tuple[str, ...]  # lowercase A-labels, no trailing dot
    enabled: bool
    pool: str | None  # None: the listener's pool
    max_connections: int | None  # None: only the global per-partner limit applies
    revocation: Revocation
    roots: tuple[x509.Certificate, ...]  # trust anchors for this partner alone
    root_files: tuple[Path, ...]  # file each root came from, same order as `roots`
    crls: tuple[x509.CertificateRevocationList, ...]
    crl_files: tuple[Path, ...]  # same order as `crls`


@dataclass(frozen=True)
class PolicyProblem:
    """Something the operator must fix, naming the file."""

    partner: str  # partner id, or "" for the policies folder itself
    path: Path
    message: str
    fatal: bool = True  # True: the partner is broken; False: a warning

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class PolicySnapshot:
    """Every partner of one policies folder at one moment; never mutated."""

    folder: Path
    partners: Mapping[str, PartnerPolicy]  # loaded partners, enabled or not (read-only)
    problems: tuple[PolicyProblem, ...]
    broken: frozenset[str]  # partners with a fatal problem (may still be in `partners`)
    loaded_at: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.UTC))

    def state_counts(self) -> dict[str, int]:
        """Partner counts by state, for the `edge_partners` gauge."""
        counts = {"enabled": 0, "disabled": 0, "broken": len(self.broken)}
        for pid, policy in self.partners.items():
            if pid not in self.broken:
                counts["enabled" if policy.enabled else "disabled"] += 1
        return counts

    def problems_of(self, partner: str) -> tuple[PolicyProblem, ...]:
        """The problems reported for one partner."""
        return tuple(p for p in self.problems if p.partner == partner)


def is_ignored_name(name: str) -> bool:
    """Hidden files (editor swap files, Kubernetes `..data` links) and READMEs."""
    return name.startswith(".") or name.upper().startswith("README")


def normalize_domain(raw: str) -> str:
    """Lowercase, no trailing dot, IDNA A-labels. Raises ValueError saying why."""
    name = raw.strip().rstrip(".").lower()
    if not name:
        raise ValueError(f"domain {raw!r} is empty")
    if name.startswith("*."):
        raise ValueError(
            f"domain {raw!r} has a wildcard: write {name[2:]!r}, which already covers "
            "every name under it"
        )
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"domain {raw!r} is not a valid internationalized name") from exc
    labels = name.split(".")
    if any(not _LABEL.match(label) for label in labels):
        raise ValueError(f"domain {raw!r} is not a valid DNS name")
    if len(labels) < 2:
        # A one-label domain ("com") would let a partner vouch for a whole TLD.
        raise ValueError(f"domain {raw!r} has a single label; write the partner's own domain")
    return name


class _PartnerLoader:
    """Reads one partner folder, collecting problems instead of stopping at the first."""

    def __init__(self, pid: str, folder: Path, now: _dt.datetime) -> None:
        self.pid = pid
        self.folder = folder
        self.now = now
        self.problems: list[PolicyProblem] = []
        self.roots: list[x509.Certificate] = []
        self.root_files: list[Path] = []
        self.crls: list[x509.CertificateRevocationList] = []
        self.crl_files: list[Path] = []
        self.unknown_files: list[Path] = []

    def problem(self, path: Path, message: str, *, fatal: bool = True) -> None:
        self.problems.append(PolicyProblem(self.pid, path, message, fatal))

    def load_file(self) -> PartnerPolicy | None:
        """A single-file partner: `ID.toml` with `roots` (and `crls`) as PEM text."""
        self._check_reserved()
        path = self.folder
        settings = _Settings()
        if _is_domain(self.pid):
            settings.domains = (normalize_domain(self.pid),)
        raw = self._parse_toml(path)
        if raw is None:
            return None
        for key in _SINGLE_FILE_KEYS:
            value = raw.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                self.problem(path, f"{key}: must be PEM text (a multi-line string)")
            elif key == "roots":
                if "-----BEGIN" not in value:
                    self.problem(path, "roots: no PEM certificate (-----BEGIN CERTIFICATE-----)")
                    continue
                self._load_roots(path, value.encode("ascii", "replace"))
            else:
                self._load_crls(path, value.encode("ascii", "replace"))
        policy = {k: v for k, v in raw.items() if k not in _SINGLE_FILE_KEYS}
        settings = self._settings(policy, path, settings, _POLICY_KEYS + _SINGLE_FILE_KEYS)
        if not self.roots:
            self.problem(path, "roots: missing (the partner's CA certificates, PEM text)")
        return self._finish(settings)

    def _check_reserved(self) -> None:
        if self.pid in RESERVED_PARTNER_IDS:
            self.problem(
                self.folder,
                f"partner id {self.pid!r} is reserved (it labels unidentified connections "
                "in metrics); rename it",
            )

    def load(self) -> PartnerPolicy | None:
        self._check_reserved()
        try:
            entries = sorted(self.folder.iterdir())
        except OSError as exc:
            self.problem(self.folder, f"cannot list partner folder: {exc.strerror or exc}")
            return None
        policy_path: Path | None = None
        for path in entries:
            name = path.name
            if is_ignored_name(name):
                continue
            if path.is_dir():
                self.problem(
                    path,
                    "sub-folders are not read; put roots and CRLs directly in the partner folder",
                    fatal=False,
                )
                continue
            suffix = path.suffix.lower()
            if name == POLICY_FILE:
                policy_path = path
            elif suffix in ROOT_SUFFIXES:
                self._load_roots(path)
            elif suffix in CRL_SUFFIXES:
                self._load_crls(path)
            else:
                self.unknown_files.append(path)
                self.problem(
                    path,
                    "ignored: unknown file type (roots end in .pem, .crt or .cer; CRLs in "
                    ".crl; policy in policy.toml)",
                    fatal=False,
                )
        settings = self._load_policy_toml(policy_path)
        if not self.roots:
            hint = ""
            if self.unknown_files:
                hint = " (not read: " + ", ".join(p.name for p in self.unknown_files) + ")"
            self.problem(self.folder, f"no trusted root certificate found{hint}")
        return self._finish(settings)

    def _finish(self, settings: _Settings) -> PartnerPolicy | None:
        self._check_crls(settings.revocation)
        if any(p.fatal for p in self.problems):
            return None
        return PartnerPolicy(
            id=self.pid,
            folder=self.folder,
            domains=settings.domains,
            enabled=settings.enabled,
            pool=settings.pool,
            max_connections=settings.max_connections,
            revocation=settings.revocation,
            roots=tuple(self.roots),
            root_files=tuple(self.root_files),
            crls=tuple(self.crls),
            crl_files=tuple(self.crl_files),
        )

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as exc:
            self.problem(path, f"cannot read: {exc.strerror or exc}")
            return None

    def _load_roots(self, path: Path, data: bytes | None = None) -> None:
        if data is None:
            data = self._read(path)
        if data is None:
            return
        certs: list[x509.Certificate]
        if data.lstrip().startswith(b"-----BEGIN"):
            if b"PRIVATE KEY-----" in data:
                # Never keep (or echo) key material; the operator must remove it.
                self.problem(
                    path,
                    "contains a private key; a partner folder must hold only the partner's "
                    "CA certificates: remove the key from this file",
                )
                return
            try:
                certs = x509.load_pem_x509_certificates(data)
            except ValueError as exc:
                self.problem(path, f"not a readable PEM certificate file: {exc}")
                return
        else:
            try:
                certs = [x509.load_der_x509_certificate(data)]
            except ValueError:
                self.problem(path, "neither PEM nor a DER certificate")
                return
        for index, cert in enumerate(certs):
            where = (
                f"certificate #{index + 1} ({_subject(cert)})"
                if len(certs) > 1
                else (f"certificate {_subject(cert)}")
            )
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
                is_ca = bc.ca
            except x509.ExtensionNotFound:
                is_ca = False
            except ValueError as exc:
                self.problem(path, f"{where} has malformed extensions: {exc}")
                continue
            if not is_ca:
                self.problem(
                    path,
                    f"{where} is not a CA certificate (basicConstraints CA:TRUE is "
                    "required); put the partner's root or issuing CA here, not a leaf",
                )
                continue
            if cert.not_valid_after_utc < self.now:
                self.problem(
                    path,
                    f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}; chains through "
                    "it are rejected as expired",
                    fatal=False,
                )
            if cert in self.roots:
                continue  # the same root in two files is harmless
            self.roots.append(cert)
            self.root_files.append(path)

    def _load_crls(self, path: Path, data: bytes | None = None) -> None:
        if data is None:
            data = self._read(path)
        if data is None:
            return
        crls: list[x509.CertificateRevocationList] = []
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                blocks = _PEM_CRL.findall(data)
                if not blocks:
                    self.problem(path, "PEM file without an 'X509 CRL' block")
                    return
                crls = [x509.load_pem_x509_crl(b) for b in blocks]
            else:
                crls = [x509.load_der_x509_crl(data)]
        except ValueError as exc:
            self.problem(path, f"not a readable CRL (PEM or DER): {exc}")
            return
        for crl in crls:
            self.crls.append(crl)
            self.crl_files.append(path)

    def _check_crls(self, revocation: Revocation) -> None:
        # The rules (usable, scope, deltas) live in edge.core.revocation.
        pairs = list(zip(self.crls, self.crl_files, strict=True))
        for found in crl_problems(pairs, self.roots, self.now):
            self.problem(found.path, found.message, fatal=found.fatal)
        if revocation is Revocation.REQUIRE_CRL and not self.crls:
            self.problem(
                self.folder,
                'revocation = "require-crl" but the folder has no .crl file: every chain '
                "will be rejected as crl_unavailable",
                fatal=False,
            )

    def _load_policy_toml(self, path: Path | None) -> _Settings:
        """The validated settings from `policy.toml` (defaults where absent or wrong)."""
        settings = _Settings()
        if _is_domain(self.pid):
            settings.domains = (normalize_domain(self.pid),)
        if path is None:
            if not settings.domains:
                self.problem(
                    self.folder,
                    f"folder name {self.pid!r} is not a domain name and there is no "
                    f"{POLICY_FILE} listing domains",
                )
            return settings
        raw = self._parse_toml(path)
        if raw is None:
            return settings
        return self._settings(raw, path, settings, _POLICY_KEYS)

    def _parse_toml(self, path: Path) -> dict[str, object] | None:
        try:
            with path.open("rb") as f:
                return tomllib.load(f)
        except OSError as exc:
            self.problem(path, f"cannot read: {exc.strerror or exc}")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.problem(path, f"not valid TOML: {exc}")
        return None

    def _settings(
        self,
        raw: Mapping[str, object],
        path: Path,
        settings: _Settings,
        known: tuple[str, ...],
    ) -> _Settings:
        """Validated policy settings from a parsed policy (folder or single file)."""
        for key in raw:
            if key not in known:
                self.problem(path, f"{key}: unknown key (known keys: {', '.join(known)})")
        if "domains" in raw:
            value = raw["domains"]
            if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
                self.problem(path, "domains: must be a list of strings")
            elif not value:
                self.problem(path, "domains: must not be empty")
            else:
                domains: list[str] = []
                for d in value:
                    try:
                        norm = normalize_domain(d)
                    except ValueError as exc:
                        self.problem(path, f"domains: {exc}")
                        continue
                    if norm not in domains:
                        domains.append(norm)
                settings.domains = tuple(domains)
        elif not settings.domains:
            self.problem(
                path, f"domains: missing, and the folder name {self.pid!r} is not a domain name"
            )
        if "enabled" in raw:
            if isinstance(raw["enabled"], bool):
                settings.enabled = raw["enabled"]
            else:
                self.problem(path, "enabled: must be true or false")
        if "pool" in raw:
            pool = raw["pool"]
            if isinstance(pool, str) and pool:
                settings.pool = pool
            else:
                self.problem(path, "pool: must be a non-empty string naming a [[pools]] entry")
        if "max_connections" in raw:
            limit = raw["max_connections"]
            # bool is an int in Python; `max_connections = true` is a mistake, not 1.
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
                settings.max_connections = limit
            else:
                self.problem(path, "max_connections: must be an integer >= 1")
        if "revocation" in raw:
            value = raw["revocation"]
            if isinstance(value, str) and value in _REVOCATION_VALUES:
                settings.revocation = Revocation(value)
            else:
                choices = ", ".join(f'"{r}"' for r in _REVOCATION_VALUES)
                self.problem(path, f"revocation: must be one of {choices}")
        return settings


_REVOCATION_VALUES = tuple(r.value for r in Revocation)


@dataclass
class _Settings:
    """policy.toml values while loading; defaults are DESIGN.md's."""

    domains: tuple[str, ...] = ()
    enabled: bool = True
    pool: str | None = None
    max_connections: int | None = None
    revocation: Revocation = Revocation.CRL_IF_PRESENT


def _is_domain(name: str) -> bool:
    try:
        normalize_domain(name)
    except ValueError:
        return False
    return True


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def load_policies(folder: Path, previous: PolicySnapshot | None = None) -> PolicySnapshot:
    """Load every partner folder under `folder`.

    A partner with a fatal problem is listed in `broken`. If it loaded fine in
    `previous`, its previous policy stays in `partners` (a typo during a live
    reload must not cut off a working partner); otherwise it is absent.
    Raises PolicyFolderError when `folder` itself cannot be listed.
    """
    now = _dt.datetime.now(_dt.UTC)
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        raise PolicyFolderError(f"{folder}: policies folder does not exist") from None
    except NotADirectoryError:
        raise PolicyFolderError(f"{folder}: policies path is not a folder") from None
    except OSError as exc:
        raise PolicyFolderError(
            f"{folder}: cannot read policies folder: {exc.strerror or exc}"
        ) from None
    partners: dict[str, PartnerPolicy] = {}
    problems: list[PolicyProblem] = []
    broken: set[str] = set()
    folder_ids = {p.name for p in entries if not is_ignored_name(p.name) and p.is_dir()}
    for path in entries:
        if is_ignored_name(path.name):
            continue
        if path.is_file() and path.name.endswith(SINGLE_FILE_SUFFIX):
            pid = path.name[: -len(SINGLE_FILE_SUFFIX)]
            loader = _PartnerLoader(pid, path, now)
            if pid in folder_ids:
                loader.problem(
                    path, f"partner {pid!r} is defined twice: by this file and by a folder"
                )
                policy = None
            else:
                policy = loader.load_file()
            problems.extend(loader.problems)
            if policy is not None:
                partners[policy.id] = policy
                continue
            broken.add(pid)
            if previous is not None and pid in previous.partners:
                partners[pid] = previous.partners[pid]
            continue
        if not path.is_dir():
            problems.append(
                PolicyProblem(
                    "",
                    path,
                    "ignored: only partner folders and single-file partners (ID.toml) "
                    "belong here; move this file into the partner's folder",
                    fatal=False,
                )
            )
            continue
        loader = _PartnerLoader(path.name, path, now)
        if f"{path.name}{SINGLE_FILE_SUFFIX}" in {p.name for p in entries}:
            loader.problem(
                path, f"partner {path.name!r} is defined twice: by this folder and by a file"
            )
            policy = None
        else:
            policy = loader.load()
        problems.extend(loader.problems)
        if policy is not None:
            partners[policy.id] = policy
            continue
        broken.add(path.name)
        if previous is not None and path.name in previous.partners:
            partners[path.name] = previous.partners[path.name]
    return PolicySnapshot(
        folder=folder,
        partners=types.MappingProxyType(partners),
        problems=tuple(problems),
        broken=frozenset(broken),
        loaded_at=now,
    )
