"""End to end through the CLIs: 3 clients x 3 rounds of the tiny model over real storage.

Every Job is a `fedtune-trainer` process configured only by its environment, as in a pod: the task
in FEDTUNE_TASK, storage credentials as AWS_* variables, the summary in the termination log. On
s3 the base model and the data come from the bucket too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune_trainer import report
from fedtune_trainer.adapter import lora
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import SUMMARY_MAX_BYTES
from fedtune_trainer.wire.layout import global_prefix
from fedtune_trainer.wire.results import (
    AggregateSummary,
    AnySummary,
    ClientSummary,
    EvaluationSummary,
    RoundRecord,
    parse_summary,
)
from fedtune_trainer.wire.settings import Model
from fedtune_trainer.wire.task import AggregateTask, ClientTask, EvaluateTask
from tests.trainer.support import Demo, Storage

# PEFT calls an API that transformers 5 deprecates; nothing a user can act on.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

ROUNDS = 3
CLIENTS = ["client-0", "client-1", "client-2"]
COMMON = {"run": "e2e", "adapter": {"r": 8, "alpha": 16, "dropout": 0.0}}
DATA = {"format": "chat"}
TRAINING = {"localSteps": 8, "batchSize": 8, "learningRate": 0.01, "seed": 3}
DELTA = {"dtype": "bf16", "topK": 0.25, "quantization": {"bits": 8}, "errorFeedback": True}


def start(command: str, task: Model, env: dict[str, str], log: Path) -> subprocess.Popen:
    job_env = {**env, "FEDTUNE_TASK": json.dumps(task.wire()), "FEDTUNE_TERMINATION_LOG": str(log)}
    return subprocess.Popen(
        ["fedtune-trainer", command],
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, log: Path) -> AnySummary:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args} failed:\n{err[-3000:]}"
    text = log.read_text()
    assert len(text.encode()) <= SUMMARY_MAX_BYTES
    assert out.strip().splitlines()[-1] == text  # the summary also goes to stdout
    return parse_summary(text)


@pytest.fixture
def assets(demo: Demo, storage: Storage) -> dict[str, str]:
    """URIs of the model and the data: local paths on file://, objects in the bucket on s3."""
    if not storage.uri.startswith("s3://"):
        return {
            "model": demo.model.as_uri(),
            "eval": str(demo.eval_data),
            **{c: str(demo.client_data(i)) for i, c in enumerate(CLIENTS)},
        }
    s = storage.open()
    for path in demo.model.iterdir():
        s.put_file(f"assets/model/{path.name}", path)
    for path in demo.data.iterdir():
        s.put_file(f"assets/data/{path.name}", path)
    return {
        "model": s.url("assets/model"),
        "eval": s.url("assets/data/eval.jsonl"),
        **{c: s.url(f"assets/data/client-{i}.jsonl") for i, c in enumerate(CLIENTS)},
    }


# On S3 only: the file store's behaviour is specified by test_store, and each run of this test
# starts 17 trainer processes (minutes of CPU, most of it their imports).
@pytest.mark.parametrize("storage", ["s3"], indirect=True)
def test_three_clients_three_rounds(
    demo: Demo,
    storage: Storage,
    assets: dict[str, str],
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = {**subprocess_env, **storage.env}
    location = {"uri": storage.uri}

    def aggregate_task(r: int) -> AggregateTask:
        return AggregateTask.model_validate({
            **COMMON, "round": r, "baseModel": assets["model"], "storage": location,
            "rounds": ROUNDS, "clients": CLIENTS, "minClients": 2, "delta": DELTA,
        })  # fmt: skip

    def evaluate_task(r: int) -> EvaluateTask:
        return EvaluateTask.model_validate({
            **COMMON, "round": r, "baseModel": assets["model"], "storage": location,
            "data": DATA, "evaluation": {"dataUri": assets["eval"]},
        })  # fmt: skip

    def evaluate(r: int) -> float:
        log = tmp_path / f"evaluate-{r}.log"
        summary = finish(start("evaluate", evaluate_task(r), env, log), log)
        assert isinstance(summary, EvaluationSummary)
        assert summary.round == r
        assert summary.examples == 24
        return summary.eval_loss

    def client_task(r: int, c: str) -> ClientTask:
        return ClientTask.model_validate({
            **COMMON, "round": r, "client": c, "baseModel": assets["model"], "storage": location,
            "data": DATA,
            "dataUri": assets[c], "training": TRAINING, "delta": DELTA,
        })  # fmt: skip

    summaries: list[AggregateSummary] = []
    log = tmp_path / "aggregate-0.log"
    summaries.append(finish(start("aggregate", aggregate_task(0), env, log), log))  # type: ignore[arg-type]
    losses = {0: evaluate(0)}  # the base model: LoRA B starts at zero
    for r in range(1, ROUNDS + 1):
        procs = {
            c: (
                start("client", client_task(r, c), env, tmp_path / f"{c}-{r}.log"),
                tmp_path / f"{c}-{r}.log",
            )
            for c in CLIENTS
        }  # the clients of a round run concurrently, as their Jobs would
        for c, (proc, clog) in procs.items():
            summary = finish(proc, clog)
            assert isinstance(summary, ClientSummary)
            assert summary.client == c
            assert summary.round == r
            assert summary.samples == 48
            assert summary.bytes_sent < summary.raw_bytes < summary.full_model_bytes
        log = tmp_path / f"aggregate-{r}.log"
        agg = finish(start("aggregate", aggregate_task(r), env, log), log)
        assert isinstance(agg, AggregateSummary)
        assert [c.client for c in agg.record.contributions] == CLIENTS
        assert agg.record.rejections == []
        summaries.append(agg)
    losses[ROUNDS] = evaluate(ROUNDS)
    assert losses[ROUNDS] < losses[0] - 0.2, losses
    assert summaries[-1].final_uri == storage.open().url("final")

    s = storage.open()
    for r in range(ROUNDS + 1):
        assert st.read_manifest(s, global_prefix(r)) is not None
        record = RoundRecord.model_validate_json(s.get_bytes(f"rounds/{r:06d}/metrics.json"))
        assert record == summaries[r].record
        assert record.eval_loss is None  # the aggregator does not evaluate ...
        if r:
            assert record.bytes_received > 0
    # ... the evaluation Job's loss is beside the record, and the report shows it.
    assert {r.round: r.eval_loss for r in report.read_records(s) if r.eval_loss} == losses
    # Error feedback state lives in storage, one version per client (older ones pruned).
    for c in CLIENTS:
        assert st.committed_versions(s, f"state/clients/{c}") == [ROUNDS - 1, ROUNDS]

    # The final adapter is a standard PEFT directory.
    final_dir = tmp_path / "final"
    st.fetch_committed(s, "final", final_dir)
    base = AutoModelForCausalLM.from_pretrained(demo.model)
    ids = torch.tensor([[5, 40, 41, 42, 43]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, final_dir)
    loaded = lora.adapter_tensors(model)
    _, files = st.read_committed(s, global_prefix(ROUNDS), [lora.ADAPTER_WEIGHTS])
    expected = lora.parse_weights(files[lora.ADAPTER_WEIGHTS])
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not torch.allclose(model(ids).logits, before)
