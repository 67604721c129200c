"""Where and how the model runs: device, precision, seeds, and loading a base model by URI."""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from . import store
from .errors import SettingError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def quiet_hf() -> None:
    """Progress bars from transformers would drown the training log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT still calls a transformers API that v5 deprecates; the warning says nothing to a user.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_dir(uri: str, marker: str, what: str) -> Path | str:
    """A local directory for `uri` (path, file:// or s3://bucket/prefix) that holds `marker`;
    or, for a hub id such as `Qwen/Qwen2.5-0.5B` that names no local directory, the id itself,
    which transformers resolves through the hub (for clusters that can reach one)."""
    if HUB_ID.match(uri) and not Path(uri).exists():
        return uri
    path = store.fetch(uri if uri.endswith("/") or not uri.startswith("s3://") else uri + "/")
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{uri}: no {marker}, not a Hugging Face {what} directory")
    return path


def model_dir(uri: str) -> Path | str:
    return local_dir(uri, "config.json", "model")


def config_source(uri: str) -> Path | str:
    """Where `AutoConfig` can read the model's config.json, fetching that one file and none of
    the weights (what the aggregator of round 0 needs, see lora.initial_adapter)."""
    if HUB_ID.match(uri) and not Path(uri).exists():
        return uri
    if uri.startswith("s3://"):
        return store.fetch(uri.rstrip("/") + "/config.json")
    path = store.fetch(uri)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: no config.json, not a Hugging Face model directory")
    return path


def load_base(uri: str, runtime: Runtime) -> PreTrainedModel:
    """The frozen base model, loaded straight onto the runtime's device in its weight dtype.

    `low_cpu_mem_usage` builds the model on the meta device and fills it tensor by tensor from
    the (memory-mapped) safetensors: peak memory is about one copy of the weights, not two
    (random init, then the checkpoint). transformers 5 always loads this way and ignores the
    flag; 4.x needs it. `device_map` puts each tensor on the GPU as it is read, so a GPU
    client never holds the whole model in host memory. nf4 quantizes the linear layers while
    loading (bitsandbytes; the output head and norms stay in the compute dtype).
    """
    from transformers import AutoModelForCausalLM

    quiet_hf()
    kwargs: dict[str, object] = {}
    if runtime.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.autocast_dtype or torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(uri),
        dtype=runtime.weight_dtype,
        low_cpu_mem_usage=True,
        device_map={"": runtime.device},
        **kwargs,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(uri: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    quiet_hf()
    tok = AutoTokenizer.from_pretrained(local_dir(uri, "tokenizer_config.json", "tokenizer"))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"{uri}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
