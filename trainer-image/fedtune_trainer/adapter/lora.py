"""The LoRA adapter as the federation sees it: a flat dict of named tensors plus a PEFT config.

Tensor names are PEFT's saved names (`get_peft_model_state_dict`, adapter name stripped), which is
exactly what `adapter_model.safetensors` holds, so a global adapter in storage is a standard PEFT
directory and `PeftModel.from_pretrained` loads it unchanged.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune_trainer.wire.settings import ALL_LINEAR, AdapterSpec

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PretrainedConfig, PreTrainedModel
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import global_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def trainable_names(names: list[str] | set[str], spec: AdapterSpec) -> list[str]:
    """The adapter tensors a client trains and sends: all of them, minus LoRA A under freeze_a."""
    return sorted(n for n in names if not (spec.freeze_a and ".lora_A." in n))


def lora_config(spec: AdapterSpec, base_model: str = "") -> LoraConfig:
    from peft import LoraConfig

    # PEFT takes its `all-linear` shorthand only as a bare string: inside a list it would look
    # for a module literally named "all-linear" and fail with "Target modules not found".
    targets: str | list[str] = (
        ALL_LINEAR if list(spec.target_modules) == [ALL_LINEAR] else list(spec.target_modules)
    )
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias=spec.bias_mode,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )


def config_json(spec: AdapterSpec, base_model: str = "") -> bytes:
    """`adapter_config.json` as PEFT writes it (through PEFT itself, so versions agree)."""
    with tempfile.TemporaryDirectory() as tmp:
        lora_config(spec, base_model).save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG).read_bytes()


def attach(
    base: PreTrainedModel, spec: AdapterSpec, tensors: Mapping[str, torch.Tensor] | None = None
) -> PeftModel:
    """Wrap `base` with a LoRA adapter; load `tensors` (every adapter tensor) when given."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(base, lora_config(spec))
    if tensors is not None:
        expected = set(adapter_tensors(model))
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            raise ValueError(
                "adapter does not match the model and adapter config: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        set_peft_model_state_dict(model, dict(tensors))
    if spec.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def initial_adapter(
    config: str | Path | PretrainedConfig, spec: AdapterSpec, seed: int
) -> dict[str, torch.Tensor]:
    """The adapter PEFT initialises for `seed`, built from the model's config alone.

    Bit for bit what `torch.manual_seed(seed); get_peft_model(base, lora_config(spec))` gives on
    the real base model (the tests hold it to that, all-linear included), but no base weight is
    ever read or allocated: the aggregator of round 0 needs the config (one small JSON file),
    not 16 GB of checkpoint and 32 GB of RAM for an 8B model.

    How: the model is built on the meta device (shapes only), and each of its parameters is then
    replaced by a CPU tensor of the same shape that is one broadcast scalar (stride 0: 4 bytes,
    whatever the shape). PEFT's own code then runs unchanged: it creates each LoRA layer on the
    CPU, draws its initial values from the seeded generator in its own order (that order, and
    how many numbers each layer draws, is PEFT's business, which is why this runs PEFT instead
    of copying its init), and moves it to "the device of the base layer", which is now the CPU
    and not the meta device, where the values would be discarded. The caller's RNG state is
    left as it was.

    `config` is a directory (or config.json) as `AutoConfig.from_pretrained` takes it, a hub
    id, or a loaded config.
    """
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(config, str | Path):
        model_config = config
    else:
        model_config = AutoConfig.from_pretrained(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    for module in skeleton.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            placeholder = torch.zeros((), dtype=param.dtype).expand(param.shape)
            module.register_parameter(name, torch.nn.Parameter(placeholder, requires_grad=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(skeleton, lora_config(spec))
        return adapter_tensors(model)


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors as fp32 CPU copies, keyed by their saved names."""
    from peft import get_peft_model_state_dict

    return {
        name: t.detach().to("cpu", torch.float32).clone()
        # Never the full embedding matrix: the federation exchanges adapter tensors only.
        for name, t in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }


def trainable_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, keyed by their saved names (those of `adapter_tensors`).

    Matched by storage, not by rewriting names: PEFT's state dict holds the parameters
    themselves, whatever naming rule (adapter name, bias mode) it applies.
    """
    from peft import get_peft_model_state_dict

    saved = {
        t.data_ptr(): name
        for name, t in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    return {saved[p.data_ptr()]: p for p in model.parameters() if p.requires_grad}


def weights_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """`adapter_model.safetensors` content for these tensors."""
    import safetensors.torch

    return safetensors.torch.save(
        {k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"}
    )


def parse_weights(data: bytes) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return {k: v.float() for k, v in safetensors.torch.load(data).items()}


def peft_files(tensors: Mapping[str, torch.Tensor], config: bytes) -> dict[str, bytes]:
    """The files of a PEFT adapter directory."""
    return {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights_bytes(tensors)}


def config_summary(config: bytes) -> dict[str, object]:
    """The few fields of an adapter config worth showing in a manifest."""
    data = json.loads(config)
    return {k: data.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules")}


def read_global(store: st.Store, round_: int) -> tuple[dict[str, torch.Tensor], bytes]:
    """The committed global adapter of `round_`: its tensors and its adapter_config.json."""
    _, files = st.read_committed(store, global_prefix(round_), [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    return parse_weights(files[ADAPTER_WEIGHTS]), files[ADAPTER_CONFIG]
