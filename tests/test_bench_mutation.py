"""The mutation benchmark's own pieces: what it leaves alone, how it names mutants, its score."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench.mutation import join_log_calls, mark_unmutated, mutant_pattern, tally, unmutated_lines

SOURCE = '''\
import logging

log = logging.getLogger("x")
_SCHEMA = """
CREATE TABLE t (id TEXT);
"""


class Store:
    def save(self, db, value):
        log.warning("saving %s "
                    "now", value)
        db.execute("UPDATE t SET id=? WHERE id=?", (value, value))
        sets = ["state=?"]
        return value + 1

    def report(self, m):
        m.counter("saved_total", "Values saved")
        return "text"
'''


def test_log_metric_and_sql_lines_are_left_alone_and_nothing_else() -> None:
    lines = unmutated_lines(SOURCE)
    text = SOURCE.splitlines()
    marked = {text[n - 1].strip() for n in lines}
    assert 'log.warning("saving %s "' in marked and '"now", value)' in marked
    assert 'db.execute("UPDATE t SET id=? WHERE id=?", (value, value))' in marked
    assert 'sets = ["state=?"]' in marked
    assert 'm.counter("saved_total", "Values saved")' in marked
    assert "return value + 1" not in marked and 'return "text"' not in marked


def test_marking_keeps_the_program_and_puts_blocks_on_function_headers(tmp_path: Path) -> None:
    path = tmp_path / "store.py"
    path.write_text(SOURCE)
    count = mark_unmutated(path, frozenset({"Store.report"}))
    marked = path.read_text()
    assert ast.dump(ast.parse(marked)) == ast.dump(ast.parse(SOURCE))  # comments only
    assert "CREATE TABLE t (id TEXT);\n" in marked  # nothing inside the triple-quoted string
    assert "    def report(self, m):  # pragma: no mutate block" in marked
    assert "        return value + 1\n" in marked
    assert count == len(unmutated_lines(join_log_calls(SOURCE))) + 1
    # A log call over several lines is joined on one, with its pragma: mutmut reads a pragma
    # that ends a statement as if it were on its first line only.
    assert "        log.warning('saving %s now', value)  # pragma: no mutate\n" in marked


def test_only_log_calls_alone_on_their_lines_are_joined() -> None:
    source = ('def f(log, x):\n'
              '    log.info("a %s",\n'
              '             x)  # why\n'
              '    if x: log.info("b %s",\n'
              '                   x)\n'
              '    y = (x,\n'
              '         x)\n')
    joined = join_log_calls(source)
    assert joined.splitlines()[1] == "    log.info('a %s', x)"
    assert joined.splitlines()[2:] == source.splitlines()[3:]  # the rest as it was
    assert ast.dump(ast.parse(joined)) == ast.dump(ast.parse(source))


def test_mutant_names_are_matched_per_function() -> None:
    method = mutant_pattern("server/app.py", "CentralServer._committer")
    assert fnmatch.fnmatch("server.app.x\u01c1CentralServer\u01c1_committer__mutmut_12", method)
    assert not fnmatch.fnmatch("server.app.x\u01c1CentralServer\u01c1_commit__mutmut_1", method)
    function = mutant_pattern("protocol/messages.py", "_decode")
    assert fnmatch.fnmatch("protocol.messages.x__decode__mutmut_3", function)


def test_the_score_counts_checked_mutants_less_the_equivalent_ones() -> None:
    statuses = {"a": "killed", "b": "killed", "c": "survived", "d": "survived",
                "e": "not_checked", "f": "timeout"}
    row = tally(statuses, {"d": "the same statement in another case"})
    assert (row["mutants"], row["checked"], row["equivalent"]) == (6, 5, 1)
    assert row["score"] == round(2 / 4, 4)
    assert tally({"a": "not_checked"}, {})["score"] is None


def test_the_copy_imports_every_package_from_itself_and_loads_the_selection_plugin(
        tmp_path: Path) -> None:
    from bench.mutation import _write_config

    for package in ("edge", "server", "provisioning", "mqttlink"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.mutmut]\nold = 1\n')
    _write_config(tmp_path, ["edge/agent.py"], ["tests/test_fast_agent.py"])
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert config["source_paths"] == ["edge", "mqttlink", "provisioning", "server"]
    assert config["only_mutate"] == ["edge/agent.py"] and "old" not in config
    args = config["pytest_add_cli_args"]
    assert args[args.index("tests._mutation_selection") - 1] == "-p"
    assert (tmp_path / "tests" / "_mutation_selection.py").is_file()


class _Stats:
    def __init__(self) -> None:
        self.duration_by_test = {"fast_a": 0.01, "fast_b": 0.02, "broker_a": 3.0,
                                 "broker_b": 9.0, "broker_c": 30.0}
        self.tests_by_mangled_function_name = {
            "f": {"fast_a", "fast_b", "broker_a", "broker_b", "broker_c"},
            "g": {"broker_c"},  # only a slow test reaches it: it keeps that one
        }


def _plugin(stats: _Stats) -> dict[str, Any]:
    from bench.mutation import _SELECTION_PLUGIN

    namespace: dict[str, Any] = {}
    exec(compile(_SELECTION_PLUGIN, "_mutation_selection.py", "exec"), namespace)
    namespace["_stats"] = lambda: stats
    return namespace


def test_each_function_keeps_its_fastest_tests_up_to_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = _Stats()
    plugin = _plugin(stats)
    monkeypatch.setenv("ALARMPOST_MUTATION_TEST_CAP_S", "5")
    monkeypatch.setenv("ALARMPOST_MUTATION_SELECTION", str(tmp_path / "selection.json"))
    plugin["pytest_sessionfinish"](None)
    assert stats.tests_by_mangled_function_name == {
        "f": {"fast_a", "fast_b", "broker_a"}, "g": {"broker_c"}}
    assert json.loads((tmp_path / "selection.json").read_text()) == {"cap_s": 5.0, "dropped": 2}


def test_without_a_cap_every_test_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = _Stats()
    monkeypatch.setenv("ALARMPOST_MUTATION_TEST_CAP_S", "0")
    _plugin(stats)["pytest_sessionfinish"](None)
    assert len(stats.tests_by_mangled_function_name["f"]) == 5


def test_a_tests_time_includes_its_fixtures() -> None:
    stats = _Stats()
    hook = _plugin(stats)["pytest_runtest_makereport"]

    class Item:
        nodeid = "broker_a"

    class Call:
        def __init__(self, when: str, duration: float) -> None:
            self.when, self.duration = when, duration

    for when, duration in (("setup", 0.5), ("call", 7.0), ("teardown", 0.25)):
        wrapper = hook(Item(), Call(when, duration))
        next(wrapper)
        with contextlib.suppress(StopIteration):
            wrapper.send(None)
    assert stats.duration_by_test["broker_a"] == 3.75  # the body is mutmut's own count


def test_every_fast_test_file_is_in_the_default_selection() -> None:
    from bench.mutation import DEFAULT_TESTS, ROOT

    fast = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_fast_*.py"))
    assert fast and set(fast) <= set(DEFAULT_TESTS)
    assert set(DEFAULT_TESTS[:len(fast)]) == set(fast)  # first in the selection
