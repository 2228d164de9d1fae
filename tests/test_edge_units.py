"""Edge pieces on their own: configuration, outbox durability, the button guard."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge.config import load_edge_config
from edge.hardware import ButtonGuard
from edge.outbox import Outbox
from protocol.messages import Event
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
