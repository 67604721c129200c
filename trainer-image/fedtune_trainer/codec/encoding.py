"""The GradualDiff-Fed delta codec: `delta = local - global`, compressed, in a safetensors file.

Pure on purpose: tensors in, bytes (or tensors) out, no storage, no clock, no globals. The client
encodes, the aggregator decodes, and the tests hold both to the stated error bounds.

Pipeline per tensor (each stage optional, configured by `settings.DeltaSpec`):

1. error feedback: `x = delta + residual`, where the residual is what earlier rounds did not send;
2. cast to bf16/fp16 (round to nearest even);
3. top-k: keep the k = ceil(top_k * n) entries of largest magnitude; their positions are stored as
   a bitmap (n/8 bytes) or as int32 gaps between sorted indices (4k bytes), whichever is smaller;
4. blockwise absmax quantization of the kept values to 8 or 4 bits, one fp32 scale per block
   (4-bit values are stored offset by 8 and packed two per byte);
5. zstd on every stored part that it shrinks (tiny parts such as a single scale are kept raw).

What the receiver decodes is `sent`; the new residual is `x - sent`. So, summed over rounds, what a
client sent equals the sum of its true deltas minus the latest residual, whatever the compression.

Stated error bounds for one tensor, element by element, from `x` to the decoded value:
- fp32, top_k 1, no quantization: exact (bit for bit);
- bf16 cast: |err| <= 2^-8 |x| (+ 2^-133 below the normal range); fp16: <= 2^-11 |x| + 2^-25;
- quantization with b bits: |err| <= absmax(block) / (2 * qmax) with qmax = 2^(b-1) - 1,
  on top of the cast error of the value it quantizes;
- top-k: a kept entry has the error above; a dropped entry is at most the k-th largest magnitude.

The container: safetensors, one to three parts per tensor, keyed `<i>.<part>` where i is the
tensor's position in the sorted names and part is v (values), s (scales), m (position bitmap) or
x (position gaps); the metadata key "fedtune" holds one JSON document with the format, the
encoding and, per tensor, its name, shape, k, position coding and which parts are zstd frames
(stored as uint8). Each part's dtype and length follow from those (`part_spec`), so the reader
checks every part against what it must be rather than trusting what the file says. Names appear
once, in the metadata, so that the header stays small next to a sparse payload.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedtune_trainer.codec.container import (
    CAST,
    FORMAT,
    METADATA_KEY,
    kept_count,
    position_coding,
    qmax,
    to_bytes,
)
from fedtune_trainer.codec.decoding import decode_tensor, read_layout
from fedtune_trainer.wire.settings import DeltaSpec


@dataclass(frozen=True)
class Encoded:
    """The result of encoding one client's delta."""

    blob: bytes
    """The safetensors file, ready to upload."""
    sent: dict[str, torch.Tensor]
    """Exactly what `decode(blob)` returns (fp32): what the aggregator will see."""
    residual: dict[str, torch.Tensor] | None
    """What was not sent (fp32), for the next round; None when lossless or without feedback."""
    raw_bytes: int
    """The same delta as dense fp32: the baseline the encoding is measured against."""

    @property
    def encoded_bytes(self) -> int:
        return len(self.blob)


def run_encoding(spec: DeltaSpec) -> dict[str, Any]:
    """The encoding a file made with `spec` declares (without error_feedback, the client's own
    business: it changes what is sent next round, not how this file reads)."""
    return {
        "dtype": spec.dtype,
        "top_k": spec.top_k,
        "bits": spec.quantization.bits,
        "block_size": spec.quantization.block_size,
        "compression": spec.compression,
    }


def compute_delta(
    local: Mapping[str, torch.Tensor], global_: Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """`local - global` in fp32 for the trainable tensors `names`."""
    out = {}
    for name in names:
        a, b = local[name], global_[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: local shape {tuple(a.shape)} != global {tuple(b.shape)}")
        out[name] = a.detach().float().cpu() - b.detach().float().cpu()
    return out


def dense_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Size of the tensors as dense fp32."""
    return sum(t.numel() * 4 for t in tensors.values())


# --------------------------------------------------------------------------------------------
# Stages (each a pure function on 1-D tensors)
# --------------------------------------------------------------------------------------------


def topk_select(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest-magnitude entries of a 1-D tensor."""
    if k >= values.numel():
        return torch.arange(values.numel(), dtype=torch.int64)
    idx = torch.topk(values.float().abs(), k, sorted=False).indices
    return torch.sort(idx).values


def pack_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    """A bitmap of n bits (LSB first), set at `indices`, as uint8."""
    bits = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
    bits[indices] = 1
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def quantize(values: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a 1-D tensor: (codes, fp32 scales, one per block).

    8 bits: int8 codes in [-127, 127]. 4 bits: codes in [-7, 7] stored as (code + 8), two per
    byte (low nibble first).
    """
    n = values.numel()
    nblocks = math.ceil(n / block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32)
    padded[:n] = values.float()
    blocks = padded.view(nblocks, block)
    scales = blocks.abs().amax(dim=1) / qmax(bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp(-qmax(bits), qmax(bits)).to(torch.int8)
    codes = codes.view(-1)[:n]
    if bits == 8:
        return codes, scales
    nibbles = torch.full((math.ceil(n / 2) * 2,), 8, dtype=torch.uint8)
    nibbles[:n] = (codes + 8).to(torch.uint8)
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scales


# --------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------


def encode(
    delta: Mapping[str, torch.Tensor],
    spec: DeltaSpec,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> Encoded:
    """Encode a delta (name -> tensor) with `spec`, adding `residual` first when feedback is on."""
    import safetensors.torch
    import zstandard

    use_feedback = spec.error_feedback and not spec.lossless
    compressor = zstandard.ZstdCompressor(level=spec.compression_level)
    cast = CAST[spec.dtype]
    bits, block = spec.quantization.bits, spec.quantization.block_size
    parts: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    sent: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(delta)):
        x = delta[name].detach().float().cpu()
        if use_feedback and residual is not None and name in residual:
            r = residual[name].float().cpu()
            if r.shape != x.shape:
                raise ValueError(f"{name}: residual shape {tuple(r.shape)} != {tuple(x.shape)}")
            x = x + r
        flat = x.reshape(-1)
        n = flat.numel()
        values = flat.to(cast)
        entry: dict[str, Any] = {"i": i, "shape": list(x.shape)}
        tensor_parts: dict[str, torch.Tensor] = {}
        if spec.top_k < 1.0:
            k = kept_count(n, spec.top_k)
            idx = topk_select(values, k)
            values = values[idx]
            entry["k"] = k
            if position_coding(n, k) == "m":
                entry["pos"] = "m"
                tensor_parts["m"] = pack_mask(idx, n)
            else:
                entry["pos"] = "x"
                gaps = torch.diff(idx, prepend=torch.zeros(1, dtype=idx.dtype))
                tensor_parts["x"] = gaps.to(torch.int32)
        if bits:
            codes, scales = quantize(values, bits, block)
            tensor_parts["v"], tensor_parts["s"] = codes, scales
        else:
            tensor_parts["v"] = values.contiguous()
        out = decode_tensor(entry, bits, block, lambda p, tp=tensor_parts: tp[p])
        sent[name] = out
        if use_feedback:
            new_residual[name] = x - out
        zstd_parts = ""
        for part, t in tensor_parts.items():
            key = f"{i}.{part}"
            parts[key] = t.contiguous()
            if spec.compression == "zstd":
                raw = to_bytes(t)
                packed = compressor.compress(raw)
                if len(packed) < len(raw):
                    zstd_parts += part
                    parts[key] = torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone()
        if zstd_parts:
            entry["z"] = zstd_parts
        layout[name] = entry
    encoding = {**run_encoding(spec), "error_feedback": use_feedback}
    # One metadata key: safetensors writes its metadata map in hash order, so with several keys
    # the same delta would not always be the same bytes (and a rerun not the same checksum).
    document = {"format": FORMAT, "encoding": encoding, "tensors": layout}
    metadata = {METADATA_KEY: json.dumps(document, separators=(",", ":"))}
    blob = safetensors.torch.save(parts, metadata=metadata)
    return Encoded(
        blob=blob,
        sent=sent,
        residual=new_residual if use_feedback else None,
        raw_bytes=dense_bytes(delta),
    )


def manifest_fields(
    encoded: Encoded,
    *,
    run: str,
    round_: int,
    client: str,
    samples: int,
    steps: int,
    train_loss: float | None,
) -> dict[str, Any]:
    """What a client's manifest says about its delta, next to the file list the commit adds."""
    import hashlib

    return {
        "kind": "delta",
        "run": run,
        "round": round_,
        "client": client,
        "samples": samples,
        "steps": steps,
        "train_loss": train_loss,
        "raw_bytes": encoded.raw_bytes,
        "encoded_bytes": encoded.encoded_bytes,
        "sha256": hashlib.sha256(encoded.blob).hexdigest(),
        "encoding": read_layout(encoded.blob).encoding,
    }
