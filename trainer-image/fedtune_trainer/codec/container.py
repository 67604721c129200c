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
    """'m' (a bitmap, n/8 bytes) or 'x' (int32 gaps, 4k bytes), whichever is smaller."""
    return "m" if n <= 32 * k else "x"


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
