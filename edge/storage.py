"""The agent's events with or without a working disk.

:class:`EventStore` puts every event in the :class:`~edge.outbox.Outbox` while the disk works. When
the outbox cannot be opened or written (a full, read-only, failed or unreadable disk), it keeps the
events in memory instead, and the agent sends them just the same: the press has already turned on
strobe and siren by then, and never waits for storage. The fault is raised once per change of state
(counted in ``storage_faults``, logged once, reported as ``"storage"`` in the heartbeat), and
:meth:`EventStore.recover` (called every ``[outbox] retry_s``) reopens the outbox and writes into it
what memory held.

Sequence numbers are never used twice for one post, in any of these states:

- the disk fails while running: numbering goes on from memory inside the block the outbox reserved
  while it worked (:data:`edge.outbox.RESERVE_BLOCK`), which an outbox opened later skips;
- no reservation left (the block is used up, or the disk was read-only, full or unreadable at
  boot): a number is at least the wall clock in milliseconds (``max(last + 1, now_ms)``), so a
  restart in the same state numbers above the run before it (presses come at least ``hold_ms``
  apart, so numbering never runs ahead of the clock by more than one). Such numbers jump (to ~1.7e12); once
  the outbox is back it records the highest one and counts on from there. This relies on a clock
  that does not go back across restarts of a post without storage (an NTP-synced post);
- the disk comes back: the outbox records the highest number used in memory before it numbers again.

Epoch: events carry the outbox's epoch. If the outbox cannot even be read at boot, a memory epoch
is made for this run (the server sees a new epoch, as for a wiped disk); once an outbox opens again,
new events carry its epoch.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from edge.outbox import Outbox, Pending, new_epoch
from protocol.messages import Event

# What a failing disk raises: SQLite's errors, and OSError from making the outbox's directory.
StorageError = (sqlite3.Error, OSError)
_UNREADABLE = ("file is not a database", "database disk image is malformed")


class EventStore:
    def __init__(self, path: Path,
                 log: logging.Logger | logging.LoggerAdapter,  # type: ignore[type-arg]
                 counters: Counter[str], clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock  # wall clock, for numbers without a reservation
        self.log = log
        self.counters = counters
        self.outbox: Outbox | None = None
        self.fault = False
        self.epoch = ""
        self._last_seq = 0  # the highest number used (on disk or in memory)
        self._reserved_seq = 0  # numbers up to this were reserved on disk before use
        self._held: OrderedDict[str, Event] = OrderedDict()  # events only memory has
        # Acknowledged while the outbox could not be written (it may still hold them).
        self._acked: set[str] = set()

    # ------------------------------------------------------------------ opening
    def open(self) -> list[Pending]:
        """Open the outbox and return its pending events; never raises for storage trouble."""
        try:
            self._attach(self._open_writable())
            assert self.outbox is not None
            return self.outbox.pending()
        except StorageError as exc:
            self._fault("open", exc)
        # Read what the disk still holds (read-only or full): the numbers, the epoch, the events.
        try:
            seen = Outbox(self.path, read_only=True)
        except StorageError as exc:
            self.epoch = new_epoch()
            self.log.error("the outbox %s cannot be read either (%s): this run numbers events "
                           "from the clock under a new epoch %s", self.path, exc, self.epoch)
            return []
        try:
            self.epoch = seen.epoch or new_epoch()
            # The numbers up to the reservation may have been used from memory before: skip them.
            self._last_seq = self._reserved_seq = seen.reserved_seq
            pending = seen.pending()
        except sqlite3.Error as exc:
            self.log.error("the outbox %s could only be read in part (%s)", self.path, exc)
            pending = []
        finally:
            seen.close()
        self.log.warning("read %d pending event(s) from the outbox %s; it stays closed until it "
                         "can be written", len(pending), self.path)
        return pending

    def _open_writable(self) -> Outbox:
        try:
            return Outbox(self.path)
        except sqlite3.DatabaseError as exc:
            if not any(text in str(exc) for text in _UNREADABLE) or not self.path.exists():
                raise
            # Unreadable, but the disk takes writes: keep the damaged file for inspection and
            # start a new outbox (a new epoch: the server sees the numbering start again).
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self.counters["outbox_unreadable"] += 1
            self.log.error("the outbox %s is unreadable (%s): moved to %s, starting a new one",
                           self.path, exc, aside.name)
            return Outbox(self.path)

    def _attach(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.epoch = outbox.epoch
        self._last_seq = outbox.last_seq
        self._reserved_seq = outbox.reserved_seq
        if outbox.skipped:
            self.log.info("sequence numbers %d-%d were reserved before (maybe used from memory): "
                          "skipped", outbox.last_seq - outbox.skipped + 1, outbox.last_seq)

    # ------------------------------------------------------------------ the fault
    def _fault(self, what: str, exc: BaseException) -> None:
        self.counters["outbox_errors"] += 1
        if self.outbox is not None:
            self._last_seq = max(self._last_seq, self.outbox.last_seq)
            self._reserved_seq = max(self._reserved_seq, self.outbox.reserved_seq)
            outbox, self.outbox = self.outbox, None
            try:
                outbox.close(release=False)
            except sqlite3.Error:
                pass
        if not self.fault:
            self.fault = True
            self.counters["storage_faults"] += 1
            self.log.error(
                "storage fault: cannot %s the outbox %s (%s). Button, strobe and siren work; "
                "events are kept in memory and sent; retrying the outbox", what, self.path, exc,
            )

    def recover(self) -> bool:
        """Try the outbox again; on success write into it what memory held. True if healthy."""
        if not self.fault:
            return True
        try:
            outbox = self._open_writable()
        except StorageError as exc:
            self.counters["outbox_retries_failed"] += 1
            self.log.debug("outbox still unavailable: %s", exc)
            return False
        try:
            written = outbox.store(self._held.values(), used_up_to=self._last_seq,
                                   acked=self._acked)
        except StorageError as exc:
            self.counters["outbox_retries_failed"] += 1
            self.log.debug("outbox opened but still cannot be written: %s", exc)
            outbox.close(release=False)
            return False
        held = len(self._held)
        self._held.clear()
        self._acked.clear()
        self._attach(outbox)
        self.fault = False
        self.counters["storage_recovered"] += 1
        self.log.warning("storage back: outbox %s reopened, %d event(s) kept in memory written "
                         "(%d new), numbering goes on after %d",
                         self.path, held, written, outbox.last_seq)
        return True

    # ------------------------------------------------------------------ events
    def add(self, make: Callable[[int, str], Event]) -> Event:
        """Number and keep an event (``make(seq, epoch)``): on disk if possible, else in memory."""
        if self.outbox is not None:
            outbox = self.outbox
            try:
                event = outbox.add(lambda seq: make(seq, outbox.epoch))
            except Exception as exc:  # whatever the disk (or a bug) raises, the alarm goes on
                self._fault("write", exc)
            else:
                self._last_seq, self._reserved_seq = outbox.last_seq, outbox.reserved_seq
                return event
        event = make(self._memory_seq(), self.epoch)
        self._held[event.id] = event
        self.counters["events_held_in_memory"] += 1
        self.log.info("event %s seq %d kept in memory (no outbox)", event.id, event.seq)
        return event

    def _memory_seq(self) -> int:
        seq = self._last_seq + 1
        if seq > self._reserved_seq:  # nothing reserved on disk for it: stay above any restart
            seq = max(seq, int(self._clock() * 1000))
        self._last_seq = seq
        return seq

    def acked(self, event_id: str) -> None:
        """The server has the event: drop it (from memory, from the outbox, or later from it)."""
        self._held.pop(event_id, None)
        if self.outbox is None:
            if self.fault:
                self._acked.add(event_id)
            return
        try:
            self.outbox.remove(event_id)
        except Exception as exc:
            self._fault("delete from", exc)
            self._acked.add(event_id)

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        if self.outbox is not None:
            try:
                self.outbox.close(release=True)
            except sqlite3.Error as exc:
                self.log.warning("closing the outbox: %s", exc)
            self.outbox = None
