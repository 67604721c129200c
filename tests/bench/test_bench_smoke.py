"""The benchmarks keep working: each runs at tiny sizes and writes a JSON document with its rows.

Not a measurement (the sizes are far too small to mean anything, and `make test` runs with one
thread): only the code paths of `make bench`, end to end, including the child processes of the
aggregation benchmark and, on the devcluster, the operator's with the fake trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import communication, operator_overhead, records
from bench.common import Result, machine
from devcluster.testing import DevCluster

REQUIRED = {
    "communication": {"config", "bytes_per_client_round", "ratio_vs_full_model", "eval_loss"},
    "parity": {"config", "eval_loss", "ratio_vs_centralized"},
    "client": {"method", "tokens_per_s", "vs_plain", "peak_rss_mb", "step_mb"},
    "aggregation": {"clients", "method", "seconds", "peak_rss_mb"},
    "operator": {"metric", "median_s", "p95_s", "mb", "cpu_s"},
}
MACHINE_KEYS = {"cpu", "cpu_cores", "ram_gib", "torch", "device"}

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch space shared by the module's benchmarks, as in one `python -m bench` run."""
    return tmp_path_factory.mktemp("bench-work")


def check_document(path: Path, name: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == name
    assert set(doc["machine"]) >= MACHINE_KEYS
    assert doc["rows"], f"{name}: no rows"
    for row in doc["rows"]:
        assert REQUIRED[name] <= set(row), f"{name}: row {row} lacks {REQUIRED[name] - set(row)}"
    return doc


def written(result: Result, out: Path, name: str) -> dict:
    assert result.name == name
    table = result.table()
    assert table.count("\n") == len(result.rows) + 1  # header, alignment, one line per row
    return check_document(result.write(out, machine()), name)


def test_communication(work: Path, tmp_path: Path) -> None:
    doc = written(
        bench_main.run_one("communication", True, work, tmp_path), tmp_path, "communication"
    )
    configs = {r["config"] for r in doc["rows"]}
    assert {"full-model fp32 FedAvg", "fp32 adapter delta", "full model bf16"} <= configs
    tiny = [r for r in doc["rows"] if r["eval_loss"] is not None]
    assert len(tiny) == 2 + len(communication.ENCODINGS)  # full-model FedAvg at two rates
    full = next(r for r in tiny if r["config"] == "full-model fp32 FedAvg")
    assert full["ratio_vs_full_model"] == pytest.approx(1.0)
    deltas = [r for r in tiny if not r["config"].startswith("full-model")]
    assert all(r["bytes_per_client_round"] < full["bytes_per_client_round"] for r in deltas)
    reference = next(r for r in tiny if r["config"] == communication.REFERENCE)
    assert reference["loss_cost"] == 0
    assert reference["ratio_vs_fp32_delta"] == 1
    assert all(r["run_bytes_per_client"] > r["bytes_per_client_round"] for r in deltas) == (
        doc["settings"]["rounds"] > 1
    )
    # The residual: kept by the error-feedback encodings alone, a dense fp32 adapter per round.
    for row in deltas:
        assert (row["state_bytes_per_client_round"] > 0) == ("EF" in row["config"]), row
    # What the docs show of a record: every config's loss per round and its cost per round.
    per_round = records.tables(doc)
    assert per_round["loss-per-round"].count("\n") == 1 + len(tiny)  # header, alignment, rows
    assert per_round["cost-per-round"].count("\n") == len(tiny)  # the reference has no cost
    # The sample run report the aggregator wrote, fetched out of the run's storage.
    assert (tmp_path / "communication-report" / "report.html").is_file()
    assert (tmp_path / "communication.png").is_file()


def test_parity(work: Path, tmp_path: Path) -> None:
    doc = written(bench_main.run_one("parity", True, work, tmp_path), tmp_path, "parity")
    central = doc["rows"][0]
    assert central["config"].startswith("centralized")
    assert central["ratio_vs_centralized"] == pytest.approx(1.0)
    federated = [r for r in doc["rows"] if r["config"].startswith("federated")]
    assert {r["optimizer_steps"] for r in federated} == {central["optimizer_steps"]}


def test_client(work: Path, tmp_path: Path) -> None:
    doc = written(bench_main.run_one("client", True, work, tmp_path), tmp_path, "client")
    methods = {r["method"] for r in doc["rows"]}
    assert {"transformers + peft", "fedtune", "fedtune + checkpointing"} <= methods
    plain = next(r for r in doc["rows"] if r["method"] == "transformers + peft")
    assert plain["vs_plain"] == pytest.approx(1.0)
    for row in doc["rows"]:
        assert row["tokens_per_s"] > 0
        assert row["peak_rss_mb"] > 0
        if row["method"] in ("fedtune", "fedtune + checkpointing"):  # packing batches differ
            assert row["loss_vs_plain"] < 1e-3  # same model, batches and steps: same training


def test_aggregation(work: Path, tmp_path: Path) -> None:
    doc = written(bench_main.run_one("aggregation", True, work, tmp_path), tmp_path, "aggregation")
    assert {(r["clients"], r["method"]) for r in doc["rows"]} == {
        (n, m) for n in (2, 4) for m in ("streaming", "load-everything")
    }
    for row in doc["rows"]:
        assert row["peak_rss_mb"] > row["rss_after_import_mb"] > 0
        assert row["max_abs_diff_vs_streaming"] < 1e-6  # both methods wrote the same adapter
    assert not list(work.glob("aggregation-store*")), "the deltas were left behind"


def test_operator(devcluster: DevCluster, tmp_path: Path) -> None:
    """On the session's devcluster, the fake trainer put on the Jobs' PATH through the runs'
    spec.template.env (the benchmark's own cluster puts it on the kubelet's pod PATH)."""
    sizes = operator_overhead.SMOKE
    path = operator_overhead.pod_path(devcluster.cluster.dir)
    rows = operator_overhead.measure(devcluster, sizes, tmp_path, job_env={"PATH": path})
    result = Result(name="operator", title="smoke", columns=list(rows[0]), rows=rows)
    doc = written(result, tmp_path, "operator")
    metric = {r["metric"]: r for r in doc["rows"]}
    phases = ["1 run", "2 runs x 2 clients", "2 runs x 2 clients, control plane first"]
    # Hand-offs (a) and (b), each followed by the operator's own share of it and that share less
    # its waits on the API server.
    handoffs = [r for r in doc["rows"] if r["metric"].startswith(("(a)", "(b)"))]
    for phase in phases:
        of = [r for r in handoffs if r["metric"].endswith(f", {phase}")]
        assert len(of) == 6, phase
        for row in of:
            assert row["samples"] > 0
            assert 0 <= row["median_s"] <= row["p95_s"] < sizes.timeout_s
        shares = [r for r in of if "the operator's own" in r["metric"]]
        own = [r for r in of if "not waiting on the API server" in r["metric"]]
        assert len(shares) == len(own) == 2
        for share, rest in zip(shares, own, strict=True):
            assert rest["median_s"] <= share["median_s"] + 1e-9
    for phase in phases[1:]:
        for request in ("status write", "Job create"):
            server = metric[f"the API server's own time for the operator's {request}, {phase}"]
            assert server["samples"] > 0
            assert 0 < server["median_s"] <= server["p95_s"]
        during = f"CPU while {phase} x {sizes.concurrent_rounds} rounds ran: "
        cpu = {
            name.removeprefix(during): r["cpu_s"]
            for name, r in metric.items()
            if name.startswith(during)
        }
        machine_busy = next(v for name, v in cpu.items() if name.startswith("the machine, busy"))
        parts = {name: v for name, v in cpu.items() if not name.startswith("the machine")}
        assert set(parts) == {*operator_overhead.COMPONENTS, "operator", "the pods and the rest"}
        assert parts["kube-apiserver"] > 0
        assert parts["operator"] > 0
        assert machine_busy == pytest.approx(sum(parts.values()))
    memory = [r for r in doc["rows"] if r["mb"] is not None]
    assert len(memory) == 3
    assert all(r["mb"] > 0 for r in memory)
