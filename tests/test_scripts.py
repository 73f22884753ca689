"""The GPU benchmark and measurement scripts run only on the GPU machine: here, at least, each one
must parse (a syntax error would cost a whole device call)."""

import pathlib

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses(path):
    compile(path.read_text(), str(path), "exec")


def test_memory_peak_replays_an_allocator_trace():
    import sys

    sys.path.insert(0, str(SCRIPTS[0].parent))
    from memory_peak import _replay

    trace = [{"action": "alloc", "addr": 1, "size": 10}, {"action": "alloc", "addr": 2, "size": 5},
             {"action": "free_requested", "addr": 1, "size": 10}, {"action": "free_completed", "addr": 1, "size": 10},
             {"action": "alloc", "addr": 3, "size": 7}]
    totals = [t for t, _ in _replay(trace)]
    assert totals == [10, 15, 5, 5, 12]
    *_, (total, live) = _replay(trace[:2])
    assert total == 15 and sorted(live) == [1, 2]
