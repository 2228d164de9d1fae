"""The incident lifecycle: allowed transitions, audit log, bus notices."""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol.messages import Event
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.bus import IncidentOpened, IncidentUpdated
from server.incidents import CLASSIFICATIONS, InvalidTransition, next_state
from server.storage import IntegrityError, Storage
from tests.helpers import api, run_posts, run_server, until


def test_transition_rules() -> None:
    assert next_state("new", "acknowledged") == "acknowledged"
    assert next_state("paged", "acknowledged") == "paged"  # recorded, state kept
    assert next_state("paged", "paged") == "paged"  # re-page after decline/timeout
    assert next_state("accepted", "en_route") == "en_route"
    with pytest.raises(InvalidTransition, match="classification"):
        next_state("on_scene", "resolved")
    assert next_state("on_scene", "resolved", "medical") == "resolved"
    with pytest.raises(InvalidTransition, match="already resolved"):
        next_state("resolved", "cancelled")
    with pytest.raises(InvalidTransition, match="cannot go from new to on_scene"):
        next_state("new", "on_scene")
    with pytest.raises(InvalidTransition, match="unknown state"):
        next_state("new", "exploded")
    assert "false_alarm" in CLASSIFICATIONS


def test_storage_transitions_are_audited_and_the_audit_is_append_only(storage: Storage) -> None:
    store = storage
    (res,) = store.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=time.time()),
                                   time.time())])
    store.incidents.transition(res.incident_id, "acknowledged", "op:alice")
    store.incidents.transition(res.incident_id, "paged", "dispatcher", reason="team T1")
    with pytest.raises(InvalidTransition):
        store.incidents.transition(res.incident_id, "resolved", "op:alice")
    incident = store.incidents.transition(res.incident_id, "resolved", "op:alice",
                                classification="help_request", reason="crowd at the gate")
    assert incident["state"] == "resolved" and incident["classification"] == "help_request"
    assert incident["acknowledged_by"] == "op:alice"
    assert [(a["actor"], a["action"], a["to_state"]) for a in incident["timeline"]] == [
        ("post:P001", "opened", "new"),
        ("op:alice", "acknowledged", "acknowledged"),
        ("dispatcher", "paged", "paged"),
        ("op:alice", "resolved", "resolved"),
    ]
    assert store.incidents.open_count() == 0
    with pytest.raises(LookupError):
        store.incidents.transition("nope", "acknowledged", "op:alice")
    with pytest.raises(IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    with pytest.raises(IntegrityError, match="append-only"):
        store.db.execute("UPDATE audit SET actor='mallory'")
    # A new press after resolution opens a new incident.
    (res2,) = store.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=2, ts=time.time()),
                                    time.time())])
    assert res2.new_incident and res2.incident_id != res.incident_id


async def test_bus_tells_subscribers_and_api_shows_the_timeline(
    deployment: d.Deployment, server: CentralServer
) -> None:
    notices = server.bus.subscribe()
    async with run_posts(deployment, "P001") as posts:
        await posts["P001"].press()
        opened = await asyncio.wait_for(notices.get(), 5)
        while not isinstance(opened, IncidentOpened):
            opened = await asyncio.wait_for(notices.get(), 5)
        assert opened.post_id == "P001"
        server.transition(opened.incident_id, "acknowledged", "op:bob")
        updated = await asyncio.wait_for(notices.get(), 5)
        while not isinstance(updated, IncidentUpdated):  # e.g. dispatch_queued: no teams here
            updated = await asyncio.wait_for(notices.get(), 5)
        # What a console receives of it.
        assert updated.as_dict() == {"type": "incident_updated", "incident_id": opened.incident_id,
                                     "state": "acknowledged", "action": "acknowledged",
                                     "actor": "op:bob"}
    body = await api(deployment, f"/api/incidents/{opened.incident_id}")
    actions = [a["action"] for a in body["timeline"]]
    assert actions[0] == "opened" and actions[-1] == "acknowledged"
    assert "dispatch_queued" in actions  # no patrol team in this deployment, and it says so
    assert (await api(deployment, "/api/incidents?state=open"))[0]["id"] == opened.incident_id
    assert await api(deployment, "/api/incidents?state=closed") == []
    server.bus.unsubscribe(notices)


async def test_auto_resolve_closes_idle_incidents(make_deployment) -> None:
    dep = make_deployment(1, auto_resolve_s=0.4)
    async with run_server(dep) as server, run_posts(dep, "P001") as posts:
        await posts["P001"].press()
        await until(lambda: server.storage.incidents.open_count() == 1, 5, "incident opened")
        await until(lambda: server.storage.incidents.open_count() == 0, 5, "incident resolved")
        (incident,) = server.storage.incidents.recent("closed", 10)
        assert incident["classification"] == "test"


def test_the_audit_records_who_when_and_why(storage: Storage) -> None:
    """Each timeline entry says who did it, when (the time given, else now), from which state
    and why; a resolution says its classification before the note. Idle incidents are resolved
    as `test` by `system`, at the time the sweep ran, and say why."""
    store = storage
    now = time.time()
    (a,) = store.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=now), now)])
    (b,) = store.incidents.commit_events([(Event(id=new_ulid(), post="P002", seq=1, ts=now), now)])
    store.incidents.transition(a.incident_id, "acknowledged", "op:alice", at=now + 5)
    store.incidents.transition(a.incident_id, "acknowledged", "op:bob", at=now + 6)  # the first one stays
    resolved = store.incidents.transition(a.incident_id, "resolved", "op:alice", at=now + 9,
                                classification="help_request", reason="crowd at the gate")
    assert resolved["acknowledged_by"] == "op:alice" and resolved["acknowledged_at"] == now + 5
    assert resolved["closed_at"] == now + 9 and resolved["note"] == "crowd at the gate"
    entry = resolved["timeline"][-1]
    assert (entry["at"], entry["from_state"], entry["to_state"], entry["detail"]) == (
        now + 9, "acknowledged", "resolved", "help_request: crowd at the gate")
    assert resolved["timeline"][1]["detail"] == ""
    with pytest.raises(LookupError, match="no incident 'nope'"):
        store.incidents.transition("nope", "acknowledged", "op:alice")

    assert store.incidents.resolve_idle(30.0, now + 10) == []  # idle only 10 s
    assert store.incidents.resolve_idle(30.0, now + 31) == [b.incident_id]
    swept = store.incidents.get(b.incident_id)
    assert swept is not None and swept["classification"] == "test"
    assert swept["closed_at"] == now + 31
    last = swept["timeline"][-1]
    assert (last["actor"], last["action"], last["at"], last["detail"]) == (
        "system", "resolved", now + 31, "test: resolved automatically after 30 s idle")
    assert store.incidents.open_count() == 0
