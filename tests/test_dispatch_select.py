"""Property tests: the team chosen is the nearest available one by the rule."""

from __future__ import annotations

import math
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from server.dispatch import TeamIndex
from server.patrol import Team, haversine_km, make_team, on_shift, parse_shift, point_in_polygon

NOW = time.time()
MAX_AGE = 120.0
POST = ("P001", 26.08, 119.33)

team_st = st.fixed_dictionaries({
    "dlat": st.floats(-0.2, 0.2, allow_nan=False),
    "dlon": st.floats(-0.2, 0.2, allow_nan=False),
    "device_ok": st.booleans(),
    "free": st.booleans(),
    "fresh": st.sampled_from([True, True, True, False]),
    "zone": st.booleans(),
})


def build(specs: list[dict[str, object]]) -> TeamIndex:
    teams = [Team(id=f"T{i:03d}", zone_posts=frozenset({"P001"}) if s["zone"] else frozenset())
             for i, s in enumerate(specs)]
    index = TeamIndex(teams)
    for i, s in enumerate(specs):
        tid = f"T{i:03d}"
        age = 10.0 if s["fresh"] else MAX_AGE + 10
        index.set_position(tid, POST[1] + float(s["dlat"]), POST[2] + float(s["dlon"]),  # type: ignore[arg-type]
                           NOW - age)
        index.device_ok[i] = bool(s["device_ok"])
        index.free[i] = bool(s["free"])
    return index


def rule_cost(index: TeamIndex, i: int, margin: float) -> float:
    """The rule, written plainly: distance minus the zone margin; unknown positions last."""
    zone = margin if "P001" in index.teams[i].zone_posts else 0.0
    if index.position_at[i] < NOW - MAX_AGE:
        return 1e12 - zone
    return haversine_km(POST[1], POST[2], index.lat_deg[i], index.lon_deg[i]) - zone


@settings(max_examples=300, deadline=None)
@given(st.lists(team_st, max_size=40), st.floats(0, 3), st.sets(st.integers(0, 39), max_size=5))
def test_chosen_team_is_nearest_available_by_the_rule(specs, margin, excluded) -> None:
    index = build(specs)
    exclude = {f"T{i:03d}" for i in excluded}
    choice = index.choose(*POST, now=NOW, max_age_s=MAX_AGE, zone_margin_km=margin, exclude=exclude)
    eligible = [i for i, s in enumerate(specs)
                if s["device_ok"] and s["free"] and f"T{i:03d}" not in exclude]
    if not eligible:
        assert choice is None
        return
    assert choice is not None
    chosen = index.pos[choice.team_id]
    assert chosen in eligible
    best = min(rule_cost(index, i, margin) for i in eligible)
    assert rule_cost(index, chosen, margin) <= best + 1e-6
    # A free team with a known position always beats one whose position is unknown.
    if any(specs[i]["fresh"] for i in eligible):
        assert choice.distance_km is not None
        assert math.isclose(choice.distance_km, haversine_km(
            POST[1], POST[2], index.lat_deg[chosen], index.lon_deg[chosen]), abs_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(team_st, max_size=40), st.floats(0.5, 30))
def test_broadcast_reaches_every_available_team_within_the_radius(specs, radius) -> None:
    index = build(specs)
    got = index.within(POST[1], POST[2], radius, now=NOW, max_age_s=MAX_AGE)
    want = {f"T{i:03d}" for i, s in enumerate(specs)
            if s["device_ok"] and s["free"] and s["fresh"]
            and haversine_km(POST[1], POST[2], index.lat_deg[i], index.lon_deg[i]) <= radius}
    assert {c.team_id for c in got} == want
    dists = [c.distance_km for c in got]
    assert dists == sorted(dists)


def test_zone_margin_prefers_the_zone_team_only_within_the_margin() -> None:
    teams = [Team(id="NEAR"), Team(id="ZONE", zone_posts=frozenset({"P001"}))]
    index = TeamIndex(teams)
    km = 1 / 111.2
    index.set_position("NEAR", POST[1] + 1.0 * km, POST[2], NOW)
    index.set_position("ZONE", POST[1] + 1.8 * km, POST[2], NOW)
    index.device_ok[:] = True
    pick = index.choose(*POST, now=NOW, max_age_s=MAX_AGE, zone_margin_km=1.0)
    assert pick is not None and pick.team_id == "ZONE" and pick.in_zone
    pick = index.choose(*POST, now=NOW, max_age_s=MAX_AGE, zone_margin_km=0.5)
    assert pick is not None and pick.team_id == "NEAR"


def test_geometry_and_shifts() -> None:
    # Fuzhou to Xiamen is about 210 km.
    assert 200 < haversine_km(26.07, 119.30, 24.48, 118.09) < 230
    square = ((26.0, 119.0), (26.0, 119.5), (26.5, 119.5), (26.5, 119.0))
    assert point_in_polygon(26.2, 119.2, square) and not point_in_polygon(26.6, 119.2, square)
    polygon_team = make_team("T1", zone_polygon=[list(p) for p in square])
    assert polygon_team.holds("P999", 26.2, 119.2) and not polygon_team.holds("P999", 27.0, 119.2)
    night = parse_shift("19:00-07:00")
    assert on_shift(night, 23 * 60) and on_shift(night, 6 * 60) and not on_shift(night, 12 * 60)
    assert on_shift(None, 0) and on_shift(parse_shift("07:00-19:00"), 7 * 60)


def test_a_team_off_shift_is_not_chosen() -> None:
    from server.patrol import minute_of_day

    m = minute_of_day(NOW)
    later = f"{(m + 60) // 60 % 24:02d}:{m % 60:02d}-{(m + 120) // 60 % 24:02d}:{m % 60:02d}"
    teams = [make_team("NEAR", shift=later), make_team("FAR")]
    index = TeamIndex(teams)
    index.set_position("NEAR", POST[1], POST[2], NOW)
    index.set_position("FAR", POST[1] + 0.05, POST[2], NOW)
    index.device_ok[:] = True
    pick = index.choose(*POST, now=NOW, max_age_s=MAX_AGE, zone_margin_km=0.0)
    assert pick is not None and pick.team_id == "FAR"
    index = TeamIndex([make_team("NEAR", shift=f"{m // 60:02d}:{m % 60:02d}-"
                                 f"{(m + 60) // 60 % 24:02d}:{m % 60:02d}"), make_team("FAR")])
    index.set_position("NEAR", POST[1], POST[2], NOW)
    index.set_position("FAR", POST[1] + 0.05, POST[2], NOW)
    index.device_ok[:] = True
    pick = index.choose(*POST, now=NOW, max_age_s=MAX_AGE, zone_margin_km=0.0)
    assert pick is not None and pick.team_id == "NEAR"
