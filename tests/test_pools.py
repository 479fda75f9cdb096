"""Pools: the balancer and health machine as pure functions, then the real thing.

The first half runs the sans-I/O decisions of ``edge.pools`` in microseconds.
The second half runs real members (MTLS on 127.0.0.1), a real DNS server
(dnspython's message parsing and rendering on a loopback UDP port, serving
records the test changes while the edge runs) and, end to end, ``edge run``
as a subprocess.
"""

from __future__ import annotations

import random
from collections import Counter

from edge.pools import Candidate, Health, advance, choose, observe, refresh_delay

# ----------------------------------------------------------------------
# Core: pure decisions


def _simulate(
    weights: dict[str, int],
    balance: str,
    picks: int,
    *,
    hold: int = 0,
    seed: int = 7,
) -> Counter[str]:
    """Pick ``picks`` times; each connection lives for ``hold`` later picks on average."""
    rng = random.Random(seed)
    active: Counter[str] = Counter()
    passes: dict[str, float] = dict.fromkeys(weights, 0.0)
    live: list[str] = []
    chosen_count: Counter[str] = Counter()
    for _ in range(picks):
        cands = [
            Candidate(key=k, weight=w, active=active[k], passes=passes[k])
            for k, w in weights.items()
        ]
        c = choose(cands, balance)  # type: ignore[arg-type]
        assert c is not None
        passes[str(c.key)] = advance(c)
        chosen_count[str(c.key)] += 1
        active[str(c.key)] += 1
        live.append(str(c.key))
        # Connections end at random, so the pool holds about `hold` of them.
        while len(live) > hold:
            ended = live.pop(rng.randrange(len(live)))
            active[ended] -= 1
    return chosen_count


def _within(counts: Counter[str], weights: dict[str, int], tolerance: float) -> None:
    total = sum(counts.values())
    weight_sum = sum(weights.values())
    for key, weight in weights.items():
        expected = total * weight / weight_sum
        assert abs(counts[key] - expected) <= tolerance * expected, (key, counts, expected)


def test_weights_hold_over_1000_connections() -> None:
    weights = {"fe1": 1, "fe2": 2, "fe3": 3, "fe4": 4}
    for balance in ("least_connections", "round_robin"):
        for hold in (0, 5, 50, 2000):  # short-lived to never-ending connections
            _within(_simulate(weights, balance, 1000, hold=hold), weights, 0.10)
    # Idle members and short connections: exactly proportional.
    assert _simulate(weights, "round_robin", 1000) == Counter(
        {"fe1": 100, "fe2": 200, "fe3": 300, "fe4": 400}
    )


def test_least_connections_prefers_the_idle_member() -> None:
    cands = [
        Candidate(key="busy", weight=1, active=10, passes=5.0),
        Candidate(key="idle", weight=1, active=0, passes=6.0),
    ]
    chosen = choose(cands, "least_connections")
    assert chosen is not None and chosen.key == "idle"
    # Round robin ignores the load, goes by pass.
    chosen = choose(cands, "round_robin")
    assert chosen is not None and chosen.key == "busy"
    # Weighted: 10 connections on weight 10 is lighter than 2 on weight 1.
    cands = [Candidate(key="big", weight=10, active=10), Candidate(key="small", weight=1, active=2)]
    chosen = choose(cands, "least_connections")
    assert chosen is not None and chosen.key == "big"


def test_least_connections_steers_around_a_member_that_holds_connections() -> None:
    """One member never finishes its connections: it gets far fewer new ones."""
    active: Counter[str] = Counter()
    passes = {"slow": 0.0, "fast1": 0.0, "fast2": 0.0}
    picks: Counter[str] = Counter()
    for _ in range(300):
        cands = [Candidate(key=k, weight=1, active=active[k], passes=passes[k]) for k in passes]
        c = choose(cands, "least_connections")
        assert c is not None
        key = str(c.key)
        passes[key] = advance(c)
        picks[key] += 1
        if key == "slow":
            active[key] += 1  # the fast members finish at once
    assert picks["slow"] < 300 / 3 / 2, picks


def test_eligibility_down_full_unroutable_excluded() -> None:
    cands = [
        Candidate(key="down", weight=1, up=False),
        Candidate(key="full", weight=1, active=3, max_connections=3),
        Candidate(key="noaddr", weight=1, routable=False),
        Candidate(key="tried", weight=1),
    ]
    assert choose(cands, "least_connections", ["tried"]) is None
    ok = choose(cands, "least_connections")
    assert ok is not None and ok.key == "tried"
    # Last resort: the members out of rotation, still not full or unroutable ones.
    last = choose(cands, "least_connections", ["tried"], down=True)
    assert last is not None and last.key == "down"


def test_srv_priority_and_zero_weight() -> None:
    cands = [
        Candidate(key="backup", weight=100, priority=20),
        Candidate(key="zero", weight=0, priority=10),
        Candidate(key="main", weight=5, priority=10),
    ]
    for _ in range(3):
        chosen = choose(cands, "least_connections")
        assert chosen is not None and chosen.key == "main"
    # Weight 0 serves when nothing else of its priority can; then the next priority.
    chosen = choose(cands, "least_connections", ["main"])
    assert chosen is not None and chosen.key == "zero"
    chosen = choose(cands, "least_connections", ["main", "zero"])
    assert chosen is not None and chosen.key == "backup"


def test_health_machine_thresholds() -> None:
    h = Health()
    assert h.up
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h.up  # two failures of three
    h = observe(h, True, unhealthy_after=3, healthy_after=2)  # a success resets the streak
    for _ in range(2):
        h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h.up
    h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert not h.up
    h = observe(h, True, unhealthy_after=3, healthy_after=2)
    assert not h.up
    h = observe(h, True, unhealthy_after=3, healthy_after=2)
    assert h.up
    # Counters are capped: no unbounded growth on a member that stays down.
    for _ in range(1000):
        h = observe(h, False, unhealthy_after=3, healthy_after=2)
    assert h == Health(up=False, successes=0, failures=3)


def test_refresh_delay_is_clamped() -> None:
    assert refresh_delay([0]) == 1.0
    assert refresh_delay([30, 7]) == 7
    assert refresh_delay([86400]) == 300
    assert refresh_delay([]) == 300
