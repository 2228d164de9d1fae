"""The console in real Chromium (Playwright, Debian's chromium, fake camera and microphone).

The page is served on 127.0.0.1 (a secure context, so getUserMedia works without HTTPS) while
WebRTC runs over the machine's non-loopback address: aioice skips 127.0.0.1, and Chromium offers
its host candidates on every interface (in a bare network namespace: add 127.0.0.2/8 to lo).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import async_playwright

from bench.chromium import CHROMIUM_ARGS, INSTALL_HINT, find_chromium
from provisioning import deployment as d
from server.app import CentralServer
from tests.console_helpers import PASSWORD, add_users
from tests.helpers import run_posts, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams, run_teams

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


async def login(browser: Any, dep: d.Deployment, name: str) -> Any:
    # Playwright's wait_for_function polls with eval, which the console's CSP forbids.
    context = await browser.new_context(bypass_csp=True)
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{dep.http_port}/console/")
    assert page.url.endswith("/console/login")  # no session: sent to the login page
    await page.fill("#name", name)
    await page.fill("#password", PASSWORD)
    await page.click("#submit")
    await page.wait_for_url("**/console/")
    await page.wait_for_selector("#conn.ok")  # the live WebSocket is up
    return page


async def frames_decoded(page: Any, mode: str = "call") -> int:
    stats = await page.evaluate("(mode) => window.__console.videoStats(mode)", mode)
    return int(stats["framesDecoded"])


async def test_operator_answers_silences_and_resolves_in_chromium(
    server: CentralServer, deployment: d.Deployment, browser: Any
) -> None:
    add_users(server, ("alice", "operator"), ("bob", "supervisor"))
    async with run_posts(deployment, "P001") as posts:
        alice = await login(browser, deployment, "alice")
        bob = await login(browser, deployment, "bob")

        pressed_at = time.time()
        await posts["P001"].press()
        ring = await alice.wait_for_selector("#ring:not(.hidden)", timeout=3000)
        incident_id = await ring.get_attribute("data-incident")
        for page in (alice, bob):
            rang_ms = await page.wait_for_function(
                f"window.__console.ringedAt[{incident_id!r}]", timeout=3000)
            rang = (await rang_ms.json_value()) / 1000
            assert rang - pressed_at < 1.0, f"rang {rang - pressed_at:.3f} s after the press"
        assert "P001" in await alice.inner_text("#ring-text")

        # Alice opens the incident and answers the call: the video decodes frames.
        await alice.click(f"#inc-{incident_id}")
        await alice.wait_for_selector("#incident:not(.hidden)")
        assert not await alice.is_visible("#ring")  # taken in hand: it stops ringing here
        await alice.click("#btn-answer")
        await until(lambda: frames_decoded(alice), 10, "first decoded frame")
        first = await frames_decoded(alice)
        await until(lambda: _more(alice, first + 5), 5, "framesDecoded rising")
        intercom = posts["P001"].agent.intercom
        assert intercom.engine is not None and intercom.engine.camera_open
        # Chromium's fake microphone (a beep) reaches the post's speaker sink.
        await until(lambda: intercom.engine.sink.frames > 10, 5, "operator audio at the post")
        await until(lambda: intercom.engine.sink.peak > 0, 5, "non-silent operator audio")

        # Bob sees who took the call and cannot take it.
        await bob.click(f"#inc-{incident_id}")
        await bob.wait_for_selector(f"#inc-{incident_id} .holder:has-text('taken by alice')")
        await bob.wait_for_selector("#call-status:has-text('taken by alice')")
        assert await bob.is_disabled("#btn-answer")
        # ...but can watch the camera from the posts view (one camera serves both).
        await bob.click("#tab-posts")
        await bob.wait_for_selector("#map circle.alarm")  # the alarmed post, red on the map
        assert await bob.inner_text("#post-P001 .state") == "alarm"
        await bob.click("#post-P001 button.camera")
        await until(lambda: _more(bob, 3, "view"), 10, "frames in bob's camera view")
        assert intercom.engine.opened_sources == 1
        await bob.click("#viewer-close")
        await until(lambda: len(intercom.engine.calls) == 1, 5, "bob's view ended")

        # Silence the siren: the post confirms, the console shows it.
        assert posts["P001"].hardware.siren
        await alice.click("#btn-silence")
        await alice.wait_for_selector("#commands li.confirmed[data-cmd='silence']", timeout=5000)
        assert not posts["P001"].hardware.siren

        # Classify and resolve with a note; the call ends and the camera is freed.
        await alice.select_option("#classification", "help_request")
        await alice.fill("#note", "crowd of cars at the gate at closing time")
        await alice.click("#btn-resolve")
        await alice.wait_for_selector("#incident[data-state='resolved']", timeout=5000)
        await until(lambda: not intercom.engine.camera_open, 5, "camera released")
        incident = server.storage.incidents.get(incident_id)
        assert incident["classification"] == "help_request"
        assert incident["note"] == "crowd of cars at the gate at closing time"
        actions = [(t["actor"], t["action"]) for t in incident["timeline"]]
        assert ("alice", "call_answered") in actions and ("alice", "resolved") in actions
        await until(lambda: server.calls.calls == {}, 5, "no call left on the server")


async def _more(page: Any, than: int, mode: str = "call") -> bool:
    return await frames_decoded(page, mode) > than


async def test_closing_the_browser_ends_the_call(make_deployment: Any, browser: Any) -> None:
    # With patrol teams the dispatcher pages one at once (the incident is "paged" before any
    # console sees it): it must ring all the same, until an operator takes it in hand.
    dep = make_deployment(2)
    specs = [TeamSpec("A", 1.0)]
    add_teams(dep, specs)
    async with run_server(dep) as server, run_teams(dep, server, specs), \
            run_posts(dep, "P002") as posts:
        add_users(server, ("alice", "operator"))
        alice = await login(browser, dep, "alice")
        await posts["P002"].press()
        ring = await alice.wait_for_selector("#ring:not(.hidden)", timeout=3000)
        assert server.storage.incidents.get(await ring.get_attribute("data-incident"))["state"] == "paged"
        await alice.click(f"#inc-{await ring.get_attribute('data-incident')}")
        await alice.click("#btn-answer")
        await until(lambda: frames_decoded(alice), 10, "first decoded frame")
        intercom = posts["P002"].agent.intercom
        assert intercom.engine is not None and intercom.engine.camera_open
        await alice.context.close()  # the tab goes away without hanging up
        await until(lambda: not intercom.engine.camera_open, 5, "camera released")
        await until(lambda: server.calls.calls == {}, 5, "call ended on the server")


async def test_test_mode_accounts_and_dispatch_overrides_in_chromium(
    make_deployment: Any, browser: Any
) -> None:
    dep = make_deployment(2)
    specs = [TeamSpec("A", 1.0)]
    add_teams(dep, specs, answer_timeout_s=30.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001", "P002") as posts:
        add_users(server, ("tina", "technician"), ("otto", "operator"), ("ada", "admin"))
        # A technician puts P001 in test mode from the posts view.
        tina = await login(browser, dep, "tina")
        assert await tina.is_visible("#view-posts") and not await tina.is_visible("#tab-users")
        await tina.fill("#test-reason", "commissioning")
        await tina.click("#post-P001 button.testmode")
        await tina.wait_for_selector("#post-P001.test .badge-test")
        assert server.storage.posts.in_test_mode("P001")

        # Its press shows as TEST in the operator's queue and does not ring.
        otto = await login(browser, dep, "otto")
        await posts["P001"].press()
        test_id = (await until(lambda: server.storage.incidents.recent("open", 5), 5,
                               "test incident"))[0]["id"]
        await otto.wait_for_selector(f"#inc-{test_id}.test .badge-test")
        assert not await otto.is_visible("#ring")
        assert await otto.evaluate(f"window.__console.ringedAt[{test_id!r}]") is None

        # A real press on P002 rings; the operator cancels team A's page, then re-dispatches.
        await posts["P002"].press()
        ring = await otto.wait_for_selector("#ring:not(.hidden)", timeout=3000)
        real_id = await ring.get_attribute("data-incident")
        assert real_id != test_id
        page = await teams["A"].wait_page(5)
        await otto.click(f"#inc-{real_id}")
        await otto.click(f"#page-{page.id} button.cancel-page")
        await otto.wait_for_selector(f"#page-{page.id}.cancelled")
        await otto.click("#btn-redispatch")
        second = await teams["A"].wait_page(5, count=2)
        await otto.wait_for_selector(f"#page-{second.id}.waiting")
        await otto.wait_for_selector("#timeline li:has-text('redispatch')")

        # An admin creates an account and disables it from the Accounts view.
        ada = await login(browser, dep, "ada")
        await ada.click("#tab-users")
        await ada.fill("#new-name", "nina")
        await ada.select_option("#new-role", "supervisor")
        await ada.fill("#new-password", PASSWORD)
        await ada.click("#btn-add-user")
        await ada.wait_for_selector("#user-nina")
        assert await ada.eval_on_selector("#user-nina select.role", "s => s.value") == "supervisor"
        await ada.click("#user-nina button.toggle")
        await ada.wait_for_selector("#user-nina.disabled")
        await ada.wait_for_selector("#audit li:has-text('user_disabled')")
        assert server.storage.incidents.get(test_id)["classification"] == "test"
