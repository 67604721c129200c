"""The GradualDiff-Fed delta codec: `delta = local - global`, compressed, in a safetensors file.

Pure on purpose: tensors in, bytes (or tensors) out, no storage, no clock, no globals. The client
encodes, the aggregator decodes, and the tests hold both to the stated error bounds.

Pipeline per tensor (each stage optional, configured by `delta_settings.DeltaSpec`):

1. error feedback: `x = delta + residual`, where the residual is what earlier rounds did not send;
2. cast to bf16/fp16 (round to nearest even);
3. top-k: keep the k = ceil(top_k * n) entries of largest magnitude; their positions are stored as
   a bitmap (n/8 bytes), as int32 gaps between sorted indices (4k bytes) or Elias-Fano (about
   k (2 + log2(n/k)) bits), whichever is smallest as stored (after zstd). (uint16 gaps with
   escapes were not added: their size depends on the gaps, so a reader could not fix it from n
   and k, and Elias-Fano is smaller wherever k > n / 2^14, i.e. wherever gaps fit 16 bits.)
4. blockwise absmax quantization of the kept values, one fp32 scale per block: uniform at 8 or 4
   bits (4-bit values stored offset by 8, two per byte), rounded to nearest or stochastically;
   or at 4 bits to the nearest level of a 16-value codebook (nf4, fp4), the nibble its index;
5. zstd on every stored part that it shrinks (tiny parts such as a single scale are kept raw).

What the receiver decodes is `sent`; the new residual is `x - sent`. So, summed over rounds, what a
client sent equals the sum of its true deltas minus the latest residual, whatever the compression
(quantization alone included: top_k 1 with bits 4/8 and error_feedback carries the rounding error).
A cast alone (bf16/fp16, no top-k, no quantization) keeps no residual (`DeltaSpec.feeds_back`).

Stated error bounds for one tensor, element by element, from `x` to the decoded value:
- fp32, top_k 1, no quantization: exact (bit for bit);
- bf16 cast: |err| <= 2^-8 |x| (+ 2^-133 below the normal range); fp16: <= 2^-11 |x| + 2^-25;
- uniform quantization with b bits: |err| <= absmax(block) / (2 * qmax) with qmax = 2^(b-1) - 1,
  on top of the cast error of the value it quantizes;
- the same with stochastic rounding: |err| < absmax(block) / qmax (one step), and unbiased:
  E[decoded] = x, each value rounded up with probability its fraction of a step (the draws are
  seeded by `encode`'s seed and the tensor's name, so a rerun sends the same bytes);
- nf4 / fp4: the decoded value is the level nearest x among absmax(block) * codebook, so |err| <=
  half the widest gap between levels times absmax(block): 0.152 (nf4, between -1 and -0.696) and
  1/6 (fp4, between 4/6 and 1): wider than uniform 4-bit's 1/14 at the edges, narrower near zero,
  where a Gaussian block has most of its values (nf4's RMS error on Gaussian blocks is 15% below
  uniform 4-bit's, but its codes are equiprobable, so zstd no longer shrinks them: ~9% larger);
- top-k: a kept entry has the error above; a dropped entry is at most the k-th largest magnitude.

LoRA-aware encodings. Under adapter.freezeA only B is trained and sent (`lora.trainable_names`):
its delta dB is the compact form of the change dB A of the product (rank r, but out x r values
against the (out + in) r of any rank-r factorisation). With both factors trained, the product's
change B'A' - BA = B' dA + dB A has rank up to 2r: sent exactly as factors it is twice the
factor delta; truncated to rank r it is as large as the factor delta and loses about 30% of its
norm (measured: r 16, 1024 x 1024, 30% of the norm), and dense it is out x in. So sending the
change of B A never pays, and is not implemented; the factor delta is already the compact form.

The container: safetensors, one to three parts per tensor, keyed `<i>.<part>` where i is the
tensor's position in the sorted names and part is v (values), s (scales), m (position bitmap),
x (position gaps) or e (Elias-Fano positions); the metadata key "fedtune" holds one JSON document
with the format, the encoding (with "codebook" only when not uniform, so that earlier files read
as they did) and, per tensor, its name, shape, k, position coding and which parts are zstd frames
(stored as uint8). Each part's dtype and length follow from those (`part_spec`), so the reader
checks every part against what it must be rather than trusting what the file says. Names appear
once, in the metadata, so that the header stays small next to a sparse payload.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedtune_trainer.codec.container import (
    CAST,
    CODEBOOKS,
    FORMAT,
    METADATA_KEY,
    ef_low_bits,
    kept_count,
    position_codings,
    qmax,
    to_bytes,
)
from fedtune_trainer.codec.decoding import decode_tensor, read_layout
from fedtune_trainer.wire.delta_settings import DeltaSpec


@dataclass(frozen=True)
class Encoded:
    """The result of encoding one client's delta."""

    blob: bytes
    """The safetensors file, ready to upload."""
    sent: dict[str, torch.Tensor]
    """Exactly what `decode(blob)` returns (fp32): what the aggregator will see."""
    residual: dict[str, torch.Tensor] | None
    """What was not sent (fp32), for the next round; None unless `spec.feeds_back`."""
    raw_bytes: int
    """The same delta as dense fp32: the baseline the encoding is measured against."""

    @property
    def encoded_bytes(self) -> int:
        return len(self.blob)


def run_encoding(spec: DeltaSpec) -> dict[str, Any]:
    """The encoding a file made with `spec` declares (without error_feedback, the client's own
    business: it changes what is sent next round, not how this file reads)."""
    encoding: dict[str, Any] = {
        "dtype": spec.dtype,
        "top_k": spec.top_k,
        "bits": spec.quantization.bits,
        "block_size": spec.quantization.block_size,
        "compression": spec.compression,
    }
    # Additive: a file without "codebook" is uniform, as every file before codebooks was.
    # (Stochastic rounding, like error feedback, changes which codes are sent, not how they read.)
    if spec.quantization.codebook != "uniform":
        encoding["codebook"] = spec.quantization.codebook
    return encoding


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


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values (LSB first) packed eight to a uint8, the last byte padded with zeros."""
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def pack_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    """A bitmap of n bits (LSB first), set at `indices`, as uint8."""
    bits = torch.zeros(n, dtype=torch.uint8)
    bits[indices] = 1
    return pack_bits(bits)


def elias_fano(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted distinct indices below n as one uint8 part (`container.ef_sizes`): the low
    l = floor(log2(n/k)) bits of each, packed, then the rest in unary: bit (index >> l) + rank
    set. About k (2 + log2(n/k)) bits, within 2 bits per index of the entropy of a k-subset."""
    k = indices.numel()
    low = ef_low_bits(n, k)
    low_bits = (indices[:, None] >> torch.arange(low)) & 1
    high = torch.zeros(k + ((n - 1) >> low) + 1, dtype=torch.uint8)
    high[(indices >> low) + torch.arange(k)] = 1
    return torch.cat([pack_bits(low_bits.reshape(-1).to(torch.uint8)), pack_bits(high)])


def position_part(coding: str, indices: torch.Tensor, n: int) -> torch.Tensor:
    """The stored positions of the sorted `indices` in `coding` (`container.position_codings`)."""
    if coding == "m":
        return pack_mask(indices, n)
    if coding == "x":
        return torch.diff(indices, prepend=torch.zeros(1, dtype=indices.dtype)).to(torch.int32)
    return elias_fano(indices, n)


def pack_nibbles(nibbles: torch.Tensor, fill: int) -> torch.Tensor:
    """4-bit values two per byte, low nibble first; an odd count padded with `fill`."""
    n = nibbles.numel()
    padded = torch.full((math.ceil(n / 2) * 2,), fill, dtype=torch.uint8)
    padded[:n] = nibbles
    pairs = padded.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def nearest_codes(y: torch.Tensor, codebook: tuple[float, ...]) -> torch.Tensor:
    """The code (uint8) of the codebook value nearest each of `y` (ties to the lower value)."""
    table = torch.tensor(codebook, dtype=torch.float32)
    ordered, order = torch.sort(table, stable=True)
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    return order[torch.bucketize(y, midpoints)].to(torch.uint8)


def quantize(
    values: torch.Tensor,
    bits: int,
    block: int,
    codebook: str = "uniform",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a 1-D tensor: (codes, fp32 scales, one per block).

    uniform, 8 bits: int8 codes in [-127, 127]. uniform, 4 bits: codes in [-7, 7] stored as
    (code + 8), two per byte (low nibble first). Scale = absmax / qmax; rounding to nearest, or
    with `noise` (uniform in [0, 1), one per value) floor(y + noise): stochastic rounding.
    nf4 / fp4: the nibble is the index of the nearest codebook value to x / absmax, and the
    scale is the absmax itself.
    """
    n = values.numel()
    nblocks = math.ceil(n / block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32)
    padded[:n] = values.float()
    blocks = padded.view(nblocks, block)
    absmax = blocks.abs().amax(dim=1)
    if codebook != "uniform":
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = nearest_codes(blocks / safe[:, None], CODEBOOKS[codebook]).view(-1)[:n]
        return pack_nibbles(codes, fill=CODEBOOKS[codebook].index(0.0)), absmax
    scales = absmax / qmax(bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = blocks / safe[:, None]
    if noise is None:
        rounded = torch.round(scaled)
    else:
        dither = torch.zeros(nblocks * block, dtype=torch.float32)
        dither[:n] = noise
        rounded = torch.floor(scaled + dither.view(nblocks, block))
    codes = rounded.clamp(-qmax(bits), qmax(bits)).to(torch.int8).view(-1)[:n]
    if bits == 8:
        return codes, scales
    return pack_nibbles((codes + 8).to(torch.uint8), fill=8), scales


def tensor_seed(seed: int, name: str) -> int:
    """A tensor's own 63-bit seed of the stochastic rounding, from the encoder's and its name:
    independent draws per tensor, and the same whatever other tensors the delta holds."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------


def _stored(t: torch.Tensor, compressor: Any) -> tuple[torch.Tensor, bool]:
    """A part as the file holds it: a zstd frame (uint8) when that is smaller, else raw."""
    if compressor is not None:
        raw = to_bytes(t)
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            return torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone(), True
    return t.contiguous(), False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode(
    delta: Mapping[str, torch.Tensor],
    spec: DeltaSpec,
    residual: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Encoded:
    """Encode a delta (name -> tensor) with `spec`, adding `residual` first when feedback is on.

    `seed` seeds stochastic rounding (each tensor its own stream, `tensor_seed`), the one random
    stage: the client passes one derived from its run, round and client, so that a rerun of a
    round sends the same bytes. Nothing else depends on it.
    """
    import safetensors.torch
    import zstandard

    use_feedback = spec.feeds_back
    compressor = (
        zstandard.ZstdCompressor(level=spec.compression_level)
        if spec.compression == "zstd"
        else None
    )
    cast = CAST[spec.dtype]
    quant = spec.quantization
    bits, block = quant.bits, quant.block_size
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
        stored: dict[str, tuple[torch.Tensor, bool]] = {}
        if spec.top_k < 1.0:
            k = kept_count(n, spec.top_k)
            idx = topk_select(values, k)
            values = values[idx]
            entry["k"] = k
            # Every coding the format allows here, stored as the file would hold it: the
            # smallest wins (the first, the v1 coding, on a tie).
            options = {c: position_part(c, idx, n) for c in position_codings(n, k)}
            packed = {c: _stored(t, compressor) for c, t in options.items()}
            coding = min(packed, key=lambda c: _nbytes(packed[c][0]))
            entry["pos"] = coding
            tensor_parts[coding], stored[coding] = options[coding], packed[coding]
        if bits:
            noise = None
            if quant.stochastic_rounding:
                generator = torch.Generator().manual_seed(tensor_seed(seed, name))
                noise = torch.rand(values.numel(), generator=generator)
            codes, scales = quantize(values, bits, block, quant.codebook, noise)
            tensor_parts["v"], tensor_parts["s"] = codes, scales
        else:
            tensor_parts["v"] = values.contiguous()
        out = decode_tensor(
            entry, bits, block, lambda p, tp=tensor_parts: tp[p], codebook=quant.codebook
        )
        sent[name] = out
        if use_feedback:
            new_residual[name] = x - out
        zstd_parts = ""
        for part, t in tensor_parts.items():
            parts[f"{i}.{part}"], compressed = stored.get(part) or _stored(t, compressor)
            zstd_parts += part * compressed
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
