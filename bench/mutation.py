"""``alarmpost bench mutation``: does the test suite fail when the code breaks a promise?

Runs mutmut (3.x) on the alarm-path modules and the security guards: it plants one small bug at a
time (a flipped comparison, a dropped argument, a changed constant or string) and runs the tests
that cover the function it changed (mutmut records which tests reach which function, then runs
only those for each mutant, two at a time). A mutant the tests catch is *killed*; one they miss
*survives*. Survivors are either killed by a new test or listed, with the reason, in
``bench/mutation_equivalents.toml`` as equivalent (no test can tell them apart from the original).

The run happens in a scratch copy of the working tree, never in it. In that copy, logging calls,
metric help texts and SQL text are marked ``# pragma: no mutate`` (see :func:`unmutated_lines`),
and fuzz tests are left out (they guard robustness, and would cost minutes per mutant).

Thousands of mutants, each running the real-broker tests that reach its function, take over an
hour on two cores. So a run has two phases within its budget (30 minutes by default): every
mutant of the functions where the promises live (:data:`CRITICAL`), then a seeded random sample
of the other mutants, as many as the rest of the budget takes. ``sample=all`` checks every mutant
whatever the time (about 70 minutes here).

Options (``KEY=VALUE``): ``modules`` (comma-separated paths; default the alarm path and the
guards), ``tests`` (comma-separated test files; default those that exercise them), ``children``
(parallel mutants, default 2), ``budget_s`` (default 1800), ``sample`` (``budget`` or ``all``),
``seed`` (of the sample, default 1), ``keep`` (1: keep the scratch copy and print where),
``target`` (score to meet on the alarm-path modules, 0.9), ``test_cap_s`` (seconds of tests
kept for each function, fastest first and fixtures included, default :data:`TEST_CAP_S`; 0 for
every test that reaches it).

JSON, over the mutants of the critical functions (:data:`CRITICAL`, every one of them checked
in every run; the target applies to these): ``mutants``, ``checked``, ``killed``, ``survived``,
``timeout``, ``no_tests``, ``equivalent``, ``score`` (killed / (checked - equivalent)),
``alarm_path_score``, ``per_module`` (the same per module), ``survivors`` (names of the
unexplained survivors). Beside them: ``generated`` (every mutant of the modules),
``critical_checked``, ``sampled`` and ``sample`` (counts and score of the seeded sample of the
other functions' mutants: informative only, since the test cap leaves out most of the
real-broker tests that cover those functions), ``elapsed_s``, ``complete`` (false if the budget
ran out before every critical mutant was checked), ``sample_complete`` (false if it ran out
during the sample, which takes what the budget leaves), ``test_cap_s`` and ``tests_left_out``
(function-test pairs beyond the cap).
"""

from __future__ import annotations

import ast
import fnmatch
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS_FILE = Path(__file__).with_name("mutation_equivalents.toml")

# The alarm path: a press on the post to the ACK back, and the codecs in between.
ALARM_PATH = ("edge/agent.py", "edge/outbox.py", "server/app.py", "server/storage/incidents.py",
              "protocol/messages.py", "protocol/topics.py")
# The guards: sessions, permissions, login limits, the same-origin/CSRF check.
GUARDS = ("server/web/auth.py", "server/web/http.py")
DEFAULT_MODULES = ALARM_PATH + GUARDS

# Functions of those modules that are neither on the alarm path nor a guard: the video intercom
# and commands on the post, registry and metrics plumbing and the console's read queries on the
# server, account management beside the session and login guards, plain response helpers.
# They have tests of their own; leaving them out keeps the run within 30 minutes.
OUT_OF_SCOPE: dict[str, frozenset[str]] = {
    "edge/agent.py": frozenset({
        "_PostLog.process", "EdgeAgent._spawn_call_task", "EdgeAgent._call_done",
        "EdgeAgent._publish_call", "EdgeAgent._arm_siren_timeout", "EdgeAgent._siren_timeout",
    }),
    "server/app.py": frozenset({
        "load_registry", "CentralServer.reload_registry", "CentralServer._setup_metrics",
        "CentralServer._on_sighup", "CentralServer.set_test_mode", "CentralServer._flush",
        "CentralServer._flush_loop", "CentralServer.transition", "CentralServer._reported_faults",
        "CentralServer._clone_check", "_topic_kind",
    }),
    # The alarm path's store: committing events (and their sequence checks); the incident
    # lifecycle and the console's reads have tests of their own (tests/test_incidents.py,
    # tests/test_storage.py).
    "server/storage/incidents.py": frozenset({
        "IncidentStore.transition", "IncidentStore.note", "IncidentStore.resolve_idle",
        "IncidentStore.state", "IncidentStore.audit", "IncidentStore.recent", "IncidentStore.get",
        "IncidentStore.first_event", "IncidentStore.active_not_in_dispatch",
        "IncidentStore.events", "IncidentStore.open_count", "IncidentStore.summary",
    }),
    "server/web/auth.py": frozenset({
        "Accounts.users", "Accounts.count", "Accounts.add_user", "Accounts.add_user_hashed",
        "Accounts._keeps_an_admin", "Accounts.set_role", "Accounts.set_disabled",
        "Accounts.set_password_hashed", "Accounts.audit", "Accounts.audit_log",
        "LoginLimiter.size", "login_refused",
    }),
    # The guards here are the same-origin and CSRF checks and the secret comparison; the input
    # bounds (JSON depth and size, parameters, header deadline) are guarded by the fuzz tests.
    "server/web/http.py": frozenset({
        "error", "refuse", "bad_input", "run_handler", "DeadlineServer.__init__",
        "DeadlineServer.__call__", "DeadlineAppRunner.__init__", "DeadlineAppRunner._make_server",
        "_float", "_int", "_constant", "parse_json", "_read_at_most", "json_body", "query_int",
        "query_str", "str_field", "BadInput.__init__", "DeadlineRequestHandler.connection_made",
        "DeadlineRequestHandler._arm", "DeadlineRequestHandler._disarm",
        "DeadlineRequestHandler.data_received", "DeadlineRequestHandler.connection_lost",
        "DeadlineRequestHandler._expired",
    }),
}

# Tests that exercise those modules. Left out: browser tests, the process-killing failure tests
# (tests/test_failures.py), broker-outage and patrol-app tests: each takes seconds of waiting,
# and a surviving mutant runs every test that reaches its function.
DEFAULT_TESTS = (
    # Millisecond tests of the alarm path's own logic and of the guards: for most mutants the
    # first tests that run (the fastest first), and the ones that kill them.
    "tests/test_fast_agent.py", "tests/test_fast_ingest.py", "tests/test_fast_storage.py",
    "tests/test_fast_protocol.py", "tests/test_fast_guards.py",
    "tests/test_promises.py", "tests/test_alarm_path.py", "tests/test_security.py",
    "tests/test_protocol.py", "tests/test_edge_units.py", "tests/test_server_units.py",
    "tests/test_incidents.py", "tests/test_route_permissions.py", "tests/test_console_auth.py",
    "tests/test_hostile_ingest.py", "tests/test_edge_storage.py", "tests/test_edge_boundary.py",
    "tests/test_web_hostile.py", "tests/test_patrol.py",
)
# Tests deselected within those files: fuzzing (thousands of inputs; it guards robustness, and
# would cost minutes for every mutant of every function it touches) and the slowest waits.
DESELECT = "not garbage and not fuzz and not slow_it_down and not trickling and not poison"
# Seconds of tests (fastest first, fixtures included) kept for each function's mutants.
TEST_CAP_S = 5.0

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code).
_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests",
           34: "skipped", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
           255: "timeout", 37: "killed"}

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
_LOGGERS = {"log", "logger", "self.log", "_log"}
_METRIC_DEFS = {"counter", "gauge", "histogram"}


# The functions where the promises live: every one of their mutants is checked in every run.
# The rest of the modules' mutants are sampled (seeded) to fill what is left of the budget.
CRITICAL: dict[str, tuple[str, ...]] = {
    "edge/agent.py": ("EdgeAgent._on_press", "EdgeAgent._output", "EdgeAgent._sender",
                      "EdgeAgent._on_ack", "EdgeAgent._resend_all_now", "EdgeAgent._backoff"),
    "edge/outbox.py": ("Outbox.add", "Outbox.remove", "Outbox.pending"),
    "server/app.py": ("CentralServer._committer", "CentralServer._send_acks",
                      "CentralServer._handle", "CentralServer.handle"),
    "server/storage/incidents.py": ("IncidentStore.commit_events",),
    "protocol/messages.py": ("_decode", "decode_from_post", "decode_from_server", "check_bounds"),
    "server/web/auth.py": ("User.may", "Accounts.session", "Accounts.create_session",
                           "LoginLimiter.begin", "LoginLimiter.attempt"),
    "server/web/http.py": ("same_origin", "forgery_refusal", "same_secret"),
}


def mutant_pattern(module: str, function: str) -> str:
    """mutmut's name pattern for the mutants of ``Class.method`` or ``function`` in ``module``."""
    dotted = module.removesuffix(".py").replace("/", ".")
    if "." in function:
        cls, name = function.split(".", 1)
        return f"{dotted}.x\u01c1{cls}\u01c1{name}__mutmut_*"
    return f"{dotted}.x_{function}__mutmut_*"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


_SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|PRAGMA|BEGIN|COMMIT|ROLLBACK|CREATE|DROP|"
                  r"ALTER|WITH|VALUES|FROM|WHERE|ORDER|SET|ON CONFLICT|LIMIT)\b", re.IGNORECASE)


# Pieces of SQL built up in code: "state=?", "coalesce(acknowledged_by, ?)".
_SQL_FRAGMENT = re.compile(r"^\w+\s*(=|<>|<|>|<=|>=)\s*\?|\bcoalesce\(|\bIS NULL\b|\bNOT IN\b",
                           re.IGNORECASE)


def _span(node: ast.AST) -> range:
    start = getattr(node, "lineno", 0)
    return range(start, (getattr(node, "end_lineno", None) or start) + 1)


def unmutated_lines(source: str) -> set[int]:
    """Lines whose mutants say nothing about the tests: logging calls and metric definitions
    (their text is read, not tested), and SQL text (a changed keyword case is the same
    statement, a mangled one fails in any test that runs it)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and (_SQL.match(node.value) or _SQL_FRAGMENT.search(node.value)):
            lines.update(_span(node))
    for statement in _log_and_metric_calls(source):
        lines.update(_span(statement))
    return lines


def _log_and_metric_calls(source: str) -> list[ast.Expr]:
    """The statements that are a logging call or a metric definition."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Call):
            continue
        func = node.value.func
        if not isinstance(func, ast.Attribute):
            continue
        owner = _dotted(func.value)
        if (func.attr in _LOG_METHODS and owner in _LOGGERS) or func.attr in _METRIC_DEFS:
            found.append(node)
    return found


def join_log_calls(source: str) -> str:
    """Each logging call or metric definition that spans several lines, on one line.

    mutmut reads a ``# pragma: no mutate`` that ends a statement as if it were on the
    statement's first line: a node that starts on the last line of a multi-line call (the
    ``", retained" if retained else ""`` of a log message) would be mutated whatever its
    pragma says. On one line, the whole call is left alone."""
    text = source.splitlines()
    calls = [c for c in _log_and_metric_calls(source)
             if (c.end_lineno or c.lineno) > c.lineno
             and not text[c.lineno - 1][:c.col_offset].strip()]  # alone on its lines
    for call in sorted(calls, key=lambda c: c.lineno, reverse=True):
        end = call.end_lineno or call.lineno
        rest = text[end - 1][call.end_col_offset or 0:].strip()
        if rest and not rest.startswith("#"):
            continue  # something else follows it on its last line
        text[call.lineno - 1:end] = [" " * call.col_offset + ast.unparse(call)]
    return "\n".join(text) + "\n"


def out_of_scope_headers(source: str, names: frozenset[str]) -> set[int]:
    """The last header line (``...:``) of each function named in ``names`` (``name`` or
    ``Class.name``), where a ``# pragma: no mutate block`` leaves the whole function alone."""
    headers: set[int] = set()

    def visit(body: list[ast.stmt], owner: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, node.name)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                qualified = f"{owner}.{node.name}" if owner else node.name
                if qualified in names:
                    headers.add(node.body[0].lineno - 1)

    visit(ast.parse(source).body, "")
    return headers


def mark_unmutated(path: Path, out_of_scope: frozenset[str] = frozenset()) -> int:
    """Mark the lines :func:`unmutated_lines` finds with ``# pragma: no mutate`` (multi-line
    logging calls joined on one line first, :func:`join_log_calls`), and the functions in
    ``out_of_scope`` with ``# pragma: no mutate block``; return how many."""
    source = join_log_calls(path.read_text())
    skip = unmutated_lines(source)
    blocks = out_of_scope_headers(source, out_of_scope)
    # A comment cannot go on a line that ends inside a (triple-quoted) string.
    inside_strings: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            inside_strings.update(range(token.start[0], token.end[0]))
    out = []
    for number, line in enumerate(source.splitlines(), start=1):
        if "#" not in line and number not in inside_strings:
            if number in blocks:
                line += "  # pragma: no mutate block"
            elif number in skip:
                line += "  # pragma: no mutate"
        out.append(line)
    marked = "\n".join(out) + "\n"
    ast.parse(marked)  # still the same program
    path.write_text(marked)
    return len(skip) + len(blocks)


def _copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, nothing ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


# Loaded into every pytest run in the scratch copy (``-p tests._mutation_selection``); it acts
# only in mutmut's stats pass, where mutmut records which tests reach which function and how
# long each test takes:
# - a test's time includes its fixtures (mutmut counts only the test's body, so a test whose
#   broker and server take a second to start would pass for a fast one and be run first);
# - each function keeps its tests fastest first up to ``ALARMPOST_MUTATION_TEST_CAP_S`` seconds
#   (0: all): a mutant that survives runs every test kept for its function, and for the agent's
#   and the server's hot functions that was 50-100 real-broker tests, over a minute a mutant.
_SELECTION_PLUGIN = """\
import json
import os

import pytest


def _stats():
    try:
        from mutmut.mutation.trampoline import get_mutant_under_test
        from mutmut.state import state
    except ImportError:
        return None
    return state() if get_mutant_under_test() == "stats" else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    stats = _stats()
    if stats is not None and call.when in ("setup", "teardown") \\
            and item.nodeid in stats.duration_by_test:
        stats.duration_by_test[item.nodeid] += call.duration


def pytest_sessionfinish(session):
    stats = _stats()
    cap = float(os.environ.get("ALARMPOST_MUTATION_TEST_CAP_S", "0") or 0)
    if stats is None or cap <= 0:
        return
    duration = stats.duration_by_test
    dropped = 0
    for function, tests in stats.tests_by_mangled_function_name.items():
        total, keep = 0.0, set()
        for test in sorted(tests, key=lambda name: (duration.get(name, 0.0), name)):
            total += duration.get(test, 0.0)
            if keep and total > cap:
                break
            keep.add(test)
        dropped += len(tests) - len(keep)
        tests.intersection_update(keep)
    with open(os.environ["ALARMPOST_MUTATION_SELECTION"], "w") as out:
        json.dump({"cap_s": cap, "dropped": dropped}, out)
"""


def _packages(dest: Path) -> list[str]:
    """The top-level packages of the copy: all of them go under mutants/, so that the tests
    import every package from the scratch copy (not the editable install's working tree,
    which others may be changing while the run goes on)."""
    return sorted(p.name for p in dest.iterdir() if (p / "__init__.py").is_file()
                  and p.name != "tests")


def _write_config(dest: Path, modules: list[str], tests: list[str]) -> None:
    pyproject = dest / "pyproject.toml"
    text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject.read_text())
    sources = sorted({m.split("/")[0] for m in modules} | set(_packages(dest)))
    (dest / "tests" / "_mutation_selection.py").write_text(_SELECTION_PLUGIN)
    text += "\n[tool.mutmut]\n" + "\n".join([
        f"source_paths = {json.dumps(sources)}",
        f"only_mutate = {json.dumps(modules)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'also_copy = ["docs", "README.md"]',  # tests check the docs' examples and tables
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "tests._mutation_selection", '
        f'"-q", "-k", "{DESELECT}"]',
        "timeout_multiplier = 5.0",
        "timeout_constant = 20.0",
    ]) + "\n"
    pyproject.write_text(text)


def _module_of(key: str) -> str:
    """``server.app.xǁCentralServerǁhandle__mutmut_3`` -> ``server/app.py``."""
    dotted = key.split(".x")[0] if ".x" in key else key.rsplit(".", 1)[0]
    return dotted.replace(".", "/") + ".py"


def read_results(workdir: Path) -> dict[str, str]:
    """Mutant name -> status, from mutmut's ``*.meta`` files."""
    out: dict[str, str] = {}
    for meta in (workdir / "mutants").rglob("*.py.meta"):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        for key, code in data.get("exit_code_by_key", {}).items():
            out[key] = "not_checked" if code is None else _STATUS.get(code, "suspicious")
    return out


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> dict[str, str]:
    """Mutant name -> why it is equivalent (reviewed by hand)."""
    if not path.exists():
        return {}
    data = tomllib.loads(path.read_text())
    return {entry["mutant"]: entry["reason"] for entry in data.get("equivalent", [])}


def tally(statuses: dict[str, str], equivalents: dict[str, str]) -> dict[str, Any]:
    """Counts by status; the score is over the mutants checked (all of them, or a sample)."""
    counts = Counter(statuses.values())
    equivalent = sum(1 for k, s in statuses.items() if s != "killed" and k in equivalents)
    checked = len(statuses) - counts["not_checked"]
    considered = checked - equivalent
    return {
        "mutants": len(statuses),
        "checked": checked,
        "killed": counts["killed"],
        "survived": counts["survived"],
        "timeout": counts["timeout"],
        "no_tests": counts["no_tests"],
        "not_checked": counts["not_checked"],
        "equivalent": equivalent,
        "score": round(counts["killed"] / considered, 4) if considered else None,
    }


def summarise(statuses: dict[str, str], equivalents: dict[str, str],
              modules: list[str]) -> dict[str, Any]:
    per_module = {
        module: tally({k: s for k, s in statuses.items() if _module_of(k) == module}, equivalents)
        for module in modules
    }
    alarm = {k: s for k, s in statuses.items() if _module_of(k) in ALARM_PATH}
    result = tally(statuses, equivalents)
    result["alarm_path_score"] = tally(alarm, equivalents)["score"] if alarm else None
    result["per_module"] = per_module
    result["survivors"] = sorted(k for k, s in statuses.items()
                                 if s in ("survived", "no_tests", "suspicious")
                                 and k not in equivalents)
    result["stale_equivalents"] = sorted(set(equivalents) - set(statuses))
    return result


def _progress(workdir: Path, started: float) -> str:
    counts = Counter(read_results(workdir).values())
    done = sum(n for s, n in counts.items() if s != "not_checked")
    total = sum(counts.values())
    return (f"mutation: {done}/{total} mutants checked · {counts['killed']} killed · "
            f"{counts['survived']} survived · {counts['timeout']} timeout · "
            f"{time.monotonic() - started:.0f} s")


def _run_mutmut(workdir: Path, env: dict[str, str], names: list[str], children: int,
                deadline: float, started: float, log_path: Path) -> tuple[int, bool]:
    """``mutmut run NAMES`` with live progress until it ends or ``deadline`` passes; return
    (exit code, whether it finished), exit code 3 if interrupted."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(children),
             *names],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                print("mutation: budget spent; stopping", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
                return proc.returncode, False
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                print(_progress(workdir, started), file=sys.stderr)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print("mutation: interrupted", file=sys.stderr)
        return 3, False
    return proc.returncode, proc.returncode == 0


def main(as_json: bool, options: dict[str, str]) -> int:
    known = {"modules", "tests", "children", "budget_s", "keep", "target", "sample", "seed",
             "test_cap_s"}
    unknown = set(options) - known
    if unknown:
        print(f"alarmpost bench mutation: unknown option(s) {sorted(unknown)}; "
              f"known: {sorted(known)}", file=sys.stderr)
        return 2
    modules = [m for m in options.get("modules", ",".join(DEFAULT_MODULES)).split(",") if m]
    tests = [t for t in options.get("tests", ",".join(DEFAULT_TESTS)).split(",")
             if t and (ROOT / t).exists()]
    try:
        children = int(options.get("children", "2"))
        budget = float(options.get("budget_s", "1800"))
        target = float(options.get("target", "0.9"))
        seed = int(options.get("seed", "1"))
        test_cap = float(options.get("test_cap_s", str(TEST_CAP_S)))
        sample_all = options.get("sample", "budget") == "all"
        if options.get("sample", "budget") not in ("budget", "all"):
            raise ValueError("sample is 'budget' (default) or 'all'")
    except ValueError as exc:
        print(f"alarmpost bench mutation: {exc}", file=sys.stderr)
        return 2
    missing = [m for m in modules if not (ROOT / m).is_file()]
    if missing:
        print(f"alarmpost bench mutation: no such module(s) {missing}", file=sys.stderr)
        return 2
    if shutil.which("mutmut", path=str(Path(sys.executable).parent)) is None:
        print("alarmpost bench mutation: mutmut is not installed; ./run test installs it "
              "(pip install -e '.[test]')", file=sys.stderr)
        return 3

    # On tmpfs when there is one: every test commits to SQLite with synchronous=FULL, and on a
    # disk those fsyncs, not the tests, would set the pace of thousands of test runs.
    scratch = Path("/dev/shm")
    base = str(scratch) if scratch.is_dir() and os.access(scratch, os.W_OK) else None
    workdir = Path(tempfile.mkdtemp(prefix="alarmpost-mutation-", dir=base))
    started = time.monotonic()
    try:
        _copy_tree(workdir)
        marked = sum(mark_unmutated(workdir / m, OUT_OF_SCOPE.get(m, frozenset()))
                     for m in modules)
        _write_config(workdir, modules, tests)
        print(f"mutation: {len(modules)} modules ({marked} log, metric and SQL lines and "
              f"out-of-scope functions left alone), "
              f"{len(tests)} test files, {children} at a time, budget {budget:.0f} s, "
              f"in {workdir}", file=sys.stderr)
        log_path = workdir / "mutmut.log"
        (workdir / "tmp").mkdir()
        # mutants/ made before mutmut starts: a path on PYTHONPATH that does not exist when
        # Python starts is remembered as empty, and nothing would be imported from it.
        (workdir / "mutants").mkdir()
        selection = workdir / "selection.json"
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(workdir / "tmp"),
               # processes the tests start (the server, the simulator) import the copy too
               "PYTHONPATH": str(workdir / "mutants"),
               # every test that stores anything runs once, on SQLite (not again on PostgreSQL)
               "ALARMPOST_TEST_STORAGE": "sqlite",
               "ALARMPOST_MUTATION_TEST_CAP_S": str(test_cap),
               "ALARMPOST_MUTATION_SELECTION": str(selection)}
        deadline = started + budget
        # 1. Every mutant of the critical functions (this also records which tests reach which
        # function, once for both phases).
        critical = [mutant_pattern(m, f) for m in modules for f in CRITICAL.get(m, ())]
        code, complete = _run_mutmut(workdir, env, critical or ["*"], children, deadline,
                                     started, log_path)
        if code == 3:
            return 3
        phase1_s = time.monotonic() - started
        checked = {k for k, st in read_results(workdir).items() if st != "not_checked"}
        rest = sorted(k for k in read_results(workdir) if k not in checked)
        # 2. A seeded sample of the others, as many as the rest of the budget should take at
        # the pace of phase 1 (sample=all: all of them, whatever the budget).
        sample_complete = True
        if complete and rest and critical:
            if sample_all:
                picked = rest
            else:
                pace = max(phase1_s - 150.0, 60.0) / max(len(checked), 1)  # s per mutant
                # (sampled mutants survive more often than critical ones, and a survivor runs
                # every test kept for its function: half the critical pace's room)
                room = int(max(deadline - time.monotonic() - 150.0, 0.0) / pace * 0.5)
                picked = sorted(random.Random(seed).sample(rest, min(room, len(rest))))
            if picked:
                print(f"mutation: {len(checked)} critical mutants checked in {phase1_s:.0f} s; "
                      f"now {len(picked)} of the other {len(rest)}", file=sys.stderr)
                code, sample_complete = _run_mutmut(workdir, env, picked, children,
                                                    deadline if not sample_all else math.inf,
                                                    started, log_path)
                if code == 3:
                    return 3
        statuses = read_results(workdir)
        if not statuses or all(st == "not_checked" for st in statuses.values()):
            print("mutation: mutmut produced no results; its log says:\n"
                  + log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 3
        equivalents = load_equivalents()
        in_critical = {k for k in statuses if any(fnmatch.fnmatchcase(k, p) for p in critical)}
        # The score and the target are over the critical functions, every mutant of which is
        # checked in every run; the sample of the others is reported beside it.
        result = summarise({k: st for k, st in statuses.items() if k in in_critical},
                           equivalents, modules)
        result["generated"] = len(statuses)
        result["critical_checked"] = len(checked)
        sampled = {k: st for k, st in statuses.items()
                   if k not in in_critical and st != "not_checked"}
        result["sampled"] = len(sampled)
        result["sample"] = {key: value for key, value in tally(sampled, equivalents).items()
                            if key in ("checked", "killed", "survived", "timeout", "no_tests",
                                       "score")}
        result["complete"] = complete
        result["sample_complete"] = sample_complete
        result["sampling"] = "all" if sample_all else "budget"
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        result["test_cap_s"] = test_cap
        if selection.exists():
            result["tests_left_out"] = json.loads(selection.read_text()).get("dropped", 0)
        result["children"] = children
    finally:
        if options.get("keep") == "1":
            print(f"mutation: scratch copy kept in {workdir} (mutmut show NAME there)",
                  file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if not as_json:
        sample = result["sample"]
        print(f"critical mutants {result['mutants']} (of {result['generated']}): killed "
              f"{result['killed']}, survived "
              f"{result['survived']}, timeout {result['timeout']}, no tests {result['no_tests']}, "
              f"equivalent {result['equivalent']}; score {result['score']} "
              f"(alarm path {result['alarm_path_score']})")
        for module, row in result["per_module"].items():
            print(f"  {module:<28} {row['killed']:>4}/{row['mutants']:<4} score {row['score']}")
        for name in result["survivors"]:
            print(f"  survivor: {name}")
        print(f"sample of the others: {sample['checked']} checked, {sample['killed']} killed, "
              f"{sample['survived']} survived; score {sample['score']}")
    else:
        print(json.dumps(result))
    met = (result["complete"] and result["alarm_path_score"] is not None
           and result["alarm_path_score"] >= target)
    return 0 if met else 1
