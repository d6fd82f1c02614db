"""The ORM path against the raw floor: tracestore.orm.recent_traces read as `Trace` entities through an
application's own Session, against plain sqlite3 running the same SQL on the same file.

    python benchmarks/orm_path.py --scale 1m [--runs 61] [--keep] [--json out.json]

One data set, the shape bench_query.py uses (hot session: 10 % of the traces, 1,000 of them in the last 10
minutes), written at head by tracestore.testing.bulk and finalized (the deployed state). Two questions, the
10-minute window of the hot session and its latest 100, each timed as three variants interleaved round by
round (medians):

- `orm`: what an application runs, `with Session(engine) as s: s.scalars(recent_traces(...)).all()` on an
  Engine made with plain `sqlalchemy.create_engine`: a Session per request, the select built per call;
- `raw`: the floor, plain sqlite3 (the store's pragmas) running the SQL that select compiles to for SQLite,
  each row decoded into a tuple (the JSON columns parsed, as the entities' are);
- `rows`: the same select's columns as rows through the same kind of Session, which shows how much of the
  gap is the ORM's making of entities (identity map, instance state) rather than tracestore's statement.

The answers of `orm` and `raw` are compared trace for trace (exit status 2 when they differ).
`benchmarks/suite.py` runs it after the main run and report.py puts its table in results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy
from common import (
    DEFAULT_WORKDIR,
    HOT_UID,
    LATEST,
    WINDOW_S,
    Line,
    connect,
    data_options,
    finish,
    git_revision,
    interleaved,
    parse_scale,
    ratio_line,
    remove_db,
    text_table,
)
from sqlalchemy.orm import Session

from tracestore.migrate import finalize
from tracestore.models import Trace
from tracestore.orm import recent_traces
from tracestore.testing.bulk import GenerateReport, generate

# The targets for the ORM path, set for 1M traces (a 1,000-trace window): on smaller files the window holds
# fewer traces and the per-call costs weigh more, so they are shown there but not judged.
WINDOW_TARGET = 1.6
LATEST_TARGET = 2.5
TARGETS_FROM = 1_000_000


class OrmBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.lines: list[Line] = []
        self.problems: list[str] = []
        self.out: dict[str, Any] = {
            "config": {"scale": args.scale, "runs": args.runs, "seed": args.seed, "revision": git_revision()}
        }

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def data(self) -> GenerateReport:
        """A head-schema file, finalized; with --keep, reused when its options match."""
        traces = self.args.scale
        options = data_options(traces, self.args.seed)
        path = self.args.workdir / f"orm-head-{traces}-seed{self.args.seed}.db"
        sidecar = path.with_suffix(".json")
        if self.args.keep and path.exists() and sidecar.exists():
            saved = json.loads(sidecar.read_text())
            if saved["options"] == options:
                self.log(f"reusing {path}")
                return GenerateReport(**saved["report"])
        remove_db(path)
        self.log(f"generating {traces:,} traces at head into {path}")
        report = generate(path, schema="head", **options)
        finalize(f"sqlite:///{path}")  # the deployed state: the rolling-deploy triggers are gone
        sidecar.write_text(json.dumps({"options": options, "report": report.__dict__}))
        return report

    def measure(self, data: GenerateReport) -> None:
        path = Path(data.path)
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")  # the application's own, nothing of tracestore's
        raw = connect(path)
        questions = (("window", {"since": data.now - WINDOW_S}), ("latest", {"limit": LATEST}))
        timings: dict[str, Any] = {}
        rows: dict[str, int] = {}
        try:
            for name, args in questions:
                variants = variants_for(engine, raw, args)
                orm_ids = [trace.id for trace in variants["orm"]()]
                raw_ids = [row[0] for row in variants["raw"]()]
                rows_ids = [row[0] for row in variants["rows"]()]
                if not orm_ids == raw_ids == rows_ids:
                    self.problems.append(
                        f"{name}: the ORM path and the floor differ ({len(orm_ids)} vs {len(raw_ids)})"
                    )
                rows[name] = len(orm_ids)
                self.log(f"{name}: ORM path vs raw floor, {self.args.runs} interleaved rounds")
                timings[name] = interleaved(variants, runs=self.args.runs, warmup=5)
        finally:
            raw.close()
            engine.dispose()
        if rows["window"] != data.burst_traces:
            self.problems.append(f"window returned {rows['window']} traces, expected {data.burst_traces}")
        window, latest = timings["window"], timings["latest"]
        self.out.update(rows=rows, timings=timings, data=data.__dict__)
        self.lines += [
            ratio_line(f"ORM entities / raw floor, 10-min window ({rows['window']} traces)", window["orm"],
                       window["raw"], WINDOW_TARGET),
            ratio_line("  rows of the same select / raw floor", window["rows"], window["raw"]),
            ratio_line("  ORM entities / rows of the same select", window["orm"], window["rows"]),
            ratio_line(f"ORM entities / raw floor, latest {LATEST}", latest["orm"], latest["raw"], LATEST_TARGET),
            ratio_line("  rows of the same select / raw floor", latest["rows"], latest["raw"]),
            ratio_line("  ORM entities / rows of the same select", latest["orm"], latest["rows"]),
        ]  # fmt: skip
        if data.traces < TARGETS_FROM:
            for line in (self.lines[0], self.lines[3]):
                line.target, line.ok = f"{line.target} (n/a: < 1M traces)", None


def variants_for(engine: sqlalchemy.Engine, raw: Any, args: dict[str, Any]) -> dict[str, Callable[[], list[Any]]]:
    """The three ways to ask the hot session the same question (see the module docstring)."""
    compiled = recent_traces(HOT_UID, **args).compile(dialect=engine.dialect)
    sql = str(compiled)
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    loads = orjson.loads
    columns = [column for column in Trace.__table__.c]

    def orm() -> list[Any]:
        with Session(engine) as session:
            return list(session.scalars(recent_traces(HOT_UID, **args)).all())

    def rows() -> list[Any]:
        with Session(engine) as session:
            return list(session.execute(recent_traces(HOT_UID, **args).with_only_columns(*columns)).all())

    def floor() -> list[Any]:
        return [
            (i, ct, ns, loads(data), loads(meta) if meta is not None else {}, created, updated)
            for i, ct, ns, data, meta, created, updated in raw.execute(sql, params).fetchall()
        ]

    return {"orm": orm, "raw": floor, "rows": rows}


def render(bench: OrmBench, data: GenerateReport) -> str:
    header = (
        f"tracestore ORM path @ {bench.out['config']['revision']}: {data.traces:,} traces, hot session"
        f" {data.hot_traces:,}; medians of {bench.args.runs} interleaved rounds, a Session per call"
    )
    return "\n".join([header, "", text_table(bench.lines), ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_scale, default="1m", help="traces to generate: 10k, 100k, 1m...")
    parser.add_argument("--runs", type=int, default=61, help="interleaved rounds per question (default 61)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (gitignored)")
    parser.add_argument("--keep", action="store_true", help="keep the file, and reuse a matching one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("need --runs >= 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = OrmBench(args)
    data = bench.data()
    bench.measure(data)
    if not args.keep:
        remove_db(Path(data.path))
        Path(data.path).with_suffix(".json").unlink(missing_ok=True)
    return finish(bench, render(bench, data), args.json, wrong="WRONG RESULTS, timings are void")


if __name__ == "__main__":
    sys.exit(main())
