"""A delta file back to tensors, one tensor at a time, never trusting what the file says.

Every part is checked against the size its tensor's shape, k and encoding prescribe (`part_spec`)
and zstd frames are decompressed with that size as a hard bound, so a hostile file costs at most
the memory of the tensor it claims to be. `decode_one` serves the aggregator's streaming reads;
`decode` the tests and the client's own check of what it sends.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedtune_trainer.codec.container import (
    CAST,
    CODEBOOKS,
    FORMAT,
    MAX_HEADER,
    METADATA_KEY,
    DeltaFormatError,
    ef_low_bits,
    ef_sizes,
    from_bytes,
    to_bytes,
)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of uint8 bytes, LSB first, as one uint8 0/1 per bit."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices set in a bitmap made by pack_mask."""
    return torch.nonzero(unpack_bits(packed)[:n], as_tuple=False).view(-1)


def elias_fano_indices(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The k indices of an Elias-Fano part made by `encoding.elias_fano`, checked: the part is
    exactly its size, the high half has exactly k set bits and none in its padding. (Indices
    past n or out of order are the caller's check, as for every coding.)"""
    low_bytes, high_bytes = ef_sizes(n, k)
    if packed.numel() != low_bytes + high_bytes:
        raise DeltaFormatError(f"Elias-Fano part of {packed.numel()} bytes for {k} of {n}")
    low = ef_low_bits(n, k)
    low_bits = unpack_bits(packed[:low_bytes])[: k * low].view(k, low).to(torch.int64)
    lows = (low_bits << torch.arange(low)).sum(dim=1)
    high_bits = unpack_bits(packed[low_bytes:])
    used = k + ((n - 1) >> low) + 1
    ones = torch.nonzero(high_bits[:used], as_tuple=False).view(-1)
    if ones.numel() != k or bool(high_bits[used:].any()):
        raise DeltaFormatError(
            f"Elias-Fano part holds {ones.numel()} indices (and padding bits "
            f"{int(high_bits[used:].sum())}) where {k} were announced"
        )
    return ((ones - torch.arange(k)) << low) | lows


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    n: int,
    codebook: str = "uniform",
) -> torch.Tensor:
    """Inverse of quantize, in fp32."""
    if bits == 4:
        if codes.numel() != math.ceil(n / 2):
            raise DeltaFormatError(f"4-bit codes: {codes.numel()} bytes for {n} values")
        nibbles = torch.stack([codes & 0x0F, codes >> 4], dim=1).view(-1)[:n].long()
        if codebook == "uniform":
            q = nibbles.float() - 8
        else:  # every nibble is a code of a 16-value codebook: nothing to check
            q = torch.tensor(CODEBOOKS[codebook], dtype=torch.float32)[nibbles]
    else:
        if codes.numel() != n:
            raise DeltaFormatError(f"8-bit codes: {codes.numel()} for {n} values")
        q = codes.float()
    nblocks = math.ceil(n / block)
    if scales.numel() != nblocks:
        raise DeltaFormatError(f"{scales.numel()} scales for {nblocks} blocks")
    per_value = scales.float().repeat_interleave(block)[:n]
    return q * per_value


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
            return from_bytes(decompress_bounded(to_bytes(t), size, f"{name}.{part}"), dtype, shape)

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
        cast = CAST.get(encoding.get("dtype", ""))
        if cast is None:
            raise DeltaFormatError(f"unknown dtype {encoding.get('dtype')!r}")
        return cast, [k]
    if part == "s" and bits:
        return torch.float32, [math.ceil(k / block)]
    if part == "m":
        return torch.uint8, [math.ceil(n / 8)]
    if part == "x":
        return torch.int32, [k]
    if part == "e":
        return torch.uint8, [sum(ef_sizes(n, k))]
    raise DeltaFormatError(f"no part {part!r} in this encoding")


def codebook(encoding: Mapping[str, Any]) -> str:
    """The encoding's codebook: files without one (all before codebooks) are uniform."""
    return encoding.get("codebook", "uniform")


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
        or codebook(encoding) not in ("uniform", *CODEBOOKS)
        or (codebook(encoding) != "uniform" and encoding["bits"] != 4)
    ):
        raise DeltaFormatError("bad encoding metadata")
    return Layout(encoding=encoding, tensors=tensors)


def read_layout(blob: bytes) -> Layout:
    """Parse just the safetensors header of a delta file (cheap: no tensor is touched)."""
    if len(blob) < 8:
        raise DeltaFormatError("truncated: no header")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > MAX_HEADER or 8 + size > len(blob):
        raise DeltaFormatError("truncated or corrupt header")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaFormatError(f"corrupt header: {e}") from e
    return layout_from_metadata(header.get("__metadata__"))


def decode_tensor(
    entry: Mapping[str, Any],
    bits: int,
    block: int,
    read: Callable[[str], torch.Tensor],
    codebook: str = "uniform",
) -> torch.Tensor:
    """Rebuild one dense fp32 tensor from its layout entry and a reader of its (raw) parts."""
    shape = [int(d) for d in entry["shape"]]
    n = math.prod(shape)
    k = int(entry.get("k", n))
    if not 0 <= k <= n:
        raise DeltaFormatError(f"k={k} outside [0, {n}]")
    if bits:
        values = dequantize(read("v"), read("s"), bits, block, k, codebook)
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
    elif positions == "e":
        idx = elias_fano_indices(read("e"), n, k)
    else:
        raise DeltaFormatError(f"unknown positions coding {positions!r}")
    if idx.numel() != k or (k and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise DeltaFormatError("sparse positions do not match the values")
    # Strictly increasing, as every encoder writes them: a repeated index would let a later
    # value silently overwrite an earlier one.
    if k > 1 and not bool((torch.diff(idx) > 0).all()):
        raise DeltaFormatError("sparse positions are not strictly increasing")
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
        codebook(enc),
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
