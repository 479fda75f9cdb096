"""The `edge` command line: run, check, verify, demo (docs/reference/cli.md).

Owns: argument parsing, the offline commands `edge check` and `edge verify`
(their output and exit codes), and dispatch to `edge run` / `edge demo`.

Must never: decide trust itself (it asks `edge.core.trust`), import trio or the
gateway at module import (`edge check` and `edge verify` must work, and start
fast, without the shell), or print key material.

Exit codes: `check` 0 clean / 1 anything broken or warned about;
`verify` 0 accepted / 1 rejected / 2 usage or configuration error;
any command 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import types
from pathlib import Path
from typing import Literal, cast

from cryptography import x509

from edge.core.config import Config, ConfigError, default_config_path, load_config
from edge.core.outbound import PartnerEdgeTrust, reach
from edge.core.pem import load_certificates
from edge.core.policies import (
    PartnerPolicy,
    PolicyFolderError,
    PolicySnapshot,
    load_policies,
    resolve_domain_conflicts,
)
from edge.core.snapshot import build_snapshot, policy_folders
from edge.core.trust import PartnerTrust, Verdict
from edge.report import located_config_problem, located_policy_problem

__all__ = ["console_main", "main"]

EXIT_OK = 0
EXIT_REJECTED = 1  # verify: rejected; check: something is broken
EXIT_USAGE = 2
# Identity certificates this close to expiry are called out by `edge check`.
_EXPIRY_WARNING = _dt.timedelta(days=30)


class _UsageError(Exception):
    """A problem with what the operator asked for: exit 2 with this message."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge",
        description="Edge federation gateway: per-partner mutual TLS in, mutual TLS to a pool.",
    )
    from edge.version import version

    parser.add_argument("--version", action="version", version=f"edge {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "configuration file (default: $EDGE_CONFIG, else ./edge.toml)"

    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT, then drain")
    run.add_argument("--config", type=Path, help=config_help)
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    run.add_argument(
        "--workers",
        type=_workers_arg,
        default=1,
        metavar="N|auto",
        help="gateway processes sharing the ports (SO_REUSEPORT); auto: one per CPU",
    )

    check = sub.add_parser(
        "check",
        help="load and validate configuration and partner policies offline",
        description="Print each partner (domains, roots with expiry, CRLs with next update) "
        "and every problem. Exit 0 when everything loads cleanly, 1 otherwise.",
    )
    check.add_argument("--config", type=Path, help=config_help)
    check.add_argument(
        "--policies",
        type=Path,
        help="check this partner policies folder (without --config: only this folder)",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (partners, states, roots, problems with file and line)",
    )

    verify = sub.add_parser(
        "verify",
        help="would this certificate chain be accepted? (offline)",
        description="Exit 0 accepted, 1 rejected, 2 usage or configuration error.",
    )
    verify.add_argument("chain", type=Path, metavar="CHAIN.pem", help="leaf first, then issuers")
    source = verify.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help=config_help)
    source.add_argument("--policies", type=Path, help="partner policies folder")
    verify.add_argument("--partner", help="only this partner (its roots, for --purpose server)")
    verify.add_argument("--purpose", choices=("client", "server"), default="client")
    verify.add_argument("--name", help="host name or IP the server must be valid for")
    verify.add_argument("--at", help="verify at this time (ISO 8601; default now, UTC if no zone)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")

    demo = sub.add_parser("demo", help="a self-contained federation on loopback")
    demo.add_argument("--log-format", choices=("json", "text"), default="text")
    return parser


def _workers_arg(text: str) -> int | None:
    """`--workers`: a count >= 1, or `auto` (None: one per CPU)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one `edge` command; return its exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, a usage error is 2
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "check" and args.json:
            return _check_json(args.config, args.policies)
        if args.command == "check":
            return _check(args.config, args.policies)
        if args.command == "verify":
            return _verify(args)
        if args.command == "run":
            config_path = args.config if args.config is not None else default_config_path()
            return _run(config_path, args.log_format, args.workers)
        if args.command == "demo":
            from edge.demo import demo_command

            return demo_command(args.log_format)
    except _UsageError as exc:
        print(f"edge {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks
    return EXIT_USAGE


def _run(config_path: Path, log_format: Literal["json", "text"], workers: int | None) -> int:
    """`edge run`: one gateway in this process, or a supervisor of ``workers``.

    The trio shell is imported only here, so check and verify start without it.
    """
    from edge import workers as _workers

    listen = os.environ.get(_workers.WORKER_LISTEN_ENV)
    if listen is None:
        count = _workers.cpu_count() if workers is None else workers
        if count > 1:
            return _workers.supervise_command(config_path, log_format, count)
    from edge.run import run_command

    if listen is None:
        return run_command(config_path, log_format)
    # A worker of a supervisor: it binds where it is told and never supervises.
    where = {name: (str(h), int(p)) for name, (h, p) in json.loads(listen).items()}
    return run_command(config_path, "json", worker_listen=where)


def console_main() -> None:
    """Entry point of the `edge` console script."""
    raise SystemExit(main())


# --- edge check ------------------------------------------------------------------------


def _day(when: _dt.datetime) -> str:
    return when.strftime("%Y-%m-%d")


def _cert_line(cert: x509.Certificate, source: str, now: _dt.datetime) -> tuple[str, str | None]:
    """A printable line for a certificate, and a problem if it is expired."""
    end = cert.not_valid_after_utc
    note = ""
    problem = None
    if end < now:
        note = "  EXPIRED"
        problem = f"{source}: {cert.subject.rfc4514_string()} expired on {_day(end)}"
    elif end - now < _EXPIRY_WARNING:
        note = f"  expires in {(end - now).days} days"
    return f"{cert.subject.rfc4514_string()} ({source}) expires {_day(end)}{note}", problem


def _print_snapshot(snapshot: PolicySnapshot) -> int:
    """Print one policies folder; return the number of problems (errors + warnings)."""
    counts = snapshot.state_counts()
    total = len(set(snapshot.partners) | snapshot.broken)
    print(
        f"policies {snapshot.folder}: {total} partner(s): {counts['enabled']} enabled, "
        f"{counts['disabled']} disabled, {counts['broken']} broken"
    )
    problems = 0
    for problem in snapshot.problems_of(""):
        print(f"  {'error' if problem.fatal else 'warning'}: {located_policy_problem(problem)}")
        problems += 1
    now = _dt.datetime.now(_dt.UTC)
    for pid in sorted(set(snapshot.partners) | snapshot.broken):
        policy = snapshot.partners.get(pid)
        if pid in snapshot.broken:
            state = "BROKEN" + (" (previous policy kept)" if policy is not None else "")
        else:
            assert policy is not None
            state = "enabled" if policy.enabled else "disabled"
        print(f"partner {pid}: {state}")
        if policy is not None:
            _print_policy(policy, now)
        for problem in snapshot.problems_of(pid):
            print(f"  {'error' if problem.fatal else 'warning'}: {located_policy_problem(problem)}")
            problems += 1
    for notice in snapshot.notices:  # ignored backups and hidden names: said, not counted
        print(f"  notice: {notice}")
    return problems


def _print_policy(policy: PartnerPolicy, now: _dt.datetime) -> None:
    print(f"  domains: {', '.join(policy.domains)}")
    limit = policy.max_connections if policy.max_connections is not None else "global limit"
    pool = policy.pool or "(the listener's)"
    print(f"  pool: {pool}; max_connections: {limit}; revocation: {policy.revocation}")
    print(f"  outbound: reached by {reach(policy).line}")
    for root, path in zip(policy.roots, policy.root_files, strict=True):
        line, _ = _cert_line(root, path.name, now)
        print(f"  root {line}")  # an expired root is already a warning from the loader
    for crl, path in zip(policy.crls, policy.crl_files, strict=True):
        nxt = crl.next_update_utc
        when = _day(nxt) if nxt is not None else "never"
        stale = "  STALE" if nxt is not None and nxt < now else ""
        revoked = len(list(crl))
        print(
            f"  crl {crl.issuer.rfc4514_string()} ({path.name}) next update {when}, "
            f"{revoked} revoked{stale}"
        )


def _print_config(config: Config) -> int:
    now = _dt.datetime.now(_dt.UTC)
    problems = 0
    ident = config.identity
    print(f"config {config.path}: loaded")
    for label, certs, path in (
        ("public", ident.public_chain[:1], ident.public_cert),
        ("internal", ident.internal_chain[:1], ident.internal_cert),
    ):
        for cert in certs:
            line, problem = _cert_line(cert, path.name, now)
            print(f"  {label} certificate {line}")
            if problem is not None:
                print(f"  error: {config.path}: identity.{label}_cert: {problem}")
                problems += 1
    for root in ident.internal_root_certs:
        line, problem = _cert_line(root, "internal_roots", now)
        print(f"  internal root {line}")
        if problem is not None:
            print(f"  error: {config.path}: identity.internal_roots: {problem}")
            problems += 1
    for listener in config.listeners:
        where = f" policies {listener.policies}" if listener.policies else ""
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        target = (
            f"for members of pools {', '.join(listener.pools)} -> partners"
            if listener.mode == "outbound"
            else f"-> pool {listener.pool}"
        )
        print(
            f"  listener {listener.name}: {listener.mode} on {host}:{listener.port} {target}{where}"
        )
    for pool in config.pools.values():
        members = ", ".join(
            f"{m.host}" + (f" at {m.address}" if m.address else "") + f":{m.port}"
            for m in pool.members
        )
        print(f"  pool {pool.name}: {members}")
    if config.metrics is not None:
        print(f"  metrics on {config.metrics.host}:{config.metrics.port}")
    for warning in config.warnings:
        print(f"  warning: {warning}")
        problems += 1
    return problems


def _check_json(config_arg: Path | None, policies_arg: Path | None) -> int:
    from edge.report import check_document

    config = config_arg
    if config is None and policies_arg is None:
        config = default_config_path()
    document = check_document(config, policies_arg)
    print(json.dumps(document, indent=2, sort_keys=True))
    return EXIT_OK if document["ok"] else EXIT_REJECTED


def _check(config_arg: Path | None, policies_arg: Path | None) -> int:
    """Load like `edge run` does (edge.core.snapshot.build_snapshot) and print it."""
    problems = 0
    folders: list[Path] = []
    config: Config | None = None
    if config_arg is not None or policies_arg is None:
        path = config_arg if config_arg is not None else default_config_path()
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"config {path}: BROKEN")
            for line in exc.problems:
                print(f"  error: {located_config_problem(line, path)}")
            problems += len(exc.problems)
        else:
            problems += _print_config(config)
            folders.extend(policy_folders(config))
    if policies_arg is not None and policies_arg not in folders:
        folders.append(policies_arg)
    loaded: dict[Path, PolicySnapshot] = {}
    for folder in folders:
        try:
            loaded[folder] = load_policies(folder)
        except PolicyFolderError as exc:
            print(f"error: {exc}")
            problems += 1
    # Without a configuration (--policies alone) the folder rules still apply.
    checked = {folder: resolve_domain_conflicts(snap) for folder, snap in loaded.items()}
    if config is not None:
        # The same cross-checks `edge run` applies: what is broken here is broken there.
        snapshot = build_snapshot(config, loaded)
        for line in snapshot.problems:
            print(f"  error: {located_config_problem(line, config.path)}")
            problems += 1
        checked.update((f, t.policies) for f, t in snapshot.folders.items())
    for folder in loaded:
        problems += _print_snapshot(checked[folder])
    if problems:
        print(f"{problems} problem(s) found")
        return EXIT_REJECTED
    print("ok: everything loads cleanly")
    return EXIT_OK


# --- edge verify -----------------------------------------------------------------------


def _read_chain(path: Path) -> tuple[x509.Certificate, ...]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        certs = load_certificates(data)
    except ValueError:
        raise _UsageError(f"{path}: no readable certificate (expected PEM or DER)") from None
    return certs


def _parse_at(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise _UsageError(
            f"--at {text!r}: not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)"
        ) from None
    return when.replace(tzinfo=_dt.UTC) if when.tzinfo is None else when.astimezone(_dt.UTC)


def _load_config_for_verify(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _UsageError("configuration error:\n  " + "\n  ".join(exc.problems)) from None


def _snapshot_for_verify(args: argparse.Namespace) -> tuple[PolicySnapshot | None, Config | None]:
    config: Config | None = None
    if args.policies is not None:
        folder: Path = args.policies
    else:
        config = _load_config_for_verify(args.config or default_config_path())
        if args.purpose == "server" and args.partner is None:
            return None, config  # the configured internal_roots are all we need
        folders = list(dict.fromkeys(x.policies for x in config.listeners if x.policies))
        if not folders:
            raise _UsageError(f"{config.path}: no mtls listener names a policies folder")
        if len(folders) > 1:
            listed = ", ".join(str(f) for f in folders)
            raise _UsageError(
                f"the configuration names several policies folders ({listed}); "
                "choose one with --policies"
            )
        folder = folders[0]
    try:
        snapshot = load_policies(folder)
    except PolicyFolderError as exc:
        raise _UsageError(str(exc)) from None
    if config is not None:
        # Cross-checked as `edge run` does (a partner with an unknown pool is broken).
        snapshot = build_snapshot(config, {folder: snapshot}).folders[folder].policies
    return snapshot, config


def _only_partner(snapshot: PolicySnapshot, pid: str) -> PartnerPolicy:
    if pid in snapshot.broken:
        problems = "; ".join(str(p) for p in snapshot.problems_of(pid) if p.fatal)
        raise _UsageError(f"partner {pid} is broken: {problems}")
    policy = snapshot.partners.get(pid)
    if policy is None:
        known = ", ".join(sorted(snapshot.partners)) or "none"
        raise _UsageError(f"no partner {pid!r} in {snapshot.folder} (partners: {known})")
    return policy


def _verify(args: argparse.Namespace) -> int:
    purpose = cast(Literal["client", "server"], args.purpose)
    if purpose == "server" and not args.name:
        raise _UsageError("--purpose server needs --name HOST (the name the server must match)")
    if purpose == "client" and args.name:
        raise _UsageError("--name applies to --purpose server only")
    if purpose == "server" and args.policies is not None and args.partner is None:
        raise _UsageError("--purpose server with --policies needs --partner P (whose roots)")
    at = _parse_at(args.at)
    chain = _read_chain(args.chain)
    snapshot, config = _snapshot_for_verify(args)

    verdict: Verdict
    if purpose == "client":
        assert snapshot is not None
        if args.partner is not None:
            policy = _only_partner(snapshot, args.partner)
            snapshot = PolicySnapshot(
                folder=snapshot.folder,
                partners=types.MappingProxyType({policy.id: policy}),
                problems=(),
                broken=frozenset(),
            )
        verdict = PartnerTrust(snapshot).verify_client(chain, at=at)
    else:
        if args.partner is not None:
            # Exactly what an outbound dial to --name decides (one implementation).
            assert snapshot is not None
            _only_partner(snapshot, args.partner)
            verdict = PartnerEdgeTrust(snapshot).verify(args.partner, chain, args.name, at=at)
        else:
            assert config is not None
            # The very decision the gateway's upstream dial takes (edge.pools).
            verdict = build_snapshot(config, {}).server_trust.verify_server(chain, args.name, at=at)

    if args.json:
        print(json.dumps({"purpose": purpose, **verdict.as_dict()}, sort_keys=True))
    else:
        print(verdict.line)
    return EXIT_OK if verdict.accepted else EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
