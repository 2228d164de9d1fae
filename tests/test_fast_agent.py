"""The post's alarm path in milliseconds: press, outbox, send, resend, ACK, heartbeat, commands.

These drive the agent's own methods with a recording stand-in for the client object the agent
publishes through (an in-memory object with the ``publish`` the agent calls) and a recording
stand-in for its :class:`edge.hardware.Hardware`; the outbox is a real SQLite file. What the
broker promises (QoS 1, the persistent session, the Last Will) stays with the real-broker tests
(tests/test_promises.py, tests/test_alarm_path.py); here every branch of the agent's own logic
gets a test that fails within a few milliseconds when that logic is broken, which is what
``alarmpost bench mutation`` needs to check thousands of mutants in its budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import protocol.ulid
from edge.agent import TAKEOVER_FAULT_S, EdgeAgent, _InFlight
from edge.config import EdgeConfig, HardwareSection, OutboxSection, PostSection, TimingSection
from protocol.messages import (
    Ack,
    Command,
    CommandResult,
    Event,
    ServerStatus,
    Status,
    decode_from_post,
    encode,
)
from protocol.topics import post_topic, server_status_topic
from protocol.ulid import new_ulid

POST = "P001"


class RecordingHardware:
    """The agent's hardware interface in memory: outputs, a button, and a journal shared with
    the outbox and the client, so a test can see what happened in which order."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.button = False
        self.strobe = self.siren = self.help = False
        self.broken: set[str] = set()  # outputs whose driver raises
        self.started = False
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop, on_press: Callable[[int], None]) -> None:
        self.started = True

    def _set(self, name: str, on: bool) -> None:
        if name in self.broken:
            raise OSError(f"{name} driver gone")
        setattr(self, name, on)
        self.journal.append(f"{name} {'on' if on else 'off'}")

    def set_strobe(self, on: bool) -> None:
        self._set("strobe", on)

    def set_siren(self, on: bool) -> None:
        self._set("siren", on)

    def set_help(self, on: bool) -> None:
        self._set("help", on)

    def close(self) -> None:
        self.closed = True


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # monotonic


@dataclass
class FakeClient:
    """What the agent publishes through, in memory: records every publish and returns at once
    (the broker's PUBACK), or waits while ``hold`` is clear, or raises ``fail``."""

    journal: list[str]
    published: list[Published] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    fail: Exception | None = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a publish has begun

    def __post_init__(self) -> None:
        self.hold.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 0,
                      retain: bool = False) -> None:
        self.entered.set()
        await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        self.published.append(Published(topic, payload, qos, retain, time.monotonic()))
        self.journal.append(f"publish {topic.rsplit('/', 1)[-1]}")
        async with self.arrived:
            self.arrived.notify_all()

    def on(self, kind: str) -> list[Published]:
        return [p for p in self.published if p.topic == post_topic(POST, kind)]  # type: ignore[arg-type]

    async def wait_for(self, kind: str, count: int, within: float = 2.0) -> list[Published]:
        """Until ``count`` publishes on this post's ``kind`` topic have been made."""
        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.on(kind)) >= count)

        await asyncio.wait_for(enough(), within)
        return self.on(kind)


def _config(tmp_path: Path, **timing: float) -> EdgeConfig:
    config = EdgeConfig(
        post=PostSection(id=POST),
        hardware=HardwareSection(backend="mock", siren_max_s=600.0),
        timing=TimingSection(**{"ack_timeout_s": 30.0, "resend_max_s": 60.0, **timing}),
        outbox=OutboxSection(path=str(tmp_path / "outbox.db")),
    )
    config.validate()
    return config


@dataclass
class Post:
    agent: EdgeAgent
    hardware: RecordingHardware
    client: FakeClient
    journal: list[str]
    preloads: list[int]

    def outbox_ids(self) -> list[str]:
        assert self.agent.outbox is not None
        return [p.id for p in self.agent.outbox.pending()]

    def ack(self, event: Event, *, post: str = POST, incident: str = "INC1",
            duplicate: bool = False) -> tuple[str, bytes]:
        ack = Ack(post=post, event_id=event.id, incident_id=incident, ts=time.time(),
                  duplicate=duplicate)
        return post_topic(post, "ack"), encode(ack)

    async def deliver(self, topic: str, payload: bytes) -> None:
        await self.agent._handle(self.client, topic, payload)  # type: ignore[arg-type]


def _make_post(tmp_path: Path, silent: bool = False, **timing: float) -> Post:
    journal: list[str] = []
    config = _config(tmp_path, **timing)
    config.post.silent = silent
    hardware = RecordingHardware(journal)
    agent = EdgeAgent(config, hardware)
    preloads: list[int] = []
    agent.intercom.preload = lambda: preloads.append(1)  # type: ignore[method-assign]
    # What run() does before it connects: open the outbox and take what it holds.
    for entry in agent.store.open():
        agent._inflight[entry.id] = _InFlight(entry)
    store_add = agent.store.add

    def add(make: Any) -> Event:
        event = store_add(make)
        journal.append("outbox")
        return event

    agent.store.add = add  # type: ignore[method-assign]
    return Post(agent, hardware, FakeClient(journal), journal, preloads)


@pytest.fixture
def post(tmp_path: Path) -> Iterator[Post]:
    made = _make_post(tmp_path)
    yield made
    made.agent.store.close()


@pytest.fixture
async def sending(post: Post) -> AsyncIterator[Post]:
    """The post with its sender running against the in-memory client."""
    task = asyncio.create_task(post.agent._sender(post.client))  # type: ignore[arg-type]
    yield post
    assert not task.done(), "the sender ended"  # it runs until its session ends
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _events(post: Post) -> list[Event]:
    """The events the post has published, decoded as the server would."""
    out = []
    for p in post.client.on("event"):
        where, message = decode_from_post(p.topic, p.payload)
        assert where.post_id == POST and isinstance(message, Event)
        out.append(message)
    return out


# ---------------------------------------------------------------------------------- the press
async def test_press_switches_strobe_and_siren_on_before_the_outbox_and_before_sending(
        sending: Post) -> None:
    post = sending
    pressed: list[Event] = []
    post.agent.press_listeners.append(pressed.append)
    before = time.time()
    post.agent._on_press(250)
    # Outputs first, then the outbox, all inside the press callback; the network comes later.
    assert post.journal == ["strobe on", "siren on", "outbox"]
    assert post.hardware.strobe is True and post.hardware.siren is True
    [published] = await post.client.wait_for("event", 1)
    assert post.journal == ["strobe on", "siren on", "outbox", "publish event"]
    [event] = _events(post)
    assert pressed == [event]
    assert (event.post, event.seq, event.hold_ms, event.type) == (POST, 1, 250, "alarm")
    assert before <= event.ts <= time.time()
    assert event.epoch == post.agent.epoch != ""
    assert post.outbox_ids() == [event.id]  # on disk, and it stays there until the ACK
    assert post.agent.outbox is not None
    assert post.agent.outbox.pending()[0].payload == published.payload
    assert post.agent.counters["presses"] == 1 and post.agent.outbox_depth == 1
    assert post.preloads == [1]  # the media stack starts loading as the post rings


def _ulid_ms(ulid: str) -> int:
    """The milliseconds a ULID was stamped with (its first 10 characters)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = 0
    for char in ulid[:10]:
        value = value * 32 + alphabet.index(char)
    return value


async def test_an_events_id_carries_the_time_of_its_press(
        post: Post, monkeypatch: pytest.MonkeyPatch) -> None:
    # A ULID minted without a time of its own would read this clock and say 1970: the agent
    # stamps the id with the press's own time, the event's ts.
    monkeypatch.setattr(protocol.ulid, "time", SimpleNamespace(time=lambda: 0.0))
    post.agent._on_press(100)
    assert post.agent.outbox is not None
    [pending] = post.agent.outbox.pending()
    [event] = [m for m in [decode_from_post(post_topic(POST, "event"), pending.payload)[1]]
               if isinstance(m, Event)]
    assert _ulid_ms(event.id) == int(event.ts * 1000) > 0


async def test_presses_are_numbered_in_order_and_counted(sending: Post) -> None:
    post = sending
    for hold in (100, 200, 300):
        post.agent._on_press(hold)
    await post.client.wait_for("event", 3)
    events = _events(post)
    assert [(e.seq, e.hold_ms) for e in events] == [(1, 100), (2, 200), (3, 300)]
    assert post.outbox_ids() == [e.id for e in events]
    assert post.agent.counters["presses"] == 3 and post.agent.outbox_depth == 3


async def test_a_silent_post_stores_and_sends_without_strobe_or_siren(tmp_path: Path) -> None:
    post = _make_post(tmp_path, silent=True)
    post.agent._on_press(120)
    assert post.journal == ["outbox"]
    assert not post.hardware.strobe and not post.hardware.siren
    task = asyncio.create_task(post.agent._sender(post.client))  # type: ignore[arg-type]
    await post.client.wait_for("event", 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [e.hold_ms for e in _events(post)] == [120]
    post.agent.store.close()


async def test_a_dead_strobe_driver_does_not_keep_the_siren_off_or_lose_the_event(
        post: Post, caplog: pytest.LogCaptureFixture) -> None:
    post.hardware.broken.add("strobe")
    post.agent._on_press(90)
    assert post.hardware.siren is True and post.hardware.strobe is False
    assert post.journal == ["siren on", "outbox"]
    assert post.agent.counters["output_errors"] == 1
    assert "could not switch the strobe on: strobe driver gone" in caplog.text
    assert len(post.outbox_ids()) == 1
    post.hardware.broken = {"siren"}
    post.agent._on_press(90)
    assert post.agent.counters["output_errors"] == 2
    assert "could not switch the siren on: siren driver gone" in caplog.text
    assert len(post.outbox_ids()) == 2


async def test_a_failing_press_listener_is_counted_and_the_others_still_hear(post: Post) -> None:
    heard: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    post.agent.press_listeners[:] = [broken, heard.append]
    post.agent._on_press(100)
    assert [e.id for e in heard] == post.outbox_ids()
    assert post.agent.counters["listener_errors"] == 1



# ------------------------------------------------------------------------- sending, resending
async def test_each_event_is_published_at_qos_1_and_not_again_before_its_ack_timeout(
        sending: Post) -> None:
    post = sending
    sent: list[tuple[str, int]] = []
    post.agent.sent_listeners.append(lambda event_id, attempt: sent.append((event_id, attempt)))
    post.agent._on_press(100)
    [published] = await post.client.wait_for("event", 1)
    assert (published.qos, published.retain) == (1, False)
    [event_id] = post.outbox_ids()
    assert sent == [(event_id, 1)]
    assert post.agent.counters["resends"] == 0
    # The next try is one ACK timeout (30 s here, jittered by 10 %) after the broker took it.
    wait = post.agent._inflight[event_id].next_try - time.monotonic()
    assert 30.0 * 0.9 - 1.0 < wait <= 30.0 * 1.1
    assert post.outbox_ids() == [event_id]  # the broker's PUBACK deletes nothing


async def test_an_unacknowledged_event_is_resent_with_a_doubling_wait(tmp_path: Path) -> None:
    post = _make_post(tmp_path, ack_timeout_s=0.05, resend_max_s=10.0)
    sent: list[tuple[str, int]] = []
    post.agent.sent_listeners.append(lambda event_id, attempt: sent.append((event_id, attempt)))
    task = asyncio.create_task(post.agent._sender(post.client))  # type: ignore[arg-type]
    post.agent._on_press(100)
    tries = await post.client.wait_for("event", 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    [event_id] = post.outbox_ids()
    assert sent == [(event_id, 1), (event_id, 2), (event_id, 3)]
    assert {p.payload for p in tries} == {tries[0].payload}  # the same event, byte for byte
    first, second = tries[1].at - tries[0].at, tries[2].at - tries[1].at
    assert 0.05 * 0.9 <= first < 0.5  # one ACK timeout ...
    assert 0.10 * 0.9 <= second  # ... then twice that
    assert post.agent.counters["resends"] == 2
    post.agent.store.close()


async def test_an_event_acknowledged_while_another_is_being_published_is_not_sent(
        sending: Post) -> None:
    post = sending
    post.client.hold.clear()  # the broker is slow to take the first publish
    for _ in range(3):
        post.agent._on_press(100)
    first, second, third = post.outbox_ids()
    await asyncio.wait_for(post.client.entered.wait(), 2)  # the sender is on the first
    topic, payload = post.ack(Event(id=second, post=POST, seq=2, ts=time.time()))
    await post.deliver(topic, payload)
    post.client.hold.set()
    await post.client.wait_for("event", 2)
    assert [e.id for e in _events(post)] == [first, third]
    assert post.outbox_ids() == [first, third]


async def test_resend_all_now_sends_every_pending_event_at_once(sending: Post) -> None:
    post = sending
    post.agent._on_press(100)
    post.agent._on_press(100)
    await post.client.wait_for("event", 2)
    post.agent._resend_all_now()  # what a reconnect or a server coming back does
    tries = await post.client.wait_for("event", 4)
    assert [p.payload for p in tries[2:]] == [p.payload for p in tries[:2]]
    assert post.agent.counters["resends"] == 2


async def test_the_sender_wakes_for_the_earliest_deadline_among_many(sending: Post) -> None:
    post = sending
    post.agent._on_press(100)
    post.agent._on_press(100)
    await post.client.wait_for("event", 2)
    soon, late = post.agent._inflight.values()
    late.next_try = time.monotonic() + 60.0
    soon.next_try = time.monotonic() + 0.02
    post.agent._wake.set()
    tries = await post.client.wait_for("event", 3)
    assert tries[2].payload == soon.entry.payload


async def test_a_server_that_comes_online_gets_every_pending_event_again(sending: Post) -> None:
    post = sending
    post.agent._on_press(100)
    await post.client.wait_for("event", 1)
    status = server_status_topic()
    await post.deliver(status, encode(ServerStatus(state="online", ts=time.time())))
    assert post.agent.server_online is True
    tries = await post.client.wait_for("event", 2)
    assert tries[1].payload == tries[0].payload
    # Online again while online: nothing to resend.
    await post.deliver(status, encode(ServerStatus(state="online", ts=time.time())))
    await post.deliver(status, encode(ServerStatus(state="offline", ts=time.time())))
    assert post.agent.server_online is False
    post.agent._on_press(100)
    await post.client.wait_for("event", 3)
    assert len(post.client.on("event")) == 3


def test_resend_backoff_doubles_from_the_ack_timeout_up_to_its_ceiling(tmp_path: Path) -> None:
    post = _make_post(tmp_path, ack_timeout_s=2.0, resend_max_s=30.0)
    for attempts, base in ((0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (9, 30.0)):
        waits = [post.agent._backoff(attempts) for _ in range(300)]
        assert base * 0.9 <= min(waits) and max(waits) <= base * 1.1, (attempts, base)
        assert max(waits) - min(waits) > base * 0.1  # jittered: posts do not resend in step
    post.agent.store.close()


# ------------------------------------------------------------------------------------ the ACK
async def test_the_servers_ack_alone_deletes_the_event_and_lights_help_is_coming(
        sending: Post) -> None:
    post = sending
    heard: list[tuple[Ack, float]] = []
    post.agent.ack_listeners.append(lambda ack, at: heard.append((ack, at)))
    post.agent._on_press(100)
    await post.client.wait_for("event", 1)
    [event] = _events(post)
    assert post.outbox_ids() == [event.id] and post.hardware.help is False
    before = time.time()
    await post.deliver(*post.ack(event, incident="INC7"))
    assert post.outbox_ids() == [] and post.agent.outbox_depth == 0
    assert post.hardware.help is True
    assert post.agent.counters["acks"] == 1 and post.agent.counters["acks_unknown"] == 0
    [(ack, at)] = heard
    assert (ack.event_id, ack.incident_id) == (event.id, "INC7")
    assert before <= at <= time.time()
    post.agent._resend_all_now()  # nothing left to send
    post.agent._on_press(100)
    await post.client.wait_for("event", 2)
    assert [e.seq for e in _events(post)] == [1, 2]


async def test_a_repeated_or_unknown_ack_changes_nothing_but_a_counter(sending: Post) -> None:
    post = sending
    post.agent._on_press(100)
    post.agent._on_press(100)
    await post.client.wait_for("event", 2)
    first, second = _events(post)
    stranger = Event(id=new_ulid(), post=POST, seq=99, ts=time.time())
    await post.deliver(*post.ack(stranger))
    assert post.agent.counters["acks_unknown"] == 1 and post.agent.counters["acks"] == 0
    assert post.hardware.help is False  # an ACK for nothing of ours is no help coming
    assert post.outbox_ids() == [first.id, second.id]
    await post.deliver(*post.ack(first))
    await post.deliver(*post.ack(first, duplicate=True))  # the answer to a resend
    assert post.agent.counters["acks"] == 1 and post.agent.counters["acks_unknown"] == 2
    assert post.outbox_ids() == [second.id]
    await post.deliver(*post.ack(second))
    assert post.agent.counters["acks"] == 2 and post.outbox_ids() == []


async def test_acks_for_another_post_are_refused_and_counted_by_the_receiver(
        post: Post) -> None:
    post.agent._on_press(100)
    [event_id] = post.outbox_ids()
    event = Event(id=event_id, post=POST, seq=1, ts=time.time())
    other_topic, other_payload = post.ack(event, post="P002")
    _, good = post.ack(event)

    @dataclass
    class Message:
        topic: str
        payload: object

    class Inbox:
        async def __aiter__(self) -> AsyncIterator[Message]:
            yield Message(other_topic, other_payload)  # addressed to another post
            yield Message(post_topic(POST, "ack"), good.replace(POST.encode(), b"P002"))
            yield Message(post_topic(POST, "ack"), b"{not json")
            yield Message(post_topic(POST, "ack"), None)  # a cleared retained message
            yield Message(post_topic(POST, "ack"), good)

    class Client(FakeClient):
        messages = Inbox()

    await post.agent._receiver(Client(post.journal))  # type: ignore[arg-type]
    counters = post.agent.counters
    assert (counters["rejected_wrong_post"], counters["rejected_post_mismatch"],
            counters["rejected_malformed"], counters["rejected_empty"]) == (1, 1, 1, 1)
    assert counters["acks"] == 1 and post.outbox_ids() == []
    assert counters["handler_errors"] == 0


async def test_a_handler_that_fails_is_counted_and_the_next_message_still_handled(
        post: Post, caplog: pytest.LogCaptureFixture) -> None:
    post.agent._on_press(100)
    [event_id] = post.outbox_ids()
    _, good = post.ack(Event(id=event_id, post=POST, seq=1, ts=time.time()))

    def broken(ack: Ack, at: float) -> None:
        raise RuntimeError("listener bug")

    post.hardware.broken.add("help")  # the lamp's driver raises inside the ACK handler

    @dataclass
    class Message:
        topic: str
        payload: bytes

    class Inbox:
        async def __aiter__(self) -> AsyncIterator[Message]:
            yield Message(post_topic(POST, "ack"), good)
            yield Message(post_topic(POST, "ack"), good)

    class Client(FakeClient):
        messages = Inbox()

    await post.agent._receiver(Client(post.journal))  # type: ignore[arg-type]
    assert post.agent.counters["handler_errors"] == 1
    assert post.agent.counters["acks"] == 1 and post.agent.counters["acks_unknown"] == 1
    assert "could not be handled: OSError: help driver gone" in caplog.text
    assert post.outbox_ids() == []


# ------------------------------------------------------------------------ restart, heartbeat
async def test_events_left_in_the_outbox_are_sent_again_after_a_restart(tmp_path: Path) -> None:
    post = _make_post(tmp_path)
    post.agent._on_press(100)
    post.agent._on_press(200)
    ids = post.outbox_ids()
    post.agent.store.close()
    again = _make_post(tmp_path)  # what run() reads back before it connects
    assert list(again.agent._inflight) == ids and again.agent.outbox_depth == 2
    task = asyncio.create_task(again.agent._sender(again.client))  # type: ignore[arg-type]
    await again.client.wait_for("event", 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [e.id for e in _events(again)] == ids
    again.agent._on_press(100)
    assert again.outbox_ids()[2:] and _seq_of(again, again.outbox_ids()[2]) == 3
    again.agent.store.close()


def _seq_of(post: Post, event_id: str) -> int:
    assert post.agent.outbox is not None
    return next(p.seq for p in post.agent.outbox.pending() if p.id == event_id)


async def test_the_heartbeat_reports_the_posts_state_and_its_faults(post: Post) -> None:
    beat = post.agent.heartbeat()
    assert (beat.post, beat.interval_s, beat.outbox_depth, beat.faults) == (
        POST, post.agent.config.timing.heartbeat_s, 0, ())
    assert (beat.button, beat.strobe, beat.siren, beat.help, beat.silent) == (
        False, False, False, False, False)
    assert 0 <= beat.uptime_s < 60 and abs(beat.ts - time.time()) < 5
    post.agent._on_press(100)
    post.hardware.button = True
    post.hardware.help = True
    beat = post.agent.heartbeat()
    assert (beat.button, beat.strobe, beat.siren, beat.help, beat.outbox_depth) == (
        True, True, True, True, 1)
    post.agent.store.fault = True
    assert post.agent.heartbeat().faults == ("storage",)
    post.agent._on_taken_over("a clone")
    assert post.agent.heartbeat().faults == ("storage", "session_taken_over")
    assert post.agent.counters["session_taken_over"] == 1
    post.agent.store.fault = False
    assert post.agent._taken_over_at is not None
    post.agent._taken_over_at -= TAKEOVER_FAULT_S + 1  # long ago: no longer reported
    assert post.agent.heartbeat().faults == ()


async def test_the_heartbeat_of_a_silent_post_says_so(tmp_path: Path) -> None:
    post = _make_post(tmp_path, silent=True, heartbeat_s=7.0)
    beat = post.agent.heartbeat()
    assert beat.silent is True and beat.interval_s == 7.0
    post.agent.store.close()


# ---------------------------------------------------------------------------------- commands
def _command(cmd: str, command_id: str | None = None) -> tuple[str, bytes]:
    message = Command(id=command_id or new_ulid(), post=POST, cmd=cmd,  # type: ignore[arg-type]
                      ts=time.time())
    return post_topic(POST, "cmd"), encode(message)


async def test_commands_drive_the_outputs_and_are_answered_once_applied(post: Post) -> None:
    post.agent._on_press(100)
    assert (post.hardware.strobe, post.hardware.siren) == (True, True)
    post.hardware.help = True
    expected = {
        "silence": (True, False, True),
        "strobe_off": (False, False, True),
        "siren_on": (False, True, True),
        "strobe_on": (True, True, True),
        "reset": (False, False, False),
    }
    for cmd, outputs in expected.items():
        topic, payload = _command(cmd)
        await post.deliver(topic, payload)
        assert (post.hardware.strobe, post.hardware.siren, post.hardware.help) == outputs, cmd
        last = post.client.on("cmdresult")[-1]
        _, result = decode_from_post(last.topic, last.payload)
        assert isinstance(result, CommandResult) and last.qos == 1
        sent = decode_from_server_command(payload)
        assert (result.id, result.cmd, result.ok, result.post) == (sent.id, cmd, True, POST)
    assert len(post.client.on("cmdresult")) == len(expected)


def decode_from_server_command(payload: bytes) -> Command:
    from protocol.messages import decode_from_server

    message = decode_from_server(post_topic(POST, "cmd"), payload, POST)
    assert isinstance(message, Command)
    return message


async def test_a_repeated_command_is_answered_again_but_applied_once(post: Post) -> None:
    topic, payload = _command("siren_on")
    await post.deliver(topic, payload)
    assert post.hardware.siren is True
    post.hardware.siren = False  # switched off by hand (or by its timer) meanwhile
    await post.deliver(topic, payload)  # the broker redelivers the same command
    assert post.hardware.siren is False
    assert post.agent.counters["commands_repeated"] == 1
    assert len(post.client.on("cmdresult")) == 2


async def test_a_status_on_the_posts_own_topic_from_another_device_is_a_takeover(
        post: Post) -> None:
    topic = post_topic(POST, "status")
    mine = post.agent._own_status(Status(post=POST, state="online", ts=time.time()))
    await post.deliver(topic, mine)
    assert post.agent.counters["session_taken_over"] == 0
    old = encode(Status(post=POST, state="offline", ts=time.time() - 3600))
    await post.deliver(topic, old)  # an earlier run's will: means nothing now
    assert post.agent.counters["session_taken_over"] == 0
    clone = encode(Status(post=POST, state="online", ts=time.time()))
    await post.deliver(topic, clone)
    assert post.agent.counters["session_taken_over"] == 1
    assert "session_taken_over" in post.agent.faults
