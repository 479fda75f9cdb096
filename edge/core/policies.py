"""Partner policies: the `federation_policies/` folder read into an immutable snapshot.

Owns: the on-disk layout of partner folders (DESIGN.md, "Partner policy
folder"), parsing of each partner's roots, CRLs and `policy.toml`, and the
judgement of which partners are loaded, disabled or broken. One partner's
mistakes never stop another partner from loading.

Must never: decide whether a certificate chain is accepted (that is
`edge.core.trust`), touch sockets or import trio, mutate a snapshot once built,
open anything but a regular file, read through a symlink that leaves the
policies folder, or echo key material.
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
  certificate, private key material anywhere in the folder, a FIFO, socket,
  device, oversized file or outside symlink where a root, CRL or policy.toml
  is expected, a CRL file that does not parse, no usable root at all;
- warnings (the partner still loads): a file with an extension we do not read
  (`root.pem.txt`: a typo we refuse to ignore silently), a sub-folder, a root
  already expired or not valid yet, `require-crl` with no CRL, a world-writable
  policies or partner folder, and every CRL problem of
  `edge.core.revocation.crl_problems`: an unusable CRL (no nextUpdate, unknown
  critical extension, critical CRLNumber, indirect, signature or cRLSign
  failing against a root in the folder), a stale or not yet valid CRL, a delta
  without its base. Such a CRL never counts as "not revoked": the certificates
  it covers are refused as `crl_unavailable`, the others still work.
`edge check` reports both and exits 1 on either. Notices (an ignored backup
copy or hidden entry) are printed but do not fail `edge check`.

Odd files (README, "What the edge does with odd files"): only regular files
are opened, non-blocking, refused above `MAX_POLICY_FILE_BYTES`, and a FIFO,
socket or device is a problem naming it, never a hang. A symlink whose target
lies outside the policies folder is refused (the Kubernetes `..data` layout
stays inside it). Hidden and backup-looking names are ignored with a notice.

The fail-closed rule on reload: a change that could withdraw trust and cannot
be read withdraws it (policy.toml, CRLs, the folder itself, no root left: the
partner is broken and not trusted); a change that could add trust and cannot
be read adds nothing (an unreadable root file: the partner keeps the roots it
can read, with its new settings, and is reported broken until fixed). A new
partner is all or nothing. Two enabled partners claiming one domain: the one
that held it first keeps it (`resolve_domain_conflicts`).
"""

from __future__ import annotations

import datetime as _dt
import enum
import ipaddress
import os
import stat
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from edge.core.config import parse_address
from edge.core.domains import normalize_domain
from edge.core.names import subject
from edge.core.pem import NO_CRL_BLOCK, has_private_key, is_pem, load_certificates, load_crls
from edge.core.revocation import crl_problems

__all__ = [
    "CRL_SUFFIXES",
    "KEY_PROBLEM",
    "MAX_POLICY_FILE_BYTES",
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
    "parse_edge",
    "resolve_domain_conflicts",
]

ROOT_SUFFIXES = frozenset({".pem", ".crt", ".cer"})
CRL_SUFFIXES = frozenset({".crl"})
POLICY_FILE = "policy.toml"
# "unknown" is the metrics label for connections that matched no partner; a partner
# with that id would make two different things indistinguishable on dashboards.
RESERVED_PARTNER_IDS = frozenset({"unknown"})

_POLICY_KEYS = ("domains", "enabled", "pool", "max_connections", "revocation", "edge")
# A single-file partner (`ID.toml` at the top of the policies folder) adds these.
_SINGLE_FILE_KEYS = ("roots", "crls")
SINGLE_FILE_SUFFIX = ".toml"
# Certificates and CRLs; a large public CA's CRL stays well under this. Anything
# bigger is not ours, and reading it would stall a reload.
MAX_POLICY_FILE_BYTES = 64 * 1024 * 1024
# Unknown files are read only to spot key material; a key is small.
_SNIFF_BYTES = 1024 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"
# Names that hold private keys (PEM, PKCS#8, PKCS#12, Java keystores): never opened.
_KEY_SUFFIXES = frozenset({".key", ".p8", ".pk8", ".p12", ".pfx", ".jks", ".keystore"})
KEY_PROBLEM = "a private key does not belong in a partner folder: remove it"
# Backup copies editors, cp and package managers leave behind (`cp -r x x.bak`).
_BACKUP_SUFFIXES = (".bak", ".old", ".orig", ".swp", ".swo", ".tmp")


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
    # Outbound: the partner's edge as (host, port), like Lync's ProxyFqdn; None: DNS SRV.
    edge: tuple[str, int] | None = None


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
    # Ignored entries (backup copies, hidden names): said, but not problems.
    notices: tuple[PolicyProblem, ...] = ()

    def new_notices(self, previous: PolicySnapshot | None) -> tuple[PolicyProblem, ...]:
        """Notices not already in ``previous``: log these, so each is said once."""
        seen = set(previous.notices) if previous is not None else set()
        return tuple(n for n in self.notices if n not in seen)

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
    """Hidden entries, READMEs and backup-looking names: never loaded.

    Hidden covers editor files (`.#x`, `.x.swp`) and Kubernetes' `..data` links;
    backup-looking is `x~` and `x.bak`, `.old`, `.orig`, `.swp`, `.swo`, `.tmp`
    (files and folders alike: `cp -r fabrikam.com fabrikam.com.bak`).
    """
    lower = name.lower()
    return (
        name.startswith(".")
        or name.upper().startswith("README")
        or name.endswith("~")
        or lower.endswith(_BACKUP_SUFFIXES)
    )


def _is_quiet(name: str) -> bool:
    """Ignored without a notice: READMEs and the kubelet's own `..` entries."""
    return name.startswith("..") or name.upper().startswith("README")


class _Refused(Exception):
    """A policy file we will not read; the message says why."""


def _printable(text: str) -> str:
    """A file-system name fit for a one-line message (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    return "not a file"


def _inspect(path: Path, root: str) -> os.stat_result:
    """The stat of ``path``, refusing a symlink out of ``root``. Opens nothing."""
    real = os.path.realpath(path)
    if not _inside(real, root):
        raise _Refused(
            f"a symbolic link leading outside the policies folder (to {_printable(real)}): "
            "refused; copy what you need into the folder"
        )
    return os.stat(real)


def _read_regular(path: Path, root: str, limit: int = MAX_POLICY_FILE_BYTES) -> bytes:
    """The bytes of a regular file inside ``root``, without a UTF-8 BOM.

    Never blocks: the type is checked before opening (a FIFO is never opened),
    the open is non-blocking and does not follow a symlink swapped in since,
    and `fstat` on the open file decides. Raises `_Refused` or OSError.
    """
    st = _inspect(path, root)
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"not a regular file ({_kind(st.st_mode)}): refused, never read; remove it")
    real = os.path.realpath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    fd = os.open(real, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(
                f"not a regular file ({_kind(st.st_mode)}): refused, never read; remove it"
            )
        if st.st_size > limit:
            raise _Refused(f"too large ({st.st_size} bytes, limit {limit}): refused")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # bounded even if the file grows while we read
            chunk = os.read(fd, min(1024 * 1024, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _Refused(f"too large (over {limit} bytes): refused")
    finally:
        os.close(fd)
    return b"".join(chunks).removeprefix(_UTF8_BOM)


def _world_writable(folder: Path) -> bool:
    try:
        return bool(os.stat(folder).st_mode & stat.S_IWOTH)
    except OSError:
        return False


_WORLD_WRITABLE = (
    "world-writable: anyone on this host can add or change trust here; "
    "chmod o-w (owned by root or the edge's admin user)"
)


class _PartnerLoader:
    """Reads one partner folder, collecting problems instead of stopping at the first."""

    def __init__(self, pid: str, folder: Path, now: _dt.datetime, root: str) -> None:
        self.pid = pid
        self.folder = folder
        self.now = now
        self.root = root  # real path of the policies folder: nothing is read outside it
        self.problems: list[PolicyProblem] = []
        self.notices: list[PolicyProblem] = []
        # A fatal problem in a file that could withdraw trust (policy.toml, a CRL,
        # the folder itself): on reload the partner is not kept in any form.
        self.withdraws = False
        # What the readable files say (roots it could read, its settings), built
        # even when something is broken: a reload may keep it (see `_settle`).
        self.partial: PartnerPolicy | None = None
        self.roots: list[x509.Certificate] = []
        self.root_files: list[Path] = []
        self.crls: list[x509.CertificateRevocationList] = []
        self.crl_files: list[Path] = []
        self.unknown_files: list[Path] = []

    def problem(self, path: Path, message: str, *, fatal: bool = True) -> None:
        self.problems.append(PolicyProblem(self.pid, path, message, fatal))
        if fatal and not self._adds_only(path):
            self.withdraws = True

    def _adds_only(self, path: Path) -> bool:
        """True when ``path`` can only add trust: a root file (or a stray file) in
        a partner folder. Not policy.toml, a CRL, the folder, or a single-file
        partner (its one file holds the policy)."""
        return (
            path != self.folder
            and path.parent == self.folder
            and path.name != POLICY_FILE
            and path.suffix.lower() not in CRL_SUFFIXES
        )

    def notice(self, path: Path, message: str) -> None:
        self.notices.append(PolicyProblem(self.pid, path, message, fatal=False))

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
        if _world_writable(self.folder):
            self.problem(self.folder, _WORLD_WRITABLE, fatal=False)
        try:
            entries = sorted(self.folder.iterdir())
        except OSError as exc:
            self.problem(self.folder, f"cannot list partner folder: {exc.strerror or exc}")
            return None
        policy_path: Path | None = None
        for path in entries:
            name = path.name
            if is_ignored_name(name):
                if not _is_quiet(name):
                    self.notice(path, "ignored: hidden or backup-looking name, never read")
                continue
            suffix = path.suffix.lower()
            known = name == POLICY_FILE or suffix in ROOT_SUFFIXES or suffix in CRL_SUFFIXES
            if suffix in _KEY_SUFFIXES:
                self.problem(path, KEY_PROBLEM)  # by its name: never opened
                continue
            try:
                st = _inspect(path, self.root)
            except _Refused as exc:
                self.problem(path, str(exc), fatal=known)
                continue
            except OSError as exc:  # a dangling link, or gone since the listing
                self.problem(path, f"cannot read: {exc.strerror or exc}", fatal=known)
                continue
            if stat.S_ISDIR(st.st_mode):
                self.problem(
                    path,
                    "sub-folders are not read; put roots and CRLs directly in the partner folder",
                    fatal=False,
                )
                continue
            if not stat.S_ISREG(st.st_mode):
                # Never opened: opening a FIFO would block every reload for good.
                self.problem(
                    path,
                    f"not a regular file ({_kind(st.st_mode)}): refused, never read; remove it",
                    fatal=known,
                )
                continue
            if name == POLICY_FILE:
                policy_path = path
            elif suffix in ROOT_SUFFIXES:
                self._load_roots(path)
            elif suffix in CRL_SUFFIXES:
                self._load_crls(path)
            elif self._holds_key(path):
                self.problem(path, KEY_PROBLEM)
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

    def _holds_key(self, path: Path) -> bool:
        """Whether a file of unknown type holds PEM key material (bounded read)."""
        try:
            data = _read_regular(path, self.root, _SNIFF_BYTES)
        except (_Refused, OSError):
            return False
        return has_private_key(data)

    def _finish(self, settings: _Settings) -> PartnerPolicy | None:
        self._check_crls(settings.revocation)
        if self.roots:
            self.partial = self._policy(settings)
        if any(p.fatal for p in self.problems):
            return None
        return self.partial

    def _policy(self, settings: _Settings) -> PartnerPolicy:
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
            edge=settings.edge,
        )

    def _read(self, path: Path) -> bytes | None:
        """The file's bytes (UTF-8 BOM stripped), or None after reporting why not."""
        try:
            return _read_regular(path, self.root)
        except _Refused as exc:
            self.problem(path, str(exc))
        except OSError as exc:
            self.problem(path, f"cannot read: {exc.strerror or exc}")
        return None

    def _load_roots(self, path: Path, data: bytes | None = None) -> None:
        if data is None:
            data = self._read(path)
        if data is None:
            return
        certs: list[x509.Certificate]
        data = data.removeprefix(_UTF8_BOM)  # Windows editors add one to PEM text
        if is_pem(data):
            if has_private_key(data):
                # Never keep (or echo) key material; the operator must remove it.
                self.problem(
                    path,
                    f"contains a private key, and {KEY_PROBLEM} (a partner folder holds "
                    "only the partner's CA certificates)",
                )
                return
            try:
                certs = list(load_certificates(data))
            except ValueError as exc:
                self.problem(path, f"not a readable PEM certificate file: {exc}")
                return
        else:
            try:
                certs = list(load_certificates(data))
            except ValueError:
                self.problem(path, "neither PEM nor a DER certificate")
                return
        for index, cert in enumerate(certs):
            where = (
                f"certificate #{index + 1} ({subject(cert, full=True)})"
                if len(certs) > 1
                else (f"certificate {subject(cert, full=True)}")
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
            if cert.not_valid_before_utc > self.now:
                # Like an expired root: a warning (edge check exits 1), the partner loads.
                self.problem(
                    path,
                    f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z; "
                    "chains through it are rejected as not_yet_valid until then",
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
        try:
            crls = load_crls(data)
        except ValueError as exc:
            if str(exc) == NO_CRL_BLOCK:
                self.problem(path, NO_CRL_BLOCK)
                return
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
        data = self._read(path)
        if data is None:
            return None
        try:
            return tomllib.loads(data.decode("utf-8"))
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
        if "edge" in raw:
            try:
                settings.edge = parse_edge(raw["edge"])
            except ValueError as exc:
                self.problem(path, f"edge: {exc}")
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
    edge: tuple[str, int] | None = None


def parse_edge(value: object) -> tuple[str, int]:
    """`edge = "sip.fabrikam.com:5061"` (or "[v6]:port") -> (host, port), the host a
    lowercase DNS name or an IP address. Raises ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError('must be "host:port", e.g. "sip.fabrikam.com:5061"')
    host, port = parse_address(value, allow_any_port=False)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    try:
        return normalize_domain(host), port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc} (a host name or IP address, then :port)") from None


def _is_domain(name: str) -> bool:
    try:
        normalize_domain(name)
    except ValueError:
        return False
    return True


def load_policies(folder: Path, previous: PolicySnapshot | None = None) -> PolicySnapshot:
    """Load every partner folder under `folder`.

    A partner with a fatal problem is listed in `broken`. On a reload (it is in
    `previous`), the fail-closed rule decides what stays trusted: if the
    problem is in a file that could withdraw trust (policy.toml, a CRL, the
    folder itself, or no root left) the partner is absent; if it is only in
    root files (a half-copied new root), the partner stays, built from the
    files that do read, with its new settings. A new partner is all or nothing.
    Two enabled partners claiming one domain: see `resolve_domain_conflicts`.
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
    # The folder itself may be a link (/etc/edge/policies -> /srv/...); links
    # inside it must stay inside its real path (Kubernetes' `..data` does).
    root = os.path.realpath(folder)
    partners: dict[str, PartnerPolicy] = {}
    problems: list[PolicyProblem] = []
    notices: list[PolicyProblem] = []
    broken: set[str] = set()
    if _world_writable(folder):
        problems.append(PolicyProblem("", folder, _WORLD_WRITABLE, fatal=False))
    kinds: dict[Path, int] = {}
    for path in entries:
        if is_ignored_name(path.name):
            if not _is_quiet(path.name):
                notices.append(
                    PolicyProblem(
                        "",
                        path,
                        "ignored: hidden or backup-looking name, never loaded as a partner",
                        fatal=False,
                    )
                )
            continue
        try:
            kinds[path] = _inspect(path, root).st_mode
        except _Refused as exc:
            pid = path.name.removesuffix(SINGLE_FILE_SUFFIX) if path.is_file() else path.name
            problems.append(PolicyProblem(pid, path, str(exc)))
            broken.add(pid)  # partner-level: withdrawn, whatever `previous` held
        except OSError as exc:
            problems.append(
                PolicyProblem("", path, f"cannot read: {exc.strerror or exc}", fatal=False)
            )
    names = {p.name for p in kinds}
    folder_ids = {p.name for p, mode in kinds.items() if stat.S_ISDIR(mode)}
    for path, mode in kinds.items():
        if stat.S_ISREG(mode) and path.name.endswith(SINGLE_FILE_SUFFIX):
            pid = path.name[: -len(SINGLE_FILE_SUFFIX)]
            loader = _PartnerLoader(pid, path, now, root)
            if pid in folder_ids:
                loader.problem(
                    path, f"partner {pid!r} is defined twice: by this file and by a folder"
                )
                policy = None
            else:
                policy = loader.load_file()
        elif stat.S_ISDIR(mode):
            pid = path.name
            loader = _PartnerLoader(pid, path, now, root)
            if f"{pid}{SINGLE_FILE_SUFFIX}" in names:
                loader.problem(
                    path, f"partner {pid!r} is defined twice: by this folder and by a file"
                )
                policy = None
            else:
                policy = loader.load()
        else:
            what = "" if stat.S_ISREG(mode) else f"not a regular file ({_kind(mode)}), "
            problems.append(
                PolicyProblem(
                    "",
                    path,
                    f"ignored: {what}only partner folders and single-file partners (ID.toml) "
                    "belong here; move this file into the partner's folder",
                    fatal=False,
                )
            )
            continue
        problems.extend(loader.problems)
        notices.extend(loader.notices)
        kept = _settle(loader, policy, previous)
        if policy is None:
            broken.add(pid)
        if kept is not None:
            partners[pid] = kept
    return PolicySnapshot(
        folder=folder,
        partners=types.MappingProxyType(partners),
        problems=tuple(problems),
        broken=frozenset(broken),
        loaded_at=now,
        notices=tuple(notices),
    )


def _settle(
    loader: _PartnerLoader, policy: PartnerPolicy | None, previous: PolicySnapshot | None
) -> PartnerPolicy | None:
    """What stays trusted of one partner: the fail-closed rule (module docstring)."""
    if policy is not None:
        return policy
    if previous is None or loader.pid not in previous.partners or loader.withdraws:
        return None  # new partners are all or nothing; unreadable withdrawals withdraw
    return loader.partial  # only root files failed: they add nothing, the rest stands


def resolve_domain_conflicts(
    snapshot: PolicySnapshot, previous: PolicySnapshot | None = None
) -> PolicySnapshot:
    """``snapshot`` with each domain held by at most one enabled partner.

    Pure (no I/O, inputs untouched) and idempotent. For every domain that
    several enabled partners of ``snapshot.partners`` list, the holder is the
    partner that held it in ``previous`` (an enabled partner listing it there),
    else the alphabetically first id. Every other claimant loses: it leaves
    `partners`, joins `broken`, and gets a fatal problem naming both folders;
    the holder gets a warning naming the loser. Disabled partners claim nothing
    (they are not trusted). One root shared by several partners is not a
    conflict: the leaf names decide (DESIGN.md).
    """
    claims: dict[str, list[str]] = {}
    for pid in sorted(snapshot.partners):
        policy = snapshot.partners[pid]
        if policy.enabled:
            for domain in policy.domains:
                claims.setdefault(domain, []).append(pid)
    held: dict[str, str] = {}
    if previous is not None:
        for pid in sorted(previous.partners, reverse=True):  # first id wins a tie
            old = previous.partners[pid]
            if old.enabled:
                for domain in old.domains:
                    held[domain] = pid
    losers: set[str] = set()
    problems: list[PolicyProblem] = []
    for domain, pids in sorted(claims.items()):
        if len(pids) < 2:
            continue
        holder = held.get(domain)
        first = holder in pids
        winner = holder if holder is not None and first else pids[0]
        why = "held it first" if first else "is alphabetically first"
        win = snapshot.partners[winner]
        for pid in pids:
            if pid == winner:
                continue
            losers.add(pid)
            loser = snapshot.partners[pid]
            problems.append(
                PolicyProblem(
                    pid,
                    loser.folder,
                    f"domain {domain} is also claimed by partner {winner!r} ({win.folder}), "
                    f"which keeps it ({why}); this partner is not trusted until one of the "
                    "two drops the domain",
                )
            )
            problems.append(
                PolicyProblem(
                    winner,
                    win.folder,
                    f"domain {domain} is also claimed by partner {pid!r} ({loser.folder}), "
                    "which is refused until one of the two drops the domain",
                    fatal=False,
                )
            )
    if not losers:
        return snapshot
    kept = {pid: p for pid, p in snapshot.partners.items() if pid not in losers}
    return PolicySnapshot(
        folder=snapshot.folder,
        partners=types.MappingProxyType(kept),
        problems=snapshot.problems + tuple(problems),
        broken=snapshot.broken | losers,
        loaded_at=snapshot.loaded_at,
        notices=snapshot.notices,
    )
