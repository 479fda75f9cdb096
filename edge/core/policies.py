"""Partner policies: the `federation_policies/` folder read into an immutable snapshot.

Owns: the on-disk layout of partner folders (docs/partners.md, "The
policies folder"), parsing of each partner's roots, CRLs and `policy.toml`, and the
judgement of which partners are loaded, disabled or broken. One partner's
mistakes never stop another partner from loading. This module walks the
policies folder (`load_policies`) and settles conflicts; the parts live in
`edge.core.policy_model` (the values), `edge.core.partner_folder` (one
partner's files) and `edge.core.folder_files` (reading files safely), and
their public names are re-exported here.

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

Odd files (docs/partners.md, "What the edge does with odd files"): only regular files
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
import os
import stat
import types
from pathlib import Path

from edge.core.domains import normalize_domain
from edge.core.folder_files import (
    MAX_POLICY_FILE_BYTES,
    WORLD_WRITABLE,
    Refused,
    file_kind,
    inspect_entry,
    is_ignored_name,
    is_quiet,
    world_writable,
)
from edge.core.partner_folder import PartnerLoader, parse_edge
from edge.core.policy_model import (
    CRL_SUFFIXES,
    KEY_PROBLEM,
    POLICY_FILE,
    RESERVED_PARTNER_IDS,
    ROOT_SUFFIXES,
    SINGLE_FILE_SUFFIX,
    PartnerPolicy,
    PolicyFolderError,
    PolicyProblem,
    PolicySnapshot,
    Revocation,
)

# The split modules' public names stay importable from here (issue 14).
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
    if world_writable(folder):
        problems.append(PolicyProblem("", folder, WORLD_WRITABLE, fatal=False))
    kinds: dict[Path, int] = {}
    for path in entries:
        if is_ignored_name(path.name):
            if not is_quiet(path.name):
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
            kinds[path] = inspect_entry(path, root).st_mode
        except Refused as exc:
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
            loader = PartnerLoader(pid, path, now, root)
            if pid in folder_ids:
                loader.problem(
                    path, f"partner {pid!r} is defined twice: by this file and by a folder"
                )
                policy = None
            else:
                policy = loader.load_file()
        elif stat.S_ISDIR(mode):
            pid = path.name
            loader = PartnerLoader(pid, path, now, root)
            if f"{pid}{SINGLE_FILE_SUFFIX}" in names:
                loader.problem(
                    path, f"partner {pid!r} is defined twice: by this folder and by a file"
                )
                policy = None
            else:
                policy = loader.load()
        else:
            what = "" if stat.S_ISREG(mode) else f"not a regular file ({file_kind(mode)}), "
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
    loader: PartnerLoader, policy: PartnerPolicy | None, previous: PolicySnapshot | None
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
    conflict: the leaf names decide (docs/partners.md).
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
