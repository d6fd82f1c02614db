"""A hypothesis state machine drives random sequences of writes (store, store_batch, re-store of an existing id
with changed fields and sessions, delete, prune) and reads (get, query with filters, get_by_session_uid with
since/limit, get_by_session_uids, page_by_session_uid walked to the last page) against the real store, on SQLite
and PostgreSQL, and against a model in plain Python (tests/oracle.py): every answer must match the model's.

One database per test, emptied at the start of each run (a fresh migrated database per run costs a second on
PostgreSQL); the runs and their steps are bounded so the test takes seconds.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.backends import Backend
from tests.oracle import merge_restore, oracle_query
from tracestore import TraceContext, TraceStore

T0 = 1_700_000_000.0
IDS = ["a", "b", "c", "é", "😀", "x'y", "a\u0301"]
SESSIONS = ["s1", "s2", "ß", "s'3"]
# Few distinct times, so ties on created_at (broken by id) and bounds equal to a created_at come up often.
TIMES = [T0, T0 + 1, T0 + 1, T0 + 2.5, T0 + 3, T0 + 7]
BOUNDS = st.one_of(st.none(), st.sampled_from([*TIMES, T0 - 1, T0 + 0.5, T0 + 100]))
LIMITS = st.one_of(st.none(), st.integers(1, 6))


def traces_with(ids: st.SearchStrategy[str]) -> st.SearchStrategy[TraceContext]:
    return st.builds(
        TraceContext,
        context_type=st.sampled_from(["span", "log"]),
        namespace=st.sampled_from(["web", "worker"]),
        data=st.one_of(st.integers(-5, 5), st.text(max_size=3), st.lists(st.booleans(), max_size=2)),
        metadata=st.dictionaries(st.sampled_from(["k", "v"]), st.integers(0, 3), max_size=2),
        session_uids=st.lists(st.sampled_from(SESSIONS), max_size=3),
        created_at=st.sampled_from(TIMES),
        updated_at=st.sampled_from(TIMES),
        id=ids,
    )


TRACES = traces_with(st.sampled_from(IDS))


def several_sessions_oracle(
    traces: list[TraceContext], uids: list[str], since: float | None, limit: int | None
) -> list[TraceContext]:
    """get_by_session_uids: traces in any of the sessions, each once, newest first (ties: id descending)."""
    chosen = {trace.id: trace for uid in uids for trace in oracle_query(traces, session_uid=uid, since=since)}
    ordered = sorted(chosen.values(), key=lambda trace: (trace.created_at, trace.id), reverse=True)
    return ordered if limit is None else ordered[:limit]


class TraceStoreMachine(RuleBasedStateMachine):
    """The store against a dict of id -> the TraceContext it must hold."""

    store: TraceStore
    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        with self.backend.raw() as connection:  # each run starts from no traces
            connection.exec_driver_sql("DELETE FROM trace_sessions")
            connection.exec_driver_sql("DELETE FROM traces")
        self.model: dict[str, TraceContext] = {}

    @property
    def traces(self) -> list[TraceContext]:
        return list(self.model.values())

    # -- writes ----------------------------------------------------------------------------------------------
    @rule(trace=TRACES)
    def store_one(self, trace: TraceContext) -> None:
        self.store.store(trace)
        self.model[trace.id] = merge_restore(self.model.get(trace.id), trace)

    @rule(batch=st.lists(TRACES, max_size=5))  # repeated ids in one batch act like successive store() calls
    def store_batch(self, batch: list[TraceContext]) -> None:
        self.store.store_batch(batch)
        for trace in batch:
            self.model[trace.id] = merge_restore(self.model.get(trace.id), trace)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def restore_existing(self, data: st.DataObject) -> None:
        """An id already stored, with changed fields, time and sessions: updated in place, sessions added."""
        trace_id = data.draw(st.sampled_from(sorted(self.model)), label="id")
        trace = data.draw(traces_with(st.just(trace_id)), label="restored")
        self.store.store(trace)
        self.model[trace_id] = merge_restore(self.model[trace_id], trace)

    @rule(trace_id=st.sampled_from([*IDS, "never-stored"]))
    def delete(self, trace_id: str) -> None:
        assert self.store.delete(trace_id) is (self.model.pop(trace_id, None) is not None)

    @rule(cutoff=st.sampled_from([*TIMES, T0 - 1, T0 + 0.5]), batch_size=st.integers(1, 3))
    def prune(self, cutoff: float, batch_size: int) -> None:
        doomed = [trace_id for trace_id, trace in self.model.items() if trace.created_at < cutoff]
        report = self.store.prune(older_than=cutoff, batch_size=batch_size)
        assert report.deleted == len(doomed), (report, doomed)
        for trace_id in doomed:
            del self.model[trace_id]

    # -- reads -----------------------------------------------------------------------------------------------
    @rule(trace_id=st.sampled_from([*IDS, "never-stored"]))
    def get(self, trace_id: str) -> None:
        assert self.store.get(trace_id) == self.model.get(trace_id)

    @rule(
        args=st.fixed_dictionaries(
            {
                "session_uid": st.one_of(st.none(), st.sampled_from([*SESSIONS, "nobody"])),
                "namespace": st.one_of(st.none(), st.sampled_from(["web", "worker"])),
                "context_type": st.one_of(st.none(), st.sampled_from(["span", "log"])),
                "since": BOUNDS,
                "until": BOUNDS,
                "limit": LIMITS,
            }
        )
    )
    def query(self, args: dict[str, Any]) -> None:
        assert self.store.query(**args) == oracle_query(self.traces, **args), args

    @rule(uid=st.sampled_from(SESSIONS), since=BOUNDS, limit=LIMITS)
    def get_by_session_uid(self, uid: str, since: float | None, limit: int | None) -> None:
        expected = oracle_query(self.traces, session_uid=uid, since=since, limit=limit)
        assert self.store.get_by_session_uid(uid, since=since, limit=limit) == expected

    @rule(uids=st.lists(st.sampled_from([*SESSIONS, "nobody"]), max_size=4), since=BOUNDS, limit=LIMITS)
    def get_by_session_uids(self, uids: list[str], since: float | None, limit: int | None) -> None:
        expected = several_sessions_oracle(self.traces, uids, since, limit)
        assert self.store.get_by_session_uids(uids, since=since, limit=limit) == expected

    @rule(uid=st.sampled_from(SESSIONS), since=BOUNDS, page_size=st.integers(1, 4))
    def walk_pages(self, uid: str, since: float | None, page_size: int) -> None:
        """Every page but the last is full, and the pages concatenate to the whole answer, once each."""
        pages: list[list[TraceContext]] = []
        cursor = None
        while True:
            items, cursor = self.store.page_by_session_uid(uid, since=since, limit=page_size, cursor=cursor)
            pages.append(items)
            if cursor is None:
                break
            assert len(pages) <= len(self.model) + 1, "pagination does not end"
        assert all(len(page) == page_size for page in pages[:-1]) and len(pages[-1]) <= page_size
        assert [trace for page in pages for trace in page] == oracle_query(self.traces, session_uid=uid, since=since)

    @invariant()
    def links_follow_their_traces(self) -> None:
        # The denormalized copy of created_at is what the session index sorts on: it must never drift.
        assert self.backend.junction_drift() == []


def test_store_matches_the_model(store: TraceStore, backend: Backend) -> None:
    TraceStoreMachine.store = store
    TraceStoreMachine.backend = backend
    run_state_machine_as_test(
        TraceStoreMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
