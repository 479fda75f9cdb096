"""Live reload: notice changed files, build the next snapshot, swap it, re-authorize.

Owns watching (``poll_interval_s`` fingerprints of edge.toml, the identity
files and every policies folder; SIGHUP forces a reload), the reload of each
input (``load_config``, ``load_policies``, CRLs fetched from distribution
points), building the next ``Snapshot`` off to the side in a worker thread
(``edge.core.snapshot.build_snapshot``) and handing it to the gateway, which
swaps it in with one assignment, and then the re-authorization of every live
connection against the new snapshot with the chain it presented (closing,
``trust_withdrawn``, those that no longer pass). It also re-checks when the
clock alone changes a verdict (a CRL's next update, a certificate's expiry):
the watch loop wakes then, not at its next poll, so a live connection closes
when the earliest certificate of its verified path (root included) expires
(``trust_withdrawn``, reason ``expired``).

What a configuration change takes is ``edge.core.snapshot.diff``'s answer:
``config_reloaded`` logs what applied live and what needs a restart (the
running values of those stay in the snapshot until then).

Must never: stop the gateway because a reload failed (a broken file keeps the
last good snapshot, counted and logged), mutate the current snapshot, or
block the event loop with parsing or verifier building (worker thread).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import trio
from cryptography import x509

from edge.admission import LiveConnection, where
from edge.core.config import Config, ConfigError, load_config
from edge.core.policies import PartnerPolicy, PolicyFolderError, PolicySnapshot, load_policies
from edge.core.reasons import Reason
from edge.core.snapshot import Snapshot, build_snapshot, carry_running, diff
from edge.crlfetch import CrlFetcher
from edge.current import Current, build_current
from edge.logs import EventLog
from edge.metrics import Metrics
from edge.outbound_listener import OutboundListeners
from edge.watch import Fingerprint, fingerprint

__all__ = ["Reloader", "config_files", "log_config_warnings", "log_new_notices"]

# Live connections re-checked between two yields to the event loop.
_RECHECK_BATCH = 200
# A certificate is valid through its notAfter second: re-check this long after it.
_EXPIRY_SLACK_S = 1.0


def config_files(config: Config) -> list[Path]:
    """The files a configuration reload depends on: edge.toml and the identity."""
    ident = config.identity
    return [
        config.path,
        ident.public_cert,
        ident.public_key,
        ident.internal_cert,
        ident.internal_key,
        *ident.internal_roots,
        # A changed passphrase is a changed identity, like the key it opens.
        *ident.passphrase_files,
    ]


def log_config_warnings(log: EventLog, config: Config) -> None:
    """One ``config_warning`` per warning of a configuration just taken into use."""
    for warning in config.warnings:
        log.event("config_warning", config=str(config.path), warning=warning)


def log_new_notices(log: EventLog, new: Snapshot, previous: Snapshot | None) -> None:
    """One ``partner_notice`` per notice (an ignored file) not said for ``previous``."""
    for folder, trust in new.folders.items():
        before = previous.folders.get(folder) if previous is not None else None
        for notice in trust.policies.new_notices(before.policies if before else None):
            log.event(
                "partner_notice",
                partner=notice.partner,
                file=str(notice.path),
                notice=notice.message,
            )


class Reloader:
    """Keeps the gateway's snapshot in step with the files; run ``watch`` in a nursery."""

    def __init__(
        self,
        current: Callable[[], Current],
        swap: Callable[[Current], None],
        live: Callable[[], Mapping[int, LiveConnection]],
        metrics: Metrics,
        log: EventLog,
        crl_fetcher: CrlFetcher | None = None,
        outbound: OutboundListeners | None = None,
    ) -> None:
        self._current = current
        self._outbound = outbound
        self._swap = swap
        self._live = live
        self._metrics = metrics
        self._log = log
        self._crl_fetcher = crl_fetcher
        self._requested = trio.Event()
        # One rebuild at a time: the watcher and the CRL fetcher both rebuild,
        # and each must start from the snapshot the other swapped in (else the
        # later swap would bring back what the earlier one replaced).
        self._rebuilding = trio.Lock()
        self._policy_prints: dict[Path, Fingerprint] = {}
        self._config_print: Fingerprint = ()
        self._next_time_recheck = math.inf
        # Called when a requested (SIGHUP) reload has finished, applied or not.
        self.on_forced_done: Callable[[], None] = lambda: None
        # The watch loop's current sleep, so a new expiry can wake it earlier.
        self._sleep: trio.CancelScope | None = None

    def remember_files(self) -> None:
        """Fingerprint what was just loaded (startup), so only changes reload."""
        snapshot = self._current().snapshot
        self._config_print = fingerprint(files=config_files(snapshot.config))
        for folder in snapshot.folders:
            self._policy_prints[folder] = fingerprint([folder])

    def request(self) -> None:
        """Reload configuration, identity and policies now (SIGHUP)."""
        self._requested.set()

    async def watch(self) -> None:
        """Poll for changes every poll_interval_s, or at once on ``request``."""
        while True:
            interval = self._current().snapshot.config.policies.poll_interval_s
            with trio.move_on_after(interval) as sleep:
                sleep.deadline = min(sleep.deadline, self._next_time_recheck)
                self._sleep = sleep
                await self._requested.wait()
            self._sleep = None
            forced = self._requested.is_set()
            self._requested = trio.Event()
            try:
                await self.poll_once(forced=forced)
            except Exception as exc:  # never let a reload bug stop the gateway
                self._metrics.policy_reloads.labels("error").inc()
                self._log.event(
                    "reload_failed", error=f"{type(exc).__name__}: {exc}", where=where(exc)
                )
            if forced:  # applied or failed, but not cancelled (shutting down)
                self.on_forced_done()

    async def poll_once(self, *, forced: bool = False) -> None:
        """Reload whatever changed on disk (everything when ``forced``)."""
        config = self._current().snapshot.config
        config_print = await trio.to_thread.run_sync(
            lambda: fingerprint(files=config_files(config))
        )
        if forced or config_print != self._config_print:
            await self._reload_config(config_print)
        for folder in list(self._current().snapshot.folders):
            folder_print = await trio.to_thread.run_sync(fingerprint, [folder])
            if forced or folder_print != self._policy_prints.get(folder):
                await self._reload_policies(folder, folder_print)
        if trio.current_time() >= self._next_time_recheck:
            await self.recheck_live(None)

    async def _rebuild(
        self, loaded: Mapping[Path, PolicySnapshot], config: Config | None = None
    ) -> Snapshot:
        """The next snapshot, built in a worker thread and swapped in; returned."""
        async with self._rebuilding:
            previous = self._current().snapshot
            inputs = {f: t.loaded for f, t in previous.folders.items()}
            inputs.update(loaded)
            fetched = self._crl_fetcher.crls() if self._crl_fetcher is not None else {}
            new = await trio.to_thread.run_sync(
                lambda: build_snapshot(config or previous.config, inputs, fetched, previous)
            )
            self._swap(build_current(new, self._current()))  # the swap: one assignment
            if self._outbound is not None:
                # Outbound connections to partners the new snapshot no longer
                # allows close now (trust_withdrawn), within this poll.
                self._outbound.update(new)
        log_new_notices(self._log, new, previous)
        return new

    async def _reload_policies(self, folder: Path, folder_print: Fingerprint) -> None:
        previous = self._current().snapshot.folders[folder]
        try:
            loaded = await trio.to_thread.run_sync(load_policies, folder, previous.loaded)
        except PolicyFolderError as exc:
            # The whole folder is unreadable (unmounted?): keep every partner.
            self._metrics.policy_reloads.labels("error").inc()
            self._log.event("policies_reload_failed", folder=str(folder), error=str(exc))
            self._policy_prints[folder] = folder_print
            return
        self._policy_prints[folder] = folder_print
        old = previous.policies
        new = (await self._rebuild({folder: loaded})).folders[folder].policies
        old_ids, new_ids = set(old.partners), set(new.partners)
        changed = sorted(
            pid
            for pid in old_ids & new_ids
            if not _same_policy(old.partners[pid], new.partners[pid])
        )
        for problem in new.problems:
            self._log.event(
                "partner_problem",
                partner=problem.partner,
                file=str(problem.path),
                problem=problem.message,
                kept_last_good=problem.partner in new.partners,
            )
        result = "error" if new.broken else "ok"
        self._metrics.policy_reloads.labels(result).inc()
        self._log.event(
            "policies_reloaded",
            folder=str(folder),
            result=result,
            added=sorted(new_ids - old_ids),
            removed=sorted(old_ids - new_ids),
            changed=changed,
            broken=sorted(new.broken),
            partners=new.state_counts(),
        )
        await self.recheck_live(folder)

    async def apply_fetched_crls(self) -> None:
        """New CRLs arrived (edge.crlfetch): a snapshot with them, re-check live."""
        await self._rebuild({})
        await self.recheck_live(None)
        fetched = self._crl_fetcher.crls() if self._crl_fetcher is not None else {}
        self._log.event(
            "crls_applied", partners={pid: len(crls) for pid, crls in sorted(fetched.items())}
        )

    async def _reload_config(self, config_print: Fingerprint) -> None:
        """Re-read edge.toml and the identity files; apply what can be applied live."""
        current = self._current().snapshot
        path = current.config.path
        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            self._config_print = config_print
            self._metrics.policy_reloads.labels("error").inc()
            self._log.event(
                "config_reload_failed",
                config=str(path),
                problems=list(exc.problems),
                kept="the configuration and certificates loaded before",
            )
            return
        # Every field compared (diff); what needs a restart keeps its running
        # value in the snapshot taken into use (carry_running).
        change = diff(current, dataclasses.replace(current, config=new))
        running = carry_running(current.config, new)
        if self._crl_fetcher is not None:
            # [revocation] applies live: fetch turned off stops every fetch now.
            self._crl_fetcher.configure(running.revocation)
        await self._rebuild({}, running)
        self._config_print = config_print
        self._metrics.policy_reloads.labels("ok").inc()
        self._log.event(
            "config_reloaded",
            config=str(path),
            applied=list(change.applied),
            needs_restart=list(change.needs_restart),
        )
        log_config_warnings(self._log, new)

    async def recheck_live(self, folder: Path | None) -> None:
        """Re-authorize live connections (of ``folder``, or all); close the failures."""
        now = trio.current_time()
        checked = 0
        snapshot = self._current().snapshot
        for live in list(self._live().values()):
            listener = live.listener
            if listener.policies is None or (folder is not None and listener.policies != folder):
                continue
            conn = live.conn
            if conn.end is not None:
                continue
            expired = _expired_path(conn.verdict.not_after if conn.verdict else None)
            if expired is not None:  # the verdict itself stopped being true
                live.withdraw(Reason.EXPIRED.value, expired)
                continue
            trust = snapshot.folder_of(listener)
            if trust is None:
                continue
            verdict = trust.verifier.verify_client(conn.chain)
            if not verdict.accepted:
                assert verdict.reason is not None
                live.withdraw(verdict.reason.value, verdict.detail)
            elif verdict.partner != conn.partner:
                live.withdraw(
                    Reason.PARTNER_CHANGED.value,
                    f"the chain now identifies partner {verdict.partner}, not {conn.partner}",
                )
            checked += 1
            if checked % _RECHECK_BATCH == 0:
                await trio.sleep(0)  # keep relays flowing during a big re-check
        self._next_time_recheck = self._earliest_time_event(now)

    def note_expiry(self, chain: tuple[x509.Certificate, ...]) -> None:
        """A connection went live with ``chain`` (its verified path, root included):
        re-check just after its first certificate expires, waking the watch loop."""
        expiries = [c.not_valid_after_utc.timestamp() for c in chain]
        if expiries:
            self._next_time_recheck = min(
                self._next_time_recheck,
                trio.current_time() + max(0.0, min(expiries) + _EXPIRY_SLACK_S - time.time()),
            )
            if self._sleep is not None:
                self._sleep.deadline = min(self._sleep.deadline, self._next_time_recheck)

    def _earliest_time_event(self, now: float) -> float:
        """When the next re-check is due even if no file changes (trio clock)."""
        wall = time.time()
        soonest = math.inf
        for trust in self._current().snapshot.folders.values():
            for policy in trust.policies.partners.values():
                for crl in policy.crls:
                    if crl.next_update_utc is not None:
                        t = crl.next_update_utc.timestamp()
                        if t > wall:
                            soonest = min(soonest, t)
        for live in self._live().values():
            verdict = live.conn.verdict
            for cert in (verdict.chain if verdict is not None else ()) or live.conn.chain:
                # Valid through notAfter itself: the verifier refuses just after it.
                t = cert.not_valid_after_utc.timestamp() + _EXPIRY_SLACK_S
                if t > wall:
                    soonest = min(soonest, t)
        return now + (soonest - wall) if soonest != math.inf else math.inf


def _expired_path(not_after: _dt.datetime | None) -> str | None:
    """Why a live connection's verified path (root included) is no longer valid, or
    None: it is closed at the path's earliest notAfter, whatever else a re-check
    would say first."""
    if not_after is None or _dt.datetime.now(_dt.UTC) <= not_after:
        return None
    return (
        f"the verified path expired at {not_after.strftime('%Y-%m-%dT%H:%M:%SZ')} "
        "(its earliest notAfter, the partner's root included)"
    )


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
