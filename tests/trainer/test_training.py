"""The training loop: schedule, step count, and gradient accumulation equal to one large batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune_trainer import lora
from fedtune_trainer.data import load_examples
from fedtune_trainer.runtime import pick_runtime
from fedtune_trainer.task import AdapterSpec, TrainingSpec
from fedtune_trainer.training import backward, collate, lr_factor, mean_loss, total_steps, train
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
