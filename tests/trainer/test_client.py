"""The client Job and round 0, in process with the tiny model; failures through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune_trainer import aggregate, client
from fedtune_trainer.adapter import lora
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.codec.decoding import decode
from fedtune_trainer.learning.data import load_examples
from fedtune_trainer.learning.runtime import pick_runtime
from fedtune_trainer.learning.training import mean_loss
from fedtune_trainer.storage import s3
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.marker import claim_root
from fedtune_trainer.wire.contract import STATE_DIR_ENV
from fedtune_trainer.wire.delta_settings import DeltaSpec, QuantizationSpec
from fedtune_trainer.wire.layout import (
    client_prefix,
    client_state_prefix,
    control_prefix,
    global_prefix,
)
from fedtune_trainer.wire.settings import AdapterSpec, LocalPrivacy, StorageLocation, TrainingSpec
from fedtune_trainer.wire.task import AggregateTask, CleanupTask, ClientTask
from tests.trainer.support import Demo, Storage

# PEFT calls an API that transformers 5 deprecates; nothing a user can act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

ADAPTER = AdapterSpec(r=4, alpha=8, dropout=0.0)
TRAINING = TrainingSpec(local_steps=6, batch_size=8, learning_rate=1e-2, seed=1)


def quiet(_: str) -> None:
    pass


def init_task(demo: Demo, store: st.Store, seed: int = 0) -> AggregateTask:
    return AggregateTask(
        run="unit", round=0, base_model=str(demo.model), adapter=ADAPTER,
        storage=StorageLocation(uri=store.uri), rounds=3, seed=seed,
    )  # fmt: skip


def client_task(
    demo: Demo, store: st.Store, round_: int, delta: DeltaSpec, **kw: object
) -> ClientTask:
    base: dict = {
        "run": "unit", "round": round_, "client": "client-0", "base_model": str(demo.model),
        "adapter": ADAPTER, "storage": StorageLocation(uri=store.uri),
        "data_uri": str(demo.client_data(0)), "data": {"format": "chat"}, "training": TRAINING,
        "delta": delta,
    }  # fmt: skip
    return ClientTask(**{**base, **kw})


def global_tensors(store: st.Store, round_: int) -> dict[str, torch.Tensor]:
    _, files = st.read_committed(store, global_prefix(round_), [lora.ADAPTER_WEIGHTS])
    return lora.parse_weights(files[lora.ADAPTER_WEIGHTS])


def client_loss(demo: Demo, tensors: dict[str, torch.Tensor]) -> float:
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(0)), "chat", tok, 512)
    model = lora.attach(AutoModelForCausalLM.from_pretrained(demo.model), ADAPTER, tensors)
    return mean_loss(model, examples, pick_runtime("fp32"), tok.pad_token_id)


def test_round_zero_is_a_seeded_peft_adapter(
    demo: Demo, file_store: st.FileStore, tmp_path: Path
) -> None:
    from peft import PeftModel

    summary = aggregate.run(init_task(demo, file_store), file_store, quiet)
    assert summary.round == 0
    assert summary.record.contributions == []
    assert (summary.record.accepted, summary.record.rejected) == (0, 0)
    first = global_tensors(file_store, 0)
    assert len(first) == 8  # q_proj and v_proj, A and B, two layers
    for name, t in first.items():
        assert (t.abs().sum() == 0) == (".lora_B." in name), name  # B starts at zero
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    assert all(torch.equal(first[k], global_tensors(file_store, 0)[k]) for k in first)
    aggregate.run(init_task(demo, file_store, seed=5), file_store, quiet)
    assert not all(torch.equal(first[k], global_tensors(file_store, 0)[k]) for k in first)

    st.fetch_committed(file_store, global_prefix(0), tmp_path / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo.model), tmp_path / "adapter"
    )
    assert model.peft_config["default"].r == ADAPTER.r


def test_client_uploads_a_delta_that_improves_its_own_loss(
    demo: Demo, file_store: st.FileStore
) -> None:
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    lines: list[str] = []
    summary = client.run(
        client_task(demo, file_store, 1, DeltaSpec(dtype="fp32")), file_store, lines.append
    )

    manifest, files = st.read_committed(file_store, client_prefix(1, "client-0"))
    blob = files[DELTA_FILE]
    assert summary.samples == manifest["samples"] == 48
    assert summary.steps == manifest["steps"] == TRAINING.local_steps
    assert summary.bytes_sent == len(blob) == manifest["encoded_bytes"]
    assert summary.sha256 == manifest["sha256"] == manifest["files"][DELTA_FILE]["sha256"]
    g0 = global_tensors(file_store, 0)
    assert summary.raw_bytes == 4 * sum(t.numel() for t in g0.values())
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(demo.model).parameters())
    assert summary.full_model_bytes == 4 * params
    assert summary.train_loss is not None
    assert summary.train_loss == manifest["train_loss"]
    assert any(line.startswith("step 6/6 loss ") and "tokens/s" in line for line in lines)

    delta = decode(blob)
    assert set(delta) == set(g0)
    local = {k: g0[k] + delta[k] for k in g0}
    assert client_loss(demo, local) < client_loss(demo, g0) - 0.05


def test_the_summary_counts_records_cut_to_length(demo: Demo, file_store: st.FileStore) -> None:
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    lines: list[str] = []
    short = TRAINING.model_copy(update={"max_seq_length": 12, "local_steps": 1})
    t = client_task(demo, file_store, 1, DeltaSpec(dtype="fp32"), training=short)
    summary = client.run(t, file_store, lines.append)
    assert summary is not None
    assert (summary.samples, summary.truncated_records, summary.dropped_records) == (48, 48, 0)
    manifest, _ = st.read_committed(file_store, client_prefix(1, "client-0"))
    assert (manifest["truncated_records"], manifest["dropped_records"]) == (48, 0)
    assert "data: 48 records, 48 truncated, 0 dropped" in lines


LOSSY = DeltaSpec(
    dtype="bf16", top_k=0.1, quantization=QuantizationSpec(bits=8), error_feedback=True
)


def test_a_rerun_overwrites_and_never_feeds_the_residual_back_twice(
    demo: Demo, file_store: st.FileStore
) -> None:
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    prefix = client_state_prefix("client-0")

    def residual(r: int) -> bytes:
        return st.read_committed(file_store, st.versioned_prefix(prefix, r))[1][
            client.RESIDUAL_FILE
        ]

    first = client.run(client_task(demo, file_store, 1, LOSSY), file_store, quiet)
    residual_1 = residual(1)
    again = client.run(client_task(demo, file_store, 1, LOSSY), file_store, quiet)
    assert again.sha256 == first.sha256  # seeded: the same delta, under the same keys
    assert residual(1) == residual_1
    assert file_store.list(client_prefix(1, "client-0") + "/") == [
        f"{client_prefix(1, 'client-0')}/{DELTA_FILE}",
        f"{client_prefix(1, 'client-0')}/manifest.json",
    ]
    # Round 2 trains from global 1 and feeds back residual 1, on every rerun alike.
    aggregate.run(
        AggregateTask(run="unit", round=1, base_model=str(demo.model), adapter=ADAPTER,
                      storage=StorageLocation(uri=file_store.uri), rounds=3, clients=["client-0"],
                      delta=LOSSY),
        file_store, quiet,
    )  # fmt: skip
    logs: list[str] = []
    r2 = client.run(client_task(demo, file_store, 2, LOSSY), file_store, logs.append)
    r2_again = client.run(client_task(demo, file_store, 2, LOSSY), file_store, logs.append)
    assert r2.sha256 == r2_again.sha256
    assert logs.count("error feedback: residual of round 1") == 2
    assert st.committed_versions(file_store, prefix) == [1, 2]
    # Exactly one residual is fed back: sent 2 + residual 2 == true delta 2 + residual 1. Training
    # does not depend on the encoding, so a lossless run of the same round shows the true delta.
    key = client_prefix(2, "client-0")
    sent = decode(st.read_committed(file_store, key)[1][DELTA_FILE])
    res1, res2 = lora.parse_weights(residual_1), lora.parse_weights(residual(2))
    client.run(client_task(demo, file_store, 2, DeltaSpec(dtype="fp32")), file_store, quiet)
    true = decode(st.read_committed(file_store, key)[1][DELTA_FILE])
    assert set(sent) == set(res1) == set(res2) == set(true)
    for k in sent:
        assert float(res1[k].abs().max()) > 0
        torch.testing.assert_close(sent[k] + res2[k], true[k] + res1[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("drift_control", ["none", "scaffold"])
def test_a_client_with_a_state_dir_keeps_its_residual_and_control_variate_there(
    demo: Demo,
    file_store: st.FileStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    drift_control: str,
) -> None:
    """FEDTUNE_STATE_DIR names a volume of the client's own: what it carries from round to round
    stays there, and the run's storage gets the round's commit alone."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    training = TRAINING.model_copy(update={"drift_control": drift_control})
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    logs: list[str] = []
    client.run(client_task(demo, file_store, 1, LOSSY, training=training), file_store, logs.append)

    own = st.FileStore(tmp_path / "state" / "unit")
    assert st.committed_versions(own, client_state_prefix("client-0")) == [1]
    scaffold = drift_control == "scaffold"
    assert st.committed_versions(own, control_prefix("client-0")) == ([1] if scaffold else [])
    assert file_store.list("state/") == []
    assert f"error feedback: this round's residual kept in {own.uri}" in logs
    # A rerun of the round reads its residual from there, like the run's storage.
    assert client.read_residual(own, client_task(demo, file_store, 2, LOSSY))[0] == 1


def test_missing_global_adapter_fails_clearly(demo: Demo, file_store: st.FileStore) -> None:
    with pytest.raises(
        st.ObjectNotFound, match=r"rounds/000004/global: no committed manifest\.json"
    ):
        client.run(client_task(demo, file_store, 5, LOSSY), file_store, quiet)


def run_cli(
    args: list[str], env: dict[str, str], task: object, log: Path
) -> subprocess.CompletedProcess:
    job_env = {**env, "FEDTUNE_TASK": json.dumps(task.wire()), "FEDTUNE_TERMINATION_LOG": str(log)}  # type: ignore[attr-defined]
    return subprocess.run(
        ["fedtune-trainer", *args], env=job_env, capture_output=True, text=True, timeout=300
    )


def test_a_failing_client_exits_non_zero_with_a_short_reason(
    demo: Demo, file_store: st.FileStore, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(demo.client_data(0).read_text().splitlines()[0] + "\n{broken\n")
    log = tmp_path / "termination-log"
    t = client_task(demo, file_store, 1, LOSSY, data_uri=str(bad))
    proc = run_cli(["client"], subprocess_env, t, log)
    assert proc.returncode == 2  # bad input: the Job must not retry it
    reason = log.read_text()
    assert reason.startswith("error: DataError: ")
    assert f"{bad} line 2: invalid JSON" in reason
    assert "\n" not in reason
    assert len(reason) < 600
    assert "Traceback" in proc.stderr
    assert file_store.list("rounds/") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only Job")
def test_a_4bit_base_on_a_cpu_only_job_is_refused_before_any_download(
    demo: Demo, file_store: st.FileStore, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    log = tmp_path / "termination-log"
    adapter = ADAPTER.model_copy(update={"base_quantization": "nf4"})
    t = client_task(demo, file_store, 1, LOSSY, adapter=adapter, base_model="s3://nowhere/model")
    proc = run_cli(["client"], subprocess_env, t, log)
    assert proc.returncode == 2  # the same on every retry: the Job must stop
    assert log.read_text().startswith(
        "error: SettingError: adapter.baseQuantization: nf4 needs a CUDA GPU"
    )
    assert "nowhere" not in proc.stderr  # refused before fetching the model


def test_a_task_of_the_wrong_kind_is_refused(
    demo: Demo, file_store: st.FileStore, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    log = tmp_path / "termination-log"
    proc = run_cli(["aggregate"], subprocess_env, client_task(demo, file_store, 1, LOSSY), log)
    assert proc.returncode == 1
    assert log.read_text() == "error: ValueError: `aggregate` was given a client task"


def test_no_task_is_an_error(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("FEDTUNE_TASK")}
    env["FEDTUNE_TERMINATION_LOG"] = str(tmp_path / "log")
    proc = subprocess.run(
        ["fedtune-trainer", "client"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert (tmp_path / "log").read_text() == (
        "error: RuntimeError: no task: set FEDTUNE_TASK_FILE or FEDTUNE_TASK"
    )


def test_cleanup_deletes_the_run_and_nothing_else(
    storage: Storage, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    s = storage.open()
    assert claim_root(s, "unit", "uid-1", required=True, log=quiet)  # what round 0 does
    for key in ("rounds/000000/global/manifest.json", "state/server/000001/x", "final/a"):
        s.put_bytes(key, b"x")
    if storage.uri.startswith("s3://"):
        bucket, _ = s3.split_s3(storage.uri)
        outside = s3.S3Store(bucket, "runs/test-other", st.S3Settings())
    else:
        outside = st.FileStore(tmp_path / "store-other")
    outside.put_bytes("keep.bin", b"k")
    log = tmp_path / "termination-log"
    task = CleanupTask(run="unit", run_uid="uid-1", storage=StorageLocation(uri=storage.uri))
    proc = run_cli(["cleanup"], {**subprocess_env, **storage.env}, task, log)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(log.read_text()) == {
        "kind": "cleanup", "run": "unit", "uri": s.uri, "deleted": 4
    }  # fmt: skip
    assert s.list("") == []
    assert outside.list("") == ["keep.bin"]


def test_a_tokenizer_may_live_apart_from_the_model(demo: Demo, tmp_path: Path) -> None:
    from fedtune_trainer.learning.loading import load_tokenizer, model_dir

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok_dir / name).write_bytes((demo.model / name).read_bytes())
    tok = load_tokenizer(tok_dir.as_uri())
    assert tok.pad_token == "<pad>"
    assert tok.chat_template is not None
    with pytest.raises(FileNotFoundError, match=r"no config\.json, not a Hugging Face model"):
        model_dir(str(tok_dir))


def test_local_privacy_clips_the_delta_before_it_leaves_the_client(
    demo: Demo, file_store: st.FileStore
) -> None:
    """A site's own guarantee: whatever the client trained, what it uploads is within the site's
    clip norm (lossless encoding, no noise: the uploaded norm is the clipped norm exactly)."""
    aggregate.run(init_task(demo, file_store), file_store, quiet)
    lines: list[str] = []
    task = client_task(
        demo,
        file_store,
        1,
        DeltaSpec(dtype="fp32", error_feedback=False),
        local_privacy=LocalPrivacy(clip_norm=1e-3),
    )
    client.run(task, file_store, lines.append)
    _, files = st.read_committed(file_store, client_prefix(1, "client-0"))
    delta = decode(files[DELTA_FILE])
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
    assert norm == pytest.approx(1e-3, rel=1e-5)
    clipped = next(line for line in lines if line.startswith("local privacy: delta norm "))
    assert float(clipped.split()[4]) > 1e-3  # it was clipped, not merely small
