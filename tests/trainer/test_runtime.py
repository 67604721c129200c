"""Where the model runs: precision and quantization choices, the settings a Job cannot honour,
bf16 base weights with an fp32 adapter, and fetching only the config for round 0."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch

from devcluster.s3 import S3Account
from fedtune_trainer.adapter import lora
from fedtune_trainer.learning.data import load_examples
from fedtune_trainer.learning.loading import config_source, load_base, load_tokenizer
from fedtune_trainer.learning.runtime import pick_runtime
from fedtune_trainer.learning.training import train
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.settings import AdapterSpec, TrainingSpec
from tests.trainer.support import Demo

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's choices")


@cpu_only
@pytest.mark.parametrize(
    ("precision", "weights", "autocast"),
    [
        ("auto", torch.float32, None),  # never bf16 by default on a CPU: often slower there
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, torch.bfloat16),  # asked for: half the memory
    ],
)
def test_cpu_precisions(precision: str, weights: torch.dtype, autocast: torch.dtype | None) -> None:
    runtime = pick_runtime(precision)  # type: ignore[arg-type]
    assert (runtime.device.type, runtime.weight_dtype, runtime.autocast_dtype) == (
        "cpu",
        weights,
        autocast,
    )


@cpu_only
@pytest.mark.parametrize(
    ("precision", "quantization", "field"),
    [
        ("auto", "nf4", "adapter.baseQuantization: nf4 needs a CUDA GPU"),
        ("bf16", "nf4", "adapter.baseQuantization: nf4 needs a CUDA GPU"),
        ("fp16", "none", "training.precision: fp16 needs a CUDA GPU"),
    ],
)
def test_settings_a_cpu_job_cannot_honour_name_their_field(
    precision: str, quantization: str, field: str
) -> None:
    with pytest.raises(SettingError, match=field):
        pick_runtime(precision, quantization)  # type: ignore[arg-type]


@cpu_only
def test_bf16_base_weights_train_an_fp32_adapter(demo: Demo) -> None:
    runtime = pick_runtime("bf16")
    base = load_base(str(demo.model), runtime)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in base.parameters())
    model = lora.attach(base, AdapterSpec(r=4, target_modules=["all-linear"]))
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter
    assert {p.dtype for p in adapter.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in adapter.items()}
    tok = load_tokenizer(str(demo.model))
    examples = load_examples(str(demo.client_data(0)), "chat", tok, 512)[:8]
    spec = TrainingSpec(local_steps=2, batch_size=4, learning_rate=1e-2)
    gen = torch.Generator().manual_seed(0)
    result = train(model, examples, spec, runtime, tok.pad_token_id, gen, lambda _: None)
    assert math.isfinite(result.loss)
    assert 0 < result.loss < 10
    assert any(not torch.equal(before[n], p) for n, p in adapter.items())
    assert {p.dtype for p in adapter.values()} == {torch.float32}


@pytest.mark.integration
def test_round_zero_fetches_the_config_and_no_weights(
    demo: Demo, s3: S3Account, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    bucket = s3.bucket(f"fedtune-{uuid.uuid4().hex[:12]}")
    store = open_store(f"{bucket}/models/tiny")
    for path in demo.model.iterdir():
        store.put_file(path.name, path)
    source = config_source(f"{bucket}/models/tiny")
    assert isinstance(source, Path)
    assert source.name == "config.json"
    # The cache's lock file aside, config.json is all that was fetched.
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
    assert cached == ["config.json"]
    spec = AdapterSpec(r=4)
    assert (
        lora.initial_adapter(source, spec, 0).keys()
        == lora.initial_adapter(demo.model, spec, 0).keys()
    )
