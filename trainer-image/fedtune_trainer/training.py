"""A plain PyTorch training loop (nanoGPT style) and the evaluation loss.

No HF Trainer: the loop is short enough to read in one sitting, and every knob in
task.TrainingSpec maps to one visible line (accumulation, schedule, clipping, precision).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, Example
from .runtime import Runtime
from .task import TrainingSpec


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int
    """Distinct examples the client holds (the FedAvg weight)."""
    loss: float
    """Token-weighted mean training loss over the round."""
    tokens: int
    seconds: float


def collate(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
    }


def batch_stream(
    examples: list[Example], batch_size: int, generator: torch.Generator
) -> Iterator[list[Example]]:
    """Endless batches, reshuffled every epoch; the last short batch of an epoch is kept."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())


def lr_factor(step: int, total: int, spec: TrainingSpec) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.lr_scheduler == "constant":
        return 1.0
    span = max(1, total - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    if spec.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(spec: TrainingSpec, n_examples: int) -> int:
    """Optimizer steps of one round: local_epochs wins over local_steps."""
    if spec.local_epochs is not None:
        batches = math.ceil(n_examples / spec.batch_size)
        return max(1, math.ceil(spec.local_epochs * batches / spec.gradient_accumulation_steps))
    assert spec.local_steps is not None
    return spec.local_steps


def backward(
    model: torch.nn.Module,
    micro: list[dict[str, torch.Tensor]],
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
) -> tuple[float, int, int]:
    """Accumulate the gradients of one optimizer step's micro-batches.

    The summed token loss is divided by the label tokens of the *whole step*, so that splitting a
    batch into micro-batches leaves the gradient unchanged. Returns the summed loss, the label
    tokens and the tokens processed.
    """
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    step_loss, seen = 0.0, 0
    for batch in micro:
        with runtime.autocast():
            loss, _ = token_loss_sum(model, batch)
        scaler.scale(loss / max(1, n_tokens)).backward()
        step_loss += loss.item()
        seen += int(batch["attention_mask"].sum())
    return step_loss, n_tokens, seen


def train(
    model: torch.nn.Module,
    examples: list[Example],
    spec: TrainingSpec,
    runtime: Runtime,
    pad_id: int,
    generator: torch.Generator,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> TrainResult:
    """Train the parameters that require grad; log step, loss, lr and tokens/s."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scaler = torch.amp.GradScaler(enabled=runtime.autocast_dtype == torch.float16)
    steps = total_steps(spec, len(examples))
    stream = batch_stream(examples, spec.batch_size, generator)
    every = max(1, steps // 20)
    model.train()
    loss_sum, token_count, start = 0.0, 0, time.perf_counter()
    window_tokens, window_start = 0, start
    for step in range(steps):
        lr = spec.learning_rate * lr_factor(step, steps, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [
            collate(next(stream), pad_id, runtime.device)
            for _ in range(spec.gradient_accumulation_steps)
        ]
        step_loss, n_tokens, seen = backward(model, micro, runtime, scaler)
        window_tokens += seen
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training diverged: loss is {step_loss} at step {step + 1}")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += step_loss
        token_count += n_tokens
        if (step + 1) % every == 0 or step + 1 == steps:
            now = time.perf_counter()
            rate = window_tokens / max(now - window_start, 1e-9)
            log(
                f"step {step + 1}/{steps} loss {step_loss / max(1, n_tokens):.4f} "
                f"lr {lr:.2e} tokens/s {rate:.0f}"
            )
            window_tokens, window_start = 0, now
    model.eval()
    return TrainResult(
        steps=steps,
        samples=len(examples),
        loss=loss_sum / max(1, token_count),
        tokens=token_count,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    examples: list[Example],
    runtime: Runtime,
    pad_id: int,
    batch_size: int = 8,
) -> float:
    """Token-weighted mean next-token loss over `examples` (the evaluation loss)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, runtime.device)
        with runtime.autocast():
            loss, n = token_loss_sum(model, batch)
        total += loss.item()
        count += n
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return total / count
