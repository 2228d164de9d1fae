"""The ``alarmpost`` command line: the demo end to end, help texts, and clean errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alarmpost_cli.demo import parse_metrics
from alarmpost_cli.main import main
from tests.helpers import ALARMPOST


def run_cli(*args: str, timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ALARMPOST, *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=env,
    )


def _summary_figure(stdout: str, label: str) -> int:
    match = re.search(rf"^\s*{label}\s+(\d+)", stdout, re.MULTILINE)
    assert match, f"no {label!r} in the summary:\n{stdout}"
    return int(match.group(1))


def test_headless_demo_loses_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo's temporary deployment lands here
    proc = run_cli("demo", "--headless", "--duration", "8", "--posts", "5", "--press-every", "1",
                   timeout=120, env=env)
    where = re.search(r"deployment\s+(\S+)", proc.stderr)
    assert where, proc.stderr
    directory = Path(where.group(1))
    logs = ""
    if directory.exists():  # kept only on failure
        for name in ("server.log", "demo.log"):
            path = directory / name
            if path.exists():
                logs += f"\n--- {name}\n{path.read_text()[-3000:]}"
        shutil.rmtree(directory, ignore_errors=True)
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}{logs}"

    assert proc.returncode == 0, detail
    assert "Traceback" not in proc.stderr, detail
    assert _summary_figure(proc.stdout, "lost") == 0, detail
    committed = _summary_figure(proc.stdout, "events committed")
    presses = _summary_figure(proc.stdout, "presses accepted")
    acks = _summary_figure(proc.stdout, "ACKs received")
    assert committed >= 1, detail
    assert committed == presses == acks, detail
    assert "result: OK" in proc.stdout, detail
    assert not logs, "the temporary deployment must be removed after a successful run"
    # The token is a secret: the demo says where it is, never what it is.
    assert "server.toml" in proc.stderr


def test_demo_keeps_dir_given(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    proc = run_cli("demo", "--headless", "--duration", "1", "--posts", "2", "--press-every", "0",
                   "--dir", str(target), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (target / "server.toml").exists()
    assert (target / "server.log").exists()
    token = re.search(r'api_token = "([^"]+)"', (target / "server.toml").read_text())
    assert token
    assert token.group(1) not in proc.stdout + proc.stderr
    assert token.group(1) not in (target / "demo.log").read_text()
    assert token.group(1) not in (target / "server.log").read_text()

    again = run_cli("demo", "--headless", "--duration", "1", "--dir", str(target))
    assert again.returncode == 2
    assert "not empty" in again.stderr and "Traceback" not in again.stderr


def test_help_explains_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("demo", "server", "edge", "sim", "provision", "bench"):
        assert word in proc.stdout

    proc = run_cli("demo", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--posts", "--press-every", "--headless", "--duration", "--dir"):
        assert option in proc.stdout
    assert "status table" in proc.stdout


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "alarmpost"
    if not script.exists():
        pytest.skip("the alarmpost console script is not installed next to this interpreter")
    proc = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "--headless" in proc.stdout


def test_missing_server_config_is_a_clear_error() -> None:
    proc = run_cli("server", "--config", "/nonexistent.toml")
    assert proc.returncode == 2
    assert "/nonexistent.toml" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--posts", "0"], ["--press-every", "-1"], ["--duration", "-5"]])
def test_demo_rejects_bad_arguments(args: list[str]) -> None:
    proc = run_cli("demo", "--headless", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("alarmpost: --") and "Traceback" not in proc.stderr


def test_missing_mosquitto_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)  # provisioning.broker's lookup
    code = main(["demo", "--headless", "--duration", "1", "--dir", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install -y mosquitto" in err
    assert not (tmp_path / "d").exists()  # nothing written before the check


def test_parse_metrics_sums_labelled_series() -> None:
    text = (
        "# HELP alarmpost_rejected_total Messages rejected, by reason\n"
        "# TYPE alarmpost_rejected_total counter\n"
        'alarmpost_rejected_total{reason="malformed"} 2\n'
        'alarmpost_rejected_total{reason="unknown_post"} 3\n'
        "alarmpost_incidents_open 4\n"
        'alarmpost_commit_seconds_bucket{le="0.001"} 1\n'
    )
    figures = parse_metrics(text)
    assert figures["alarmpost_rejected_total"] == 5
    assert figures["alarmpost_incidents_open"] == 4


# ---------------------------------------------------------------------------- the docs stay true
ROOT = Path(__file__).resolve().parent.parent


def test_protocol_doc_examples_are_exact() -> None:
    """Every JSON example in docs/protocol.md decodes with its direction's codec and encodes back
    to the very same bytes."""
    from protocol.messages import Rejected, decode_from_post, decode_from_server, encode
    from protocol.topics import EDGE_KINDS, parse_post_topic, server_status_topic

    text = (ROOT / "docs" / "protocol.md").read_text()
    topic = None
    checked = 0
    for match in re.finditer(r"Topic `([^`]+)`|```json\n(.*?)\n```", text, re.DOTALL):
        if match.group(1):
            topic = match.group(1)
            continue
        assert topic is not None, "a JSON example before any 'Topic `...`' line"
        payload = match.group(2).encode()
        try:
            if topic == server_status_topic():
                again = encode(decode_from_server(topic, payload, "P001"))
            elif parse_post_topic(topic).kind in EDGE_KINDS:
                again = encode(decode_from_post(topic, payload)[1])
            else:
                again = encode(decode_from_server(topic, payload, parse_post_topic(topic).post_id))
        except Rejected as exc:
            raise AssertionError(
                f"docs/protocol.md: the JSON example after 'Topic `{topic}`:' is {exc}; each "
                "```json example needs its own 'Topic `...`:' line before it and must be exactly "
                "what protocol.encode writes"
            ) from None
        assert again == payload, f"docs/protocol.md: {topic} example is not what encode writes"
        checked += 1
    assert checked >= 10


def test_readme_documents_every_config_key() -> None:
    import dataclasses

    from edge.config import EdgeConfig
    from server.config import ServerConfig

    readme = (ROOT / "README.md").read_text()
    for config in (EdgeConfig(), ServerConfig()):
        for section in dataclasses.fields(config):
            value = getattr(config, section.name)
            if not dataclasses.is_dataclass(value):
                continue
            hint = f"add a row for it to the {type(config).__name__} table in README.md"
            assert f"**[{section.name}]**" in readme, f"section [{section.name}] missing: {hint}"
            for key in dataclasses.fields(value):
                assert f"| `{key.name}` |" in readme, f"[{section.name}] {key.name} missing: {hint}"
