"""Prune rate at 200K traces (tracestore generate's shape, 30 days): prune --older-than 15d, batch 10,000.

.venv/bin/python benchmarks/prune_rate.py sqlite          # secure_delete as built vs FAST, three runs each
scripts/with-postgres .venv/bin/python benchmarks/prune_rate.py postgresql   # the same rows, three runs
"""

import os
import shutil
import sqlite3
import sys

from sqlalchemy import event

from tracestore import TraceStore
from tracestore.engine import create_engine
from tracestore.testing.bulk import generate

N = 200_000
now = 1_750_000_000.0
tmp = os.environ.get("PRUNE_BENCH_DIR", "/tmp/tracestore-prune-bench")
os.makedirs(tmp, exist_ok=True)
base = f"{tmp}/base.db"
if not os.path.exists(base):
    generate(base, traces=N, schema="head", seed=1, now=now)


def sqlite_run(mode):
    path = f"{tmp}/{mode}.db"
    for s in ("", "-wal", "-shm"):
        if os.path.exists(path + s):
            os.remove(path + s)
    shutil.copy(base, path)
    engine = create_engine(f"sqlite:///{path}")
    if mode == "fast":

        @event.listens_for(engine, "connect")
        def fast(dbapi, rec):
            dbapi.execute("PRAGMA secure_delete=FAST")

        engine.dispose()
    with TraceStore(engine) as store:
        sd = store.engine.connect().exec_driver_sql("PRAGMA secure_delete").scalar()
        r = store.prune(now - 15 * 86400, batch_size=10_000)
    engine.dispose()
    print(
        f"sqlite secure_delete={sd} ({mode}): {r.deleted} traces in {r.seconds:.2f} s = {r.rate:,.0f} traces/s, "
        f"{r.batches} batches, {r.space.free_pages} free pages",
        flush=True,
    )


if sys.argv[1] == "sqlite":
    for mode in ("asbuilt", "fast", "asbuilt", "fast", "asbuilt", "fast"):
        sqlite_run(mode)
else:
    url = os.environ["TRACESTORE_PG_URL"]
    from sqlalchemy import create_engine as sa
    from sqlalchemy import make_url

    admin = sa(url, isolation_level="AUTOCOMMIT")
    for run in range(3):
        with admin.connect() as c:
            c.exec_driver_sql("DROP DATABASE IF EXISTS prune_bench WITH (FORCE)")
            c.exec_driver_sql(
                "CREATE DATABASE prune_bench TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        db = (
            make_url(url)
            .set(drivername="postgresql+psycopg", database="prune_bench")
            .render_as_string(hide_password=False)
        )
        # the same rows as the SQLite file
        src = sqlite3.connect(base)
        import orjson

        from tracestore import TraceContext

        links = {}
        for tid, uid in src.execute("select trace_id, session_uid from trace_sessions"):
            links.setdefault(tid, []).append(uid)
        with TraceStore(db) as store:
            batch = []
            for row in src.execute(
                "select id, context_type, namespace, data, metadata, created_at, updated_at from traces"
            ):
                batch.append(
                    TraceContext(
                        id=row[0],
                        context_type=row[1],
                        namespace=row[2],
                        data=orjson.loads(row[3]),
                        metadata=orjson.loads(row[4]),
                        created_at=row[5],
                        updated_at=row[6],
                        session_uids=links.get(row[0], []),
                    )
                )
                if len(batch) == 5000:
                    store.store_batch(batch)
                    batch = []
            store.store_batch(batch)
            eng = sa(db, isolation_level="AUTOCOMMIT")
            with eng.connect() as c:
                c.exec_driver_sql("VACUUM ANALYZE")
            eng.dispose()
            r = store.prune(now - 15 * 86400, batch_size=10_000)
        print(
            f"postgresql run {run + 1}: {r.deleted} traces in {r.seconds:.2f} s = {r.rate:,.0f} traces/s, "
            f"{r.batches} batches",
            flush=True,
        )
