"""The GradualDiff-Fed delta codec: `delta = local - global`, compressed, in a safetensors file.

Pure on purpose: tensors in, bytes (or tensors) out, no storage, no clock, no globals. The client
encodes, the aggregator decodes, and the tests hold both to the stated error bounds.

Pipeline per tensor (each stage optional, configured by `task.DeltaSpec`):

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
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .task import DeltaSpec

FORMAT = "fedtune.delta/v1"
METADATA_KEY = "fedtune"
_MAX_HEADER = 100 << 20

_CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeltaFormatError(ValueError):
    """The bytes are not a well-formed delta of this format."""


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


def qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for 8 bits, 7 for 4 bits (symmetric, zero exact)."""
    return (1 << (bits - 1)) - 1


def kept_count(n: int, top_k: float) -> int:
    """k, the values top-k keeps of a tensor of n (at least one, unless the tensor is empty)."""
    return min(n, max(1, math.ceil(top_k * n))) if n else 0


def position_coding(n: int, k: int) -> str:
    """'m' (a bitmap, n/8 bytes) or 'x' (int32 gaps, 4k bytes), whichever is smaller."""
    return "m" if n <= 32 * k else "x"


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


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices set in a bitmap made by pack_mask."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return torch.nonzero(bits.view(-1)[:n], as_tuple=False).view(-1)


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


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int
) -> torch.Tensor:
    """Inverse of quantize, in fp32."""
    if bits == 4:
        if codes.numel() != math.ceil(n / 2):
            raise DeltaFormatError(f"4-bit codes: {codes.numel()} bytes for {n} values")
        low = (codes & 0x0F).to(torch.int16) - 8
        high = (codes >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=1).view(-1)[:n]
    else:
        if codes.numel() != n:
            raise DeltaFormatError(f"8-bit codes: {codes.numel()} for {n} values")
        q = codes.to(torch.int16)
    nblocks = math.ceil(n / block)
    if scales.numel() != nblocks:
        raise DeltaFormatError(f"{scales.numel()} scales for {nblocks} blocks")
    per_value = scales.float().repeat_interleave(block)[:n]
    return q.float() * per_value


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    numel = math.prod(shape)
    if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
        raise DeltaFormatError(f"part has {len(raw)} bytes, expected {numel} x {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)


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
    cast = _CAST[spec.dtype]
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
                raw = _to_bytes(t)
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


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What the metadata of a delta file says: encoding and per-tensor layout."""

    encoding: dict[str, Any]
    tensors: dict[str, dict[str, Any]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(e["shape"]) for name, e in self.tensors.items()}

    def part_reader(
        self, name: str, get: Callable[[str], torch.Tensor]
    ) -> Callable[[str], torch.Tensor]:
        """A function part -> tensor for `name`, undoing zstd where the file used it."""
        entry = self.tensors[name]
        n = math.prod(int(d) for d in entry["shape"])
        k = int(entry.get("k", n))

        def read(part: str) -> torch.Tensor:
            dtype, shape = part_spec(part, n, k, self.encoding)
            t = get(f"{entry['i']}.{part}")
            if part not in entry.get("z", ""):
                if t.dtype != dtype or list(t.shape) != shape:
                    raise DeltaFormatError(
                        f"{name}.{part}: stored as {t.dtype} {list(t.shape)}, expected "
                        f"{dtype} {shape}"
                    )
                return t
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return _from_bytes(
                decompress_bounded(_to_bytes(t), size, f"{name}.{part}"), dtype, shape
            )

        return read


def decompress_bounded(frame: bytes, size: int, what: str) -> bytes:
    """The zstd `frame` decompressed, which must be exactly `size` bytes; never more is produced.

    python-zstandard's one-shot `decompress` trusts a frame header's declared content size (and
    ignores max_output_size then): a 34 KB frame declaring gigabytes makes it allocate them. So
    this streams, reading at most `size + 1` bytes in bounded chunks, and caps the window the
    decoder may allocate at the next power of two of `size` (a legitimate part, one-shot
    compressed, never needs more).
    """
    import io

    import zstandard

    window = 1 << max(10, math.ceil(math.log2(max(size, 1))))
    out = bytearray()
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        with dctx.stream_reader(io.BytesIO(frame), read_across_frames=True) as reader:
            while len(out) <= size:
                chunk = reader.read(min(1 << 20, size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise DeltaFormatError(f"{what}: zstd: {e}") from e
    if len(out) > size:
        raise DeltaFormatError(f"{what}: zstd frame inflates past the {size} bytes of the part")
    if len(out) < size:
        raise DeltaFormatError(f"{what}: zstd frame holds {len(out)} bytes, expected {size}")
    return bytes(out)


def part_spec(
    part: str, n: int, k: int, encoding: Mapping[str, Any]
) -> tuple[torch.dtype, list[int]]:
    """The dtype and shape part `part` of a tensor of n values, k of them sent, must have."""
    bits, block = int(encoding["bits"]), int(encoding["block_size"])
    if part == "v":
        if bits == 8:
            return torch.int8, [k]
        if bits == 4:
            return torch.uint8, [math.ceil(k / 2)]
        cast = _CAST.get(encoding.get("dtype", ""))
        if cast is None:
            raise DeltaFormatError(f"unknown dtype {encoding.get('dtype')!r}")
        return cast, [k]
    if part == "s" and bits:
        return torch.float32, [math.ceil(k / block)]
    if part == "m":
        return torch.uint8, [math.ceil(n / 8)]
    if part == "x":
        return torch.int32, [k]
    raise DeltaFormatError(f"no part {part!r} in this encoding")


def layout_from_metadata(metadata: Mapping[str, str] | None) -> Layout:
    if not metadata or METADATA_KEY not in metadata:
        raise DeltaFormatError(f"not a {FORMAT} file")
    try:
        document = json.loads(metadata[METADATA_KEY])
        if document.get("format") != FORMAT:
            raise DeltaFormatError(f"format {document.get('format')!r}, expected {FORMAT}")
        encoding, tensors = document["encoding"], document["tensors"]
    except (KeyError, AttributeError, json.JSONDecodeError) as e:
        raise DeltaFormatError(f"bad metadata: {e}") from e
    if (
        not isinstance(encoding, dict)
        or encoding.get("bits") not in (0, 4, 8)
        or not isinstance(encoding.get("block_size"), int)
        or encoding["block_size"] < 1
        or not isinstance(tensors, dict)
    ):
        raise DeltaFormatError("bad encoding metadata")
    return Layout(encoding=encoding, tensors=tensors)


def read_layout(blob: bytes) -> Layout:
    """Parse just the safetensors header of a delta file (cheap: no tensor is touched)."""
    if len(blob) < 8:
        raise DeltaFormatError("truncated: no header")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > _MAX_HEADER or 8 + size > len(blob):
        raise DeltaFormatError("truncated or corrupt header")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaFormatError(f"corrupt header: {e}") from e
    return layout_from_metadata(header.get("__metadata__"))


def decode_tensor(
    entry: Mapping[str, Any], bits: int, block: int, read: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """Rebuild one dense fp32 tensor from its layout entry and a reader of its (raw) parts."""
    shape = [int(d) for d in entry["shape"]]
    n = math.prod(shape)
    k = int(entry.get("k", n))
    if not 0 <= k <= n:
        raise DeltaFormatError(f"k={k} outside [0, {n}]")
    if bits:
        values = dequantize(read("v"), read("s"), bits, block, k)
    else:
        values = read("v").reshape(-1).float()
        if values.numel() != k:
            raise DeltaFormatError(f"{values.numel()} values where {k} were announced")
    if "pos" not in entry:
        if k != n:
            raise DeltaFormatError(f"{k} of {n} values without positions")
        return values.reshape(shape)
    positions = entry["pos"]
    if positions == "m":
        idx = unpack_mask(read("m"), n)
    elif positions == "x":
        idx = torch.cumsum(read("x").to(torch.int64), dim=0)
    else:
        raise DeltaFormatError(f"unknown positions coding {positions!r}")
    if idx.numel() != k or (k and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise DeltaFormatError("sparse positions do not match the values")
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = values
    return out.reshape(shape)


def decode_one(layout: Layout, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Decode tensor `name`, fetching raw stored parts by key with `get` (e.g. from safe_open)."""
    enc = layout.encoding
    return decode_tensor(
        layout.tensors[name],
        int(enc["bits"]),
        int(enc["block_size"]),
        layout.part_reader(name, get),
    )


def decode(blob: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a delta file, dense fp32."""
    import safetensors.torch

    layout = read_layout(blob)
    try:
        stored = safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DeltaFormatError(f"corrupt safetensors: {e}") from e

    def get(key: str) -> torch.Tensor:
        if key not in stored:
            raise DeltaFormatError(f"missing part {key!r}")
        return stored[key]

    try:
        return {name: decode_one(layout, name, get) for name in sorted(layout.tensors)}
    except (KeyError, TypeError, RuntimeError) as e:
        raise DeltaFormatError(f"inconsistent layout: {e}") from e


# --------------------------------------------------------------------------------------------
# The manifest of a committed delta
# --------------------------------------------------------------------------------------------

DELTA_FILE = "delta.safetensors"


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
