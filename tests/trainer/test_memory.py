"""The aggregator streams: its peak memory does not grow with the number of clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.results import AggregateSummary, parse_summary
from tests.trainer.aggregation_support import put_delta, random_tensors, task, write_global
from tests.trainer.support import run_job_measured

SHAPES = {"big.lora_A.weight": (1024, 1024), "big.lora_B.weight": (1024, 1024)}
DELTA_BYTES = 4 * sum(a * b for a, b in SHAPES.values())  # 8 MiB per client


def peak_rss_of_aggregation(root: Path, clients: int, env: dict[str, str]) -> int:
    """Peak resident set size (bytes) of `fedtune-trainer aggregate` over `clients` deltas."""
    store = st.FileStore(root)
    write_global(store, 0, random_tensors(0, shapes=SHAPES))
    names = [f"c{i:02d}" for i in range(clients)]
    for i, name in enumerate(names):
        put_delta(store, 1, name, random_tensors(i + 1, 0.01, shapes=SHAPES))
    termination = root / "termination-log"
    job_env = {
        **env,
        "FEDTUNE_TASK": json.dumps(task(store, 1, names, min_clients=clients).wire()),
        "FEDTUNE_TERMINATION_LOG": str(termination),
        # glibc's dynamic mmap threshold makes the peak depend on the order of frees (+-15 MiB
        # between identical runs); a fixed threshold returns every large buffer to the kernel on
        # free, so the peak measures what is held at once.
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    # The process's own peak (VmHWM), not wait4's ru_maxrss: Linux folds the parent's
    # high-water mark into a child's at fork/exec, so that would be at least pytest's size.
    run = run_job_measured("aggregate", job_env)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = parse_summary(termination.read_text())
    assert isinstance(summary, AggregateSummary)
    assert summary.record.accepted == clients
    return run.peak_rss


def test_peak_memory_does_not_grow_with_clients(
    tmp_path: Path, subprocess_env: dict[str, str], record_property: pytest.RecordProperty
) -> None:
    few = peak_rss_of_aggregation(tmp_path / "two", 2, subprocess_env)
    many = peak_rss_of_aggregation(tmp_path / "sixteen", 16, subprocess_env)
    record_property("peak_rss_2_clients", few)
    record_property("peak_rss_16_clients", many)
    print(
        f"aggregation peak RSS: 2 clients {few / 2**20:.1f} MiB, 16 clients {many / 2**20:.1f} MiB"
    )
    # Holding all 16 deltas would add 14 x 8 MiB = 112 MiB; streaming adds less than one delta.
    assert many - few < DELTA_BYTES
