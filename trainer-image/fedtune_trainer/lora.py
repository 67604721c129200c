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

from .task import AdapterSpec

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def trainable_names(names: list[str] | set[str], spec: AdapterSpec) -> list[str]:
    """The adapter tensors a client trains and sends: all of them, minus LoRA A under freeze_a."""
    return sorted(n for n in names if not (spec.freeze_a and ".lora_A." in n))


def lora_config(spec: AdapterSpec, base_model: str = "") -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
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


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors as fp32 CPU copies, keyed by their saved names."""
    from peft import get_peft_model_state_dict

    return {
        name: t.detach().to("cpu", torch.float32).clone()
        # Never the full embedding matrix: the federation exchanges adapter tensors only.
        for name, t in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }


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
