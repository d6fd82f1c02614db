"""The bulk legacy generator: exact legacy schema, deterministic output, the promised data shape."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.legacy import create_legacy_db
from tests.oracle import oracle_query
from tracestore import TraceStore
from tracestore.migrate import upgrade
from tracestore.migrate.verify import verify
from tracestore.testing.bulk import GenerateReport, generate

NOW = 1_750_000_000.0


def _generate(path: Path, **overrides: object) -> GenerateReport:
    options: dict[str, object] = {"traces": 5_000, "seed": 7, "now": NOW, "recent_burst": 200}
    options.update(overrides)
    return generate(path, **options)  # type: ignore[arg-type]


def _dump(path: Path) -> tuple[list[Any], list[Any]]:
    with sqlite3.connect(path) as connection:
        traces = connection.execute("SELECT * FROM traces ORDER BY rowid").fetchall()
        links = connection.execute("SELECT * FROM trace_sessions ORDER BY rowid").fetchall()
    return traces, links


def _schema(path: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(path) as connection:
        return sorted(connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())


def test_schema_is_exactly_the_legacy_one(tmp_path: Path) -> None:
    create_legacy_db(tmp_path / "reference.db")
    _generate(tmp_path / "bulk.db", traces=100)
    assert _schema(tmp_path / "bulk.db") == _schema(tmp_path / "reference.db")


def test_same_seed_and_now_give_identical_rows(tmp_path: Path) -> None:
    first = _generate(tmp_path / "a.db", orphans=5)
    second = _generate(tmp_path / "b.db", orphans=5)
    assert _dump(tmp_path / "a.db") == _dump(tmp_path / "b.db")
    assert (first.traces, first.links, first.hot_traces) == (second.traces, second.links, second.hot_traces)

    _generate(tmp_path / "c.db", seed=8, orphans=5)
    assert _dump(tmp_path / "c.db") != _dump(tmp_path / "a.db")


def test_shape_hot_session_burst_and_two_session_traces(tmp_path: Path) -> None:
    path = tmp_path / "shape.db"
    report = _generate(path, traces=20_000, hot_session_share=0.1, two_session_share=0.2, recent_burst=300)
    with sqlite3.connect(path) as connection:
        hot_times = [
            row[0]
            for row in connection.execute(
                "SELECT t.created_at FROM traces t JOIN trace_sessions ts ON ts.trace_id = t.id"
                " WHERE ts.session_uid = ?",
                (report.hot_session_uid,),
            )
        ]
        links_per_trace = Counter(
            count for (count,) in connection.execute("SELECT count(*) FROM trace_sessions GROUP BY trace_id")
        )
        session_sizes = [
            size for (size,) in connection.execute("SELECT count(*) FROM trace_sessions GROUP BY session_uid")
        ]
        oldest, newest, in_window = connection.execute(
            "SELECT min(created_at), max(created_at), sum(created_at >= ?) FROM traces", (NOW - 600,)
        ).fetchone()

    assert len(hot_times) == report.hot_traces == 2_000
    assert sum(t >= NOW - 600 for t in hot_times) == report.burst_traces == 300
    assert links_per_trace == {1: 16_000, 2: 4_000}
    assert report.two_session_traces == 4_000
    assert report.links == 24_000
    # Other sessions have Zipf-like sizes: many of them, the largest well below the hot session.
    assert len(session_sizes) == report.sessions > 100
    assert sorted(session_sizes)[-2] < report.hot_traces / 2
    assert oldest >= NOW - 30 * 86_400
    assert newest < NOW
    assert in_window > report.burst_traces  # other sessions write during the burst too


def test_rows_look_like_what_the_legacy_store_wrote(tmp_path: Path) -> None:
    path = tmp_path / "rows.db"
    _generate(path, traces=2_000, payload_bytes=400)
    traces, _ = _dump(path)
    ids = [row[0] for row in traces]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 36 and i[14] == "7" for i in ids)  # UUIDv7-shaped, as new_trace_id makes them
    # Inserted in creation order, and the id's leading 48 bits are the creation time in ms.
    times = [row[5] for row in traces]
    assert times == sorted(times)
    assert all(int(i[:8] + i[9:13], 16) == int(t * 1000) for i, t in zip(ids, times, strict=True))
    sizes = [len(row[3]) for row in traces]
    assert 380 <= sum(sizes) / len(sizes) <= 420
    for _, context_type, namespace, data, metadata, created, updated in traces[:50]:
        assert context_type and namespace and created == updated
        assert isinstance(data, str) and isinstance(orjson.loads(data), dict)
        assert isinstance(metadata, str) and isinstance(orjson.loads(metadata), dict)


def test_orphan_links_point_at_missing_traces(tmp_path: Path) -> None:
    path = tmp_path / "orphans.db"
    report = _generate(path, traces=1_000, orphans=25)
    with sqlite3.connect(path) as connection:
        (dangling,) = connection.execute(
            "SELECT count(*) FROM trace_sessions ts WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = ts.trace_id)"
        ).fetchone()
    assert dangling == report.orphans == 25


def test_the_migrated_file_answers_the_hot_query(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    report = _generate(path, traces=3_000, recent_burst=120, orphans=3)
    upgrade(f"sqlite:///{path}")
    with TraceStore(f"sqlite:///{path}", auto_upgrade=False) as store:
        recent = store.get_by_session_uid(report.hot_session_uid, since=NOW - 600)
        latest = store.get_by_session_uid(report.hot_session_uid, limit=10)
    assert len(recent) == 120
    assert [t.id for t in latest] == [t.id for t in recent[:10]]


def test_refuses_to_overwrite_and_rejects_bad_shapes(tmp_path: Path) -> None:
    path = tmp_path / "exists.db"
    path.write_bytes(b"")
    with pytest.raises(FileExistsError):
        _generate(path)
    with pytest.raises(ValueError, match="hot_session_share"):
        _generate(tmp_path / "bad.db", hot_session_share=1.5)
    with pytest.raises(ValueError, match="recent_window_s"):
        _generate(tmp_path / "bad.db", recent_window_s=0)
    assert not (tmp_path / "bad.db").exists()


def test_a_failed_generation_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _generate(path, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


# -- at head -------------------------------------------------------------------------------------------
def test_head_file_is_the_migrated_legacy_file(tmp_path: Path) -> None:
    """schema="head" gives the same schema objects and the same rows (links with their created_at) as
    generating the legacy file and running the migrations over it: the fast path for what the slow one makes."""
    _generate(tmp_path / "head.db", schema="head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.db"]  # no lock, journal or partial file beside it
    _generate(tmp_path / "legacy.db")
    upgrade(f"sqlite:///{tmp_path / 'legacy.db'}")
    assert [row[:2] for row in _schema(tmp_path / "head.db") if row[0] != "table" or row[1] != "sqlite_stat1"] == [
        row[:2] for row in _schema(tmp_path / "legacy.db") if row[0] != "table" or row[1] != "sqlite_stat1"
    ]
    assert _dump(tmp_path / "head.db") == _dump(tmp_path / "legacy.db")
    assert verify(f"sqlite:///{tmp_path / 'head.db'}").ok


def test_head_is_deterministic_and_answers_like_the_oracle(tmp_path: Path) -> None:
    report = _generate(tmp_path / "a.db", schema="head")
    _generate(tmp_path / "b.db", schema="head")
    assert _dump(tmp_path / "a.db") == _dump(tmp_path / "b.db")
    with TraceStore(f"sqlite:///{tmp_path / 'a.db'}", auto_upgrade=False) as store:
        traces = store.query()
        for uid, since in [(report.hot_session_uid, NOW - 600), (report.hot_session_uid, None)]:
            expected = [t.id for t in oracle_query(traces, session_uid=uid, since=since, limit=100)]
            assert [t.id for t in store.get_by_session_uid(uid, since=since, limit=100)] == expected
    recent = [t for t in traces if report.hot_session_uid in t.session_uids and t.created_at >= NOW - 600]
    assert len(recent) == report.burst_traces == 200


def test_head_refuses_orphans_and_unknown_schemas(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="orphan links exist only in legacy files"):
        _generate(tmp_path / "x.db", schema="head", orphans=1)
    with pytest.raises(ValueError, match="schema must be one of"):
        _generate(tmp_path / "x.db", schema="v2")
    assert not list(tmp_path.iterdir())
