"""What the encoder and the decoder share: the format's names, the dtypes it casts to, the
raw bytes of a part, and the arithmetic that fixes each part's size (`qmax`, `kept_count`,
`position_coding`), so that the reader derives a part's size rather than trusting the file."""

from __future__ import annotations

import math

import torch

FORMAT = "fedtune.delta/v1"
METADATA_KEY = "fedtune"
MAX_HEADER = 100 << 20

CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeltaFormatError(ValueError):
    """The bytes are not a well-formed delta of this format."""


def qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for 8 bits, 7 for 4 bits (symmetric, zero exact)."""
    return (1 << (bits - 1)) - 1


def kept_count(n: int, top_k: float) -> int:
    """k, the values top-k keeps of a tensor of n (at least one, unless the tensor is empty)."""
    return min(n, max(1, math.ceil(top_k * n))) if n else 0


def position_coding(n: int, k: int) -> str:
    """'m' (a bitmap, n/8 bytes) or 'x' (int32 gaps, 4k bytes), whichever is smaller: the
    coding every file of format v1 may use, and the largest a file may use (`position_codings`).
    """
    return "m" if n <= 32 * k else "x"


def ef_low_bits(n: int, k: int) -> int:
    """Elias-Fano's l: the low bits of each index stored verbatim, floor(log2(n / k))."""
    return (n // k).bit_length() - 1 if k else 0


def ef_sizes(n: int, k: int) -> tuple[int, int]:
    """Bytes of the two halves of an Elias-Fano part: the k l-bit low parts, then the high
    parts in unary (one set bit per index, at (index >> l) + its rank), k + ((n-1) >> l) + 1 bits.
    """
    if not k:
        return 0, 0
    low = ef_low_bits(n, k)
    return math.ceil(k * low / 8), math.ceil((k + ((n - 1) >> low) + 1) / 8)


def position_bytes(coding: str, n: int, k: int) -> int:
    """The raw size of the positions of k of n values in `coding`."""
    if coding == "m":
        return math.ceil(n / 8)
    if coding == "x":
        return 4 * k
    return sum(ef_sizes(n, k))


def position_codings(n: int, k: int) -> tuple[str, ...]:
    """The codings a file may use for k of n positions: `position_coding`'s, and 'e' (Elias-Fano,
    about k (2 + log2(n/k)) bits) where that is smaller raw. The encoder stores whichever is
    smallest after zstd and the layout records it; since each is at most the first's size, the
    first bounds the part."""
    legacy = position_coding(n, k)
    smaller = k > 0 and position_bytes("e", n, k) < position_bytes(legacy, n, k)
    return (legacy, "e") if smaller else (legacy,)


NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
"""QLoRA's NormalFloat4 (as bitsandbytes has it), by code: 7 negative and 8 positive quantiles of
N(0, 1) (offset 0.9677), and zero, divided by the largest, so that -1, 0 and 1 are exact."""
FP4 = tuple(s * m / 6 for s in (1.0, -1.0) for m in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
"""The e2m1 floating-point values (OCP microscaling FP4) divided by their largest, 6, by code:
bit 3 the sign, bits 0-2 exponent and mantissa (code 8 is -0, decoding to 0)."""
CODEBOOKS = {"nf4": NF4, "fp4": FP4}
"""The 16-level codebooks of 4-bit quantization, values in [-1, 1] by code (the nibble stored)."""


def to_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (half precision as int16: numpy has no bfloat16)."""
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The inverse of to_bytes, checked against the size the dtype and shape give."""
    numel = math.prod(shape)
    if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
        raise DeltaFormatError(f"part has {len(raw)} bytes, expected {numel} x {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)


# --------------------------------------------------------------------------------------------
# The manifest of a committed delta
# --------------------------------------------------------------------------------------------

DELTA_FILE = "delta.safetensors"
