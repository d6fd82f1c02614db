"""OTLP/HTTP ingest: the real SDK exporter in another process sending to `tracestore serve`, against store_batch.

    .venv/bin/python benchmarks/otlp_ingest.py                       # 50,000 spans, 3 repetitions
    .venv/bin/python benchmarks/otlp_ingest.py --spans 5000 --repeat 1 --json out.json

Each repetition, on fresh SQLite files in --workdir:

1. `tracestore serve` on a fresh file, in its own process; a sender process makes --spans spans with the SDK
   (GenAI-like attributes, ~300 bytes of prompt, session.id over --sessions sessions) and exports them with a
   BatchSpanProcessor (--batch spans per request) through the real OTLPSpanExporter (protobuf, --gzip or not).
   Ingest spans/s: the spans over the time from the first span started to the last export answered (every
   answer comes after its commit); the sender times each export() call: p50 and p99 request latency. The file
   is checked to hold every span.
2. The same spans (same seed), made in this process and mapped by tracestore.otel.span_to_trace, stored with
   store_batch in batches of the same size into another fresh file: spans/s, the spans already mapped.

Medians over the repetitions; the ratio ingest / store_batch is what the receiver keeps of the store's write rate
(target >= 0.7x). `make bench` runs it and writes otlp-ingest.json next to the suite's results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import DEFAULT_WORKDIR, git_revision, remove_db
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tracestore import TraceStore
from tracestore.otel import span_to_trace

TARGET_RATIO = 0.7
TRACESTORE = Path(sys.executable).with_name("tracestore")
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-3-70b")
OPERATIONS = ("chat", "execute_tool", "invoke_agent", "embeddings")


# -- the spans, the same in the sender and here ---------------------------------------------------------------------
def provider_for(processor: Any) -> TracerProvider:
    resource = Resource.create({"service.name": "bench-agent", "service.version": "1.4.0", "host.name": "worker-01"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return provider


def make_spans(tracer: Tracer, count: int, *, sessions: int, seed: int) -> None:
    """`count` GenAI-like spans: operation, model, token counts, a prompt excerpt, one session each."""
    rng = random.Random(seed)
    filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=8192))
    for seq in range(count):
        offset = rng.randrange(len(filler) - 300)
        attributes = {
            "session.id": f"session-{rng.randrange(sessions):04d}",
            "gen_ai.operation.name": rng.choice(OPERATIONS),
            "gen_ai.system": "openai",
            "gen_ai.request.model": rng.choice(MODELS),
            "gen_ai.usage.input_tokens": rng.randrange(8192),
            "gen_ai.usage.output_tokens": rng.randrange(2048),
            "gen_ai.request.temperature": 0.2,
            "user.id": f"user-{rng.randrange(1000)}",
            "bench.seq": seq,
            "gen_ai.prompt": filler[offset : offset + 300],
        }
        with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes=attributes):
            pass


# -- the sender process ---------------------------------------------------------------------------------------------
class TimedExporter(SpanExporter):
    """The real OTLP/HTTP exporter, each export() call timed."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.latencies: list[float] = []
        self.failures = 0
        self.last_answer = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        started = time.perf_counter()
        result = self.inner.export(spans)
        self.latencies.append(time.perf_counter() - started)
        self.last_answer = time.time()  # compared across the sender processes
        if result != SpanExportResult.SUCCESS:
            self.failures += 1
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def send(endpoint: str, count: int, sessions: int, seed: int, batch: int, gzip: bool) -> dict[str, Any]:
    """Run in the sender process: make and export the spans; what it measured."""
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    compression = Compression.Gzip if gzip else Compression.NoCompression
    exporter = TimedExporter(OTLPSpanExporter(endpoint=endpoint, compression=compression))
    # A queue that holds every span: none dropped, whatever the pace of the receiver.
    processor = BatchSpanProcessor(
        exporter, max_queue_size=count + batch, max_export_batch_size=batch, schedule_delay_millis=50
    )
    provider = provider_for(processor)
    started = time.time()
    make_spans(provider.get_tracer("bench", "1.0"), count, sessions=sessions, seed=seed)
    made = time.time()
    provider.force_flush(timeout_millis=600_000)
    provider.shutdown()
    return {
        "started": started,
        "finished": exporter.last_answer,
        "making_seconds": made - started,
        "latencies": exporter.latencies,
        "failures": exporter.failures,
    }


# -- one repetition -------------------------------------------------------------------------------------------------
def parts(args: argparse.Namespace, seed: int) -> list[tuple[int, int]]:
    """(spans, seed) of each sender: --spans shared out, each sender's spans made from its own seed."""
    share, extra = divmod(args.spans, args.senders)
    return [(share + (k < extra), seed * 1000 + k) for k in range(args.senders)]


@contextmanager
def serving(path: Path) -> Iterator[str]:
    """`tracestore serve` on a fresh file at `path`, in its own process: its endpoint. Stopped with SIGTERM after;
    RuntimeError if it logged an error or did not exit 0."""
    remove_db(path)
    log = path.with_suffix(".log")
    with log.open("w") as errors:
        server = subprocess.Popen(
            [str(TRACESTORE), "--url", f"sqlite:///{path}", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if "http://" not in line:
                raise RuntimeError(f"tracestore serve did not start: {log.read_text()}")
            yield line.split("on ", 1)[1].split()[0]
        finally:
            server.terminate()
            status = server.wait(timeout=60)
    logged = log.read_text().replace("stopped", "").strip()
    if status != 0 or logged:
        raise RuntimeError(f"tracestore serve exited {status}: {logged}")


def stored_in(path: Path, spans: int) -> int:
    with TraceStore(f"sqlite:///{path}", auto_upgrade=False) as store:
        return len(store.query(limit=spans + 1))


def through_the_receiver(path: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    with serving(path) as endpoint:
        command = [sys.executable, __file__, "--send", endpoint, "--sessions", str(args.sessions)]
        command += ["--batch", str(args.batch), *(["--gzip"] if args.gzip else [])]
        senders = [
            subprocess.Popen([*command, "--spans", str(n), "--seed", str(n_seed)], stdout=subprocess.PIPE, text=True)
            for n, n_seed in parts(args, seed)
        ]
        sent = [json.loads(sender.communicate()[0]) for sender in senders]
    latencies = sorted(latency for one in sent for latency in one["latencies"])
    seconds = max(one["finished"] for one in sent) - min(one["started"] for one in sent)
    return {
        "spans_per_s": args.spans / seconds,
        "seconds": seconds,
        "making_seconds": max(one["making_seconds"] for one in sent),
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": sum(one["failures"] for one in sent),
        "stored": stored_in(path, args.spans),
    }


def made_spans(args: argparse.Namespace, seed: int) -> list[ReadableSpan]:
    """The spans the senders make, made here (same seeds)."""
    memory = InMemorySpanExporter()
    provider = provider_for(SimpleSpanProcessor(memory))
    for part, part_seed in parts(args, seed):
        make_spans(provider.get_tracer("bench", "1.0"), part, sessions=args.sessions, seed=part_seed)
    return list(memory.get_finished_spans())


def through_store_batch(path: Path, spans: list[ReadableSpan], batch: int) -> dict[str, Any]:
    traces = [span_to_trace(span) for span in spans]
    remove_db(path)
    with TraceStore(f"sqlite:///{path}") as store:
        started = time.perf_counter()
        for start in range(0, len(traces), batch):
            store.store_batch(traces[start : start + batch])
        seconds = time.perf_counter() - started
    return {"spans_per_s": len(spans) / seconds, "seconds": seconds, "stored": stored_in(path, len(spans))}


def through_the_receiver_alone(path: Path, spans: list[ReadableSpan], batch: int) -> dict[str, Any]:
    """The receiver without the sender's cost: the same requests, encoded beforehand by the SDK's encoder, posted
    back to back on one connection by a plain HTTP client in another process."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    bodies = [encode_spans(spans[start : start + batch]).SerializeToString() for start in range(0, len(spans), batch)]
    requests_file = path.with_suffix(".requests")
    requests_file.write_bytes(pickle.dumps(bodies))
    with serving(path) as endpoint:
        command = [sys.executable, __file__, "--post", endpoint, "--requests-file", str(requests_file)]
        seconds = float(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout)
    requests_file.unlink()
    return {"spans_per_s": len(spans) / seconds, "seconds": seconds, "stored": stored_in(path, len(spans))}


def post_all(endpoint: str, requests_file: Path) -> float:
    """Run in the poster process: POST each body, one after the other on one connection; the seconds it took."""
    bodies = pickle.loads(requests_file.read_bytes())
    address = urllib.parse.urlsplit(endpoint)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port)
    started = time.perf_counter()
    for body in bodies:
        connection.request("POST", address.path, body, {"Content-Type": "application/x-protobuf"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the receiver answered {response.status}")
    seconds = time.perf_counter() - started
    connection.close()
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512, help="spans per export request and per store_batch")
    parser.add_argument("--senders", type=int, default=1, help="sender processes, each its own exporter")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gzip", action="store_true", help="the exporter compresses its requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--send", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the sender process
    parser.add_argument("--post", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the poster process
    parser.add_argument("--requests-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send:
        print(json.dumps(send(args.send, args.spans, args.sessions, args.seed, args.batch, args.gzip)))
        return 0
    if args.post:
        print(post_all(args.post, args.requests_file))
        return 0

    workdir = args.workdir / "otlp-ingest"
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for repetition in range(args.repeat):
        seed = args.seed + repetition
        received = through_the_receiver(workdir / "received.db", args, seed)
        spans = made_spans(args, seed)
        stored = through_store_batch(workdir / "stored.db", spans, args.batch)
        alone = through_the_receiver_alone(workdir / "alone.db", spans, args.batch)
        runs.append({"receiver": received, "store_batch": stored, "receiver_alone": alone})
        print(
            f"run {repetition + 1}: receiver {received['spans_per_s']:,.0f} spans/s "
            f"(p99 {received['p99_ms']:.1f} ms, {received['requests']} requests), "
            f"store_batch {stored['spans_per_s']:,.0f} spans/s, "
            f"receiver alone {alone['spans_per_s']:,.0f} spans/s",
            file=sys.stderr,
        )
    shutil.rmtree(workdir, ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(run[side][key] for run in runs)

    summary = {
        "receiver_spans_per_s": median("receiver", "spans_per_s"),
        "receiver_p50_ms": median("receiver", "p50_ms"),
        "receiver_p99_ms": median("receiver", "p99_ms"),
        "sender_making_seconds": median("receiver", "making_seconds"),
        "store_batch_spans_per_s": median("store_batch", "spans_per_s"),
        "receiver_alone_spans_per_s": median("receiver_alone", "spans_per_s"),
    }
    summary["ratio"] = summary["receiver_spans_per_s"] / summary["store_batch_spans_per_s"]
    summary["ratio_alone"] = summary["receiver_alone_spans_per_s"] / summary["store_batch_spans_per_s"]
    problems = [
        f"run {i + 1}: {side} stored {run[side]['stored']} of {args.spans} spans"
        for i, run in enumerate(runs)
        for side in ("receiver", "store_batch", "receiver_alone")
        if run[side]["stored"] != args.spans
    ]
    problems += [f"run {i + 1}: {run['receiver']['failures']} exports failed" for i, run in enumerate(runs)]
    problems = [problem for problem in problems if not problem.endswith(": 0 exports failed")]

    verdict = "meets" if summary["ratio"] >= TARGET_RATIO else "below"
    print(
        f"OTLP/HTTP ingest, {args.spans:,} spans in requests of {args.batch} "
        f"({'gzip' if args.gzip else 'protobuf, uncompressed'}), SQLite, median of {args.repeat}\n"
        f"  tracestore serve     {summary['receiver_spans_per_s']:>10,.0f} spans/s   "
        f"request p50 {summary['receiver_p50_ms']:.1f} ms, p99 {summary['receiver_p99_ms']:.1f} ms\n"
        f"  store_batch (mapped) {summary['store_batch_spans_per_s']:>10,.0f} spans/s\n"
        f"  receiver / store_batch {summary['ratio']:.2f}x (target >= {TARGET_RATIO}x: {verdict})\n"
        f"  receiver alone       {summary['receiver_alone_spans_per_s']:>10,.0f} spans/s   "
        f"(requests encoded beforehand, posted back to back: {summary['ratio_alone']:.2f}x store_batch)\n"
        f"  the sender took {summary['sender_making_seconds']:.2f} s to make the spans"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"revision": git_revision(), "spans": args.spans, "sessions": args.sessions, "batch": args.batch}
        report |= {"gzip": args.gzip, "summary": summary, "runs": runs, "problems": problems}
        args.json.write_text(json.dumps(report, indent=2))
    if problems:
        print("\nresults void:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
