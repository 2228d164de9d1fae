"""Server pieces: the HTTP API's refusals, metrics format, registry and config errors."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from protocol.settings import ConfigError
from provisioning import deployment as d
from server.app import CentralServer, load_registry
from server.config import load_server_config
from server.metrics import Metrics
from tests.helpers import api

ENDPOINTS = ["/api/posts", "/api/posts/P001", "/api/incidents", "/api/incidents/x",
             "/api/events", "/api/faults", "/metrics", "/healthz", "/nonexistent"]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("token", ["", "wrong-token"])
async def test_every_endpoint_refuses_without_the_token(
    deployment: d.Deployment, server: CentralServer, path: str, token: str
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{deployment.http_port}{path}", headers=headers
    ) as resp:
        assert resp.status == 401
        assert "token" in (await resp.json())["error"]
    assert server.metrics.value("http_requests_total", status="401") == 1


async def test_api_answers_and_refuses_bad_requests_cleanly(
    deployment: d.Deployment, server: CentralServer
) -> None:
    posts = await api(deployment, "/api/posts")
    assert [p["id"] for p in posts] == ["P001", "P002", "P003"]
    assert posts[0]["school"] and posts[0]["lat"] is not None
    assert (await api(deployment, "/healthz")) == {"ok": True}
    for bad in ["/api/events?limit=abc", "/api/events?limit=0", "/api/incidents?limit=-1",
                "/api/incidents?state=burning"]:
        body = await api(deployment, bad)
        assert "error" in body and "Traceback" not in str(body), bad
    assert (await api(deployment, "/api/posts/P999")) == {"error": "no such post"}
    assert (await api(deployment, "/api/nothing")) == {"error": "Not Found"}
    text = await api(deployment, "/metrics")
    assert "# TYPE alarmpost_posts_online gauge" in text
    assert 'alarmpost_http_requests_total{status="400"} 4' in text


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.counter("things_total", "Things")
    m.inc("things_total", reason='a"b')
    m.gauge("level", "Level", lambda: 3)
    h = m.histogram("latency_seconds", "Latency", (0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5)
    text = m.render()
    assert 'alarmpost_things_total{reason="a\\"b"} 1' in text
    assert "alarmpost_level 3" in text
    assert 'alarmpost_latency_seconds_bucket{le="0.1"} 1' in text
    assert 'alarmpost_latency_seconds_bucket{le="+Inf"} 2' in text
    assert "alarmpost_latency_seconds_count 2" in text


def test_registry_and_server_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_registry(tmp_path / "none.toml")
    bad = tmp_path / "posts.toml"
    bad.write_text('[[post]]\nid = "a/b"\n')
    with pytest.raises(ConfigError, match="invalid id"):
        load_registry(bad)
    bad.write_text('[[post]]\nid = "P1"\nlat = "north"\n')
    with pytest.raises(ConfigError, match="non-numeric"):
        load_registry(bad)
    cfg = tmp_path / "server.toml"
    cfg.write_text("[http]\nport = 8080\n")
    with pytest.raises(ConfigError, match="api_token"):
        load_server_config(cfg)


def test_log_throttle_lets_a_burst_through_then_says_how_many_it_left_out() -> None:
    from server.logthrottle import LogThrottle

    throttle = LogThrottle(burst=2, window_s=10.0, max_keys=3)
    assert [throttle.allow("P001", now=0.0) for _ in range(5)] == [
        (True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert throttle.allow("P002", now=1.0) == (True, 0)  # keys are independent
    assert throttle.allow("P001", now=10.0) == (True, 3)  # a new window names what was left out
    for key in ("a", "b", "c", "d"):
        throttle.allow(key, now=11.0)
    assert len(throttle) == 3  # memory is bounded
