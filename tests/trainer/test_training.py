"""The training loop: schedule, step count, gradient accumulation equal to one large batch, and
the memory savers (chunked loss, packing, checkpointing) that must not change the gradient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune_trainer.adapter import lora
from fedtune_trainer.learning import loss
from fedtune_trainer.learning.batches import collate, pack, real_tokens
from fedtune_trainer.learning.data import load_examples
from fedtune_trainer.learning.loss import chunked_loss_matches, token_loss_sum
from fedtune_trainer.learning.runtime import pick_runtime
from fedtune_trainer.learning.training import (
    backward,
    enable_gradient_checkpointing,
    lr_factor,
    mean_loss,
    total_steps,
    train,
)
from fedtune_trainer.wire.settings import AdapterSpec, TrainingSpec
from tests.trainer.support import Demo

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize(
    ("schedule", "warmup", "step", "total", "expected"),
    [
        ("constant", 0, 0, 10, 1.0),
        ("constant", 0, 9, 10, 1.0),
        ("constant", 3, 0, 10, 0.25),
        ("constant", 3, 2, 10, 0.75),
        ("constant", 3, 3, 10, 1.0),
        ("linear", 0, 0, 10, 1.0),
        ("linear", 0, 5, 10, 0.5),
        ("linear", 2, 6, 10, 0.5),
        ("cosine", 0, 0, 10, 1.0),
        ("cosine", 0, 5, 10, 0.5),
        ("cosine", 0, 10, 10, 0.0),
    ],
)
def test_learning_rate_schedule(
    schedule: str, warmup: int, step: int, total: int, expected: float
) -> None:
    spec = TrainingSpec(lr_scheduler=schedule, warmup_steps=warmup)  # type: ignore[arg-type]
    assert lr_factor(step, total, spec) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("settings", "examples", "expected"),
    [
        ({"local_steps": 7}, 100, 7),
        ({"local_epochs": 1.0, "batch_size": 4}, 10, 3),
        ({"local_epochs": 2.0, "batch_size": 4, "gradient_accumulation_steps": 2}, 10, 3),
        ({"local_epochs": 0.1, "batch_size": 4}, 10, 1),
        ({"local_steps": 5, "local_epochs": 1.0, "batch_size": 10}, 100, 10),
    ],
)
def test_steps_per_round(settings: dict, examples: int, expected: int) -> None:
    assert total_steps(TrainingSpec(**settings), examples) == expected


def test_accumulated_gradients_equal_one_large_batch(demo: Demo) -> None:
    tok = AutoTokenizer.from_pretrained(demo.model)
    # Records of different lengths: micro-batches hold different numbers of label tokens.
    examples = load_examples(str(demo.client_data(2)), "chat", tok, 512)[:8]
    assert len({e.trained_tokens for e in examples}) > 1
    runtime = pick_runtime("fp32")
    model = lora.attach(AutoModelForCausalLM.from_pretrained(demo.model), AdapterSpec(r=4))
    model.eval()  # no dropout: the two passes must see the same function
    with torch.no_grad():  # make LoRA B non-zero so that A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    scaler = torch.amp.GradScaler(enabled=False)

    def grads(micro: list[list]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        batches = [collate(m, tok.pad_token_id, runtime.device) for m in micro]
        backward(model, batches, runtime, scaler)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = grads([examples])
    split = grads([examples[:2], examples[2:7], examples[7:]])
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in whole.values())


def test_training_lowers_the_loss(demo: Demo) -> None:
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(1)), "chat", tok, 512)[:16]
    runtime = pick_runtime("fp32")

    def loss_after(steps: int) -> float:
        torch.manual_seed(0)
        model = lora.attach(AutoModelForCausalLM.from_pretrained(demo.model), AdapterSpec(r=4))
        spec = TrainingSpec(
            local_steps=steps, batch_size=4, gradient_accumulation_steps=2, learning_rate=0.01
        )
        gen = torch.Generator().manual_seed(1)
        result = train(model, examples, spec, runtime, tok.pad_token_id, gen, lambda _: None)
        assert result.steps == steps
        assert result.samples == len(examples)
        assert result.tokens > 0
        return mean_loss(model, examples, runtime, tok.pad_token_id)

    assert loss_after(12) < loss_after(1) - 0.1


def lora_model(demo: Demo, spec: AdapterSpec) -> torch.nn.Module:
    """The tiny model with a LoRA adapter whose B is non-zero (so that A has a gradient too),
    in eval mode (no dropout: passes that must agree see the same function)."""
    model = lora.attach(AutoModelForCausalLM.from_pretrained(demo.model), spec)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=gen)
    return model


def loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = token_loss_sum(model, batch, chunked)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def assert_same(a: tuple[float, dict], b: tuple[float, dict], rtol: float = 1e-4) -> None:
    assert a[0] == pytest.approx(b[0], rel=rtol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in a[1].values())


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.parametrize(
    ("targets", "chunk_bytes"),
    [
        (["q_proj", "v_proj"], 128 << 20),  # frozen head, one chunk: the fused path
        (["q_proj", "v_proj"], 4 * 512 * 7),  # frozen head, chunks of 7 tokens
        (["all-linear"], 4 * 512 * 5),
        (["q_proj", "lm_head"], 4 * 512 * 5),  # LoRA on the head: checkpointed chunks
    ],
)
def test_chunked_loss_equals_the_full_logits_loss(
    demo: Demo, monkeypatch: pytest.MonkeyPatch, targets: list[str], chunk_bytes: int
) -> None:
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(0)), "chat", tok, 512)[:6]
    model = lora_model(demo, AdapterSpec(r=4, target_modules=targets))
    batch = collate(examples, tok.pad_token_id, torch.device("cpu"))
    monkeypatch.setattr(loss, "CE_CHUNK_BYTES", chunk_bytes)
    assert_same(loss_and_grads(model, batch, True), loss_and_grads(model, batch, False))


def test_packed_batches_train_exactly_like_padded_ones(demo: Demo) -> None:
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(1)), "chat", tok, 512)[:8]
    lengths = sorted(len(e) for e in examples)
    model = lora_model(demo, AdapterSpec(r=4, target_modules=["all-linear"]))
    cpu = torch.device("cpu")
    padded = collate(examples, tok.pad_token_id, cpu)
    capacity = lengths[-1] + lengths[0]  # room for the longest and the shortest in one row
    packed = pack(examples, capacity, tok.pad_token_id, cpu)
    one_row = pack(examples, capacity, tok.pad_token_id, cpu, one_row=True)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert 1 < packed["input_ids"].shape[0] < len(examples)
    assert one_row["input_ids"].shape == (1, sum(lengths))
    assert real_tokens(packed) == real_tokens(one_row) == real_tokens(padded) == sum(lengths)
    reference = loss_and_grads(model, padded, False)
    for batch in (packed, one_row):
        assert_same(loss_and_grads(model, batch, True), reference)
        assert_same(loss_and_grads(model, batch, False), reference)


def test_packing_without_restarted_positions_would_leak_across_examples(demo: Demo) -> None:
    """The check above can fail: the same row read as one sequence gives another loss."""
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(1)), "chat", tok, 512)[:4]
    model = lora_model(demo, AdapterSpec(r=4))
    cpu = torch.device("cpu")
    row = pack(examples, 4096, tok.pad_token_id, cpu, one_row=True)
    leaky = {**row, "position_ids": torch.arange(row["input_ids"].shape[1])[None]}
    padded = collate(examples, tok.pad_token_id, cpu)
    with torch.no_grad():
        reference = float(token_loss_sum(model, padded)[0])
        assert float(token_loss_sum(model, row)[0]) == pytest.approx(reference, rel=1e-4)
        assert float(token_loss_sum(model, leaky)[0]) != pytest.approx(reference, rel=1e-3)


def test_gradient_checkpointing_changes_memory_not_gradients(demo: Demo) -> None:
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(2)), "chat", tok, 512)[:4]
    batch = collate(examples, tok.pad_token_id, torch.device("cpu"))
    model = lora_model(demo, AdapterSpec(r=4, target_modules=["all-linear"]))
    model.train()  # checkpointing is active in training mode only (dropout is 0.05 by default)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = loss_and_grads(model, batch, True)
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert_same(loss_and_grads(model, batch, True), plain)


def test_a_model_whose_logits_are_not_head_of_hidden_falls_back_to_its_own_logits(
    demo: Demo,
) -> None:
    """Cohere and Granite scale their logits after the head (Gemma 2 soft-caps them): the chunked
    path would train the wrong loss, so the one-off check sends such models through their own
    forward."""
    tok = AutoTokenizer.from_pretrained(demo.model)
    examples = load_examples(str(demo.client_data(0)), "chat", tok, 512)[:8]
    runtime = pick_runtime("fp32")
    batch = collate(examples, tok.pad_token_id, torch.device("cpu"))
    assert chunked_loss_matches(lora_model(demo, AdapterSpec(r=4)), batch, runtime)
    model = lora_model(demo, AdapterSpec(r=4))
    base = model.get_base_model()
    base.register_forward_hook(lambda _m, _i, out: out.__class__(logits=0.5 * out.logits))
    assert not chunked_loss_matches(model, batch, runtime)
    full, _ = token_loss_sum(model, batch, chunked=False)
    with torch.no_grad():
        assert mean_loss(model, examples, runtime, tok.pad_token_id) == pytest.approx(
            float(full) / sum(e.trained_tokens for e in examples), rel=1e-5
        )
    lines: list[str] = []
    spec = TrainingSpec(local_steps=1, batch_size=4)
    train(model, examples, spec, runtime, tok.pad_token_id, torch.Generator(), lines.append)
    assert any("full-logits loss" in line for line in lines)


HEAD_MEMORY = """
import os, sys, torch
import torch.nn.functional as F
from fedtune_trainer.learning.loss import head_cross_entropy
torch.set_num_threads(1)
torch.manual_seed(0)
n, hidden, vocab = 4096, 64, 32768
head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
h = torch.randn(n, hidden, requires_grad=True)
t = torch.randint(0, vocab, (n,))
if sys.argv[1] == "chunked":
    loss = head_cross_entropy(h, head, t)
else:
    loss = F.cross_entropy(head(h).float(), t, reduction="sum")
loss.backward()
# The process's own high-water mark: wait4's ru_maxrss would also carry the parent's (pytest's)
# peak, which Linux hands down at fork, and could hide the difference this test measures.
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(float(loss.detach()), float(h.grad.norm()), int(hwm) / 1024)
"""


def peak_rss_mb(mode: str, env: dict[str, str], tmp: Path) -> tuple[float, str]:
    """Peak RSS (MiB, the child's own VmHWM) and stdout of HEAD_MEMORY in a fresh process."""
    out, err = tmp / f"{mode}.out", tmp / f"{mode}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", HEAD_MEMORY, mode],
            # Large buffers go back to the kernel when freed: the peak is what was held at once.
            env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
            stdout=stdout,
            stderr=stderr,
        )
        proc.wait()
    assert proc.returncode == 0, err.read_text()[-2000:]
    *values, peak = out.read_text().split()
    return float(peak), " ".join(values)


@pytest.mark.integration  # two fresh processes, a minute on two busy cores
def test_the_chunked_loss_never_holds_the_full_logits(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """4,096 positions x 32,768 vocabulary: full fp32 logits are 512 MiB, and autograd keeps
    them with their softmax; the chunked loss holds at most 128 MiB of logits at a time."""
    full_rss, full_out = peak_rss_mb("full", subprocess_env, tmp_path)
    chunked_rss, chunked_out = peak_rss_mb("chunked", subprocess_env, tmp_path)
    full_loss, full_grad = map(float, full_out.split())
    loss, grad = map(float, chunked_out.split())
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert grad == pytest.approx(full_grad, rel=1e-4)
    print(f"peak RSS: full logits {full_rss:.0f} MiB, chunked {chunked_rss:.0f} MiB")
    assert full_rss - chunked_rss > 500, (full_rss, chunked_rss)
