"""The loss without the logits of the whole batch: the decoder's last hidden state is taken at
the labelled positions only and pushed through the output head a chunk of tokens at a time
(`head_cross_entropy`). With a 128k vocabulary, fp32 logits of 8 x 2048 tokens are 8 GiB, twice
over with their gradient; chunked, they are 128 MiB whatever the batch. `probe` checks once per
model that the chunked loss matches the model's own."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedtune_trainer.learning.data import IGNORE
from fedtune_trainer.learning.runtime import Runtime

if TYPE_CHECKING:
    pass
from fedtune_trainer.learning.batches import Batch, model_inputs

CE_CHUNK_BYTES = 128 << 20
"""fp32 logits held at once by the chunked loss: tokens per chunk = this / (4 * vocabulary)."""


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
