"""Incidents with their events and their append-only audit log: the alarm path's store.

An event is keyed by its post and its id: committing an event twice is a no-op that returns the
incident the first commit put it in, and another post's event with the same id is that post's own
event (a collision, counted by the caller), never a duplicate.

The incident lifecycle runs on the server's clock: an incident's ``opened_at`` and
``last_event_at`` are receipt times. The post's own time is kept as the event's ``pressed_at``; an
implausible one (ahead of the receipt beyond :data:`CLOCK_AHEAD_TOLERANCE_S`, or older than a
resend could explain, :data:`RESEND_MAX_AGE_S`) marks the event ``clock_suspect``. Per post the
store follows the outbox ``epoch`` and the highest ``seq`` seen in it: a new event whose seq
repeats one of the same epoch, or goes below the highest, is a sequence anomaly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from protocol.messages import Event
from protocol.ulid import new_ulid
from server.incidents import CLOSED, next_state
from server.storage.database import Database
from server.storage.posts import PostStore

# A post's clock may be this far ahead of the server's before its events are flagged.
CLOCK_AHEAD_TOLERANCE_S: Final = 300.0
# An event stamped longer ago than this is more than an outbox resend explains: flagged.
RESEND_MAX_AGE_S: Final = 30 * 86400.0

EVENT_COLUMNS: Final = ("id, post_id, seq, type, pressed_at, hold_ms, received_at, committed_at, "
                        "incident_id, epoch, clock_suspect")
_ACTIVE: Final = "state NOT IN ('resolved', 'cancelled')"


@dataclass(frozen=True)
class Committed:
    event_id: str
    incident_id: str
    duplicate: bool
    new_incident: bool
    test: bool = False  # opened while its post was in test mode (classified ``test``)
    collision: bool = False  # another post has an event with this id (this one is still new)
    clock_suspect: bool = False  # the post's stated time is implausible
    seq_anomaly: str = ""  # "regression" (below the epoch's highest) or "repeat"
    epoch_changed: str = ""  # the post's previous epoch, when this event starts a new one


def clock_suspect(pressed_at: float, received_at: float) -> bool:
    """True if a post's stated time cannot be right: ahead of the server beyond the tolerance,
    or older than any outbox resend (the post's outage) could explain."""
    return (pressed_at > received_at + CLOCK_AHEAD_TOLERANCE_S
            or pressed_at < received_at - RESEND_MAX_AGE_S)


class IncidentStore:
    def __init__(self, db: Database, posts: PostStore) -> None:
        self.db = db
        self.posts = posts
        self.open_by_post: dict[str, str] = {
            r["post_id"]: r["id"]
            for r in db.query(f"SELECT id, post_id FROM incidents WHERE {_ACTIVE}")}

    # -------------------------------------------------------------- the alarm path
    def commit_events(self, batch: Sequence[tuple[Event, float]]) -> list[Committed]:
        """Commit a batch of events in one transaction; open or join each post's incident.

        ``batch`` holds (event, server receipt time). Incidents open and age on receipt times;
        the event's own ``ts`` is kept as ``pressed_at`` and flagged when implausible.

        The batch costs a fixed number of statements, not a few per event: one look-up of the
        ids already stored, then one multi-row write per table. (On PostgreSQL every statement
        is a round trip; a burst of 1,000 presses must not become 6,000 of them.)
        """
        results: list[Committed] = []
        now = time.time()
        db = self.db
        opened: dict[str, str] = {}
        seqs = dict(self.posts.seq)  # (epoch, highest seq) per post, as this batch leaves them
        tallies: dict[str, list[int]] = {}  # post -> [regressions, repeats, epoch changes]
        new_incidents: list[tuple[Any, ...]] = []
        audits: list[tuple[Any, ...]] = []
        joins: list[tuple[Any, ...]] = []
        rows: list[list[Any]] = []
        with db.transaction():
            stored, posts_of = self._stored([event.id for event, _ in batch])
            in_batch: set[tuple[str, str, int]] = set()  # (post, epoch, seq) of new events here
            for event, received_at in batch:
                key = (event.post, event.id)
                if key in stored:
                    results.append(Committed(event.id, stored[key], True, False))
                    continue
                collision = bool(posts_of.get(event.id, set()) - {event.post})
                suspect = clock_suspect(event.ts, received_at)
                anomaly, old_epoch = self._check_seq(event, seqs, tallies, in_batch)
                incident_id = opened.get(event.post) or self.open_by_post.get(event.post)
                new = incident_id is None
                test = False
                if incident_id is None:
                    incident_id = new_ulid(now)
                    test = self.posts.in_test_mode(event.post)
                    new_incidents.append((incident_id, event.post, received_at, received_at,
                                          event.id, "test" if test else None))
                    audits.append((
                        incident_id, now, f"post:{event.post}",
                        f"{event.type} event {event.id}" + (" (post in test mode)" if test else "")
                        + (" (the post's clock is implausible)" if suspect else "")))
                    opened[event.post] = incident_id
                else:
                    joins.append((received_at, received_at, incident_id))
                rows.append([event.id, event.post, event.seq, event.type, event.ts, event.hold_ms,
                             received_at, 0.0, incident_id, event.epoch, int(suspect)])
                stored[key] = incident_id  # the same event twice in one batch: once
                posts_of.setdefault(event.id, set()).add(event.post)
                in_batch.add((event.post, event.epoch, event.seq))
                results.append(Committed(event.id, incident_id, False, new, test, collision,
                                         suspect, anomaly, old_epoch))
            if new_incidents:
                db.executemany(
                    "INSERT INTO incidents (id, post_id, state, opened_at, last_event_at, "
                    "event_count, first_event_id, classification) VALUES (?, ?, 'new', ?, ?, 1, ?, ?)",
                    new_incidents)
                db.executemany(
                    "INSERT INTO audit (incident_id, at, actor, action, to_state, detail) "
                    "VALUES (?, ?, ?, 'opened', 'new', ?)", audits)
            if joins:
                db.executemany(
                    "UPDATE incidents SET event_count = event_count + 1, last_event_at = "
                    "CASE WHEN last_event_at > ? THEN last_event_at ELSE ? END WHERE id=?", joins)
            if rows:
                committed_at = time.time()  # in the committing transaction, just before COMMIT
                for row in rows:
                    row[7] = committed_at
                db.executemany(
                    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            self.posts.record_seq(seqs, tallies)
        self.posts.seq = seqs  # only once committed
        self.open_by_post.update(opened)
        return results

    def _stored(self, ids: Sequence[str]) -> tuple[dict[tuple[str, str], str], dict[str, set[str]]]:
        """Of these event ids, those already stored: (post, id) -> incident, id -> posts."""
        stored: dict[tuple[str, str], str] = {}
        posts_of: dict[str, set[str]] = {}
        unique = sorted(set(ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            for row in self.db.query(
                    "SELECT post_id, id, incident_id FROM events WHERE id IN "
                    f"({', '.join('?' for _ in chunk)})", chunk):
                stored[(row["post_id"], row["id"])] = row["incident_id"]
                posts_of.setdefault(row["id"], set()).add(row["post_id"])
        return stored, posts_of

    def _check_seq(self, event: Event, seqs: dict[str, tuple[str, int]],
                   tallies: dict[str, list[int]],
                   in_batch: set[tuple[str, str, int]]) -> tuple[str, str]:
        """Follow the post's epoch and highest seq; return (anomaly, previous epoch if this
        event starts a new one). A first epoch after none ('') is not a change."""
        epoch, highest = seqs.get(event.post, ("", 0))
        tally = tallies.setdefault(event.post, [0, 0, 0])
        anomaly = changed = ""
        if event.epoch != epoch and epoch:
            # The post's outbox started again (storage wiped or replaced): seq starts afresh.
            changed = epoch
            tally[2] += 1
            highest = 0
        # (A first epoch after none is an upgraded post whose outbox, and seq, carry on.)
        if highest and event.seq <= highest:  # a number above the highest is new: no look-up
            if (event.post, event.epoch, event.seq) in in_batch or self.db.one(
                    "SELECT 1 AS hit FROM events WHERE post_id=? AND epoch=? AND seq=? LIMIT 1",
                    (event.post, event.epoch, event.seq)) is not None:
                anomaly = "repeat"
                tally[1] += 1
            elif event.seq < highest:
                anomaly = "regression"
                tally[0] += 1
        seqs[event.post] = (event.epoch, max(highest, event.seq))
        return anomaly, changed

    # -------------------------------------------------------------- lifecycle
    def transition(self, incident_id: str, to: str, actor: str, *, reason: str = "",
                   classification: str | None = None, at: float | None = None) -> dict[str, Any]:
        """Move an incident (rules in :mod:`server.incidents`), append to the audit log, and
        return the incident as it is now. Raises ``LookupError`` or ``InvalidTransition``."""
        at = time.time() if at is None else at
        with self.db.transaction():
            current = self.state(incident_id)
            if current is None:
                raise LookupError(f"no incident {incident_id!r}")
            new = next_state(current, to, classification)
            sets = ["state=?"]
            values: list[Any] = [new]
            if to == "acknowledged":
                sets += ["acknowledged_by=coalesce(acknowledged_by, ?)",
                         "acknowledged_at=coalesce(acknowledged_at, ?)"]
                values += [actor, at]
            if new in CLOSED:
                sets += ["closed_at=?", "classification=?", "note=?"]
                values += [at, classification, reason]
            self.db.execute(f"UPDATE incidents SET {', '.join(sets)} WHERE id=?",
                            (*values, incident_id))
            self.db.execute(
                "INSERT INTO audit (incident_id, at, actor, action, from_state, to_state, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (incident_id, at, actor, to, current, new,
                 reason if not classification else f"{classification}: {reason}".rstrip(": ")))
        if new in CLOSED:
            self.open_by_post = {p: i for p, i in self.open_by_post.items() if i != incident_id}
        result = self.get(incident_id)
        assert result is not None
        return result

    def note(self, incident_id: str, actor: str, action: str, detail: str = "") -> None:
        """Append an entry that does not change the state (a command, a call) to the audit log."""
        self.db.execute(
            "INSERT INTO audit (incident_id, at, actor, action, detail) "
            "SELECT id, ?, ?, ?, ? FROM incidents WHERE id=?",
            (time.time(), actor, action, detail[:500], incident_id))

    def resolve_idle(self, idle_s: float, now: float) -> list[str]:
        """Resolve (as ``test``) active incidents whose last press is older than ``idle_s``."""
        ids = [r["id"] for r in self.db.query(
            f"SELECT id FROM incidents WHERE {_ACTIVE} AND last_event_at < ?", (now - idle_s,))]
        for incident_id in ids:
            self.transition(incident_id, "resolved", "system", classification="test",
                            reason=f"resolved automatically after {idle_s:g} s idle", at=now)
        return ids

    # -------------------------------------------------------------- reads
    def state(self, incident_id: str) -> str | None:
        value = self.db.value("SELECT state FROM incidents WHERE id=?", (incident_id,))
        return str(value) if value is not None else None

    def audit(self, incident_id: str) -> list[dict[str, Any]]:
        return self.db.query(
            "SELECT at, actor, action, from_state, to_state, detail FROM audit "
            "WHERE incident_id=? ORDER BY id", (incident_id,))

    def recent(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first. ``state``: one of the states, or "open" (active) or "closed"."""
        if state == "open":
            return self.db.query(f"SELECT * FROM incidents WHERE {_ACTIVE} "
                                 "ORDER BY opened_at DESC LIMIT ?", (limit,))
        if state == "closed":
            return self.db.query("SELECT * FROM incidents WHERE state IN ('resolved', 'cancelled') "
                                 "ORDER BY opened_at DESC LIMIT ?", (limit,))
        if state:
            return self.db.query("SELECT * FROM incidents WHERE state=? "
                                 "ORDER BY opened_at DESC LIMIT ?", (state, limit))
        return self.db.query("SELECT * FROM incidents ORDER BY opened_at DESC LIMIT ?", (limit,))

    def get(self, incident_id: str) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM incidents WHERE id=?", (incident_id,))
        if row is None:
            return None
        row["events"] = self.db.query(
            "SELECT * FROM events WHERE incident_id=? ORDER BY received_at, seq", (incident_id,))
        row["timeline"] = self.audit(incident_id)
        return row

    def first_event(self, incident_id: str) -> dict[str, Any] | None:
        """The incident's post, state, opening time, classification, and its first event's
        type and stated press time."""
        return self.db.one(
            "SELECT i.id, i.post_id, i.state, i.opened_at, i.classification, e.type, "
            "e.pressed_at FROM incidents i "
            "JOIN events e ON e.post_id = i.post_id AND e.id = i.first_event_id WHERE i.id=?",
            (incident_id,))

    def active_not_in_dispatch(self) -> list[dict[str, Any]]:
        """Active incidents the dispatcher has no job for, oldest first (after an outage)."""
        return self.db.query(
            "SELECT i.id, i.post_id, i.opened_at, i.state, e.type, e.pressed_at FROM incidents i "
            "JOIN events e ON e.post_id = i.post_id AND e.id = i.first_event_id "
            f"WHERE i.{_ACTIVE} AND i.id NOT IN (SELECT incident_id FROM dispatch) "
            "ORDER BY i.opened_at")

    def events(self, post_id: str | None, limit: int) -> list[dict[str, Any]]:
        if post_id:
            return self.db.query("SELECT * FROM events WHERE post_id=? "
                                 "ORDER BY committed_at DESC LIMIT ?", (post_id, limit))
        return self.db.query("SELECT * FROM events ORDER BY committed_at DESC LIMIT ?", (limit,))

    def open_count(self) -> int:
        return len(self.open_by_post)

    def summary(self, incident_id: str) -> dict[str, Any] | None:
        """The incident with its post's name, school, address and position (no events)."""
        return self.db.one(
            "SELECT i.id, i.post_id, i.state, i.opened_at, i.last_event_at, i.closed_at, "
            "i.event_count, i.acknowledged_by, i.acknowledged_at, i.classification, i.note, "
            "p.name AS post_name, p.school, p.address, p.lat, p.lon "
            "FROM incidents i LEFT JOIN posts p ON p.id = i.post_id WHERE i.id=?", (incident_id,))
