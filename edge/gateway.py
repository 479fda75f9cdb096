"""The gateway: one running configuration, its current snapshot, start and drain.

Owns the one ``Current`` value (``edge.core.snapshot.Snapshot`` plus the TLS
contexts built from it, ``edge.current``) and its replacement in one
assignment, the gauges derived from it (certificate expiry, CRL next update,
partners by state), readiness, and the structured life of the whole:
``run`` binds (``edge.listen``), starts the metrics endpoint, the reloader
(``edge.reload``), the CRL fetcher and the pools (``edge.pools``), accepts
connections into one nursery (each served by ``edge.admission``), and on
``request_shutdown`` stops accepting, gives connections ``drain_timeout_s``
to finish, then cancels them.

Where the rest lives: binding and accept loops ``edge.listen``; one
connection's admission and its log event ``edge.admission``; the byte relay
``edge.relay``; reload and re-authorization ``edge.reload``; the `edge run`
command and its signals ``edge.run``; ``--workers`` ``edge.workers`` (the CLI
chooses it; this module never imports it).

Must never: decide trust (``edge.core.trust`` does, through the snapshot),
keep a copy of the configuration beside the snapshot, or let one
connection's failure stop the others.
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from edge.admission import Admission, partner_label
from edge.core.config import Config, Listener
from edge.core.policies import PolicyFolderError, PolicySnapshot, load_policies
from edge.core.readiness import decide_readiness
from edge.core.snapshot import Snapshot, build_snapshot, policy_folders
from edge.crlfetch import CrlFetcher
from edge.current import Current, build_current
from edge.listen import StartupError, accept_loop, bind
from edge.logs import EventLog
from edge.metrics import Metrics, serve_metrics
from edge.outbound_listener import OutboundListeners
from edge.pools import PoolSet
from edge.reload import Reloader, log_config_warnings, log_new_notices
from edge.sdnotify import Notifier
from edge.version import version

__all__ = ["Gateway", "StartupError", "export_snapshot_metrics"]


class Gateway:
    """A running gateway for one configuration."""

    def __init__(self, config: Config, log: EventLog, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics
        # The one current value; replaced, never mutated. Until load_policies
        # it holds no partner (an mtls listener then refuses everyone).
        self.current: Current = build_current(build_snapshot(config, {}))
        self._shutdown = trio.Event()
        self._shutdown_why = ""
        # --workers: where this worker binds, with SO_REUSEPORT (None: alone).
        self.worker_listen: dict[str, tuple[str, int]] | None = None
        # systemd readiness (does nothing outside systemd, and in a --workers
        # worker, whose NOTIFY_SOCKET the supervisor removes).
        self.notifier = Notifier()
        # Always built and always run: it idles while fetch = false, so a reload
        # that turns fetching on (or off) applies without a restart.
        self._crl_fetcher = CrlFetcher(config.revocation, log)
        self._pools = PoolSet(
            lambda: self.current.snapshot, lambda: self.current.client_context, metrics, log
        )
        # Outbound listeners (pool -> partners): their own room, reloaded with the rest.
        self._outbound = OutboundListeners(
            lambda: self.current, metrics, log, others_active=lambda: self._admission.active_total
        )
        self._reloader = Reloader(
            lambda: self.current,
            self._swap,
            lambda: self._admission.live,
            metrics,
            log,
            self._crl_fetcher,
            outbound=self._outbound,
        )
        self._reloader.on_forced_done = self._reload_finished
        self._admission = Admission(
            lambda: self.current,
            self._pools,
            metrics,
            log,
            crl_fetcher=self._crl_fetcher,
            shutting_down=self._shutdown.is_set,
            on_live=self._reloader.note_expiry,
            others_active=lambda: self._outbound.active_total,
        )
        self.bound: dict[str, list[str]] = {}
        self.ready = False

    @property
    def snapshot(self) -> Snapshot:
        return self.current.snapshot

    @property
    def config(self) -> Config:
        return self.current.snapshot.config

    def _swap(self, new: Current) -> None:
        self.current = new  # the swap: every next decision reads the new value
        self.export_reload_metrics()
        # Fetch only for the partners now loaded whose revocation is not off.
        self._crl_fetcher.update_partners(t.loaded for t in new.snapshot.folders.values())

    def _reload_finished(self) -> None:
        """A SIGHUP reload ended (applied or not): systemd may send the next one."""
        self.notifier.ready("serving")

    # ------------------------------------------------------------------
    # Set-up

    def load_policies(self) -> None:
        """Load every policies folder the listeners name and build the snapshot.

        Broken partners are reported and left out; the gateway runs with the
        partners that load. A missing folder, or a problem of the
        configuration as a whole (an address clash), is fatal.
        """
        config = self.config
        log_config_warnings(self.log, config)
        loaded: dict[Path, PolicySnapshot] = {}
        for folder in policy_folders(config):
            try:
                loaded[folder] = load_policies(folder)
            except PolicyFolderError as exc:
                raise StartupError(str(exc)) from exc
        fetched = self._crl_fetcher.crls()
        snapshot = build_snapshot(config, loaded, fetched)
        if snapshot.problems:
            raise StartupError("; ".join(snapshot.problems))
        for problem in snapshot.partner_problems:
            self.log.event(
                "partner_problem",
                partner=problem.partner,
                file=str(problem.path),
                problem=problem.message,
            )
        log_new_notices(self.log, snapshot, None)
        self._swap(build_current(snapshot, self.current))
        self._reloader.remember_files()
        for pool in config.pools.values():
            for member in pool.members:
                self.metrics.pool_member_up.labels(pool.name, member.host)

    def export_reload_metrics(self) -> None:
        """(Re-)export the gauges derived from the current snapshot."""
        export_snapshot_metrics(self.metrics, self.snapshot)

    def partner_label(self, listener: Listener, partner: str | None) -> str:
        return partner_label(self.snapshot, listener, partner)

    def readiness(self) -> tuple[bool, str]:
        """What /readyz answers: ``[metrics] ready_requires`` decides (edge.core.readiness)."""
        metrics = self.config.metrics
        requires = metrics.ready_requires if metrics is not None else "any_pool"
        serving = self.ready and not self._shutdown.is_set()
        up = self._pools.pools_up()
        ready, why = decide_readiness(serving, up, requires)
        if not serving:
            why = "shutting down" if self._shutdown.is_set() else "listeners not bound yet"
        elif not ready and up:
            # Name each pool that is down, the way the member-up alert does.
            down = "; ".join(f"pool {name} has no member up" for name, ok in up.items() if not ok)
            why = f"{down} (ready_requires = {requires})"
        return ready, why

    # ------------------------------------------------------------------
    # Running

    async def poll_once(self, *, forced: bool = False) -> None:
        """Reload whatever changed on disk (everything when ``forced``)."""
        await self._reloader.poll_once(forced=forced)

    def request_reload(self) -> None:
        """Reload configuration, identity and policies now (SIGHUP)."""
        self.notifier.reloading("reloading")
        self._reloader.request()

    def request_shutdown(self, why: str) -> None:
        if not self._shutdown.is_set():
            self._shutdown_why = why
            self._shutdown.set()

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``request_shutdown``; then drain and return."""
        sockets = await bind(self.config, self.worker_listen)
        self.bound = sockets.addresses()
        admission = self._admission
        async with trio.open_nursery() as root:
            if sockets.metrics:
                root.start_soon(serve_metrics, sockets.metrics, self.metrics, self.readiness)
            root.start_soon(self._reloader.watch)
            root.start_soon(self._crl_fetcher.run, self._reloader.apply_fetched_crls)
            root.start_soon(self._pools.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for listener in self.config.listeners:
                        for sock in sockets.listeners[listener.name]:
                            acceptors.start_soon(
                                functools.partial(accept_loop, outbound=self._outbound.handle),
                                listener,
                                sock,
                                connections,
                                admission.handle,
                                self.log,
                            )
                    self.ready = True
                    self.log.event(
                        "gateway_started",
                        version=version(),
                        listeners=self.bound,
                        partners=self.snapshot.partner_summary(),
                        pools={
                            p.name: [m.host for m in p.members] for p in self.config.pools.values()
                        },
                    )
                    self.notifier.ready("serving")
                    task_status.started(self.bound)
                    await self._shutdown.wait()
                    self.notifier.stopping("draining")
                    acceptors.cancel_scope.cancel()
                await sockets.aclose_listeners()
                # Logged once accepting has really stopped.
                self.log.event(
                    "shutdown_started",
                    why=self._shutdown_why,
                    active_connections=admission.active_total + self._outbound.active_total,
                )
                drain = self.config.limits.drain_timeout_s
                with trio.move_on_after(drain):
                    await admission.idle.wait()
                    await self._outbound.idle.wait()
                if admission.active_total or self._outbound.active_total:
                    self.log.event(
                        "drain_timeout",
                        closing=admission.active_total + self._outbound.active_total,
                        drain_timeout_s=drain,
                    )
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.event("gateway_stopped")


def export_snapshot_metrics(m: Metrics, snapshot: Snapshot) -> None:
    """The gauges that depend on configuration and policies, from ``snapshot``.

    Certificate expiry (every certificate the edge presents, its internal
    roots, every partner root), CRL next-update and partner counts by state.
    Series of partners, roots or CRLs that are no longer configured are
    removed, so no alert fires for a root that is gone. When two certificates
    share one label set (a re-issued root with the same subject), the sooner
    expiry is exported: alerts err toward warning.
    """
    ident = snapshot.config.identity
    expiry: dict[tuple[str, ...], float] = {}
    crls: dict[tuple[str, ...], float] = {}

    def keep_soonest(into: dict[tuple[str, ...], float], key: tuple[str, ...], t: float) -> None:
        into[key] = min(t, into.get(key, t))

    for role, certs in (
        # The whole presented chains: an expired intermediate breaks
        # handshakes just as an expired leaf does.
        ("public", ident.public_chain),
        ("internal", ident.internal_chain),
        ("internal_root", ident.internal_root_certs),
    ):
        for cert in certs:
            subject = cert.subject.rfc4514_string()
            keep_soonest(expiry, (role, "", subject), cert.not_valid_after_utc.timestamp())
    for trust in snapshot.folders.values():
        for pid, policy in trust.policies.partners.items():
            for root in policy.roots:
                subject = root.subject.rfc4514_string()
                t = root.not_valid_after_utc.timestamp()
                keep_soonest(expiry, ("partner_root", pid, subject), t)
            for crl in policy.crls:
                if crl.next_update_utc is not None:
                    issuer = crl.issuer.rfc4514_string()
                    keep_soonest(crls, (pid, issuer), crl.next_update_utc.timestamp())
    states = snapshot.partner_summary()
    m.replace_series(m.certificate_expiry, expiry)
    m.replace_series(m.crl_next_update, crls)
    m.replace_series(
        m.partners,
        {(state,): states.get(state, 0) for state in ("enabled", "disabled", "broken")},
    )
    m.replace_series(
        m.partner_state, {(pid, state): 1 for pid, state in snapshot.partner_states().items()}
    )
