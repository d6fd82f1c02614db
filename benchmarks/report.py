"""Turns a results directory's JSON into results.md and the PNG plots (rerun it alone to redraw them).

python benchmarks/report.py benchmarks/results/10m
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from common import Line, markdown_table, scale_name
from matplotlib.ticker import FuncFormatter

SIZE_TARGET = 1.2  # the size target: latency at 10M / latency at 1M


def size_points(out: Path, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per database size: the median ms of store, raw floor and legacy query, window and latest-100."""
    runs = [json.loads((out / name).read_text()) for name in results.get("size_files", [])] + [results]
    points = []
    for run in sorted(runs, key=lambda r: r["data"]["traces"]):
        timings = run["timings"]
        points.append(
            {
                "traces": run["data"]["traces"],
                "hot_traces": run["data"]["hot_traces"],
                "window_rows": run["rows"]["window"],
                "store window": timings["sync window"]["store"]["median_ms"],
                "raw window": timings["sync window"]["raw"]["median_ms"],
                "legacy window": timings["legacy window"]["legacy"]["median_ms"],
                "store latest": timings["sync latest"]["store"]["median_ms"],
                "raw latest": timings["sync latest"]["raw"]["median_ms"],
                "legacy latest": timings["legacy latest"]["legacy"]["median_ms"],
                "problems": run["problems"],
            }
        )
    return points


def size_lines(points: list[dict[str, Any]]) -> list[Line]:
    """The size target: the largest file's store latency over the next smaller one's."""
    if len(points) < 2:
        return []
    big, small = points[-1], points[-2]
    label = f"{scale_name(big['traces'])} / {scale_name(small['traces'])}"
    lines = []
    for question in ("window", "latest"):
        ratio = big[f"store {question}"] / small[f"store {question}"]
        name = "10-min window" if question == "window" else "latest 100"
        line = Line(
            f"store latency at {label} traces, {name}",
            f"{big[f'store {question}']:.3f} ms",
            f"{small[f'store {question}']:.3f} ms",
            ratio,
            f"<= {SIZE_TARGET:g}x",
            ratio <= SIZE_TARGET,
        )
        if question == "window" and big["window_rows"] != small["window_rows"]:  # not the same question
            line.target, line.ok = f"{line.target} (n/a: {small['window_rows']} vs {big['window_rows']} rows)", None
        lines.append(line)
    return lines


def _plot(
    path: Path, title: str, xlabel: str, series: dict[str, tuple[list[float], list[float]]], *, logx: bool
) -> None:
    styles = {"store": "o-", "raw floor": "s--", "legacy query": "^:"}
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, styles.get(name, "o-"), label=name)
    axes.set_yscale("log")
    if logx:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("median latency (ms, log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plots(out: Path, results: dict[str, Any], points: list[dict[str, Any]]) -> list[Path]:
    written = []
    sizes = [p["traces"] for p in points]
    for question, name in (("window", "10-minute window"), ("latest", "latest 100")):
        path = out / f"latency_vs_size_{question}.png"
        _plot(
            path,
            f"Hot session (10% of traces), {name}: latency against database size",
            "traces in the database",
            {
                "store": (sizes, [p[f"store {question}"] for p in points]),
                "raw floor": (sizes, [p[f"raw {question}"] for p in points]),
                "legacy query": (sizes, [p[f"legacy {question}"] for p in points]),
            },
            logx=True,
        )
        written.append(path)
    traces = scale_name(results["data"]["traces"])
    for axis, xlabel in (("window", "window length (s)"), ("limit", "limit (newest N traces)")):
        curve = results.get("curves", {}).get(axis)
        if not curve:
            continue
        xs = [p["x"] for p in curve]
        path = out / f"latency_vs_{axis}.png"
        _plot(
            path,
            f"{traces} traces, hot session: latency against the {axis}",
            xlabel,
            {
                "store": (xs, [p["store_ms"] for p in curve]),
                "raw floor": (xs, [p["raw_ms"] for p in curve]),
                "legacy query": (xs, [p["legacy_ms"] for p in curve]),
            },
            logx=True,
        )
        written.append(path)
    return written


def _curve_table(curve: list[dict[str, Any]], axis: str) -> str:
    head = (
        f"| {axis} | rows | store ms | raw floor ms | store / raw | legacy ms | legacy / store |\n"
        "|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {p['x']:g} | {p['rows']:,} | {p['store_ms']:.3f} | {p['raw_ms']:.3f} | {p['store_ms'] / p['raw_ms']:.2f}x"
        f" | {p['legacy_ms']:.1f} | {p['legacy_ms'] / p['store_ms']:,.0f}x |"
        for p in curve
    ]
    return "\n".join([head, *rows])


def _size_table(points: list[dict[str, Any]]) -> str:
    head = (
        "| traces | hot session | window rows | store window ms | raw ms | legacy ms | store latest-100 ms | raw ms |"
        " legacy ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {p['traces']:,} | {p['hot_traces']:,} | {p['window_rows']:,} | {p['store window']:.3f}"
        f" | {p['raw window']:.3f} | {p['legacy window']:.1f} | {p['store latest']:.3f} | {p['raw latest']:.3f}"
        f" | {p['legacy latest']:.1f} |"
        for p in points
    ]
    return "\n".join([head, *rows])


def markdown(
    results: dict[str, Any], points: list[dict[str, Any]], images: list[Path], orm_path: dict[str, Any] | None = None
) -> str:
    data, machine, config = results["data"], results.get("machine", {}), results["config"]
    lines = [Line(**line) for line in results["lines"]] + size_lines(points)
    upgrade = results["upgrade"]
    scale = scale_name(data["traces"])
    command = "make bench" if scale == "1m" else f"make bench SCALE={scale}"
    parts = [
        f"# tracestore benchmark: {data['traces']:,} traces",
        "",
        f"`{command}` (benchmarks/suite.py) at `{config['revision']}`, {machine.get('date', '')}.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('memory_gb', '?')} GB;"
        f" {machine.get('os', '')}; Python {machine.get('python', '?')}, SQLite {machine.get('sqlite', '?')}."
        " Shared and noisy: read the ratios (both sides measured in the same run, interleaved), not the times.",
        "",
        f"Data: {data['traces']:,} traces, {data['links']:,} session links, hot session {data['hot_traces']:,} traces"
        f" with {data['burst_traces']:,} in the last 10 minutes; generated as a legacy file, a copy upgraded by"
        f" `alembic upgrade head` in {upgrade['seconds']:.0f} s, then `tracestore finalize`."
        f" Medians of {config['runs']} interleaved rounds (legacy query: {results.get('legacy_runs')}).",
        "",
        "## Against the targets",
        "",
        markdown_table(lines),
        "",
        "## Latency against database size",
        "",
        _size_table(points),
        "",
    ]
    parts += [f"![{image.stem}]({image.name})" for image in images if image.stem.startswith("latency_vs_size")]
    for axis in ("window", "limit"):
        curve = results.get("curves", {}).get(axis)
        if curve:
            parts += ["", f"## Latency against the {axis}", "", _curve_table(curve, axis), ""]
            parts += [f"![latency_vs_{axis}](latency_vs_{axis}.png)"]
    parts += ["", "## Query plans", ""]
    for name, steps in results.get("plans", {}).items():
        parts += [f"- {name}: " + " / ".join(f"`{step}`" for step in steps)]
    parts += postgresql_section(results)
    parts += orm_path_section(orm_path)
    problems = results["problems"] + [problem for point in points for problem in point["problems"]]
    problems += orm_path["problems"] if orm_path else []
    if problems:
        parts += ["", "## WRONG RESULTS (timings void)", "", *[f"- {problem}" for problem in problems]]
    return "\n".join(parts) + "\n"


# (label, timings key, measured variant, base variant): the rows both engines have.
SIDE_BY_SIDE = (
    ("sync store / raw floor, 10-min window", "sync window", "store", "raw"),
    ("sync store / raw floor, latest 100", "sync latest", "store", "raw"),
    ("async store / raw floor, 10-min window", "async window", "async", "raw"),
    ("async store / raw floor, latest 100", "async latest", "async", "raw"),
    ("legacy query / store, 10-min window", "legacy window", "legacy", "store"),
    ("legacy query / store, latest 100", "legacy latest", "legacy", "store"),
)


def postgresql_section(results: dict[str, Any]) -> list[str]:
    """The PostgreSQL part's table, the same measures next to SQLite's, its plans; or why it was skipped."""
    pg = results.get("postgresql")
    if pg is None:
        return []
    if "skipped" in pg:
        return ["", "## PostgreSQL", "", f"Skipped: {pg['skipped']}."]
    server, load, upgrade = pg["server"], pg["load"], pg["upgrade"]
    parts = [
        "",
        "## PostgreSQL",
        "",
        f"PostgreSQL {server['server_version']} on the same machine, a throwaway cluster (scripts/with-postgres):"
        f" **fsync={server['fsync']}**, full_page_writes={server['full_page_writes']},"
        f" shared_buffers={server['shared_buffers']}, work_mem={server['work_mem']}, jit={server['jit']},"
        f" plan_cache_mode={server['plan_cache_mode']}, collation {server['lc_collate']}; reads over a Unix socket.",
        f"The legacy file's rows went into a legacy database by COPY ({load['copy_seconds']:.0f} s), then its"
        f" indexes ({load['index_seconds']:.0f} s) and VACUUM (ANALYZE); a copy of it (CREATE DATABASE … TEMPLATE,"
        f" {upgrade['template_copy_seconds']:.1f} s) was upgraded by `alembic upgrade head` in"
        f" **{upgrade['seconds']:.0f} s** (backfill {upgrade['backfill_seconds'] or 0:.0f} s), finalized, then"
        f" VACUUM (ANALYZE) ({upgrade['vacuum_seconds']:.1f} s: the backfill rewrote every link). Floor: raw psycopg"
        " (autocommit) running the SQL text the store compiles for PostgreSQL, decoded the same way. Medians of"
        f" {pg['runs']} interleaved rounds (legacy query: {pg['legacy_runs']}).",
        "",
        markdown_table([Line(**line) for line in pg["lines"]]),
        "",
        "### SQLite and PostgreSQL side by side",
        "",
        "| measure | SQLite | floor / base | ratio | PostgreSQL | floor / base | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key, measured, base in SIDE_BY_SIDE:
        cells = []
        for timings in (results.get("timings", {}), pg["timings"]):
            pair = timings.get(key)
            if pair is None:
                cells += ["", "", ""]
                continue
            top, bottom = pair[measured]["median_ms"], pair[base]["median_ms"]
            cells += [f"{top:.3f} ms", f"{bottom:.3f} ms", f"{top / bottom:.2f}x"]
        parts.append(f"| {label} | " + " | ".join(cells) + " |")
    sqlite_upgrade = results.get("upgrade", {}).get("seconds")
    if sqlite_upgrade is not None:
        parts.append(f"| upgrade legacy -> head | {sqlite_upgrade:.1f} s | | | {upgrade['seconds']:.1f} s | | |")
    parts += ["", "### PostgreSQL plans: EXPLAIN (ANALYZE, BUFFERS), with the query's values", ""]
    for name, steps in pg["plans"].items():
        parts += [f"{name}:", "", "```", *steps, "```", ""]
    prepared = pg.get("prepared", {})
    if prepared:
        parts += ["Plans the timed loops ran (psycopg prepares a statement on its 5th execution):", ""]
        for connection, statements in prepared.items():
            if not statements:
                parts.append(f"- {connection}: none (every read ends in a ROLLBACK, and psycopg forgets them there)")
            for statement in statements:
                parts.append(
                    f"- {connection}: `…{statement['statement'][-70:]}` custom {statement['custom_plans']},"
                    f" generic {statement['generic_plans']}"
                )
    return parts


def orm_path_section(orm_path: dict[str, Any] | None) -> list[str]:
    """The ORM path's table (orm_path.py), when the suite ran it."""
    if orm_path is None:
        return []
    data, config = orm_path["data"], orm_path["config"]
    return [
        "",
        "## The ORM path",
        "",
        f"`tracestore.orm.recent_traces` read as `Trace` entities through an application's own Session (a Session"
        f" per call, on a plain `sqlalchemy.create_engine` Engine), against plain sqlite3 running the same SQL on"
        f" the same file, rows decoded into tuples (benchmarks/orm_path.py). {data['traces']:,} traces generated at"
        f" head and finalized, hot session {data['hot_traces']:,}; medians of {config['runs']} interleaved rounds.",
        "",
        markdown_table([Line(**line) for line in orm_path["lines"]]),
    ]


def build(out: Path) -> list[Path]:
    """Write results.md and the plots from out/results.json (and the size-*.json and orm-path.json it names)."""
    results = json.loads((out / "results.json").read_text())
    points = size_points(out, results)
    images = plots(out, results, points)
    orm_file = results.get("orm_path_file")
    orm_path = json.loads((out / orm_file).read_text()) if orm_file else None
    page = out / "results.md"
    page.write_text(markdown(results, points, images, orm_path))
    return [page, *images]


if __name__ == "__main__":
    for directory in sys.argv[1:] or ["."]:
        for path in build(Path(directory)):
            print(path)
