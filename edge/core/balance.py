"""Balancing decisions for the pools: the health machine and the choice of a member.

Owns the pure decisions the pool shell (``edge.pools``) takes at every dial
and every health check: ``observe`` (a member's place in the rotation after
one more check), ``choose`` (the member for the next connection), ``advance``
(its next virtual pass) and ``refresh_delay`` (when DNS answers are due again).

Must never: do I/O, read a clock, or hold mutable state: the shell passes
immutable ``Health`` and ``Candidate`` values in and keeps the results.

General theory of operation
===========================

Two layers, as in the rest of the gateway. The *decisions* are pure
functions in this module, testable without a socket:

* ``observe(health, ok, ...)`` is the health state machine: a member leaves
  the rotation after ``unhealthy_after`` consecutive failures and comes back
  after ``healthy_after`` consecutive successes. Active checks and real
  traffic feed the same machine (a failed connect or handshake for a partner
  is as much evidence as a failed check).
* ``choose(candidates, balance, exclude)`` picks a member from immutable
  ``Candidate`` views. Eligible: in rotation, has an address, under its
  ``max_connections``, not already tried for this connection. Among those, the
  lowest SRV priority wins (static members all have priority 0), and weight-0
  SRV targets only serve when no positive-weight target of that priority can.
  Every pick advances the chosen member's *virtual pass* by ``1 / weight``
  (stride scheduling): ``round_robin`` takes the smallest pass, a smooth
  weighted round robin whose shares match the weights exactly over any
  window. ``least_connections`` takes the smallest
  ``pass + LOAD_FACTOR * active / weight``:
  in an idle pool (short connections) that is the same weighted round robin;
  when connections pile up on a member (slow, or holding long sessions) its
  score rises and new connections go elsewhere until its load per weight
  matches the others'. Plain ``active / weight`` (nginx) or HAProxy's
  ``(active + 1) / weight`` do not hold the weights at low concurrency: the
  first favours any idle light member, the second sends everything to the
  heaviest member of an idle pool. A member that joins (SRV answer) or comes
  back into rotation starts at the rotation's lowest pass, so it is not
  flooded to "catch up". ``LOAD_FACTOR`` = 2 is the trade: a member that
  holds every connection it gets receives a third of its fair share of new
  ones, while random connection lifetimes keep the weights within about 5%
  (tests/test_pools.py simulates both; 8 would steer harder and drift 8%).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from edge.core.config import Balance

__all__ = [
    "LOAD_FACTOR",
    "Candidate",
    "Health",
    "advance",
    "choose",
    "observe",
    "refresh_delay",
]

# How much a member's open connections (per weight) count against it, in picks.
LOAD_FACTOR = 2.0
# The shortest and longest wait between DNS refreshes (a TTL of 0 must not
# become a busy loop; a day-long TTL must not hide a change).
_MIN_REFRESH_S = 1.0
_MAX_REFRESH_S = 300.0


@dataclass(frozen=True)
class Health:
    """A member's place in the rotation and the streak that may change it."""

    up: bool = True
    successes: int = 0  # consecutive, capped at healthy_after
    failures: int = 0  # consecutive, capped at unhealthy_after


def observe(health: Health, ok: bool, *, unhealthy_after: int, healthy_after: int) -> Health:
    """The state after one more check (active or from real traffic)."""
    if ok:
        successes = min(health.successes + 1, healthy_after)
        return Health(up=health.up or successes >= healthy_after, successes=successes, failures=0)
    failures = min(health.failures + 1, unhealthy_after)
    return Health(up=health.up and failures < unhealthy_after, successes=0, failures=failures)


@dataclass(frozen=True)
class Candidate:
    """What the balancer knows about one member at the moment of a choice."""

    key: Hashable
    weight: int  # >= 1 for listed members; SRV weights may be 0
    active: int = 0
    up: bool = True
    routable: bool = True  # has an address to dial
    priority: int = 0  # SRV priority: lower is preferred
    max_connections: int | None = None
    passes: float = 0.0  # virtual pass (see the module docstring)


def choose(
    candidates: Sequence[Candidate],
    balance: Balance,
    exclude: Iterable[Hashable] = (),
    *,
    down: bool = False,
) -> Candidate | None:
    """The member for the next connection, or None when none is eligible.

    ``down=True`` chooses among the members *out* of rotation instead (the
    last resort before ``no_upstream``). Ties go to the earlier candidate, so
    the result is deterministic.
    """
    excluded = set(exclude)
    eligible = [
        (index, c)
        for index, c in enumerate(candidates)
        if c.routable
        and c.up != down
        and c.key not in excluded
        and (c.max_connections is None or c.active < c.max_connections)
    ]
    if not eligible:
        return None
    best_priority = min(c.priority for _, c in eligible)
    tier = [(i, c) for i, c in eligible if c.priority == best_priority]
    if any(c.weight > 0 for _, c in tier):
        tier = [(i, c) for i, c in tier if c.weight > 0]

    def key(item: tuple[int, Candidate]) -> tuple[float, int]:
        index, c = item
        if balance == "least_connections":
            return (c.passes + LOAD_FACTOR * c.active / max(c.weight, 1), index)
        return (c.passes, index)

    return min(tier, key=key)[1]


def advance(candidate: Candidate) -> float:
    """The chosen member's next virtual pass."""
    return candidate.passes + 1.0 / max(candidate.weight, 1)


def refresh_delay(ttls: Iterable[float]) -> float:
    """Seconds until the next DNS refresh: the shortest TTL, clamped."""
    shortest = min(ttls, default=_MAX_REFRESH_S)
    return min(max(shortest, _MIN_REFRESH_S), _MAX_REFRESH_S)
