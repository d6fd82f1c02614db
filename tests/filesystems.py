"""Real file systems for the tests: a small tmpfs that fills up or turns read-only (root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root only): a real file system that fills up or turns read-only."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the RLIMIT_FSIZE tests run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_leaving(where: Path, leave: int) -> Path:
    """Fill the file system at `where` up to `leave` free bytes with a file; returns the file (unlink it to free)."""
    filler = where / "filler"
    with open(filler, "wb") as file:
        while True:
            stats = os.statvfs(where)
            free = stats.f_bavail * stats.f_frsize
            if free <= leave:
                break
            file.write(b"\0" * min(free - leave, 1 << 20))
            file.flush()
    return filler
