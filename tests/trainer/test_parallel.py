"""Clients on several processes: the container command, and a 2-process client (gloo on the CPU)
that sends the delta a 1-process client sends, or fails the way one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from devcluster.net import free_port
from fedtune_trainer import aggregate, client
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.codec.decoding import decode
from fedtune_trainer.launch import first_failure, multi_node_client_command, record_exit_code
from fedtune_trainer.learning.drift import CONTROL_FILE
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import client_command, gpu_count, processes_for
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.layout import client_prefix
from fedtune_trainer.wire.results import parse_summary
from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation, TrainingSpec
from fedtune_trainer.wire.task import AggregateTask, ClientTask
from tests.trainer.support import Demo

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize(
    ("processes", "command"),
    [
        (1, ["fedtune-trainer", "client"]),
        (2, ["fedtune-trainer", "client", "--nproc-per-node", "2"]),
        (8, ["fedtune-trainer", "client", "--nproc-per-node", "8"]),
    ],
)
def test_client_command(processes: int, command: list[str]) -> None:
    assert client_command(processes) == command


def test_multi_node_command() -> None:
    assert multi_node_client_command(4, 3, "run-r1-a-0.run-r1-a:29400") == [
        "fedtune-trainer", "client", "--nproc-per-node", "4", "--nnodes", "3",
        "--node-rank", "$(JOB_COMPLETION_INDEX)", "--rdzv-endpoint", "run-r1-a-0.run-r1-a:29400",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="one node"):
        multi_node_client_command(2, 1, "x:1")


def test_client_command_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        client_command(0)


@pytest.mark.parametrize(
    ("resources", "gpus", "processes"),
    [
        (None, 0, 1),
        ({"limits": {"cpu": "4", "memory": "16Gi"}}, 0, 1),
        ({"limits": {"nvidia.com/gpu": "1"}}, 1, 1),
        ({"limits": {"nvidia.com/gpu": 4}}, 4, 4),
        ({"requests": {"amd.com/gpu": "2"}}, 2, 2),
        ({"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}}, 2, 2),
    ],
)
def test_one_process_per_gpu(resources: dict[str, Any] | None, gpus: int, processes: int) -> None:
    assert gpu_count(resources) == gpus
    assert processes_for(resources) == processes


BAD_INPUT = "error: DataError: bad.jsonl line 2: invalid JSON"
LOST = "error: DistBackendError: connection closed by peer"


@pytest.mark.parametrize(
    ("reports", "exit_codes", "expected"),
    [
        pytest.param({0: (2, 2, BAD_INPUT)}, {0: 2}, (2, BAD_INPUT), id="one-worker-failed"),
        pytest.param(
            {0: (2, 1, LOST), 1: (1, 2, BAD_INPUT)},
            {0: 1, 1: 2},
            (2, BAD_INPUT),
            id="the-first-report-wins",
        ),
        pytest.param(
            {0: (2, 2, BAD_INPUT), 1: (1, 2, BAD_INPUT)},
            {0: 2, 1: -15},
            (2, BAD_INPUT),
            id="killed-by-the-agent-after-reporting-keeps-its-code",
        ),
        pytest.param(
            {1: (1, None, BAD_INPUT)},
            {0: 2, 1: -15},
            (1, BAD_INPUT),
            id="killed-without-a-recorded-code-is-a-failure",
        ),
        pytest.param(
            {},
            {1: -9},
            (1, "error: WorkerFailed: process 1 died with signal 9; see the pod log"),
            id="died-without-a-report",
        ),
    ],
)
def test_the_launcher_reports_the_first_failure_with_its_workers_exit_code(
    tmp_path: Path,
    reports: dict[int, tuple[int, int | None, str]],
    exit_codes: dict[int, int],
    expected: tuple[int, str],
) -> None:
    """reports: rank -> (when it was written, the exit code it recorded, its text)."""
    for rank, (when, code, text) in reports.items():
        path = tmp_path / f"rank-{rank}"
        if code is not None:
            record_exit_code(path, code)
        path.write_text(text)
        os.utime(path, ns=(when * 10**9, when * 10**9))
    assert first_failure(tmp_path, exit_codes) == expected


def test_a_worker_ends_with_its_output_flushed_and_without_the_interpreter_s_teardown() -> None:
    """The teardown is where gloo can abort a worker that did all its work (launch.end_worker)."""
    program = (
        "import atexit, sys\n"
        "from fedtune_trainer.launch import end_worker\n"
        "atexit.register(lambda: print('teardown'))\n"
        "print('report', end='')\n"
        "print('progress', end='', file=sys.stderr)\n"
        "end_worker(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "report", "progress")


ADAPTER = AdapterSpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
# 5 examples per micro-batch split 3 + 2 across the processes, 2 micro-batches per step.
TRAINING = TrainingSpec(
    local_steps=4, batch_size=5, gradient_accumulation_steps=2, learning_rate=1e-2, seed=2
)
LOSSLESS = DeltaSpec(dtype="fp32", compression="none", error_feedback=False)


def task(demo: Demo, store: st.Store, data: Path | None = None, **training: Any) -> ClientTask:
    return ClientTask(
        run="par", round=1, client="client-0", base_model=str(demo.model), adapter=ADAPTER,
        storage=StorageLocation(uri=store.uri), data_uri=str(data or demo.client_data(0)),
        data={"format": "chat"}, training=TRAINING.model_copy(update=training), delta=LOSSLESS,
    )  # fmt: skip


def initial(demo: Demo, store: st.Store) -> None:
    aggregate.run(
        AggregateTask(run="par", round=0, base_model=str(demo.model), adapter=ADAPTER,
                      storage=StorageLocation(uri=store.uri), rounds=1),
        store, lambda _: None,
    )  # fmt: skip


def run_two_processes(
    t: ClientTask, env: dict[str, str], log: Path
) -> subprocess.CompletedProcess[str]:
    job_env = {**env, "FEDTUNE_TASK": json.dumps(t.wire()), "FEDTUNE_TERMINATION_LOG": str(log)}
    return subprocess.run(
        ["fedtune-trainer", "client", "--nproc-per-node", "2"],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def sent_delta(store: st.Store) -> dict[str, torch.Tensor]:
    return decode(st.read_committed(store, client_prefix(1, "client-0"))[1][DELTA_FILE])


def sent_control(store: st.Store) -> dict[str, torch.Tensor]:
    files = st.read_committed(store, client_prefix(1, "client-0"))[1]
    return decode(files[CONTROL_FILE])


@pytest.mark.integration
@pytest.mark.parametrize(
    "settings",
    [
        {"packing": False},
        {"packing": True},
        # Drift control corrects the reduced gradient once per step, on every process alike.
        {"proximal_mu": 1.0},
        {"drift_control": "scaffold"},
    ],
    ids=["padded", "packed", "fedprox", "scaffold"],
)
def test_two_processes_send_the_one_process_delta(
    demo: Demo,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    settings: dict[str, Any],
    record_property: pytest.RecordProperty,
) -> None:
    one, two = st.FileStore(tmp_path / "one"), st.FileStore(tmp_path / "two")
    for s in (one, two):
        initial(demo, s)
    single = client.run(task(demo, one, **settings), one, lambda _: None)
    log = tmp_path / "termination-log"
    proc = run_two_processes(task(demo, two, **settings), subprocess_env, log)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = parse_summary(log.read_text())
    assert proc.stdout.strip() == log.read_text()  # the launcher reports once, for both
    assert "2 processes" in proc.stderr
    assert single is not None
    assert (summary.samples, summary.steps) == (single.samples, single.steps)
    assert summary.train_loss == pytest.approx(single.train_loss, rel=1e-5)
    a, b = sent_delta(one), sent_delta(two)
    assert a.keys() == b.keys()
    # The same sums in another order: float rounding, which Adam's normalisation magnifies on
    # the few coordinates whose gradient is nearly zero, so compare each tensor as a whole.
    errors = {n: float((b[n] - a[n]).norm() / a[n].norm()) for n in a if a[n].norm() > 0}
    worst = max(errors.values())
    record_property("delta_relative_error_max", worst)
    print(f"2 processes against 1: worst relative L2 error of a delta tensor {worst:.2e}")
    assert worst < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert max(float(t.abs().max()) for t in a.values()) > 1e-3  # it did train
    assert summary.control_bytes == single.control_bytes
    if settings.get("drift_control") == "scaffold":
        ca, cb = sent_control(one), sent_control(two)
        for n in ca:
            torch.testing.assert_close(cb[n], ca[n], rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_two_nodes_of_one_process_send_the_one_process_delta(
    demo: Demo, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """The multi-node design without Kubernetes: two launchers (the pods of an Indexed Job, on
    one host here), node 0 hosting the rendezvous and reporting, node 1 only training."""
    one, two = st.FileStore(tmp_path / "one"), st.FileStore(tmp_path / "two")
    for s in (one, two):
        initial(demo, s)
    single = client.run(task(demo, one), one, lambda _: None)
    endpoint = f"127.0.0.1:{free_port()}"
    wire = json.dumps(task(demo, two).wire())
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"termination-log-{node}")
        command = multi_node_client_command(1, 2, endpoint, node_rank=str(node))
        env = {**subprocess_env, "FEDTUNE_TASK": wire, "FEDTUNE_TERMINATION_LOG": str(logs[-1])}
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = parse_summary(logs[0].read_text())
    assert not logs[1].exists()  # node 1 has nothing to report
    assert outputs[1][0] == ""
    assert single is not None
    assert summary.train_loss == pytest.approx(single.train_loss, rel=1e-5)
    a, b = sent_delta(one), sent_delta(two)
    worst = max(float((b[n] - a[n]).norm() / a[n].norm()) for n in a if a[n].norm() > 0)
    assert worst < 1e-4


@pytest.mark.integration
def test_a_failing_worker_fails_the_client_with_its_reason_and_exit_code(
    demo: Demo, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    store = st.FileStore(tmp_path / "store")
    initial(demo, store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(demo.client_data(0).read_text().splitlines()[0] + "\n{broken\n")
    log = tmp_path / "termination-log"
    proc = run_two_processes(task(demo, store, bad), subprocess_env, log)
    assert proc.returncode == 2  # invalid input, as from one process: the Job must not retry
    reason = log.read_text()
    assert reason.startswith("error: DataError: ")
    assert f"{bad} line 2: invalid JSON" in reason
    assert "\n" not in reason
    assert store.list(client_prefix(1, "client-0")) == []
