"""A plain PyTorch training loop (nanoGPT style) and the evaluation loss.

No HF Trainer: the loop is short enough to read in one sitting, and every knob in
task.TrainingSpec maps to one visible line (accumulation, schedule, clipping, precision,
packing, checkpointing, the data-parallel all-reduce).

The loss never materialises the logits of the whole batch: the decoder's last hidden state is
taken at the labelled positions only and pushed through the output head a chunk of tokens at a
time (`head_cross_entropy`). With a 128k vocabulary, fp32 logits of 8 x 2048 tokens are 8 GiB,
twice over with their gradient; chunked, they are 128 MiB whatever the batch.
"""

from __future__ import annotations

import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE, Example
from .runtime import Runtime
from .task import TrainingSpec

if TYPE_CHECKING:
    from .drift import Drift
    from .parallel import World

Batch = dict[str, torch.Tensor]

CE_CHUNK_BYTES = 128 << 20
"""fp32 logits held at once by the chunked loss: tokens per chunk = this / (4 * vocabulary)."""
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The keys of a Batch the model reads; `labels` is the loss's, `tokens` the log's."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int
    """Distinct examples the client holds (the FedAvg weight)."""
    loss: float
    """Token-weighted mean training loss over the round."""
    tokens: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def collate(batch: list[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-pad a batch; padding is masked out of attention and loss by position, so a pad id
    equal to the eos id never hides a real eos."""
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


def pack(
    batch: list[Example], capacity: int, pad_id: int, device: torch.device, one_row: bool = False
) -> Batch:
    """The examples end to end in rows of at most `capacity` tokens (first fit, longest first),
    with position ids that restart at 0 for every example and no attention mask.

    transformers reads restarting position ids as packed sequences: flash-attention runs its
    variable-length kernel over them (`one_row`: it needs the whole micro-batch in one row),
    and sdpa/eager build a block-diagonal causal mask, so no token ever attends to another
    example and the rotary positions are those of the example alone. The first token of each
    example gets no label, as in a padded row, where nothing precedes it. Together these make
    the packed loss and gradient those of the padded batch, with less padding computed (the test
    holds them equal). Rows stay bounded by `capacity` on sdpa/eager because their mask is
    dense: one row of the whole micro-batch would cost attention quadratic in its total length.
    The rest of a row is padding: a block of its own, unlabelled.
    """
    rows: list[list[Example]] = []
    if one_row:
        rows = [list(batch)]
    else:
        room: list[int] = []
        for e in sorted(batch, key=len, reverse=True):
            i = next((i for i, free in enumerate(room) if free >= len(e)), None)
            if i is None:
                rows.append([e])
                room.append(max(capacity, len(e)) - len(e))
            else:
                rows[i].append(e)
                room[i] -= len(e)
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "position_ids": positions.to(device),
        "tokens": torch.tensor(sum(len(e) for e in batch)),
    }


def batch_stream(
    examples: list[Example], batch_size: int, generator: torch.Generator
) -> Iterator[list[Example]]:
    """Endless batches, reshuffled every epoch; the last short batch of an epoch is kept."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def uses_flash_attention(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def make_batch(
    examples: list[Example],
    spec: TrainingSpec,
    pad_id: int,
    device: torch.device,
    model: torch.nn.Module,
) -> Batch:
    if spec.packing:
        capacity = spec.max_seq_length
        return pack(examples, capacity, pad_id, device, one_row=uses_flash_attention(model))
    return collate(examples, pad_id, device)


def real_tokens(batch: Batch) -> int:
    """Tokens of the batch that are not padding (what tokens/s counts)."""
    if "tokens" in batch:
        return int(batch["tokens"])
    return int(batch["attention_mask"].sum())


def model_inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of rows at a
    time, for a frozen output head.

    The gradient with respect to `hidden` is computed in the forward pass, chunk by chunk, while
    each chunk's logits are at hand (softmax minus one-hot, times the weight), and only that
    gradient (the size of `hidden`) is kept for the backward pass. So no logits outlive their
    chunk and none is computed twice: the same three matrix products as the unchunked loss
    (logits, their gradient through the head) minus the weight's gradient, which a frozen head
    does not need. The idea is Liger-Kernel's fused linear cross-entropy, written here in plain
    torch because neither transformers nor torch offers it and Liger needs Triton on a GPU.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        need_grad: bool,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None, None, None  # type: ignore[attr-defined]


def head_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(hidden)` (rows of hidden states) against
    `targets`, in chunks that bound the fp32 logits held at once to CE_CHUNK_BYTES.

    A frozen plain `nn.Linear` head (every PEFT setup that does not train the head) takes the
    fused path above. Any other head (LoRA on `lm_head`, a trained head) is called a chunk at a
    time under activation checkpointing, which frees each chunk's logits after its forward pass
    and recomputes them in the backward pass: the same memory bound for one more head product.
    """
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head(hidden[:1]).shape[-1]
    chunk = max(1, CE_CHUNK_BYTES // (4 * vocab))
    bias = getattr(head, "bias", None)
    frozen = weight is not None and not weight.requires_grad
    if type(head) is torch.nn.Linear and frozen and (bias is None or not bias.requires_grad):
        need_grad = torch.is_grad_enabled() and hidden.requires_grad
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, need_grad)

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(h, t)
    return total


def full_logits_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The summed loss from the model's own full logits: the reference the chunked path is
    checked against, and the fallback for models whose head is more than a linear layer."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder (which ends with the final norm) and the output head of a causal LM, through
    a PEFT wrapper if there is one (PEFT injects LoRA into the base model's own modules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def token_loss_sum(
    model: torch.nn.Module, batch: Batch, chunked: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and their count.

    Chunked: the decoder's last hidden state at the positions that have a label, through the
    head in chunks (`head_cross_entropy`). For chat data, where prompts are most of the tokens,
    this also skips the head for every prompt position.
    """
    if not chunked:
        return full_logits_loss_sum(model, batch)
    decoder, head = _parts(model)
    hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE
    loss = head_cross_entropy(hidden[:, :-1][labelled], head, targets[labelled])
    return loss, int(labelled.sum())


def probe(batch: Batch, width: int = 128) -> Batch:
    """A window of at most `width` tokens of the batch's first row, around its first label."""
    labelled = (batch["labels"][0] != IGNORE).nonzero().flatten()
    start = max(0, int(labelled[0]) - width // 2) if labelled.numel() else 0
    return {k: v[:1, start : start + width] for k, v in batch.items() if v.dim() == 2}


_checked: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
"""chunked_loss_matches's verdict per model, so that it runs once per model, not per call."""


@torch.no_grad()
def chunked_loss_matches(model: torch.nn.Module, batch: Batch, runtime: Runtime) -> bool:
    """Whether the chunked loss equals the model's own on a window of `batch` (in eval mode: no
    dropout).

    The chunked path assumes logits are `head(last hidden state)`. Most causal LMs are exactly
    that; some scale or soft-cap their logits after the head (Gemma 2, Cohere, Granite). Checking
    once, on a small window of the first micro-batch (both paths see the same window, so it
    needs no more context), catches every such model instead of a list of names that would go
    stale, for two short forward passes.
    """
    if model in _checked:
        return _checked[model]
    batch = probe(batch)
    was_training = model.training
    model.eval()
    try:
        with runtime.autocast():
            mine, n = token_loss_sum(model, batch)
            ref, _ = full_logits_loss_sum(model, batch)
    finally:
        model.train(was_training)
    if n == 0:
        return True
    tolerance = 1e-4 if runtime.autocast_dtype is None else 2e-2
    _checked[model] = abs(float(mine) - float(ref)) <= tolerance * max(1.0, abs(float(ref)))
    return _checked[model]


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
