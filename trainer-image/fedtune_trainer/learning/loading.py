"""Loading a base model and its tokenizer by URI (a local directory, s3:// through the download
cache, or a hub id), and keeping the Hugging Face libraries' chatter out of a Job's log."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from fedtune_trainer.learning.runtime import Runtime
from fedtune_trainer.storage.locate import fetch


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
    path = fetch(uri if uri.endswith("/") or not uri.startswith("s3://") else uri + "/")
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
        return fetch(uri.rstrip("/") + "/config.json")
    path = fetch(uri)
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
