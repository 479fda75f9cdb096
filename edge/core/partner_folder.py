"""One partner's folder (or single ``ID.toml`` file) read into a `PartnerPolicy`.

Owns `PartnerLoader`: reading `policy.toml` against its keys, the root
certificates and CRLs of one partner (through `edge.core.pem`), each problem
naming its file (with a line number where the file has lines), and what is
left when only root files fail (the fail-closed rule, `edge.core.policies`).
The checks of the `policy.toml` values live in `edge.core.partner_settings`
(`parse_edge` is re-exported from there).

Must never: stop at the first problem (collect them all), keep or echo key
material, read a file except through `edge.core.folder_files.read_regular`,
or decide trust (`edge.core.trust`).
"""

from __future__ import annotations

import datetime as _dt
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from edge.core.domains import normalize_domain
from edge.core.folder_files import (
    SNIFF_BYTES,
    UTF8_BOM,
    WORLD_WRITABLE,
    Refused,
    file_kind,
    inspect_entry,
    is_ignored_name,
    is_quiet,
    read_regular,
    world_writable,
)
from edge.core.names import subject
from edge.core.partner_settings import (
    POLICY_KEYS,
    SINGLE_FILE_KEYS,
    PolicySettings,
    is_domain,
    parse_edge,
    read_settings,
)
from edge.core.pem import NO_CRL_BLOCK, has_private_key, is_pem, load_certificates, load_crls
from edge.core.policy_model import (
    CRL_SUFFIXES,
    KEY_PROBLEM,
    POLICY_FILE,
    RESERVED_PARTNER_IDS,
    ROOT_SUFFIXES,
    PartnerPolicy,
    PolicyProblem,
    Revocation,
)
from edge.core.revocation import crl_problems

__all__ = ["PartnerLoader", "parse_edge"]

# Names that hold private keys (PEM, PKCS#8, PKCS#12, Java keystores): never opened.
_KEY_SUFFIXES = frozenset({".key", ".p8", ".pk8", ".p12", ".pfx", ".jks", ".keystore"})


class PartnerLoader:
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

    def _reporter(self, path: Path) -> Callable[[str], None]:
        """A fatal problem of `path`, as `read_settings` reports it."""
        return lambda message: self.problem(path, message)

    def notice(self, path: Path, message: str) -> None:
        self.notices.append(PolicyProblem(self.pid, path, message, fatal=False))

    def load_file(self) -> PartnerPolicy | None:
        """A single-file partner: `ID.toml` with `roots` (and `crls`) as PEM text."""
        self._check_reserved()
        path = self.folder
        settings = PolicySettings()
        if is_domain(self.pid):
            settings.domains = (normalize_domain(self.pid),)
        raw = self._parse_toml(path)
        if raw is None:
            return None
        for key in SINGLE_FILE_KEYS:
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
        policy = {k: v for k, v in raw.items() if k not in SINGLE_FILE_KEYS}
        settings = read_settings(
            policy, settings, POLICY_KEYS + SINGLE_FILE_KEYS, self.pid, self._reporter(path)
        )
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
        if world_writable(self.folder):
            self.problem(self.folder, WORLD_WRITABLE, fatal=False)
        try:
            entries = sorted(self.folder.iterdir())
        except OSError as exc:
            self.problem(self.folder, f"cannot list partner folder: {exc.strerror or exc}")
            return None
        policy_path: Path | None = None
        for path in entries:
            name = path.name
            if is_ignored_name(name):
                if not is_quiet(name):
                    self.notice(path, "ignored: hidden or backup-looking name, never read")
                continue
            suffix = path.suffix.lower()
            known = name == POLICY_FILE or suffix in ROOT_SUFFIXES or suffix in CRL_SUFFIXES
            if suffix in _KEY_SUFFIXES:
                self.problem(path, KEY_PROBLEM)  # by its name: never opened
                continue
            try:
                st = inspect_entry(path, self.root)
            except Refused as exc:
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
                    f"not a regular file ({file_kind(st.st_mode)}): refused, never read; remove it",
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
            data = read_regular(path, self.root, SNIFF_BYTES)
        except (Refused, OSError):
            return False
        return has_private_key(data)

    def _finish(self, settings: PolicySettings) -> PartnerPolicy | None:
        self._check_crls(settings.revocation)
        if self.roots:
            self.partial = self._policy(settings)
        if any(p.fatal for p in self.problems):
            return None
        return self.partial

    def _policy(self, settings: PolicySettings) -> PartnerPolicy:
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
            return read_regular(path, self.root)
        except Refused as exc:
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
        data = data.removeprefix(UTF8_BOM)  # Windows editors add one to PEM text
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
            usable, findings = _check_root(cert, where, self.now)
            for message, fatal in findings:
                self.problem(path, message, fatal=fatal)
            if not usable:
                continue
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

    def _load_policy_toml(self, path: Path | None) -> PolicySettings:
        """The validated settings from `policy.toml` (defaults where absent or wrong)."""
        settings = PolicySettings()
        if is_domain(self.pid):
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
        return read_settings(raw, settings, POLICY_KEYS, self.pid, self._reporter(path))

    def _parse_toml(self, path: Path) -> dict[str, object] | None:
        data = self._read(path)
        if data is None:
            return None
        try:
            return tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.problem(path, f"not valid TOML: {exc}")
        return None


def _check_root(
    cert: x509.Certificate, where: str, now: _dt.datetime
) -> tuple[bool, list[tuple[str, bool]]]:
    """Whether a root file's certificate may be trusted, and its problems
    (message, fatal) in the order they are reported."""
    findings: list[tuple[str, bool]] = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        return False, [(f"{where} has malformed extensions: {exc}", True)]
    if not is_ca:
        return False, [
            (
                f"{where} is not a CA certificate (basicConstraints CA:TRUE is "
                "required); put the partner's root or issuing CA here, not a leaf",
                True,
            )
        ]
    if cert.not_valid_after_utc < now:
        findings.append(
            (
                f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}; chains through "
                "it are rejected as expired",
                False,
            )
        )
    if cert.not_valid_before_utc > now:
        # Like an expired root: a warning (edge check exits 1), the partner loads.
        findings.append(
            (
                f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z; "
                "chains through it are rejected as not_yet_valid until then",
                False,
            )
        )
    return True, findings
