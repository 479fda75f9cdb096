"""What `/readyz` answers: the readiness decision, as a pure function.

Owns the meaning of `[metrics] ready_requires` (docs/operations.md, "Readiness"):

* ``any_pool`` (the default): ready while the gateway is serving and at least
  one pool has a member in rotation. A load balancer in front of several
  edges takes an edge out only when it can relay nothing at all. Pools are
  shared by every edge, so with ``all_pools`` one broken pool (say a partner's
  dedicated pool) fails every edge's /readyz at once and the balancer drops the
  partners whose pools work too; that is rarely what an operator wants. A
  down pool is an alert (``edge_pool_member_up``), not a readiness failure.
* ``all_pools``: ready only while every pool has a member in rotation (one
  edge per pool set, or a balancer that can route around an edge).

With one pool the two are the same.

Must never: do I/O, or look at anything but what it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

__all__ = ["ReadyRequires", "decide_readiness"]

ReadyRequires = Literal["all_pools", "any_pool"]


def decide_readiness(
    serving: bool, pools_up: Mapping[str, bool], requires: ReadyRequires = "any_pool"
) -> tuple[bool, str]:
    """(ready, why) for `/readyz`.

    ``serving``: listeners bound and not shutting down. ``pools_up``: pool name
    -> whether at least one member is in rotation (with an address).
    """
    if not serving:
        return False, "not serving (starting or shutting down)"
    down = sorted(name for name, up in pools_up.items() if not up)
    if not pools_up:
        return False, "no pools configured"
    if requires == "all_pools" and down:
        return False, f"pools with no member up: {', '.join(down)} (ready_requires = all_pools)"
    if len(down) == len(pools_up):
        return False, f"no pool has a member up: {', '.join(down)}"
    if down:
        return True, f"ready; pools with no member up: {', '.join(down)}"
    return True, "ready"
