"""`edge check --json`: the whole check as one JSON document.

Owns the document's shape (docs/operations.md, "`edge check --json`"): partners and their
state, roots and CRLs with their dates, the edge's own certificates, and every
problem as ``{severity, file, line, column, key, partner, message}`` with the
line (and column) wherever the file has lines: TOML syntax errors carry them
from tomllib, and a problem about a key is located at that key's line.

Must never: decide trust (it reads what ``edge.core.config`` and
``edge.core.policies`` loaded), print key material or passphrases, or import
trio or the gateway.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from edge.core.config import Config, ConfigError, load_config
from edge.core.policies import (
    PartnerPolicy,
    PolicyFolderError,
    PolicyProblem,
    PolicySnapshot,
    load_policies,
)
from edge.version import version

__all__ = ["check_document", "locate_key", "toml_position"]

_TOML_AT = re.compile(r"\(at line (\d+), column (\d+)\)")
# "identity.public_key", "[identity]", "listeners[0] (federation).address"...
_KEY = re.compile(
    r"^\[{0,2}[a-z_]+\]{0,2}(?:\[\d+\])?(?: \([^)]*\))?"
    r"(?:\.[a-z_]+(?:\[\d+\])?(?: \([^)]*\))?)*$"
)
_PART = re.compile(r"([a-z_]+)(?:\[(\d+)\])?")
_MAX_SCAN_BYTES = 1 << 20  # a configuration file is small; never read more to find a line


@dataclass(frozen=True)
class _Problem:
    severity: str  # "error" or "warning"
    file: str | None
    message: str
    key: str | None = None
    partner: str | None = None
    line: int | None = None
    column: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "key": self.key,
            "partner": self.partner,
            "message": self.message,
        }


def toml_position(message: str) -> tuple[int, int] | None:
    """(line, column) from a tomllib error message, if it has them."""
    found = _TOML_AT.search(message)
    return (int(found[1]), int(found[2])) if found else None


def _lines(path: Path) -> list[str]:
    try:
        with path.open("rb") as f:
            return f.read(_MAX_SCAN_BYTES).decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def locate_key(lines: list[str], key: str) -> int | None:
    """The 1-based line that sets ``key`` (a problem's dotted key), or None."""
    head, sep, tail = key.partition(").")  # "listeners[0] (name).address"
    text = f"{head.split(' (')[0]}.{tail}" if sep else key.split(" (")[0]
    parts = [(m[1], int(m[2]) if m[2] else None) for m in _PART.finditer(text)]
    if not parts:
        return None
    (first, index), rest = parts[0], parts[1:]
    start = 0
    header = None
    seen = -1
    for number, text in enumerate(lines):
        stripped = text.strip()
        if index is not None and re.match(rf"^\[\[\s*{first}\s*\]\]", stripped):
            seen += 1
            if seen == index:
                header, start = number, number + 1
                break
        elif index is None and re.match(rf"^\[\s*{first}\s*\]", stripped):
            header, start = number, number + 1
            break
    if header is None:
        wanted = first
        start = 0
    elif not rest:
        return header + 1
    else:
        wanted = rest[0][0]
    for number in range(start, len(lines)):
        stripped = lines[number].strip()
        if header is not None and stripped.startswith("["):
            break  # the next table: the key is not written (a missing key)
        if re.match(rf"^{wanted}\s*=", stripped):
            return number + 1
    return header + 1 if header is not None else None


def _config_problem(text: str, config_path: Path, severity: str = "error") -> _Problem:
    prefix = f"{config_path}: "
    body = text[len(prefix) :] if text.startswith(prefix) else text
    key, sep, rest = body.partition(": ")
    line = column = None
    position = toml_position(body)
    if position is not None:
        line, column = position
        return _Problem(severity, str(config_path), body, line=line, column=column)
    if sep and _KEY.match(key):
        line = locate_key(_lines(config_path), key)
        return _Problem(severity, str(config_path), rest, key=key, line=line)
    return _Problem(severity, str(config_path), body)


def _policy_problem(path: Path, message: str, partner: str, fatal: bool) -> _Problem:
    severity = "error" if fatal else "warning"
    position = toml_position(message)
    if position is not None:
        return _Problem(severity, str(path), message, None, partner or None, *position)
    key, sep, _ = message.partition(": ")
    line = None
    if sep and path.suffix == ".toml" and re.fullmatch(r"[a-z_]+", key):
        line = locate_key(_lines(path), key)
    return _Problem(severity, str(path), message, key if line else None, partner or None, line)


def _where(problem: _Problem) -> str | None:
    if problem.file is None or problem.line is None:
        return None
    column = f":{problem.column}" if problem.column is not None else ""
    return f"{problem.file}:{problem.line}{column}"


def located_config_problem(text: str, config_path: Path) -> str:
    """A configuration problem as ``file:line: ...`` (the editors' and compilers'
    form) when its key or TOML position has a line; the text unchanged otherwise."""
    where = _where(_config_problem(text, config_path))
    if where is None:
        return text
    prefix = f"{config_path}: "
    return f"{where}: {text[len(prefix) :] if text.startswith(prefix) else text}"


def located_policy_problem(problem: PolicyProblem) -> str:
    """A partner-folder problem as ``file:line: message`` when a line is known."""
    found = _policy_problem(problem.path, problem.message, problem.partner, problem.fatal)
    where = _where(found)
    return str(problem) if where is None else f"{where}: {problem.message}"


def _when(moment: _dt.datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _cert(cert: x509.Certificate, file: Path, now: _dt.datetime) -> dict[str, Any]:
    end = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "file": str(file),
        "not_before": _when(cert.not_valid_before_utc),
        "not_after": _when(end),
        "expired": end < now,
        "days_left": (end - now).days,
    }


def _partner(
    pid: str, snapshot: PolicySnapshot, policy: PartnerPolicy | None, now: _dt.datetime
) -> dict[str, Any]:
    broken = pid in snapshot.broken
    doc: dict[str, Any] = {
        "id": pid,
        "policies": str(snapshot.folder),
        "state": "broken" if broken else ("enabled" if policy and policy.enabled else "disabled"),
        "previous_policy_kept": broken and policy is not None,
    }
    if policy is not None:
        doc.update(
            domains=list(policy.domains),
            enabled=policy.enabled,
            pool=policy.pool,
            max_connections=policy.max_connections,
            revocation=str(policy.revocation),
            roots=[_cert(r, p, now) for r, p in zip(policy.roots, policy.root_files, strict=True)],
            crls=[
                {
                    "issuer": crl.issuer.rfc4514_string(),
                    "file": str(path),
                    "next_update": _when(crl.next_update_utc),
                    "stale": crl.next_update_utc is not None and crl.next_update_utc < now,
                    "revoked": len(list(crl)),
                }
                for crl, path in zip(policy.crls, policy.crl_files, strict=True)
            ],
        )
    return doc


def _config_doc(config: Config, now: _dt.datetime, problems: list[_Problem]) -> dict[str, Any]:
    ident = config.identity
    roots_file = ident.internal_roots[0] if len(ident.internal_roots) == 1 else None
    certs = []
    for role, chain, path in (
        ("public", ident.public_chain[:1], ident.public_cert),
        ("internal", ident.internal_chain[:1], ident.internal_cert),
        # Several root files may each hold several roots: name the file when there is one.
        *(("internal_root", (r,), roots_file or config.path) for r in ident.internal_root_certs),
    ):
        for cert in chain:
            entry = {"role": role, **_cert(cert, path, now)}
            certs.append(entry)
            if entry["expired"]:
                key = (
                    "identity.internal_roots"
                    if role == "internal_root"
                    else f"identity.{role}_cert"
                )
                problems.append(
                    _Problem(
                        "error",
                        str(config.path),
                        f"{entry['subject']} expired on {entry['not_after']}",
                        key=key,
                        line=locate_key(_lines(config.path), key),
                    )
                )
    for warning in config.warnings:
        problems.append(_Problem("warning", warning.split(": ", 1)[0], warning.split(": ", 1)[1]))
    return {
        "path": str(config.path),
        "state": "loaded",
        "certificates": certs,
        "listeners": [
            {
                "name": x.name,
                "mode": x.mode,
                "address": f"[{x.host}]:{x.port}" if ":" in x.host else f"{x.host}:{x.port}",
                "pool": x.pool,
                "policies": str(x.policies) if x.policies else None,
            }
            for x in config.listeners
        ],
        "pools": {
            p.name: {"members": [m.host for m in p.members], "dns_srv": p.dns_srv}
            for p in config.pools.values()
        },
        "metrics": (
            None
            if config.metrics is None
            else {
                "address": f"{config.metrics.host}:{config.metrics.port}",
                "ready_requires": config.metrics.ready_requires,
            }
        ),
    }


def check_document(config_path: Path | None, policies: Path | None) -> dict[str, Any]:
    """What ``edge check`` finds, as one JSON-ready document (``ok``: exit 0)."""
    now = _dt.datetime.now(_dt.UTC)
    problems: list[_Problem] = []
    folders: list[Path] = []
    pool_names: set[str] | None = None
    config_doc: dict[str, Any] | None = None
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            config_doc = {"path": str(config_path), "state": "broken"}
            problems.extend(_config_problem(p, config_path) for p in exc.problems)
        else:
            config_doc = _config_doc(config, now, problems)
            pool_names = set(config.pools)
            for listener in config.listeners:
                if listener.policies is not None and listener.policies not in folders:
                    folders.append(listener.policies)
    if policies is not None and policies not in folders:
        folders.append(policies)
    partners: list[dict[str, Any]] = []
    folder_docs: list[dict[str, Any]] = []
    for folder in folders:
        try:
            snapshot = load_policies(folder)
        except PolicyFolderError as exc:
            folder_docs.append({"folder": str(folder), "state": "broken"})
            problems.append(_Problem("error", str(folder), str(exc)))
            continue
        folder_docs.append({"folder": str(folder), "state": "loaded", **snapshot.state_counts()})
        for problem in snapshot.problems:
            problems.append(
                _policy_problem(problem.path, problem.message, problem.partner, problem.fatal)
            )
        for pid in sorted(set(snapshot.partners) | snapshot.broken):
            policy = snapshot.partners.get(pid)
            partners.append(_partner(pid, snapshot, policy, now))
            if (
                policy is not None
                and policy.pool is not None
                and pool_names is not None
                and policy.pool not in pool_names
            ):
                path = policy.folder / "policy.toml"
                known = ", ".join(sorted(pool_names)) or "none"
                problems.append(
                    _Problem(
                        "error",
                        str(path),
                        f"no pool named {policy.pool!r} in the configuration (pools: {known})",
                        key="pool",
                        partner=pid,
                        line=locate_key(_lines(path), "pool"),
                    )
                )
    return {
        "ok": not problems,
        "version": version(),
        "checked_at": _when(now),
        "config": config_doc,
        "policies": folder_docs,
        "partners": partners,
        "problems": [p.as_dict() for p in problems],
    }
