"""The alarm path's store in milliseconds: what committing a batch of events leaves behind.

:meth:`server.storage.incidents.IncidentStore.commit_events` called directly on the server's
storage (no broker, no server), on each backend (``storage``): the result it returns for each
event (what the ACK and the console's notices are made of), the incident it opens, and the
audit row that opening writes (the first line of the incident's timeline in the console).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

import protocol.ulid
from protocol.messages import Event
from protocol.ulid import new_ulid
from server.storage import Storage
from server.storage.incidents import Committed

POST = "P001"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _event(seq: int = 1, ts: float | None = None, post: str = POST) -> Event:
    return Event(id=new_ulid(), post=post, seq=seq, ts=time.time() if ts is None else ts)


def _ulid_ms(ulid: str) -> int:
    """The milliseconds a ULID was stamped with (its first 10 characters)."""
    value = 0
    for char in ulid[:10]:
        value = value * 32 + _CROCKFORD.index(char)
    return value


def _opened(storage: Storage, incident_id: str) -> dict[str, object]:
    rows = [r for r in storage.incidents.audit(incident_id) if r["action"] == "opened"]
    assert len(rows) == 1
    return rows[0]


def test_a_resent_event_is_a_duplicate_of_the_incident_it_joined_and_opens_nothing(
        storage: Storage) -> None:
    event = _event()
    now = time.time()
    [first] = storage.incidents.commit_events([(event, now)])
    assert first.duplicate is False and first.new_incident is True
    [again] = storage.incidents.commit_events([(event, now + 1)])
    assert again == Committed(event.id, first.incident_id, True, False)
    assert again.new_incident is False  # exactly False: the notice says "not a new incident"


def test_an_event_joining_an_open_incident_is_not_new_and_not_test(storage: Storage) -> None:
    now = time.time()
    opened, joined = storage.incidents.commit_events([(_event(1), now), (_event(2), now)])
    assert (opened.new_incident, opened.test) == (True, False)
    assert joined.incident_id == opened.incident_id
    assert joined.new_incident is False and joined.test is False


def test_an_incident_opened_in_test_mode_is_classified_test_and_says_so(
        storage: Storage) -> None:
    storage.posts.set_test_mode(POST, True, actor="alice", reason="drill")
    event = _event()
    [result] = storage.incidents.commit_events([(event, time.time())])
    assert result.test is True and result.new_incident is True
    incident = storage.incidents.get(result.incident_id)
    assert incident is not None and incident["classification"] == "test"
    assert _opened(storage, result.incident_id)["detail"] == \
        f"alarm event {event.id} (post in test mode)"
    # Another post, not in test mode: a real incident.
    other = _event(post="P002")
    [real] = storage.incidents.commit_events([(other, time.time())])
    assert real.test is False
    incident = storage.incidents.get(real.incident_id)
    assert incident is not None and incident["classification"] is None
    assert _opened(storage, real.incident_id)["detail"] == f"alarm event {other.id}"


def test_an_implausible_press_time_is_flagged_in_the_result_and_the_timeline(
        storage: Storage) -> None:
    now = time.time()
    ahead = _event(ts=now + 3600)  # a post whose clock is an hour ahead
    [result] = storage.incidents.commit_events([(ahead, now)])
    assert result.clock_suspect is True
    assert _opened(storage, result.incident_id)["detail"] == \
        f"alarm event {ahead.id} (the post's clock is implausible)"
    plain = _event(post="P002", ts=now)
    [fine] = storage.incidents.commit_events([(plain, now)])
    assert fine.clock_suspect is False
    assert _opened(storage, fine.incident_id)["detail"] == f"alarm event {plain.id}"


def test_an_incidents_id_carries_the_time_it_was_opened(
        storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    # ULIDs minted without a time of their own would say 1970: the store must stamp the
    # incident with the time it opened it (the time its audit row gives).
    monkeypatch.setattr(protocol.ulid, "time", SimpleNamespace(time=lambda: 0.0))
    [result] = storage.incidents.commit_events([(_event(), time.time())])
    opened_at = _opened(storage, result.incident_id)["at"]
    assert isinstance(opened_at, float)
    assert _ulid_ms(result.incident_id) == int(opened_at * 1000)


def test_an_event_in_a_later_batch_joins_the_incident_its_post_has_open(
        storage: Storage) -> None:
    now = time.time()
    [first] = storage.incidents.commit_events([(_event(1), now)])
    [later] = storage.incidents.commit_events([(_event(2), now + 5)])
    assert later.incident_id == first.incident_id and later.new_incident is False
    incident = storage.incidents.get(first.incident_id)
    assert incident is not None and incident["event_count"] == 2
    [other] = storage.incidents.commit_events([(_event(1, post="P002"), now + 6)])
    assert other.incident_id != first.incident_id and other.new_incident is True


def test_a_duplicate_in_a_batch_does_not_stop_the_events_after_it(storage: Storage) -> None:
    now = time.time()
    first = _event(1)
    storage.incidents.commit_events([(first, now)])
    second = _event(2)
    again, new = storage.incidents.commit_events([(first, now + 1), (second, now + 1)])
    assert again.duplicate is True and new.duplicate is False
    assert new.event_id == second.id
    # The same event twice in one batch: stored once, the second a duplicate of the first.
    third = _event(3)
    once, twice = storage.incidents.commit_events([(third, now + 2), (third, now + 2)])
    assert once.duplicate is False and twice.duplicate is True
    assert twice.incident_id == once.incident_id == again.incident_id


def test_an_id_another_post_has_used_is_a_collision_stored_as_its_own(
        storage: Storage) -> None:
    now = time.time()
    mine = _event(1)
    theirs = Event(id=mine.id, post="P002", seq=1, ts=now)
    [a] = storage.incidents.commit_events([(mine, now)])
    [b] = storage.incidents.commit_events([(theirs, now)])
    assert a.collision is False and b.collision is True and b.duplicate is False
    # Within one batch as well.
    shared = new_ulid()
    one, two = storage.incidents.commit_events([
        (Event(id=shared, post=POST, seq=2, ts=now), now),
        (Event(id=shared, post="P002", seq=2, ts=now), now)])
    assert (one.collision, two.collision) == (False, True)


def test_a_repeated_seq_and_a_new_epoch_are_reported_in_the_results(storage: Storage) -> None:
    now = time.time()
    one = Event(id=new_ulid(), post=POST, seq=1, ts=now, epoch="epochA")
    same_seq = Event(id=new_ulid(), post=POST, seq=1, ts=now, epoch="epochA")
    first, repeat = storage.incidents.commit_events([(one, now), (same_seq, now)])
    assert first.seq_anomaly == "" and repeat.seq_anomaly == "repeat"
    later = Event(id=new_ulid(), post=POST, seq=1, ts=now, epoch="epochB")
    [fresh] = storage.incidents.commit_events([(later, now)])
    assert fresh.epoch_changed == "epochA" and fresh.seq_anomaly == ""
