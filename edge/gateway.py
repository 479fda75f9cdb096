"""The gateway: listeners, one task per connection, upstream selection, relay.

Owns the life of a connection, from accept to exactly one log event at its
end. It decides nothing about trust itself: "who is this partner and may it
come in" is ``edge.core.trust`` (the core), and "is this pool member who the
topology says" is the TLS client's verification against the internal roots
plus the member's topology host name. This module only moves bytes, enforces
time and count limits, and reports.

Life of a partner connection (mode = "mtls"):

1. accept; refuse at once (``over_limit``) when the gateway is full;
2. TLS handshake, then ``PartnerTrust.verify_client`` on the chain the peer
   sent, both inside one ``handshake_timeout_s`` cancel scope. No application
   byte is read before the verdict;
3. pick a member of the partner's pool (round robin), connect, MTLS handshake
   presenting the internal certificate, verify the member's chain against
   ``internal_roots`` and its topology ``host``; a member that fails is
   skipped; no member -> ``no_upstream`` (or ``upstream_untrusted`` when a
   member presented a certificate we must not trust). Only then is the
   partner's stream read;
4. relay both ways, one bounded chunk in flight per direction (so a slow side
   slows the other through TCP back-pressure instead of growing memory),
   propagating close_notify as half-close, until both directions ended, an
   error, ``idle_timeout_s`` without a byte either way, or the drain deadline;
5. one ``connection_closed`` (or ``connection_rejected``) event.

Structured concurrency: ``Gateway.run`` owns one nursery for the metrics
endpoint and one for connections; accept loops live in a cancel scope that
shutdown cancels first (stop accepting), then connections get
``drain_timeout_s`` to finish before their nursery is cancelled.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import time
from collections import Counter as _Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

from edge.core.config import Config, ConfigError, Limits, Listener, load_config
from edge.core.limits import SourceLimits
from edge.core.policies import PartnerPolicy, PolicyFolderError, PolicySnapshot, load_policies
from edge.core.proxy_protocol import ProxyInfo
from edge.core.reasons import Reason
from edge.core.snapshot import Snapshot, build_snapshot, carry_running, diff, policy_folders
from edge.crlfetch import CrlFetcher
from edge.logs import EventLog, LogFormat
from edge.metrics import UNKNOWN_PARTNER, Metrics, serve_metrics
from edge.pools import Lease, PoolSet, UpstreamUnavailable, proxy_info
from edge.tls import TLSError, TLSStream, TLSTruncatedError
from edge.tls import client_context as make_client_context
from edge.tls import server_context as make_server_context
from edge.watch import Fingerprint, fingerprint

__all__ = ["Gateway", "StartupError", "run_command"]

# One chunk in flight per direction: the relay's memory bound.
RELAY_CHUNK = 128 * 1024
# Log fields an unauthenticated peer can fill are clipped: a stranger's 80 kB
# subject must not become a 240 kB log line per handshake.
_MAX_SUBJECT = 512
_MAX_DETAIL = 2048
# Longest a relayed connection spends closing both of its streams.
_CLOSE_BUDGET_S = 2.0
# OpenSSL's reason when a required client certificate was not sent.
_NO_PEER_CERT = "peer did not return a certificate"


class StartupError(Exception):
    """The gateway cannot start (bind failure, unreadable policies folder)."""


@dataclass
class _Conn:
    """What the final log line of one connection says."""

    listener: str
    peer: str
    started: float
    partner: str | None = None
    leaf_subject: str | None = None
    fingerprint_sha256: str | None = None
    tls_version: str | None = None
    member: str | None = None
    bytes_from_partner: int = 0
    bytes_to_partner: int = 0
    end: str | None = None
    detail: str = ""
    first_eof: str | None = None
    reported: bool = False  # its one final event has been logged
    # The chain the partner sent, kept to re-authorize the live connection
    # against every new policy snapshot (issue: trust withdrawn).
    chain: tuple[x509.Certificate, ...] = ()
    withdrawn_reason: str | None = None


@dataclass
class _Live:
    """A relayed connection that a policy change may have to close."""

    listener: Listener
    conn: _Conn
    scope: trio.CancelScope


class _Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_address(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _expiry(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


class Gateway:
    """A running gateway for one configuration."""

    def __init__(self, config: Config, log: EventLog, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics
        # The one current snapshot (edge.core.snapshot): replaced, never mutated,
        # by load_policies and every reload. Until load_policies: no partner.
        self.snapshot: Snapshot = build_snapshot(config, {})
        self._server_contexts: dict[str, SSL.Context] = {}
        ident = config.identity
        # The pool is ours: the edge -> pool leg resumes TLS sessions per member
        # host (never the partner side; see edge.tls).
        self._client_context = make_client_context(
            ident.internal_root_certs,
            ident.internal_chain,
            ident.internal_private_key,
            resume_sessions=True,
        )
        # Pool members, their health and DNS (edge.pools); the context is read
        # at each dial, so a reloaded internal identity is used at once.
        self._pools = PoolSet(lambda: self.snapshot, lambda: self._client_context, metrics, log)
        self._active_total = 0
        self._active_by_partner: _Counter[str] = _Counter()
        self._idle = trio.Event()
        self._idle.set()
        self._shutdown = trio.Event()
        self._shutdown_why = ""
        # --workers: where this worker binds, with SO_REUSEPORT (None: alone).
        self.worker_listen: dict[str, tuple[str, int]] | None = None
        self._crl_fetcher = CrlFetcher(config.revocation, log) if config.revocation.fetch else None
        self._handshakes_in_progress = 0
        self._sources = _source_limits(config.limits)
        # Live reload: what was loaded, and the connections to re-check.
        self._live: dict[int, _Live] = {}
        self._reload_requested = trio.Event()
        self._policy_prints: dict[Path, Fingerprint] = {}
        self._config_print: Fingerprint = ()
        self._next_time_recheck = math.inf
        self.bound: dict[str, list[str]] = {}
        self.ready = False

    @property
    def config(self) -> Config:
        return self.snapshot.config

    # ------------------------------------------------------------------
    # Set-up

    def load_policies(self) -> None:
        """Load every policies folder the listeners name and build contexts.

        Broken partners are reported and left out; the gateway runs with the
        partners that load (DESIGN.md). A missing folder is fatal.
        """
        config = self.config
        loaded: dict[Path, PolicySnapshot] = {}
        for folder in policy_folders(config):
            try:
                loaded[folder] = load_policies(folder)
            except PolicyFolderError as exc:
                raise StartupError(str(exc)) from exc
            self._policy_prints[folder] = fingerprint([folder])
        snapshot = build_snapshot(config, loaded, self._fetched_crls())
        if snapshot.problems:
            raise StartupError("; ".join(snapshot.problems))
        for problem in snapshot.partner_problems:
            self.log.event(
                "partner_problem",
                partner=problem.partner,
                file=str(problem.path),
                problem=problem.message,
            )
        self.snapshot = snapshot
        self._config_print = fingerprint(files=_config_files(self.config))
        self._build_server_contexts()
        self._export_static_metrics()

    def _build_server_contexts(self) -> None:
        ident = self.config.identity
        for listener in self.config.listeners:
            if listener.mode == "mtls":
                trust = self.snapshot.folder_of(listener)
                assert trust is not None
                roots = [
                    root
                    for policy in trust.policies.partners.values()
                    if policy.enabled
                    for root in policy.roots
                ]
                self._server_contexts[listener.name] = make_server_context(
                    ident.public_chain,
                    ident.public_private_key,
                    require_client_cert=True,
                    client_ca_names=_unique_subjects(roots),
                )
            else:
                self._server_contexts[listener.name] = make_server_context(
                    ident.public_chain, ident.public_private_key, require_client_cert=False
                )

    def _export_static_metrics(self) -> None:
        self.export_reload_metrics()
        for pool in self.config.pools.values():
            for member in pool.members:
                self.metrics.pool_member_up.labels(pool.name, member.host)

    def export_reload_metrics(self) -> None:
        """(Re-)export the gauges that depend on configuration and policies.

        Call after every reload: certificate expiry (every certificate the edge
        presents, its internal roots, every partner root), CRL next-update and
        partner counts by state. Series of partners, roots or CRLs that are no
        longer configured are removed, so no alert fires for a root that is gone.
        When two certificates share one label set (a re-issued root with the
        same subject), the sooner expiry is exported: alerts err toward warning.
        """
        m = self.metrics
        ident = self.config.identity
        expiry: dict[tuple[str, ...], float] = {}
        crls: dict[tuple[str, ...], float] = {}

        def keep_soonest(
            into: dict[tuple[str, ...], float], key: tuple[str, ...], t: float
        ) -> None:
            into[key] = min(t, into.get(key, t))

        for role, certs in (
            # The whole presented chains: an expired intermediate breaks
            # handshakes just as an expired leaf does.
            ("public", ident.public_chain),
            ("internal", ident.internal_chain),
            ("internal_root", ident.internal_root_certs),
        ):
            for cert in certs:
                keep_soonest(expiry, (role, "", cert.subject.rfc4514_string()), _expiry(cert))
        states = self._partner_summary()
        for trust in self.snapshot.folders.values():
            snap = trust.policies
            for pid, policy in snap.partners.items():
                for root in policy.roots:
                    subject = root.subject.rfc4514_string()
                    keep_soonest(expiry, ("partner_root", pid, subject), _expiry(root))
                for crl in policy.crls:
                    if crl.next_update_utc is not None:
                        issuer = crl.issuer.rfc4514_string()
                        keep_soonest(crls, (pid, issuer), crl.next_update_utc.timestamp())
        m.replace_series(m.certificate_expiry, expiry)
        m.replace_series(m.crl_next_update, crls)
        m.replace_series(
            m.partners,
            {(state,): states.get(state, 0) for state in ("enabled", "disabled", "broken")},
        )

    def partner_label(self, listener: Listener, partner: str | None) -> str:
        if partner is None or listener.policies is None:
            return UNKNOWN_PARTNER
        trust = self.snapshot.folder_of(listener)
        if trust is None or partner not in trust.policies.partners:
            return UNKNOWN_PARTNER
        return partner

    def readiness(self) -> tuple[bool, str]:
        if self._shutdown.is_set():
            return False, "shutting down"
        if not self.ready:
            return False, "listeners not bound yet"
        return self._pools.readiness()

    # ------------------------------------------------------------------
    # Live reload (theory: a reload builds a complete new snapshot off to the
    # side, in a worker thread, and swaps it in with one assignment; handshakes
    # already past authorization keep the verdict they got, and every live
    # connection is then re-authorized against the new snapshot with the chain
    # it presented, and closed if it no longer passes)

    async def _watch(self) -> None:
        """Poll for changes every poll_interval_s, or at once on request_reload."""
        while True:
            interval = self.config.policies.poll_interval_s
            with trio.move_on_after(interval):
                await self._reload_requested.wait()
            forced = self._reload_requested.is_set()
            self._reload_requested = trio.Event()
            try:
                await self.poll_once(forced=forced)
            except Exception as exc:  # never let a reload bug stop the gateway
                self.metrics.policy_reloads.labels("error").inc()
                self.log.event(
                    "reload_failed", error=f"{type(exc).__name__}: {exc}", where=_where(exc)
                )

    async def poll_once(self, *, forced: bool = False) -> None:
        """Reload whatever changed on disk (everything when ``forced``)."""
        config_print = await trio.to_thread.run_sync(
            lambda: fingerprint(files=_config_files(self.config))
        )
        if forced or config_print != self._config_print:
            await self._reload_config(config_print)
        for folder in list(self.snapshot.folders):
            folder_print = await trio.to_thread.run_sync(fingerprint, [folder])
            if forced or folder_print != self._policy_prints.get(folder):
                await self._reload_policies(folder, folder_print)
        if trio.current_time() >= self._next_time_recheck:
            # A CRL passed its next update, or a live chain expired.
            await self._recheck_live(None)

    async def _reload_policies(self, folder: Path, folder_print: Fingerprint) -> None:
        previous = self.snapshot.folders[folder].loaded
        try:
            snapshot = await trio.to_thread.run_sync(load_policies, folder, previous)
        except PolicyFolderError as exc:
            # The whole folder is unreadable (unmounted?): keep every partner.
            self.metrics.policy_reloads.labels("error").inc()
            self.log.event("policies_reload_failed", folder=str(folder), error=str(exc))
            self._policy_prints[folder] = folder_print
            return
        self._policy_prints[folder] = folder_print
        old = self.snapshot.folders[folder].policies
        new = await self._rebuild({folder: snapshot})
        checked = new.folders[folder].policies
        old_ids, new_ids = set(old.partners), set(checked.partners)
        changed = sorted(
            pid
            for pid in old_ids & new_ids
            if not _same_policy(old.partners[pid], checked.partners[pid])
        )
        for problem in checked.problems:
            self.log.event(
                "partner_problem",
                partner=problem.partner,
                file=str(problem.path),
                problem=problem.message,
                kept_last_good=problem.partner in checked.partners,
            )
        result = "error" if checked.broken else "ok"
        self.metrics.policy_reloads.labels(result).inc()
        self.log.event(
            "policies_reloaded",
            folder=str(folder),
            result=result,
            added=sorted(new_ids - old_ids),
            removed=sorted(old_ids - new_ids),
            changed=changed,
            broken=sorted(checked.broken),
            partners=checked.state_counts(),
        )
        await self._recheck_live(folder)

    def _fetched_crls(self) -> dict[str, list[tuple[x509.CertificateRevocationList, Path]]]:
        return self._crl_fetcher.crls() if self._crl_fetcher is not None else {}

    async def _rebuild(
        self, loaded: dict[Path, PolicySnapshot], config: Config | None = None
    ) -> Snapshot:
        """Build the next snapshot off to the side (a worker thread), swap it in.

        ``loaded``: the folders read again (the others keep what they hold);
        ``config``: a reloaded configuration. Returns the new snapshot.
        """
        current = self.snapshot
        inputs = {f: t.loaded for f, t in current.folders.items()}
        inputs.update(loaded)
        fetched = self._fetched_crls()
        new = await trio.to_thread.run_sync(
            lambda: build_snapshot(config or current.config, inputs, fetched, current)
        )
        self.snapshot = new  # the swap: one assignment
        self._build_server_contexts()
        self.export_reload_metrics()
        return new

    async def _apply_fetched_crls(self) -> None:
        """New CRLs arrived: a new snapshot with them, re-check live connections."""
        await self._rebuild({})
        await self._recheck_live(None)
        fetched = self._fetched_crls()
        self.log.event(
            "crls_applied", partners={pid: len(crls) for pid, crls in sorted(fetched.items())}
        )

    async def _reload_config(self, config_print: Fingerprint) -> None:
        """Re-read edge.toml and the identity files; apply what can be applied live."""
        path = self.config.path
        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            self._config_print = config_print
            self.metrics.policy_reloads.labels("error").inc()
            self.log.event(
                "config_reload_failed",
                config=str(path),
                problems=list(exc.problems),
                kept="the configuration and certificates loaded before",
            )
            return
        current = self.snapshot
        old = current.config
        # Every field compared (edge.core.snapshot.diff); what needs a restart
        # keeps its running value in the new snapshot (carry_running).
        change = diff(current, dataclasses.replace(current, config=new))
        if new.identity != old.identity or "identity" in change.applied:
            ident = new.identity
            # A new context: sessions of the old one are not resumed.
            self._client_context = make_client_context(
                ident.internal_root_certs,
                ident.internal_chain,
                ident.internal_private_key,
                resume_sessions=True,
            )
        await self._rebuild({}, carry_running(old, new))
        if "limits" in change.applied:
            # A new table for new connections; live ones release into the
            # table that admitted them, which goes when they have ended.
            self._sources = _source_limits(new.limits)
        self._config_print = config_print
        self.metrics.policy_reloads.labels("ok").inc()
        self.log.event(
            "config_reloaded",
            config=str(path),
            applied=list(change.applied),
            needs_restart=list(change.needs_restart),
        )
        await self._recheck_live(None)

    async def _recheck_live(self, folder: Path | None) -> None:
        """Re-authorize live connections (of ``folder``, or all); close the failures."""
        now = trio.current_time()
        checked = 0
        for live in list(self._live.values()):
            listener = live.listener
            if listener.policies is None or (folder is not None and listener.policies != folder):
                continue
            conn = live.conn
            if conn.end is not None:
                continue
            trust = self.snapshot.folder_of(listener)
            if trust is None:
                continue
            verdict = trust.verifier.verify_client(conn.chain)
            if not verdict.accepted:
                assert verdict.reason is not None
                self._withdraw(live, verdict.reason.value, verdict.detail)
            elif verdict.partner != conn.partner:
                self._withdraw(
                    live,
                    Reason.PARTNER_CHANGED.value,
                    f"the chain now identifies partner {verdict.partner}, not {conn.partner}",
                )
            checked += 1
            if checked % 200 == 0:
                await trio.sleep(0)  # keep relays flowing during a big re-check
        self._next_time_recheck = self._earliest_time_event(now)

    def _withdraw(self, live: _Live, reason: str, detail: str) -> None:
        conn = live.conn
        if conn.end is None:
            conn.end = "trust_withdrawn"
            conn.withdrawn_reason = reason
            conn.detail = detail
        live.scope.cancel()

    def _note_expiry(self, chain: tuple[x509.Certificate, ...]) -> None:
        if chain:
            soonest = min(_expiry(c) for c in chain)
            self._next_time_recheck = min(
                self._next_time_recheck, trio.current_time() + max(0.0, soonest - time.time())
            )

    def _earliest_time_event(self, now: float) -> float:
        """When the next re-check is due even if no file changes (trio clock)."""
        wall = time.time()
        soonest = math.inf
        for trust in self.snapshot.folders.values():
            for policy in trust.policies.partners.values():
                for crl in policy.crls:
                    if crl.next_update_utc is not None:
                        t = crl.next_update_utc.timestamp()
                        if t > wall:
                            soonest = min(soonest, t)
        for live in self._live.values():
            for cert in live.conn.chain:
                t = _expiry(cert)
                if t > wall:
                    soonest = min(soonest, t)
        return now + (soonest - wall) if soonest != math.inf else math.inf

    # ------------------------------------------------------------------
    # Running

    def request_reload(self) -> None:
        """Reload configuration, identity and policies now (SIGHUP)."""
        self._reload_requested.set()

    def request_shutdown(self, why: str) -> None:
        if not self._shutdown.is_set():
            self._shutdown_why = why
            self._shutdown.set()

    async def _bind(self) -> tuple[dict[str, list[trio.SocketListener]], list[trio.SocketListener]]:
        listeners: dict[str, list[trio.SocketListener]] = {}
        try:
            for listener in self.config.listeners:
                if self.worker_listen is not None:
                    host, port = self.worker_listen[listener.name]
                    listeners[listener.name] = [await _reuse_port_listener(host, port)]
                    continue
                listeners[listener.name] = await trio.open_tcp_listeners(
                    listener.port, host=listener.host
                )
            metrics_listeners: list[trio.SocketListener] = []
            # A worker's metrics are served by its supervisor (edge/workers.py).
            if self.config.metrics is not None and self.worker_listen is None:
                metrics_listeners = await trio.open_tcp_listeners(
                    self.config.metrics.port, host=self.config.metrics.host
                )
        except OSError as exc:
            for socks in listeners.values():
                for sock in socks:
                    await sock.aclose()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from exc
        return listeners, metrics_listeners

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``request_shutdown``; then drain and return."""
        listeners, metrics_listeners = await self._bind()
        for name, socks in listeners.items():
            self.bound[name] = [_format_address(s.socket.getsockname()) for s in socks]
        if metrics_listeners:
            self.bound["metrics"] = [
                _format_address(s.socket.getsockname()) for s in metrics_listeners
            ]
        async with trio.open_nursery() as root:
            if metrics_listeners:
                root.start_soon(serve_metrics, metrics_listeners, self.metrics, self.readiness)
            root.start_soon(self._watch)
            if self._crl_fetcher is not None:
                root.start_soon(self._crl_fetcher.run, self._apply_fetched_crls)
            root.start_soon(self._pools.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for listener in self.config.listeners:
                        for sock in listeners[listener.name]:
                            acceptors.start_soon(self._accept_loop, listener, sock, connections)
                    self.ready = True
                    self.log.event(
                        "gateway_started",
                        listeners=self.bound,
                        partners=self._partner_summary(),
                        pools={
                            p.name: [m.host for m in p.members] for p in self.config.pools.values()
                        },
                    )
                    task_status.started(self.bound)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for socks in listeners.values():
                    for sock in socks:
                        await sock.aclose()
                # Logged once accepting has really stopped.
                self.log.event(
                    "shutdown_started",
                    why=self._shutdown_why,
                    active_connections=self._active_total,
                )
                drain = self.config.limits.drain_timeout_s
                with trio.move_on_after(drain):
                    await self._idle.wait()
                if self._active_total:
                    self.log.event(
                        "drain_timeout", closing=self._active_total, drain_timeout_s=drain
                    )
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.event("gateway_stopped")

    def _partner_summary(self) -> dict[str, int]:
        """Partners by state over every policies folder (a partner that is broken
        but still served by its last good policy counts as broken)."""
        return self.snapshot.partner_summary()

    async def _accept_loop(
        self, listener: Listener, sock: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    self.log.event("accept_error", listener=listener.name, error=exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._handle, listener, stream)

    # ------------------------------------------------------------------
    # One connection

    async def _handle(self, listener: Listener, tcp: trio.SocketStream) -> None:
        conn = _Conn(listener=listener.name, peer=_peer_of(tcp), started=trio.current_time())
        self._active_total += 1
        self._idle = self._idle if not self._idle.is_set() else trio.Event()
        try:
            await self._serve_connection(listener, tcp, conn)
        except Exception as exc:
            # A bug must cost one connection, never the gateway (an exception
            # escaping here would cancel every connection through the nursery).
            if not conn.reported:
                self._reject(listener, conn, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            self.log.event(
                "internal_error",
                listener=listener.name,
                peer=conn.peer,
                error=f"{type(exc).__name__}: {exc}",
                where=_where(exc),
            )
            await trio.aclose_forcefully(tcp)
        finally:
            self._active_total -= 1
            if self._active_total == 0:
                self._idle.set()

    def _reject(self, listener: Listener, conn: _Conn, reason: Reason, detail: str) -> None:
        conn.reported = True
        label = self.partner_label(listener, conn.partner)
        self.metrics.handshakes.labels(listener.name, label, reason.value).inc()
        fields: dict[str, Any] = {
            "listener": listener.name,
            "peer": conn.peer,
            "reason": reason.value,
            "detail": _clip(detail, _MAX_DETAIL),
        }
        if conn.partner is not None:
            fields["partner"] = conn.partner
        if conn.leaf_subject is not None:
            fields["leaf_subject"] = conn.leaf_subject
            fields["fingerprint_sha256"] = conn.fingerprint_sha256
        self.log.event("connection_rejected", **fields)

    async def _serve_connection(
        self, listener: Listener, tcp: trio.SocketStream, conn: _Conn
    ) -> None:
        limits = self.config.limits
        if self._active_total > limits.max_connections:
            self._reject(
                listener,
                conn,
                Reason.OVER_LIMIT,
                f"max_connections={limits.max_connections} reached",
            )
            await trio.aclose_forcefully(tcp)
            return
        # Refuse before spending a handshake wherever the limit is already known.
        if self._handshakes_in_progress >= limits.max_handshakes_in_progress:
            self._reject(
                listener,
                conn,
                Reason.OVER_LIMIT,
                f"max_handshakes_in_progress={limits.max_handshakes_in_progress} reached",
            )
            await trio.aclose_forcefully(tcp)
            return
        source = _source_ip(tcp)
        sources = self._sources  # release into the table that admitted it
        refusal = sources.admit(source, trio.current_time())
        if refusal is not None:
            self._reject(listener, conn, Reason.OVER_LIMIT, refusal)
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._serve_admitted_source(listener, tcp, conn)
        finally:
            sources.release(source)

    async def _serve_admitted_source(
        self, listener: Listener, tcp: trio.SocketStream, conn: _Conn
    ) -> None:
        tls = TLSStream(tcp, self._server_contexts[listener.name], server_side=True)
        try:
            self._handshakes_in_progress += 1
            try:
                partner, pool_name = await self._admit(listener, tls, conn)
            finally:
                # Released before anything is logged: whoever reads the verdict
                # may count on the slot being free again.
                self._handshakes_in_progress -= 1
        except _Rejected as rej:
            self._reject(listener, conn, rej.reason, rej.detail)
            # No close_notify: a refusal is not a graceful end of stream.
            await trio.aclose_forcefully(tls.transport_stream)
            return
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the drain deadline
                self._reject(
                    listener, conn, Reason.SHUTTING_DOWN, "gateway shut down during handshake"
                )
                await trio.aclose_forcefully(tls.transport_stream)
            raise
        label = self.partner_label(listener, partner)
        self._active_by_partner[label] += 1
        try:
            origin = proxy_info(tcp, tls, partner, conn.tls_version, conn.chain)
            try:
                upstream, member = await self._connect_upstream(pool_name, origin)
            except _Rejected as rej:
                self._reject(listener, conn, rej.reason, rej.detail)
                await trio.aclose_forcefully(tls.transport_stream)
                return
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: the drain deadline
                    self._reject(
                        listener,
                        conn,
                        Reason.SHUTTING_DOWN,
                        "gateway shut down while connecting upstream",
                    )
                    await trio.aclose_forcefully(tls.transport_stream)
                raise
            conn.member = member.host
            self.metrics.handshakes.labels(listener.name, label, "ok").inc()
            with member:  # the member's active count, for balancing and max_connections
                await self._relay_and_report(listener, label, conn, tls, upstream)
        finally:
            self._active_by_partner[label] -= 1

    async def _admit(
        self, listener: Listener, tls: TLSStream, conn: _Conn
    ) -> tuple[str | None, str]:
        """Handshake and authorize within the handshake timeout.

        Returns (partner id or None for a "tls" listener, pool name).
        """
        limits = self.config.limits
        t0 = trio.current_time()
        timeout = limits.handshake_timeout_s if limits.handshake_timeout_s > 0 else math.inf
        with trio.move_on_after(timeout) as scope:
            try:
                await tls.do_handshake()
            except TLSTruncatedError as exc:
                raise _Rejected(
                    Reason.TLS_ERROR, "peer closed the connection during the handshake"
                ) from exc
            except TLSError as exc:
                if _NO_PEER_CERT in str(exc):
                    raise _Rejected(
                        Reason.NO_CLIENT_CERT, "the partner sent no client certificate"
                    ) from exc
                raise _Rejected(Reason.TLS_ERROR, f"TLS handshake failed: {exc}") from exc
            except (trio.BrokenResourceError, OSError) as exc:
                raise _Rejected(
                    Reason.TLS_ERROR, f"connection lost during the handshake: {exc}"
                ) from exc
            conn.tls_version = tls.version
            if listener.mode != "mtls":
                self.metrics.handshake_duration.labels(listener.name).observe(
                    trio.current_time() - t0
                )
                return None, listener.pool
            try:
                chain = tls.peer_chain
                if chain:
                    conn.leaf_subject = _clip(chain[0].subject.rfc4514_string(), _MAX_SUBJECT)
                    conn.fingerprint_sha256 = _fingerprint(chain[0])
            except ValueError as exc:  # DER that OpenSSL took but cryptography will not
                raise _Rejected(Reason.INVALID_CHAIN, f"unparsable certificate: {exc}") from exc
            conn.chain = tuple(chain)
            trust = self.snapshot.folder_of(listener)
            assert trust is not None
            verdict = trust.verifier.verify_client(chain)
        if scope.cancelled_caught:
            raise _Rejected(
                Reason.HANDSHAKE_TIMEOUT,
                f"handshake not finished within handshake_timeout_s={limits.handshake_timeout_s:g}",
            )
        self.metrics.handshake_duration.labels(listener.name).observe(trio.current_time() - t0)
        if (
            self._crl_fetcher is not None
            and verdict.partner is not None
            and (verdict.accepted or verdict.reason in (Reason.CRL_UNAVAILABLE, Reason.REVOKED))
        ):
            # Learn where this partner's CRLs live (a crl_unavailable refusal
            # too: the next attempt succeeds once the CRL has been fetched).
            self._crl_fetcher.note_chain(verdict.partner, verdict.chain or conn.chain)
        if not verdict.accepted:
            conn.partner = verdict.partner
            assert verdict.reason is not None
            raise _Rejected(verdict.reason, verdict.detail)
        assert verdict.partner is not None
        conn.partner = verdict.partner
        assert trust is not None  # the folder whose verifier gave this verdict
        policy = trust.policies.partners[verdict.partner]
        limit = limits.max_connections_per_partner
        if policy.max_connections is not None:
            limit = min(limit, policy.max_connections)
        if self._active_by_partner[verdict.partner] >= limit:
            raise _Rejected(
                Reason.OVER_LIMIT,
                f"partner {verdict.partner} is at its limit of {limit} connections",
            )
        return verdict.partner, policy.pool or listener.pool

    async def _connect_upstream(self, pool_name: str, origin: ProxyInfo) -> tuple[TLSStream, Lease]:
        """A verified stream to a member of the pool (``edge.pools`` chooses).

        ``origin`` is what a ``proxy_protocol = "v2"`` pool is told about the
        partner. The lease must be released when the relay ends.
        """
        try:
            return await self._pools.connect(pool_name, origin)
        except UpstreamUnavailable as exc:
            raise _Rejected(exc.reason, exc.detail) from exc

    async def _relay_and_report(
        self, listener: Listener, label: str, conn: _Conn, partner: TLSStream, upstream: TLSStream
    ) -> None:
        m = self.metrics
        active = m.connections_active.labels(listener.name, label)
        active.inc()
        relay_start = trio.current_time()
        try:
            await self._relay(listener, label, conn, partner, upstream)
        except BaseException:
            # Cancellation arrives wrapped in exception groups from nurseries,
            # so the shutdown flag, not the exception type, says what happened.
            conn.end = conn.end or ("shutdown" if self._shutdown.is_set() else "cancelled")
            raise
        finally:
            active.dec()
            # Shielded and bounded: a drain-deadline cancellation still sends
            # close_notify both ways (at most _CLOSE_BUDGET_S) and, above all,
            # still reaches the log line below.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_BUDGET_S):
                await _close_both(partner, upstream)
            duration = trio.current_time() - conn.started
            m.connection_duration.labels(listener.name, label).observe(
                trio.current_time() - relay_start
            )
            fields: dict[str, Any] = {
                "listener": listener.name,
                "partner": conn.partner if conn.partner is not None else label,
                "peer": conn.peer,
                "leaf_subject": conn.leaf_subject,
                "fingerprint_sha256": conn.fingerprint_sha256,
                "tls_version": conn.tls_version,
                "member": conn.member,
                "bytes_from_partner": conn.bytes_from_partner,
                "bytes_to_partner": conn.bytes_to_partner,
                "duration_s": round(duration, 3),
                "end": conn.end or "closed",
            }
            if conn.withdrawn_reason is not None:
                fields["reason"] = conn.withdrawn_reason
            if conn.detail:
                fields["detail"] = _clip(conn.detail, _MAX_DETAIL)
            conn.reported = True
            self.log.event("connection_closed", **fields)

    async def _relay(
        self, listener: Listener, label: str, conn: _Conn, partner: TLSStream, upstream: TLSStream
    ) -> None:
        idle = self.config.limits.idle_timeout_s
        watch_idle = idle > 0 and not math.isinf(idle)
        # The idle timeout is the relay scope's deadline, pushed forward by the
        # pumps (no watchdog task per connection). It is moved only once it is
        # `slack` stale, so a busy stream does not touch trio's deadline heap
        # per record; the connection closes between idle and idle + slack
        # after its last byte.
        slack = idle / 64 if watch_idle else 0.0
        from_partner = self.metrics.bytes.labels(listener.name, label, "from_partner")
        to_partner = self.metrics.bytes.labels(listener.name, label, "to_partner")

        def finish(end: str, detail: str = "") -> None:
            if conn.end is None:
                conn.end = end
                conn.detail = detail

        async def pump(
            src: TLSStream, dst: TLSStream, outbound: bool, scope: trio.CancelScope
        ) -> None:
            src_name, dst_name = ("partner", "pool") if outbound else ("pool", "partner")
            counter = from_partner if outbound else to_partner
            while True:
                try:
                    data = await src.receive_some(RELAY_CHUNK)
                except TLSTruncatedError:
                    finish(f"{src_name}_truncated", f"{src_name} closed TCP without close_notify")
                    scope.cancel()
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    finish(f"{src_name}_error", str(exc))
                    scope.cancel()
                    return
                if not data:
                    if conn.first_eof is None:
                        conn.first_eof = src_name
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        finish(f"{dst_name}_error", str(exc))
                        scope.cancel()
                    return
                try:
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    finish(f"{dst_name}_error", str(exc))
                    scope.cancel()
                    return
                n = len(data)
                counter.inc(n)
                if outbound:
                    conn.bytes_from_partner += n
                else:
                    conn.bytes_to_partner += n
                if watch_idle:
                    deadline = trio.current_time() + idle + slack
                    if deadline - scope.deadline > slack:
                        scope.deadline = deadline

        key = id(conn)
        try:
            # One scope for the whole relay: an error in either pump, a
            # withdrawn partner (_live) and the idle deadline all cancel it.
            # One pump runs in this task, the other in the nursery.
            with trio.CancelScope() as scope:
                if watch_idle:
                    scope.deadline = trio.current_time() + idle + slack
                if conn.chain:
                    self._live[key] = _Live(listener, conn, scope)
                    self._note_expiry(conn.chain)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(pump, upstream, partner, False, scope)
                    await pump(partner, upstream, True, scope)
            if scope.cancelled_caught:
                # Whoever cancelled on purpose said why first; else the deadline.
                finish("idle_timeout", f"no byte either way for idle_timeout_s={idle:g}")
        finally:
            self._live.pop(key, None)
        if conn.end is None:
            conn.end = f"{conn.first_eof}_closed" if conn.first_eof else "closed"


async def _close_both(a: TLSStream, b: TLSStream) -> None:
    # One after the other, not in a nursery of two tasks: each aclose is
    # bounded by its close_timeout (1 s; the caller's _CLOSE_BUDGET_S covers
    # both), closes its transport even when cancelled, and nearly always
    # returns at once because the relay already sent close_notify both ways.
    try:
        await a.aclose()
    finally:
        await b.aclose()


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame, for a bug report (no locals, no payload)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listener sharing its port with the other workers (SO_REUSEPORT)."""
    import socket as _socket

    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = trio.socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _source_ip(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"


def _source_limits(limits: Limits) -> SourceLimits:
    return SourceLimits(
        max_per_source=limits.max_connections_per_source,
        rate_per_s=limits.new_connections_per_source_per_s,
        burst=limits.new_connections_per_source_burst,
    )


def _config_files(config: Config) -> list[Path]:
    ident = config.identity
    return [
        config.path,
        ident.public_cert,
        ident.public_key,
        ident.internal_cert,
        ident.internal_key,
        *ident.internal_roots,
    ]


def _same_policy(a: PartnerPolicy, b: PartnerPolicy) -> bool:
    return (
        a.domains == b.domains
        and a.enabled == b.enabled
        and a.pool == b.pool
        and a.max_connections == b.max_connections
        and a.revocation == b.revocation
        and a.roots == b.roots
        and a.crls == b.crls
    )


def _unique_subjects(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        key = cert.subject.public_bytes()
        if key not in seen:
            seen.add(key)
            out.append(cert)
    return out


# ----------------------------------------------------------------------
# `edge run`


def run_command(config_path: Path, log_format: LogFormat = "json", workers: int | None = 1) -> int:
    """Load, start, serve until SIGTERM/SIGINT, drain; the exit status.

    ``workers``: gateway processes to run (None: one per CPU). Above one, this
    process becomes their supervisor (edge/workers.py).
    """
    import json
    import os
    import signal
    import sys

    from edge import workers as _workers

    worker_listen = os.environ.get(_workers.WORKER_LISTEN_ENV)
    if worker_listen is not None:
        workers = 1  # a worker never supervises
        log_format = "json"  # read by the supervisor, which formats for people
    count = _workers.cpu_count() if workers is None else workers
    log = EventLog(log_format)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge: {problem}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=list(exc.problems))
        return 1
    except OSError as exc:
        print(f"edge: {config_path}: {exc.strerror or exc}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=[str(exc)])
        return 1
    if count > 1:
        for folder in sorted({lst.policies for lst in config.listeners if lst.policies}):
            try:
                load_policies(folder)  # fail here, once, not in N restarting workers
            except PolicyFolderError as exc:
                print(f"edge: {exc}", file=sys.stderr)
                log.event("startup_failed", config=str(config_path), problems=[str(exc)])
                return 1
        return _workers.supervise(config, config_path, log, count)
    gateway = Gateway(config, log, Metrics())
    if worker_listen is not None:
        listen = json.loads(worker_listen)
        gateway.worker_listen = {name: (str(h), int(p)) for name, (h, p) in listen.items()}
    try:
        gateway.load_policies()
    except StartupError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        log.event("startup_failed", config=str(config_path), problems=[str(exc)])
        return 1

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(gateway.run)
                except StartupError as exc:
                    print(f"edge: {exc}", file=sys.stderr)
                    log.event("startup_failed", config=str(config_path), problems=[str(exc)])
                    return 1
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        gateway.request_reload()
                        continue
                    gateway.request_shutdown(signal.Signals(signum).name)
                    break
        return 0

    return trio.run(main)
