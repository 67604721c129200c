"""Synthetic rounds for the aggregation tests: a global adapter and committed client deltas.

No model is needed for rounds >= 1: the aggregator only reads tensors (evaluation is its own Job).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedtune_trainer.adapter import lora
from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.layout import client_prefix, global_prefix
from fedtune_trainer.wire.settings import AggregationSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask

PREFIX = "base_model.model.model.layers"
SHAPES = {
    f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (4, 16),
    f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": (16, 4),
    f"{PREFIX}.0.self_attn.v_proj.lora_A.weight": (4, 16),
    f"{PREFIX}.0.self_attn.v_proj.lora_B.weight": (8, 4),
}
CONFIG = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
LOSSLESS = DeltaSpec(dtype="fp32", compression="none")


def random_tensors(
    seed: int, scale: float = 1.0, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * scale for n, s in shapes.items()}


def write_global(store: st.Store, round_: int, tensors: Mapping[str, torch.Tensor]) -> None:
    st.commit(store, global_prefix(round_), lora.peft_files(tensors, CONFIG), {"round": round_})


def read_global(store: st.Store, round_: int) -> dict[str, torch.Tensor]:
    _, files = st.read_committed(store, global_prefix(round_), [lora.ADAPTER_WEIGHTS])
    return lora.parse_weights(files[lora.ADAPTER_WEIGHTS])


def put_delta(
    store: st.Store,
    round_: int,
    client: str,
    delta: Mapping[str, torch.Tensor],
    samples: int = 10,
    spec: DeltaSpec = LOSSLESS,
    train_loss: float | None = 1.0,
) -> codec.Encoded:
    enc = codec.encode(delta, spec)
    meta = codec.manifest_fields(
        enc, run="t", round_=round_, client=client, samples=samples, steps=1, train_loss=train_loss
    )
    st.commit(store, client_prefix(round_, client), {DELTA_FILE: enc.blob}, meta)
    return enc


def task(store: st.Store, round_: int, clients: list[str], **kw: object) -> AggregateTask:
    aggregation = kw.pop("aggregation", AggregationSpec())
    base = {
        "run": "t",
        "round": round_,
        "base_model": "/nonexistent-model",
        "storage": StorageLocation(uri=store.uri),
        "rounds": 100,
        "clients": clients,
        "min_clients": 1,
        "aggregation": aggregation,
        "delta": LOSSLESS,  # what put_delta encodes with unless told otherwise
    }
    return AggregateTask(**{**base, **kw})


# ------------------------------------------------------------------------------------------
# The float64 reference: numpy, written from the papers' update rules, not from the code
# ------------------------------------------------------------------------------------------


def reference_round(
    spec: AggregationSpec,
    x: dict[str, np.ndarray],
    deltas: list[dict[str, np.ndarray]],
    weights: list[float],
    state: dict[str, dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """One server round in float64; mutates `state` (per tensor: m, v)."""
    out = {}
    for name in x:
        stack = np.stack([d[name] for d in deltas])
        if spec.algorithm == "median":
            d = np.median(stack, axis=0)
        elif spec.algorithm == "trimmedMean":
            cut = int(np.floor(spec.trim_fraction * len(deltas)))
            d = np.sort(stack, axis=0)[cut : len(deltas) - cut].mean(axis=0)
        else:
            w = np.asarray(weights, dtype=np.float64)
            d = np.tensordot(w / w.sum(), stack, axes=1)
        s = state.setdefault(name, {"m": np.zeros_like(d), "v": np.zeros_like(d)})
        lr = spec.server_learning_rate
        if spec.algorithm == "fedavgm":
            s["m"] = spec.server_momentum * s["m"] + d
            out[name] = x[name] + lr * s["m"]
        elif spec.algorithm in ("fedadam", "fedyogi"):
            s["m"] = spec.beta1 * s["m"] + (1 - spec.beta1) * d
            if spec.algorithm == "fedadam":
                s["v"] = spec.beta2 * s["v"] + (1 - spec.beta2) * d**2
            else:
                s["v"] = s["v"] - (1 - spec.beta2) * d**2 * np.sign(s["v"] - d**2)
            out[name] = x[name] + lr * s["m"] / (np.sqrt(s["v"]) + spec.epsilon)
        else:
            out[name] = x[name] + lr * d
    return out


def reference_capped_weights(weights: list[float], max_share: float | None) -> list[float]:
    """Weights with no share above max(max_share, 1/n): min(w, t) for the largest level t at
    which t <= max_share * sum(min(w, t)). Found by bisection, not by the code's water-filling.
    max_share None is maxClientShare's default: twice a fair share, 2/n."""
    share = 2 / len(weights) if max_share is None else max_share
    cap = max(share, 1 / len(weights))
    if cap >= 1:
        return list(weights)

    def fits(t: float) -> bool:
        return t <= cap * sum(min(w, t) for w in weights) * (1 + 1e-12)

    lo, hi = 0.0, max(weights)
    if fits(hi):
        return list(weights)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return [min(w, lo) for w in weights]


def as_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in tensors.items()}
