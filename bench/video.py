"""``alarmpost bench video``: the video intercom in real Chromium against a real post.

What runs (127.0.0.1 for HTTP/MQTT, a temp dir removed at the end): a private Mosquitto and the
server as a child process (``alarmpost server``), both through the process harness
(:mod:`alarmpost_cli.harness`), one post as a child process (``alarmpost sim
--control``: the real edge agent on mock pins, its test pattern 640×480 at 15 fps in VP8), and
Debian's Chromium under Playwright logged in to the console. WebRTC runs over the machine's
non-loopback address (aioice skips 127.0.0.1).

Figures:

* ``answer_to_frame_ms``: answer click → first video frame shown (the page's
  ``requestVideoFrameCallback``), over ``calls`` calls (the first is the browser's first call);
* ``edge_cpu_pct``: CPU of the post's process during ``cpu_s`` seconds of one call (% of one core);
* ``edge_rss_mb``: its RSS during that call;
* ``rss_growth_50_calls_mb``: its RSS after ``cycles`` more answer/hang-up cycles minus before.

Targets: p95 ≤ 500 ms, edge CPU ≤ 15 %. Options: calls=20 cycles=50 cpu_s=10.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from alarmpost_cli.harness import Mosquitto, ServerProcess
from bench import summary_ms
from bench.chromium import CHROMIUM_ARGS, INSTALL_HINT, find_chromium

TARGET_P95_MS = 500.0
TARGET_CPU_PCT = 15.0
PASSWORD = "bench-video-password"


def _progress(text: str) -> None:
    print(f"[video] {text}", file=sys.stderr, flush=True)


def _popen(args: list[str], log_path: Path, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log)


async def _run(tmp: Path, calls: int, cycles: int, cpu_s: float) -> dict[str, Any]:
    import psutil
    from playwright.async_api import async_playwright

    from provisioning import deployment as d
    from server.web.users import add_user

    dep = d.create(tmp / "dep", d.district_posts(1), hardware_backend="mock", heartbeat_s=5.0)
    add_user(dep.server_config, "bench", "operator", PASSWORD, actor="bench")
    broker = Mosquitto.for_deployment(dep)
    server = ServerProcess.for_deployment(dep, tmp / "server.log", log_level="warning")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await broker.start_async()
        server.start()
        await server.wait_ready(20.0)
        base = [sys.executable, "-m", "alarmpost_cli.main", "--log-level", "warning"]
        edge = _popen([*base, "sim", "--deployment", str(dep.directory), "--control"],
                      tmp / "edge.log", subprocess.PIPE)
        procs.append(edge)
        edge_ps = psutil.Process(edge.pid)
        post_id = dep.posts[0].id
        executable = find_chromium()
        assert executable is not None
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
            # Playwright's wait_for_function polls with eval, which the console's CSP forbids.
            page = await (await browser.new_context(bypass_csp=True)).new_page()
            url = f"http://127.0.0.1:{dep.http_port}/console/"
            await page.goto(url)
            await page.fill("#name", "bench")
            await page.fill("#password", PASSWORD)
            await page.click("#submit")
            await page.wait_for_url("**/console/")
            await page.wait_for_selector("#conn.ok")
            await asyncio.sleep(1.5)  # let the post connect
            assert edge.stdin is not None
            edge.stdin.write(f"press {post_id}\n".encode())
            edge.stdin.flush()
            ring = await page.wait_for_selector("#ring:not(.hidden)", timeout=15000)
            assert ring is not None
            await page.click(f"#inc-{await ring.get_attribute('data-incident')}")

            async def one_call(hold_s: float = 0.0) -> float:
                await page.wait_for_selector("#btn-answer:not([disabled])", timeout=15000)
                await page.evaluate("window.__console.lastAnswerToFrameMs = null")
                await page.click("#btn-answer")
                handle = await page.wait_for_function(
                    "window.__console.lastAnswerToFrameMs", timeout=15000)
                took = float(await handle.json_value())
                if hold_s:
                    await asyncio.sleep(hold_s)
                await page.click("#btn-hangup")
                return took / 1000

            _progress(f"{calls} calls: answer click -> first frame")
            latencies = [await one_call() for _ in range(calls)]

            _progress(f"one call held {cpu_s:g} s: edge CPU and RSS")
            await page.wait_for_selector("#btn-answer:not([disabled])")
            await page.click("#btn-answer")
            await page.wait_for_function("window.__console.lastAnswerToFrameMs", timeout=15000)
            await asyncio.sleep(1.0)  # past ICE/DTLS set-up: the steady stream
            edge_ps.cpu_percent()
            await asyncio.sleep(cpu_s)
            cpu = edge_ps.cpu_percent()
            rss_call = edge_ps.memory_info().rss / 2**20
            stats = await page.evaluate("window.__console.videoStats()")
            await page.click("#btn-hangup")
            await asyncio.sleep(1.0)
            rss_before = edge_ps.memory_info().rss / 2**20

            _progress(f"{cycles} answer/hang-up cycles: edge RSS growth")
            for _ in range(cycles):
                await one_call()
            await asyncio.sleep(1.0)
            rss_after = edge_ps.memory_info().rss / 2**20
            await browser.close()
        edge.stdin.write(b"quit\n")
        edge.stdin.flush()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        await server.stop_async(10.0)
        await broker.stop_async()
    return {
        "answer_to_frame": latencies,
        "edge_cpu_pct": round(cpu, 1),
        "edge_rss_mb": round(rss_call, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "frames_decoded_in_hold": int(stats.get("framesDecoded", 0)),
    }


def main(as_json: bool, options: dict[str, str]) -> int:
    unknown = set(options) - {"calls", "cycles", "cpu_s"}
    if unknown:
        print(f"alarmpost bench video: unknown option(s) {sorted(unknown)}; "
              "known: calls, cycles, cpu_s", file=sys.stderr)
        return 2
    try:
        calls = int(options.get("calls", "20"))
        cycles = int(options.get("cycles", "50"))
        cpu_s = float(options.get("cpu_s", "10"))
    except ValueError as exc:
        print(f"alarmpost bench video: {exc}", file=sys.stderr)
        return 2
    if calls < 1 or cycles < 0 or cpu_s <= 0:
        print("alarmpost bench video: calls >= 1, cycles >= 0, cpu_s > 0", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print(f"alarmpost bench video: {INSTALL_HINT}", file=sys.stderr)
        return 3
    tmp = Path(tempfile.mkdtemp(prefix="alarmpost-bench-video-"))
    try:
        raw = asyncio.run(_run(tmp, calls, cycles, cpu_s))
    except Exception as exc:
        print(f"alarmpost bench video: could not run: {exc}", file=sys.stderr)
        for name in ("server.log", "edge.log"):
            path = tmp / name
            if path.exists():
                print(f"--- {name}\n{path.read_text()[-1500:]}", file=sys.stderr)
        if as_json:
            print(json.dumps({"bench": "video", "error": str(exc).splitlines()[0][:200]}))
        return 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latency = summary_ms(raw.pop("answer_to_frame"))
    result = {
        "bench": "video",
        "answer_to_frame_ms": latency,
        "edge_cpu_pct": raw["edge_cpu_pct"],
        "edge_rss_mb": raw["edge_rss_mb"],
        "rss_growth_50_calls_mb": round(raw["rss_after_mb"] - raw["rss_before_mb"], 1),
        "cycles": cycles,
        **raw,
        "cpu_count": os.cpu_count(),
        "targets": {"answer_to_frame_p95_ms": TARGET_P95_MS, "edge_cpu_pct": TARGET_CPU_PCT},
    }
    met = (latency["p95"] is not None and float(latency["p95"]) <= TARGET_P95_MS
           and raw["edge_cpu_pct"] <= TARGET_CPU_PCT)
    result["all_targets_met"] = met
    print(f"answer click -> first frame: p50 {latency['p50']} ms, p95 {latency['p95']} ms "
          f"(target p95 <= {TARGET_P95_MS:g} ms, n={latency['n']})")
    print(f"edge CPU, one 640x480 15 fps VP8 stream: {raw['edge_cpu_pct']} % of one core "
          f"(target <= {TARGET_CPU_PCT:g} %)")
    print(f"edge RSS during a call: {raw['edge_rss_mb']} MB; growth over {cycles} calls: "
          f"{result['rss_growth_50_calls_mb']} MB")
    if as_json:
        print(json.dumps(result), flush=True)
    return 0 if met else 1
