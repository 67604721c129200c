"""The adapter: target module sets (all-linear, explicit lists) and round 0 built from the config
alone, identical to PEFT's own initialisation of the real model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from fedtune_trainer.adapter import lora
from fedtune_trainer.wire.settings import AdapterSpec
from tests.trainer.support import Demo

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_init(model_dir: Path, spec: AdapterSpec, seed: int) -> dict[str, torch.Tensor]:
    """What PEFT gives on the real base model for `seed`: the reference."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    return lora.adapter_tensors(lora.attach(base, spec))


def wrapped(names: list[str]) -> set[str]:
    """The module kinds (q_proj, ...) that got an adapter."""
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        (["all-linear"], set(LINEAR)),  # every linear layer but the output head
        (["gate_proj", "up_proj", "down_proj"], {"gate_proj", "up_proj", "down_proj"}),
        (["self_attn.o_proj"], {"o_proj"}),  # a suffix of the module path
    ],
)
def test_initial_adapter_is_peft_init_without_the_weights(
    demo: Demo, tmp_path: Path, targets: list[str], expected: set[str]
) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(demo.model / "config.json", config_only / "config.json")
    spec = AdapterSpec(r=4, target_modules=targets)
    before = torch.random.get_rng_state()
    mine = lora.initial_adapter(config_only, spec, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    reference = peft_init(demo.model, spec, seed=11)
    assert sorted(mine) == sorted(reference)
    assert wrapped(list(mine)) == expected
    for name, tensor in reference.items():
        assert torch.equal(mine[name], tensor), name
        assert mine[name].dtype == torch.float32
        assert mine[name].stride()[-1] == 1  # real tensors, not the broadcast placeholders
    a_name = next(n for n in mine if ".lora_A." in n)
    other_seed = lora.initial_adapter(config_only, spec, seed=12)
    assert not torch.equal(other_seed[a_name], mine[a_name])


def test_all_linear_must_stand_alone() -> None:
    with pytest.raises(ValidationError, match="all-linear already names every linear layer"):
        AdapterSpec(target_modules=["all-linear", "q_proj"])
    assert AdapterSpec(targetModules=["all-linear"]).target_modules == ["all-linear"]


def test_an_all_linear_adapter_round_trips_through_plain_peft(demo: Demo, tmp_path: Path) -> None:
    from peft import PeftModel

    spec = AdapterSpec(r=4, target_modules=["all-linear"])
    tensors = lora.initial_adapter(demo.model, spec, seed=0)
    tensors = {k: v + 0.01 if ".lora_B." in k else v for k, v in tensors.items()}
    for name, data in lora.peft_files(tensors, lora.config_json(spec)).items():
        (tmp_path / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.model), tmp_path)
    loaded = lora.adapter_tensors(model)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
