"""The log event registry: every event the gateway writes, its level and fields.

Owns: the closed set of audit-log event names, each with its level
(info / warning / error), when it is emitted and a one-line meaning of every
field it may carry. `python -m edge.docs` renders docs/reference/log-events.md
from it, and tests/test_docs.py walks every `.event("name", field=...)` call in
`edge/` and fails on a name or field that is not registered here, so an event
cannot ship undocumented. `check()` is the same test for one record, for the
logger to call.

Must never: write a log line (that is `edge.logs`), import trio or any I/O
library, or list a field that could carry payload bytes or key material.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["COMMON_FIELDS", "EVENTS", "Event", "Level", "check", "level_of"]

Level = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Event:
    name: str
    level: Level
    when: str  # when it is emitted, one line
    fields: Mapping[str, str]  # field -> one-line meaning (optional fields say "when ...")


# Added to every event by the logger or the supervisor, whatever the event.
COMMON_FIELDS: Mapping[str, str] = {
    "ts": "time of the event, UTC, ISO 8601 with milliseconds (empty on a worker line the "
    "supervisor could not parse)",
    "event": "the event name",
    "worker": "with `edge run --workers N`: the number of the worker process that wrote it",
    "level": "the event's level (info, warning, error), as listed here",
}

_CONN = {
    "listener": "name of the listener that accepted the connection",
    "peer": "the client's address, host:port",
    "partner": "the partner id (its folder name), when the chain identified one",
    "leaf_subject": "subject of the certificate the client presented (RFC 4514), when it "
    "presented one",
    "fingerprint_sha256": "SHA-256 fingerprint of that certificate, hex",
}


def _e(name: str, level: Level, when: str, /, **fields: str) -> Event:
    return Event(name, level, when, fields)


_ALL: tuple[Event, ...] = (
    # --- lifecycle
    _e(
        "gateway_started",
        "info",
        "the listeners are bound and policies loaded (with --workers: once every worker is up)",
        version="the edge's version (as `edge --version` prints it)",
        listeners="listener name -> bound addresses, plus `metrics`",
        partners="partner counts by state (enabled, disabled, broken)",
        pools="pool name -> member hosts",
        workers="with --workers: the worker process ids",
    ),
    _e(
        "startup_failed",
        "error",
        "the configuration or a policies folder cannot be used; the process exits 1",
        config="the configuration file",
        problems="every problem found, one string each (also printed on stderr)",
    ),
    _e(
        "shutdown_started",
        "info",
        "SIGTERM/SIGINT received: listeners close and open connections drain",
        why="the signal or cause",
        active_connections="connections open when the drain began",
        workers="with --workers: how many workers are being stopped",
    ),
    _e(
        "drain_timeout",
        "warning",
        "drain_timeout_s passed with connections still open; they are closed now",
        closing="connections being closed",
        drain_timeout_s="the configured drain timeout",
    ),
    _e("gateway_stopped", "info", "the process is about to exit 0 after a drain"),
    _e(
        "accept_error",
        "error",
        "accepting a connection failed (e.g. out of file descriptors); retried after 0.1 s",
        listener="the listener",
        error="the operating system's error text",
    ),
    _e(
        "internal_error",
        "error",
        "a bug ended one connection (which is also logged as rejected or closed); the "
        "gateway carries on",
        listener="the listener",
        peer="the client's address",
        error="exception type and message",
        where="file:line where it was raised",
    ),
    # --- connections
    _e(
        "connection_rejected",
        "warning",
        "a connection was refused before any byte was relayed (exactly one per refused connection)",
        **_CONN,
        reason="the reason code (see reason-codes.md)",
        detail="what exactly failed, clipped",
        direction="`inbound` (a partner connecting) or `outbound` (a pool member going to a "
        "partner); outbound events always carry it",
        member="outbound: the pool member (its topology host) that asked, once its "
        "certificate was accepted",
        partner_edge="outbound: the partner edge dialled, host:port (and the address), when "
        "one answered",
    ),
    _e(
        "connection_closed",
        "info",
        "a relayed connection ended (exactly one per admitted connection)",
        **_CONN,
        tls_version="the partner side's TLS version",
        member="inbound: the pool member it was relayed to; outbound: the pool member that asked",
        bytes_from_partner="application bytes received from the partner",
        bytes_to_partner="application bytes sent to the partner",
        duration_s="seconds from accept to close",
        end="how it ended: partner_closed, pool_closed, partner_truncated, pool_truncated, "
        "partner_error, pool_error, idle_timeout, shutdown, trust_withdrawn, closed, cancelled; "
        "on a SIP listener also sip_malformed, sip_too_large",
        reason="with end=trust_withdrawn: the reason code of the re-check that failed",
        detail="more about the end, when there is more, clipped",
        direction="`inbound` or `outbound` (a pool member's connection to a partner; "
        "`member` is then who asked and `tls_version` the member side's)",
        partner_edge="outbound: the partner edge it was relayed to, host:port (and the address)",
    ),
    _e(
        "sip_rejected",
        "warning",
        "a SIP listener refused a message: answered by the edge (or dropped, for an ACK) and "
        "never relayed; after sip_malformed or sip_too_large the connection closes",
        listener="the listener",
        peer="the partner's address, host:port (outbound: the pool member's)",
        partner="the partner id (`unknown` when refused before a partner was chosen)",
        method="the request's method (empty for a response or an unreadable start line), sanitized",
        call_id="the message's Call-ID, sanitized and clipped",
        offending_domain="with sip_domain_mismatch: the From or P-Asserted-Identity host "
        "outside the partner's domains, `(none)` when the URI proves no domain; sanitized",
        reason="sip_domain_mismatch, sip_malformed or sip_too_large; on outbound SIP also "
        "unknown_destination, partner_unreachable, partner_untrusted, partner_disabled, "
        "over_limit (answered 404 or 503)",
        answered="the status code the edge answered (403, 400, 413, 513), or null when no "
        "answer could or may be sent (an ACK, an unreadable request)",
        detail="with sip_malformed or sip_too_large: what exactly is wrong",
    ),
    # --- reload
    _e(
        "policies_reloaded",
        "info",
        "a policies folder was reloaded (a change was seen, or SIGHUP)",
        folder="the policies folder",
        result="ok, or error when a partner is broken",
        added="partner ids that appeared",
        removed="partner ids that disappeared",
        changed="partner ids whose policy, roots or CRLs changed",
        broken="partner ids with a fatal problem (each keeps its last good policy if it had one)",
        partners="partner counts by state",
    ),
    _e(
        "policies_reload_failed",
        "error",
        "the policies folder itself could not be read; the previous snapshot stays in use",
        folder="the policies folder",
        error="why",
    ),
    _e(
        "partner_problem",
        "warning",
        "a partner folder or file has a problem (at start and on every reload)",
        partner="the partner id",
        file="the file concerned",
        problem="what is wrong",
        kept_last_good="on a reload: true when the partner keeps its previous, working policy",
    ),
    _e(
        "partner_notice",
        "info",
        "an entry of a partner folder is ignored (a backup copy, a hidden name); said once, "
        "at start or on the reload that first saw it",
        partner="the partner id",
        file="the entry concerned",
        notice="what the edge does with it",
    ),
    _e(
        "config_warning",
        "warning",
        "edge.toml loads but something in it deserves attention (a private key file other "
        "users can read); at start and after every configuration reload",
        config="the configuration file",
        warning="what to look at, and what to do",
    ),
    _e(
        "config_reloaded",
        "info",
        "edge.toml or an identity file changed and was applied",
        config="the configuration file",
        applied="sections applied live (identity, limits, policies)",
        needs_restart="sections that changed but apply only after a restart "
        "(listeners, metrics, pools)",
    ),
    _e(
        "config_reload_failed",
        "error",
        "the changed edge.toml or identity files do not load; everything loaded before stays",
        config="the configuration file",
        problems="every problem found",
        kept="what stays in use",
    ),
    _e(
        "reload_failed",
        "error",
        "a reload raised an unexpected error (a bug); the previous state stays, the next "
        "poll retries",
        error="exception type and message",
        where="file:line where it was raised",
    ),
    # --- CRL fetching
    _e(
        "crl_fetched",
        "info",
        "a CRL was fetched from a distribution point and differs from the one held",
        partner="the partner whose certificates name the distribution point",
        url="the distribution point",
        issuer="the CRL's issuer",
        next_update="the CRL's nextUpdate, ISO 8601",
        revoked="how many certificates it lists",
    ),
    _e(
        "crl_fetch_failed",
        "warning",
        "fetching a CRL failed; the last good one is kept and the fetch retried with back-off",
        partner="the partner",
        url="the distribution point",
        error="why",
        retry_in_s="seconds until the next attempt",
        kept_last_good="true when an earlier copy is still used",
    ),
    _e(
        "crl_fetch_refused",
        "warning",
        "a fetched body was not accepted: not a usable CRL of that issuer, not newer than the "
        "one held, a delta CRL, or a destination refused (private address, size, redirect); "
        "the last good CRL is kept",
        partner="the partner",
        url="the distribution point",
        why="why it was refused",
        retry_in_s="seconds until the next attempt",
        kept_last_good="true when an earlier copy is still used",
    ),
    _e(
        "crls_applied",
        "info",
        "fetched CRLs were merged into the partners' policies and live connections re-checked",
        partners="partner id -> number of fetched CRLs",
    ),
    # --- pools
    _e(
        "upstream_error",
        "warning",
        "one attempt to reach a pool member for a partner connection failed (the next member "
        "is tried)",
        pool="the pool",
        member="the member's host",
        reason="connect_failed, upstream_timeout, upstream_tls_error or upstream_untrusted",
        detail="what exactly failed",
    ),
    _e(
        "pool_member_down",
        "warning",
        "a member failed unhealthy_after times in a row and left the rotation",
        pool="the pool",
        member="the member's host",
        reason="the last failure's reason",
        detail="the last failure's detail",
    ),
    _e(
        "pool_member_up",
        "info",
        "a member succeeded healthy_after times in a row and is back in rotation",
        pool="the pool",
        member="the member's host",
    ),
    _e(
        "pool_member_added",
        "info",
        "an SRV answer named a new member",
        pool="the pool",
        member="the target host",
        port="the target port",
    ),
    _e(
        "pool_member_removed",
        "info",
        "an SRV answer no longer names a member (its live connections run on)",
        pool="the pool",
        member="the target host",
        port="the target port",
    ),
    _e(
        "dns_error",
        "warning",
        "a pool lookup failed (timeout, SERVFAIL, NXDOMAIN, no record); the last good answer "
        "is kept and the lookup retried with back-off",
        pool="the pool",
        name="the name looked up",
        detail="why",
    ),
    # --- outbound federation
    _e(
        "srv_target_ignored",
        "warning",
        "an SRV answer for a partner named a target outside the partner's domains (and not "
        "its `edge`); the target is never dialled",
        partner="the partner",
        srv="the SRV name looked up",
        target="the ignored target (DNS text form, bounded)",
        port="the ignored target's port",
        detail="why it was ignored",
    ),
    _e(
        "partner_edge_untrusted",
        "warning",
        "an outbound dial reached a partner edge whose certificate the partner's trust refused; "
        "the next target is tried",
        partner="the partner",
        partner_edge="host:port dialled",
        reason="the verifier's reason code",
        detail="why (bounded)",
    ),
    # --- workers (edge run --workers N)
    _e(
        "worker_started",
        "info",
        "a worker is up (its own gateway_started, renamed by the supervisor)",
        listeners="listener name -> bound addresses",
        partners="partner counts by state",
        pools="pool name -> member hosts",
        pid="the worker's process id",
    ),
    _e(
        "worker_exited",
        "error",
        "a worker exited unexpectedly; it is restarted after a back-off",
        pid="its process id",
        code="its exit status",
        restart_in_s="seconds until the restart",
    ),
    _e(
        "worker_stopped",
        "info",
        "a worker exited during shutdown",
        pid="its process id",
        code="its exit status",
    ),
    _e(
        "worker_killed",
        "error",
        "a worker had not drained within drain_timeout_s plus a margin and was killed",
        pid="its process id",
    ),
    _e(
        "worker_output",
        "warning",
        "a worker wrote a line that is not a JSON event (e.g. a crash message)",
        text="the line",
    ),
)

EVENTS: Mapping[str, Event] = {e.name: e for e in _ALL}


def level_of(name: str) -> Level:
    """The registered level of an event; an unknown event is an error."""
    event = EVENTS.get(name)
    return event.level if event is not None else "error"


def check(name: str, fields: Iterable[str]) -> list[str]:
    """Problems with one event: an unregistered name or field (empty: fine)."""
    event = EVENTS.get(name)
    if event is None:
        return [f"unregistered log event {name!r} (add it to edge/events.py)"]
    return [
        f"log event {name!r}: unregistered field {field!r} (add it to edge/events.py)"
        for field in fields
        if field not in event.fields and field not in COMMON_FIELDS
    ]
