"""The GPU benchmark and measurement scripts run only on the GPU machine: here, at least, each one
must parse (a syntax error would cost a whole device call)."""

import pathlib

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses(path):
    compile(path.read_text(), str(path), "exec")
