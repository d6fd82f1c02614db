"""The built wheel, installed alone in a fresh virtualenv: what a user's `pip install` gets (the session's
`installed` fixture in conftest.py builds it once for every test that needs it)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path


def build_and_install(tmp_path: Path) -> Installed:
    """Build the sdist, the wheel from it, and install the wheel without extras in a fresh virtualenv."""
    dist = tmp_path / "dist"
    # sdist first, then the wheel from the sdist: what a user's `pip install` gets, never stale build/ files.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("tracestore-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "pip", "install", "--quiet", wheel, cwd=tmp_path)
    return Installed(wheel, venv)
