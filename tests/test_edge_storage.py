"""The edge without its disk: a full and a read-only filesystem under a real agent.

The outbox lives on a small tmpfs mounted for the test (we run as root), so SQLite meets the
real ENOSPC / EROFS errors: nothing is injected. Each test presses through the real broker into
the real server and checks that strobe and siren came on, every event was committed, no (post,
seq) was used twice (across a restart too), the fault was in the published heartbeat, and the
outbox was used again once the storage was back.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim.fleet import SimPost
from protocol.messages import Ack, Event, Heartbeat, decode_from_post
from protocol.topics import post_topic
from provisioning import deployment as d
from server.app import CentralServer
from tests.helpers import db_rows, monitor_credentials, run_posts, until

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend


class SmallDisk:
    """A 1 MiB tmpfs: filled up, freed, remounted read-only or read-write on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with self.filler.open("ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"these tests mount a tmpfs (they need root): {done.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class HeartbeatWatch:
    """The heartbeats a post publishes, as the server receives them."""

    def __init__(self) -> None:
        self.beats: list[Heartbeat] = []

    @property
    def faults(self) -> tuple[str, ...]:
        return self.beats[-1].faults if self.beats else ()


@contextlib.asynccontextmanager
async def watch_heartbeats(dep: d.Deployment, post_id: str) -> AsyncIterator[HeartbeatWatch]:
    user, password = monitor_credentials(dep)
    watch = HeartbeatWatch()
    async with aiomqtt.Client("127.0.0.1", dep.broker_port, username=user, password=password,
                              identifier="test-heartbeat-watch",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        topic = post_topic(post_id, "heartbeat")
        await client.subscribe(topic, qos=0)

        async def read() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                _, beat = decode_from_post(str(message.topic), message.payload)
                assert isinstance(beat, Heartbeat)
                watch.beats.append(beat)

        task = asyncio.create_task(read())
        try:
            yield watch
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def press_and_ack(post: SimPost) -> Event:
    """Press; strobe and siren must be on at once; return the event once the server ACKed it."""
    loop = asyncio.get_running_loop()
    pressed: asyncio.Future[Event] = loop.create_future()
    acks: dict[str, asyncio.Future[Ack]] = {}

    def on_press(event: Event) -> None:
        if not pressed.done():
            pressed.set_result(event)
            acks.setdefault(event.id, loop.create_future())

    def on_ack(ack: Ack, _at: float) -> None:
        fut = acks.setdefault(ack.event_id, loop.create_future())
        if not fut.done():
            fut.set_result(ack)

    post.agent.press_listeners.append(on_press)
    post.agent.ack_listeners.append(on_ack)
    try:
        post.hardware.set_strobe(False)
        post.hardware.set_siren(False)
        await post.press()
        event = await asyncio.wait_for(pressed, 5)
        assert post.hardware.strobe and post.hardware.siren
        await asyncio.wait_for(acks[event.id], 10)
        return event
    finally:
        post.agent.press_listeners.remove(on_press)
        post.agent.ack_listeners.remove(on_ack)


def committed(dep: d.Deployment) -> list[tuple[str, int]]:
    return [(e, s) for e, s in db_rows(dep, "SELECT id, seq FROM events WHERE post_id='P001'")]


def assert_no_seq_reused(dep: d.Deployment, events: list[Event]) -> None:
    rows = committed(dep)
    assert sorted(rows) == sorted((e.id, e.seq) for e in events), "every event committed once"
    seqs = [s for _, s in rows]
    assert len(set(seqs)) == len(seqs), f"(post, seq) used twice: {sorted(seqs)}"


def put_outbox_on(dep: d.Deployment, path: Path) -> None:
    """Point P001's configuration at an outbox on ``path`` (before its agent is made), tried
    again every 0.3 s while it fails."""
    config = dep.post_config("P001")
    text = config.read_text()
    assert '[outbox]\npath = "../outbox/P001.db"' in text
    config.write_text(text.replace('"../outbox/P001.db"', f'"{path / "outbox.db"}"\nretry_s = 0.3'))


async def storage_back(post: SimPost) -> None:
    await until(lambda: "storage" not in post.agent.heartbeat().faults, 10, "storage back")


async def test_full_disk_keeps_the_alarm_and_never_reuses_a_sequence_number(
    deployment: d.Deployment, server: CentralServer, small_disk: SmallDisk,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put_outbox_on(deployment, small_disk.path)
    events: list[Event] = []
    async with watch_heartbeats(deployment, "P001") as watch:
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            events.append(await press_and_ack(post))  # the outbox works
            small_disk.fill()
            for _ in range(3):
                events.append(await press_and_ack(post))
            await until(lambda: "storage" in watch.faults, 5, "storage fault in a heartbeat")
            assert post.agent.counters["storage_faults"] == 1  # one state change, not per press
            faults = [r.getMessage() for r in caplog.records if "storage fault" in r.getMessage()]
            assert len(faults) == 1 and "database or disk is full" in faults[0], faults
            assert "cannot rollback" not in caplog.text  # the real error, not a rollback's
        # A restart on the full disk.
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            for _ in range(2):
                events.append(await press_and_ack(post))
            assert_no_seq_reused(deployment, events)
            watch.beats.clear()
            await until(lambda: "storage" in watch.faults, 5, "storage fault after the restart")
            small_disk.free()
            await storage_back(post)
            event = await press_and_ack(post)
            events.append(event)
            assert post.agent.outbox is not None and post.agent.outbox.last_seq == event.seq
            await until(lambda: watch.beats and "storage" not in watch.faults, 5, "fault cleared")
    assert_no_seq_reused(deployment, events)
    assert [e.seq for e in events] == sorted(e.seq for e in events)


async def test_read_only_disk_at_boot_keeps_the_alarm_and_never_reuses_a_sequence_number(
    deployment: d.Deployment, server: CentralServer, small_disk: SmallDisk
) -> None:
    put_outbox_on(deployment, small_disk.path)
    events: list[Event] = []
    async with run_posts(deployment, "P001") as posts:
        events.append(await press_and_ack(posts["P001"]))  # the outbox exists and works
    small_disk.read_only()
    async with watch_heartbeats(deployment, "P001") as watch:
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            for _ in range(2):
                events.append(await press_and_ack(post))
            await until(lambda: "storage" in watch.faults, 5, "storage fault in a heartbeat")
        # A restart, still read-only.
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            for _ in range(2):
                events.append(await press_and_ack(post))
            assert_no_seq_reused(deployment, events)
            small_disk.writable()
            await storage_back(post)
            event = await press_and_ack(post)
            events.append(event)
            assert post.agent.outbox is not None and post.agent.outbox.last_seq == event.seq
            assert post.agent.outbox.depth() == 0
    assert_no_seq_reused(deployment, events)
    # The outbox's epoch was read from the read-only disk and carried by every event.
    assert len({e.epoch for e in events}) == 1 and events[0].epoch
