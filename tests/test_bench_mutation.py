"""The mutation benchmark's own pieces: what it leaves alone, how it names mutants, its score."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from bench.mutation import mark_unmutated, mutant_pattern, tally, unmutated_lines

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
    assert count == len(unmutated_lines(SOURCE)) + 1


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
