"""The built wheel, installed alone in a fresh virtualenv, carries working migrations and CLI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_wheel_installs_and_upgrades_a_database(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # sdist first, then the wheel from the sdist: what a user's `pip install` gets, never stale build/ files.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("tracestore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tracestore/py.typed" in names
    assert "tracestore/migrations/env.py" in names
    assert "tracestore/migrations/script.py.mako" in names
    versions = ("0001_legacy_schema.py", "0003_backfill_junction_created_at.py")
    assert {f"tracestore/migrations/versions/{name}" for name in versions} <= names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "pip", "install", "--quiet", wheel, cwd=tmp_path)

    # From an unrelated directory, so nothing of the checkout can be imported by accident.
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run(venv / "bin" / "tracestore", "--url", "sqlite:///installed.db", "upgrade", cwd=work)
    assert "0004" in out or "head" in out
    out = run(venv / "bin" / "tracestore", "--url", "sqlite:///installed.db", "current", cwd=work)
    assert "0004" in out
    script = (
        "import tracestore, time;"
        "assert 'site-packages' in tracestore.__file__, tracestore.__file__;"
        "from tracestore import TraceStore, TraceContext;"
        "s = TraceStore('sqlite:///installed.db', auto_upgrade=False);"
        "t = TraceContext(context_type='c', namespace='n', data=[1], session_uids=['s']);"
        "s.store(t); assert s.get_by_session_uid('s') == [t]; print('ok')"
    )
    assert "ok" in run(venv / "bin" / "python", "-c", script, cwd=work)
