"""Keeping data bounded: deleting old traces in short batches (prune), monthly partitions of
trace_sessions on PostgreSQL (partitions), and the SQLite upkeep the store's writer does (upkeep)."""

from tracestore.retention.prune import PruneReport, Space

__all__ = ["PruneReport", "Space"]
