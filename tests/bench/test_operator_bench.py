"""The `operator` benchmark's own arithmetic: the API server's latency histograms it reads, the
CPU split of a loaded phase, and the priority it gives the control plane (then takes back)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.operator_overhead import (
    OPERATOR_REQUESTS,
    control_plane_first,
    cpu_split,
    histogram_delta,
    histogram_quantile,
    refused_status_writes,
    request_histograms,
)

JOBS = 'group="batch",resource="jobs",subresource="",verb="POST",version="v1"'
RUNS = (
    'group="fedtune.dev",resource="federatedfinetunes",subresource="status",verb="PUT",'
    'version="v1alpha1"'
)


def line(name: str, component: str, labels: str, value: float, le: str | None = None) -> str:
    bound = f',le="{le}"' if le is not None else ""
    return f'{name}{{component="{component}",dry_run="",scope="resource",{labels}{bound}}} {value}'


BUCKET = "apiserver_request_duration_seconds_bucket"
METRICS = "\n".join(
    [
        "# TYPE apiserver_request_duration_seconds histogram",
        line(BUCKET, "apiserver", JOBS, 6, "0.05"),
        line(BUCKET, "apiserver", JOBS, 9, "0.1"),
        line(BUCKET, "apiserver", JOBS, 10, "+Inf"),
        # The same requests under another component label: added to the above.
        line(BUCKET, "", JOBS, 2, "0.05"),
        line(BUCKET, "", JOBS, 2, "0.1"),
        line(BUCKET, "", JOBS, 2, "+Inf"),
        line(BUCKET, "apiserver", RUNS, 1, "0.05"),
        line(BUCKET, "apiserver", RUNS, 1, "+Inf"),
        # Not buckets of this histogram: its sum and count, and another histogram's bucket.
        line("apiserver_request_duration_seconds_sum", "apiserver", JOBS, 0.9),
        line("apiserver_request_duration_seconds_count", "apiserver", JOBS, 10),
        line("apiserver_request_sli_duration_seconds_bucket", "apiserver", JOBS, 99, "0.05"),
    ]
)


def test_the_histograms_of_a_request_kind_are_summed_over_the_other_labels() -> None:
    hists = request_histograms(METRICS)
    assert hists[OPERATOR_REQUESTS["Job create"]] == {0.05: 8, 0.1: 11, math.inf: 12}
    assert hists[OPERATOR_REQUESTS["status write"]] == {0.05: 1, math.inf: 1}
    assert set(hists) == {OPERATOR_REQUESTS["Job create"], OPERATOR_REQUESTS["status write"]}


def test_the_refused_status_writes_are_the_409s_of_runs_status_writes_alone() -> None:
    total = "apiserver_request_total"
    metrics = "\n".join(
        [
            line(total, "apiserver", RUNS + ',code="409"', 3),
            line(total, "", RUNS + ',code="409"', 1),
            line(total, "apiserver", RUNS + ',code="200"', 250),
            line(total, "apiserver", JOBS + ',code="409"', 7),  # Jobs that existed: not these
        ]
    )
    assert refused_status_writes(metrics) == 4
    assert refused_status_writes(METRICS) == 0


def test_a_phase_sees_only_the_requests_made_during_it() -> None:
    before = {0.05: 8.0, 0.1: 11.0, math.inf: 12.0}
    after = {0.05: 10.0, 0.1: 15.0, math.inf: 20.0}
    assert histogram_delta(after, before) == {0.05: 2.0, 0.1: 4.0, math.inf: 8.0}
    assert histogram_delta(after, {}) == after  # a request kind first seen during the phase


@pytest.mark.parametrize(
    ("q", "hist", "expected"),
    [
        # Linear within the bucket that holds the rank, from the bucket below's bound.
        (0.5, {0.1: 10.0, 0.2: 20.0, math.inf: 20.0}, 0.1),
        (0.75, {0.1: 10.0, 0.2: 20.0, math.inf: 20.0}, 0.15),
        (0.25, {0.1: 10.0, 0.2: 20.0, math.inf: 20.0}, 0.05),
        # Past the highest finite bound: that bound, as Prometheus answers.
        (0.95, {0.1: 1.0, 0.2: 2.0, math.inf: 10.0}, 0.2),
        # No requests: no answer, not zero.
        (0.5, {0.1: 0.0, math.inf: 0.0}, None),
        (0.5, {}, None),
    ],
)
def test_a_quantile_is_read_from_the_histogram_as_prometheus_reads_it(
    q: float, hist: dict[float, float], expected: float | None
) -> None:
    got = histogram_quantile(q, hist)
    assert got == (None if expected is None else pytest.approx(expected))


def test_the_cpu_the_named_processes_did_not_use_is_the_pods_and_the_rest() -> None:
    before = {"kube-apiserver": 10.0, "operator": 2.0, "machine": 100.0}
    after = {"kube-apiserver": 14.0, "operator": 3.5, "machine": 120.0}
    used = cpu_split(before, after)
    assert used == {"kube-apiserver": 4.0, "operator": 1.5, "the pods and the rest": 14.5}
    assert sum(used.values()) == pytest.approx(after["machine"] - before["machine"])


def nice_of(pid: int) -> tuple[int, int]:
    """(the autogroup's nice value, the main thread's)."""
    group = int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    return group, os.getpriority(os.PRIO_PROCESS, pid)


def test_the_control_plane_goes_first_during_the_phase_and_gets_its_priority_back_after() -> None:
    # A process in a session of its own, as each devcluster component is; it waits on its stdin.
    # (Raising a priority needs root, as the devcluster itself does.)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert nice_of(proc.pid) == (0, 0)
        with control_plane_first([proc.pid], nice=-7):
            assert nice_of(proc.pid) == (-7, -7)
        assert nice_of(proc.pid) == (0, 0)
    finally:
        proc.communicate(b"", timeout=30)
