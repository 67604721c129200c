"""From tokenized examples to the batches the loop trains on: padding or packing, the inputs a
model accepts, and the count of real (labelled) tokens that normalises the loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from fedtune_trainer.learning.data import IGNORE, Example
from fedtune_trainer.wire.settings import TrainingSpec

if TYPE_CHECKING:
    pass

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The keys of a Batch the model reads; `labels` is the loss's, `tokens` the log's."""


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
