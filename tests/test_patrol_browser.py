"""The patrol app in real Chromium (Playwright, Debian's chromium): a team logs in on its
"phone", goes on duty (its position comes from the browser's geolocation), gets paged for a real
press, and works the incident to the end; the incident's timeline shows each step."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import async_playwright

from bench.chromium import CHROMIUM_ARGS, INSTALL_HINT, find_chromium
from tests.helpers import MakeDeployment, api, run_posts, run_server, until
from tests.patrol_helpers import KM_LAT, TeamSpec, add_teams
from tests.patrol_web_helpers import APP_PASSWORD, give_app_passwords

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = find_chromium()
    if executable is None:
        pytest.fail(INSTALL_HINT)
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        yield chromium
        await chromium.close()


async def test_team_works_a_page_in_chromium(make_deployment: MakeDeployment,
                                             browser: Any) -> None:
    dep = make_deployment(2)
    add_teams(dep, [TeamSpec("A", 1.0)])
    give_app_passwords(dep, "A")
    post = dep.posts[0]
    here = {"latitude": post.lat + 1.0 * KM_LAT, "longitude": post.lon, "accuracy": 12}
    async with run_server(dep) as server, run_posts(dep, "P001") as posts:
        # A phone-sized page; the CSP forbids eval, which wait_for_function needs.
        context = await browser.new_context(
            bypass_csp=True, permissions=["geolocation"], geolocation=here,
            viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{dep.http_port}/patrol/")
        assert page.url.endswith("/patrol/login")  # no session: sent to the login page
        await page.fill("#team", "A")
        await page.fill("#password", APP_PASSWORD)
        await page.click("#submit")
        await page.wait_for_url("**/patrol/")
        await page.wait_for_selector("#conn.ok")
        assert "Off duty" in await page.inner_text("#duty-state")

        # On duty: the phone's position reaches the dispatcher as a TeamPosition would.
        await page.click("#duty")
        await page.wait_for_selector("#duty-state.on")
        live = server.dispatcher.live["A"]
        await until(lambda: live.position_at is not None, 5, "the phone's position on the server")
        assert live.status == "available"
        assert abs((live.lat or 0) - here["latitude"]) < 1e-6
        assert abs((live.lon or 0) - here["longitude"]) < 1e-6
        assert server.metrics.value("patrol_web_positions_total") >= 1

        # A press pages team A: the phone rings (and would vibrate) with where to go.
        pressed_at = time.time()
        await posts["P001"].press()
        card = await page.wait_for_selector("#page[data-phase='paged']", timeout=5000)
        incident_id = await card.get_attribute("data-incident")
        page_id = await card.get_attribute("data-page")
        rang = await page.wait_for_function(f"window.__patrol.rangAt[{page_id!r}]", timeout=3000)
        assert (await rang.json_value()) / 1000 - pressed_at < 2.0
        assert post.name in await page.inner_text("#page-post")
        assert await page.inner_text("#page-address")
        assert (await page.get_attribute("#nav-geo", "href") or "").startswith(
            f"geo:{post.lat:.6f},{post.lon:.6f}")

        await page.click("#btn-accept")
        await page.wait_for_selector("#page[data-phase='accepted']")
        await page.click("#btn-en-route")
        await page.wait_for_selector("#page[data-phase='en_route']")
        await page.click("#btn-on-scene")
        await page.wait_for_selector("#page[data-phase='on_scene']")
        await page.click("#btn-resolve")
        await page.select_option("#classification", "help_request")
        await page.fill("#resolve-note", "crowd at the gate at closing time")
        await page.click("#btn-resolve-confirm")
        await page.wait_for_selector("#idle:not(.hidden)")
        assert "Resolved" in await page.inner_text("#notice")
        await context.close()

        # The timeline (HTTP API, bearer token) has each step with the team as actor.
        incident = await api(dep, f"/api/incidents/{incident_id}")
        assert incident["state"] == "resolved" and incident["classification"] == "help_request"
        steps = [(t["actor"], t["action"]) for t in incident["timeline"]]
        for action in ("accepted", "en_route", "on_scene", "resolved"):
            assert ("team:A", action) in steps, steps
        assert incident["dispatch"]["team_id"] == "A"
        assert incident["dispatch"]["times"]["accept_to_on_scene_s"] is not None
