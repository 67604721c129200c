"""A plain PyTorch training loop (nanoGPT style) and the evaluation loss.

No HF Trainer: the loop is short enough to read in one sitting, and every knob in
settings.TrainingSpec maps to one visible line (accumulation, schedule, clipping, precision,
packing, checkpointing, the data-parallel all-reduce). Batches come from batches.py and the
loss, which never materialises the logits of the whole batch, from loss.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedtune_trainer.learning.data import IGNORE, Example
from fedtune_trainer.learning.runtime import Runtime
from fedtune_trainer.wire.settings import TrainingSpec

if TYPE_CHECKING:
    from fedtune_trainer.learning.drift import Drift
    from fedtune_trainer.learning.parallel import World
from fedtune_trainer.learning.batches import Batch, batch_stream, collate, make_batch, real_tokens
from fedtune_trainer.learning.loss import chunked_loss_matches, token_loss_sum


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int
    """Distinct examples the client holds (the FedAvg weight)."""
    loss: float
    """Token-weighted mean training loss over the round."""
    tokens: int
    seconds: float


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' per-layer activation checkpointing, non-reentrant: the reentrant variant
    needs inputs that require grad (PEFT's `enable_input_require_grads` hook) and breaks with
    frozen embeddings; the non-reentrant one needs neither."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


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
    micro: list[Batch],
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    n_tokens: int | None = None,
    chunked: bool = True,
) -> tuple[float, int, int]:
    """Accumulate the gradients of one optimizer step's micro-batches.

    The summed token loss is divided by the label tokens of the *whole step* (`n_tokens`: of
    every process's micro-batches when the step is split across processes; by default those
    given here), so that splitting a batch into micro-batches, or across processes whose
    gradients are then summed, leaves the gradient unchanged. Returns the summed loss, the label
    tokens and the real (non-padding) tokens processed here.
    """
    if n_tokens is None:
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    step_loss, seen = 0.0, 0
    for batch in micro:
        with runtime.autocast():
            loss, _ = token_loss_sum(model, batch, chunked)
        scaler.scale(loss / max(1, n_tokens)).backward()
        step_loss += loss.item()
        seen += real_tokens(batch)
    return step_loss, n_tokens, seen


def train(
    model: torch.nn.Module,
    examples: list[Example],
    spec: TrainingSpec,
    runtime: Runtime,
    pad_id: int,
    generator: torch.Generator,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    world: World | None = None,
    drift: Drift | None = None,
) -> TrainResult:
    """Train the parameters that require grad; log step, loss, lr and tokens/s.

    Data parallel when `world` has several processes: every process draws the same batches
    (same generator seed), takes its share of each micro-batch's examples (every world.size-th
    one), and the gradients are summed across processes once per optimizer step, after
    accumulation. Each process's loss is normalised by the label tokens of the whole step, so
    the sum is exactly the one-process gradient, and the same clipped update leaves every
    process with the same adapter (checked at the end, see parallel.World.check_same). A
    process whose share of a micro-batch is empty just contributes zero.

    Why not DistributedDataParallel: DDP buckets gradients to overlap their all-reduce with the
    backward pass, which matters when the gradient is the model's size. Here it is the
    adapter's (a few MB to a few hundred), reduced once per step; a single flat all-reduce is
    simpler, and it lets the loss call the decoder directly (chunked loss) instead of through
    the wrapped forward that DDP's bookkeeping needs.

    `drift` (FedProx, SCAFFOLD; see drift.py) corrects each step's gradient after the
    all-reduce and the unscaling, before clipping: once per optimizer step, on every process.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scaler = torch.amp.GradScaler(enabled=runtime.autocast_dtype == torch.float16)
    steps = total_steps(spec, len(examples))
    stream = batch_stream(examples, spec.batch_size, generator)
    every = max(1, steps // 20)
    model.train()
    chunked: bool | None = None
    loss_sum, token_count, start = 0.0, 0, time.perf_counter()
    window_tokens, window_start = 0, start
    for step in range(steps):
        lr = spec.learning_rate * lr_factor(step, steps, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        drawn = [next(stream) for _ in range(spec.gradient_accumulation_steps)]
        n_tokens = sum(e.trained_tokens for examples_ in drawn for e in examples_)
        micro = [
            make_batch(share, spec, pad_id, runtime.device, model)
            for share in (examples_[rank::size] for examples_ in drawn)
            if share
        ]
        if chunked is None and micro:  # a process with no share yet checks at its first one
            chunked = chunked_loss_matches(model, micro[0], runtime)
            if not chunked:
                log("warning: this model's logits are more than head(hidden): full-logits loss")
        step_loss, _, seen = backward(model, micro, runtime, scaler, n_tokens, chunked is not False)
        if world is not None and size > 1:
            world.all_reduce_grads(params)
            step_loss, seen = world.all_reduce_sum([step_loss, float(seen)])
            seen = int(seen)
        window_tokens += seen
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training diverged: loss is {step_loss} at step {step + 1}")
        scaler.unscale_(optimizer)
        if drift is not None:
            drift.apply()
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
    if world is not None and size > 1:
        world.check_same(params)
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
    chunked: bool | None = None
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, runtime.device)
        if chunked is None:
            chunked = chunked_loss_matches(model, batch, runtime)
        with runtime.autocast():
            loss, n = token_loss_sum(model, batch, chunked)
        total += loss.item()
        count += n
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return total / count
