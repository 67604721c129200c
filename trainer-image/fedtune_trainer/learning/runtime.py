"""Where and how the model runs: device, precision and seeds (loading.py loads the model)."""

from __future__ import annotations

import hashlib
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from fedtune_trainer.wire.errors import SettingError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Runtime:
    """The device, the dtype the frozen base weights are held in, and the autocast dtype.

    LoRA weights stay fp32 in every mode (PEFT upcasts adapters by default): deltas are small
    differences and lose most of their bits when the weights themselves are half precision.
    `quantization` nf4 holds the base's linear layers in 4 bits instead (QLoRA), computing in
    the autocast dtype.
    """

    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    quantization: Literal["none", "nf4"] = "none"

    @property
    def name(self) -> str:
        amp = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32"
        base = "/nf4" if self.quantization == "nf4" else ""
        return f"{self.device.type}/{amp}{base}"

    def autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def pick_runtime(
    precision: Literal["auto", "fp32", "bf16", "fp16"],
    quantization: Literal["none", "nf4"] = "none",
    local_rank: int = 0,
) -> Runtime:
    """auto means bf16 on a CUDA GPU that supports it and fp32 everywhere else.

    bf16 base weights halve the memory of the frozen model; on a GPU they are also the fast
    path. On the CPU `bf16` is allowed when asked for (it halves memory there too, and CPUs with
    AVX512-BF16 or AMX compute it natively) but never chosen by `auto`: without those
    instructions it is several times slower than fp32. fp16 is never picked automatically: it
    needs loss scaling and overflows on large deltas; it is refused on the CPU, which has no
    fp16 kernels worth the name. `local_rank` picks the GPU of one process of a multi-GPU
    client. Settings this machine cannot honour raise SettingError naming the field, before
    anything is downloaded.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if quantization == "nf4" and not cuda:
        raise SettingError(
            "adapter.baseQuantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels) and "
            "this Job has none; request a GPU for the client or set baseQuantization: none"
        )
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return Runtime(device, torch.float32, None, quantization)
    if precision == "fp16" and not cuda:
        raise SettingError("training.precision: fp16 needs a CUDA GPU; use auto, fp32 or bf16")
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    return Runtime(device, half, half, quantization)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from several parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG training touches; returns a CPU generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
