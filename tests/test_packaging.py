"""The built wheel, installed alone in a fresh virtualenv, carries working migrations and CLI."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.wheel import Installed, run

pytestmark = pytest.mark.slow


def test_wheel_installs_and_upgrades_a_database(installed: Installed, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "tracestore/py.typed" in names
    assert "tracestore/migrations/env.py" in names
    assert "tracestore/migrations/script.py.mako" in names
    versions = ("0001_legacy_schema.py", "0003_backfill_junction_created_at.py")
    assert {f"tracestore/migrations/versions/{name}" for name in versions} <= names

    venv = installed.venv
    # From an unrelated directory, so nothing of the checkout can be imported by accident.
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run(venv / "bin" / "tracestore", "--url", "sqlite:///installed.db", "upgrade", cwd=work)
    assert "0005" in out or "head" in out
    out = run(venv / "bin" / "tracestore", "--url", "sqlite:///installed.db", "current", cwd=work)
    assert "0005" in out
    script = (
        "import tracestore, time;"
        "assert 'site-packages' in tracestore.__file__, tracestore.__file__;"
        "from tracestore import TraceStore, TraceContext;"
        "s = TraceStore('sqlite:///installed.db', auto_upgrade=False);"
        "t = TraceContext(context_type='c', namespace='n', data=[1], session_uids=['s']);"
        "s.store(t); assert s.get_by_session_uid('s') == [t]; print('ok')"
    )
    assert "ok" in run(venv / "bin" / "python", "-c", script, cwd=work)


def test_demo_runs_from_a_plain_install_in_an_empty_directory(installed: Installed, tmp_path: Path) -> None:
    """No extras: factory-boy (the `testing` extra) is not there, and the demo does not need it."""
    python = installed.venv / "bin" / "python"
    probe = "import importlib.util as u; print(u.find_spec('factory') is None)"
    assert run(python, "-c", probe, cwd=tmp_path).strip() == "True"
    out = run(installed.venv / "bin" / "tracestore", "demo", "--traces", "2000", cwd=tmp_path)
    assert "Stored 2000 traces in 100 sessions" in out and "20 rows, median" in out, out
    assert "EXPLAIN QUERY PLAN:" in out and "idx_trace_sessions_uid_time" in out, out
    assert (tmp_path / "traces.db").exists()  # the default URL, in the directory it ran in
