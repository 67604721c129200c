"""Prometheus metrics (kopf has none of its own). Served by `fedtune operator --metrics-port`."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Histogram

ROUNDS_COMPLETED = Counter(
    "fedtune_rounds_completed_total", "Rounds whose aggregate was written.", ["namespace", "run"]
)
ROUND_DURATION = Histogram(
    "fedtune_round_duration_seconds",
    "From a round's start to its aggregate.",
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
BYTES_RECEIVED = Counter(
    "fedtune_delta_bytes_received_total",
    "Encoded delta bytes merged by aggregators.",
    ["namespace", "run"],
)
DELTAS_REJECTED = Counter(
    "fedtune_deltas_rejected_total", "Deltas an aggregator refused.", ["namespace", "run"]
)
CLIENT_FAILURES = Counter(
    "fedtune_client_failures_total", "Client Jobs that failed.", ["namespace", "run"]
)
RECONCILE_ERRORS = Counter(
    "fedtune_reconcile_errors_total", "Reconciles that raised an unexpected error."
)
HANDOFF_SECONDS = Histogram(
    "fedtune_handoff_seconds",
    "From the event that woke a run to the end of the writes of the reconcile that created its "
    "next Jobs: the operator's own share of a round's hand-off.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
RUNS_FINISHED = Counter("fedtune_runs_finished_total", "Runs that ended, by outcome.", ["outcome"])

PER_RUN = (ROUNDS_COMPLETED, BYTES_RECEIVED, DELTAS_REJECTED, CLIENT_FAILURES)


def forget_run(namespace: str, run: str) -> None:
    """Drop a deleted run's series, so that the exporter does not grow with every run ever seen."""
    for metric in PER_RUN:
        with contextlib.suppress(KeyError):
            metric.remove(namespace, run)
