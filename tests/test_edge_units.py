"""Edge pieces on their own: configuration, outbox durability and numbering, the event store
without a disk, the button guard."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge.config import load_edge_config
from edge.hardware import ButtonGuard
from edge.outbox import RESERVE_BLOCK, Outbox
from edge.storage import EventStore
from protocol.messages import Event, encode
from protocol.settings import ConfigError
from protocol.ulid import new_ulid


def _event(seq: int) -> Event:
    return Event(id=new_ulid(), post="P001", seq=seq, ts=time.time())


def test_outbox_survives_reopen_in_order_and_keeps_counting(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    events = [box.add(_event) for _ in range(3)]
    assert [e.seq for e in events] == [1, 2, 3]
    assert box.remove(events[1].id)
    assert not box.remove(events[1].id)
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert [p.id for p in box.pending()] == [events[0].id, events[2].id]
    box.remove(events[0].id)
    box.remove(events[2].id)
    assert box.add(_event).seq == 4  # sequence numbers never go back, even when empty
    box.close()


def test_edge_config_errors_say_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "post.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_edge_config(path)
    path.write_text('[post]\nid = "P001"\n[mqtt]\nprot = 1883\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['prot'\] in \[mqtt\]"):
        load_edge_config(path)
    path.write_text('[post]\nid = "P/1"\n')
    with pytest.raises(ConfigError, match="invalid"):
        load_edge_config(path)
    path.write_text('[post]\nid = "P001"\n[mqtt]\nport = "many"\n')
    with pytest.raises(ConfigError, match="port: expected an integer"):
        load_edge_config(path)
    path.write_text("[post\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_edge_config(path)
    path.write_text('[post]\nid = "P001"\n[outbox]\npath = "box.db"\n')
    monkeypatch.setenv("ALARMPOST_EDGE_MQTT_PORT", "2883")
    monkeypatch.setenv("ALARMPOST_EDGE_POST_SILENT", "yes")
    config = load_edge_config(path)
    assert config.mqtt.port == 2883 and config.post.silent
    assert config.mqtt.username == "P001"
    assert config.outbox_path == tmp_path / "box.db"


async def test_button_guard_hold_bounce_and_long_hold() -> None:
    loop = asyncio.get_running_loop()
    accepted: list[int] = []
    got = asyncio.Event()

    def on_accept(hold_ms: int) -> None:
        accepted.append(hold_ms)
        got.set()

    guard = ButtonGuard(loop, hold_s=0.05, debounce_s=0.03, on_accept=on_accept)
    # A brush: down for 10 ms.
    guard.edge(True)
    await asyncio.sleep(0.01)
    guard.edge(False)
    await asyncio.sleep(0.08)
    assert accepted == []
    # Contact bounce, then held: one press.
    for _ in range(5):
        guard.edge(True)
        guard.edge(False)
    guard.edge(True)
    await asyncio.wait_for(got.wait(), 1)
    assert len(accepted) == 1 and accepted[0] >= 50
    # Held long, with bounce on release: still one.
    await asyncio.sleep(0.2)
    for _ in range(5):
        guard.edge(False)
        guard.edge(True)
    guard.edge(False)
    await asyncio.sleep(0.1)
    assert len(accepted) == 1
    # Up long enough, then a new press counts.
    got.clear()
    guard.edge(True)
    await asyncio.wait_for(got.wait(), 1)
    assert len(accepted) == 2
    guard.close()


def test_gpio_backend_without_a_pin_library_explains_the_fix() -> None:
    from edge.config import HardwareSection
    from edge.hardware import GpioHardware

    with pytest.raises(ConfigError, match="backend = \"mock\""):
        GpioHardware(HardwareSection(backend="gpio"))


def _event_in(epoch: str) -> Callable[[int, str], Event]:
    return lambda seq, ep: Event(id=new_ulid(), post="P001", seq=seq, ts=time.time(), epoch=ep)


def test_outbox_epoch_is_made_once_and_an_old_outbox_gets_one(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    epoch = box.epoch
    assert re.fullmatch(r"[A-Za-z][0-9A-Za-z]{19}", epoch)
    box.close()
    assert Outbox(tmp_path / "o.db").epoch == epoch
    # An outbox written before epochs existed: it gets one on open, and keeps it.
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, payload BLOB NOT "
        "NULL, created REAL NOT NULL); CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT "
        "NULL); INSERT INTO meta VALUES ('last_seq', 7);")
    old.close()
    box = Outbox(tmp_path / "old.db")
    assert box.epoch and box.epoch != epoch
    assert box.add(_event).seq == 8
    box.close()
    assert Outbox(tmp_path / "old.db").epoch == box.epoch


def test_outbox_never_reuses_numbers_reserved_before_a_crash(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert [box.add(_event).seq for _ in range(2)] == [1, 2]
    reserved = box.reserved_seq
    assert reserved >= 2 + RESERVE_BLOCK // 2  # committed ahead of use
    box._db.close()  # a crash: numbers 3..reserved may have been used from memory
    box = Outbox(tmp_path / "o.db")
    assert box.skipped == reserved - 2
    assert box.add(_event).seq == reserved + 1
    box.close()  # a clean close gives the unused block back: no gap
    box = Outbox(tmp_path / "o.db")
    assert box.add(_event).seq == reserved + 2
    box.close()


def test_store_without_any_readable_outbox_numbers_from_the_clock(tmp_path: Path) -> None:
    counters: Counter[str] = Counter()
    log = logging.getLogger("test")
    unusable = tmp_path / "a-directory"
    unusable.mkdir()  # SQLite can neither open nor read it
    now = [1_800_000_000.0]
    store = EventStore(unusable, log, counters, clock=lambda: now[0])
    assert store.open() == []
    assert store.fault and counters["storage_faults"] == 1
    first = [store.add(_event_in(store.epoch)) for _ in range(3)]  # faster than the clock ticks
    assert [e.seq for e in first] == [1_800_000_000_000, 1_800_000_000_001, 1_800_000_000_002]
    assert first[0].epoch == store.epoch != ""
    # A restart in the same state, 0.5 s later, numbers above the run before it.
    now[0] += 0.5
    again = EventStore(unusable, log, counters, clock=lambda: now[0])
    again.open()
    assert again.add(_event_in(again.epoch)).seq == 1_800_000_000_500
    assert again.epoch != store.epoch  # nothing to read an epoch from: a memory epoch per run
    assert counters["storage_faults"] == 2  # one per state change (and per run), not per press


def test_store_moves_an_unreadable_outbox_aside_and_starts_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    counters: Counter[str] = Counter()
    store = EventStore(path, logging.getLogger("test"), counters)
    store.open()
    assert not store.fault and counters["outbox_unreadable"] == 1
    assert store.add(_event_in(store.epoch)).seq == 1
    assert len(list(tmp_path.glob("o.db.unreadable-*"))) == 1
    store.close()


def test_outbox_store_writes_back_what_memory_held_in_one_go(tmp_path: Path) -> None:
    """When the disk comes back, the events kept in memory, the numbers used meanwhile and the
    ACKs received meanwhile all reach the outbox, and a failed write-back changes nothing."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, reserve_block=8)
    first = outbox.add(lambda seq: Event(id=new_ulid(), post="P001", seq=seq, ts=time.time()))
    held = [Event(id=new_ulid(), post="P001", seq=seq, ts=time.time()) for seq in (2, 3, 5)]
    assert outbox.store(held, used_up_to=6, acked=[first.id]) == 3
    assert [p.seq for p in outbox.pending()] == [2, 3, 5]
    assert [p.payload for p in outbox.pending()] == [encode(e) for e in held]
    assert outbox.last_seq == 6 and outbox.reserved_seq >= 7
    assert outbox.store(held[:1]) == 0  # already there: nothing written twice
    before = (outbox.last_seq, outbox.reserved_seq)

    def failing() -> Iterator[Event]:  # the write-back fails half-way: all of it is undone
        yield Event(id=new_ulid(), post="P001", seq=9, ts=time.time())
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        outbox.store(failing(), used_up_to=20)
    assert (outbox.last_seq, outbox.reserved_seq) == before
    assert [p.seq for p in outbox.pending()] == [2, 3, 5]
    outbox.close()
    again = Outbox(path, reserve_block=8)
    assert [p.seq for p in again.pending()] == [2, 3, 5]
    assert again.add(lambda seq: Event(id=new_ulid(), post="P001", seq=seq, ts=time.time())).seq > 6
    again.close()


def test_resend_backoff_doubles_from_the_ack_timeout_to_its_ceiling(tmp_path: Path) -> None:
    from edge.agent import EdgeAgent
    from firmware_sim.fleet import SimPost

    config_path = tmp_path / "P001.toml"
    config_path.write_text('[post]\nid = "P001"\n[hardware]\nbackend = "mock"\n'
                           '[timing]\nack_timeout_s = 2.0\nresend_max_s = 30.0\n'
                           f'[outbox]\npath = "{tmp_path / "outbox.db"}"\n')
    agent: EdgeAgent = SimPost.from_file(config_path).agent
    for attempts, base in ((0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (40, 30.0)):
        waits = [agent._backoff(attempts) for _ in range(2000)]
        assert base * 0.9 <= min(waits) and max(waits) <= base * 1.1, (attempts, base)
        assert max(waits) - min(waits) > base * 0.15  # jittered, so posts do not resend in step
