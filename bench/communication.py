"""`communication`: what a client uploads per round, and what the compression costs in loss.

Two parts:

1. A model trained for real through the trainer's own client and aggregator code
   (`bench.federation`), the same clients, data, rounds and local steps for every encoding of
   the LoRA delta (GradualDiff). Full size: the pretrained SmolLM2-135M-Instruct with an
   all-linear r=16 adapter, one real-text source per client; its full-model rows (what a
   full-model FedAvg client uploads) are computed from its parameter count, since training all
   135M weights for every round is beyond a CPU's bench budget. Smoke size: the tiny random
   model, where full-model fp32 FedAvg (every client trains every weight and uploads the whole
   model as fp32 safetensors; the server averages the models) is trained too.
   Bytes are the files the clients actually upload, averaged over every client and round; the
   eval loss is the evaluation Job's after the last round. `state_bytes_per_client_round` is the
   error-feedback residual each client commits per round: written to (and read back from) the
   run's storage unless the client keeps its state on a volume of its own (FEDTUNE_STATE_DIR).
2. Llama shapes (1B and 7B parameters), computed, not trained: the parameter count comes from
   the model built on PyTorch's meta device (no memory), the full-model bytes are that count times
   4 (fp32) or 2 (bf16), and each encoding's bytes are the real codec's output on a delta of the
   adapter's exact shapes (LoRA r=16 on q/k/v/o) with seeded Gaussian values. Real deltas are not
   Gaussian, so zstd may do somewhat better on them; top-k and quantization sizes do not depend
   on the values at all.

`ratio_vs_full_model` is full-model fp32 bytes / this row's bytes: how many times less a client
uploads than under full-model FedAvg of the same model.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    Assets,
    RealSizes,
    Result,
    TinySizes,
    device_name,
    fmt_float,
    fmt_int,
    fmt_ratio,
    human_count,
    real_assets,
    save_figure,
    tiny_assets,
)
from bench.federation import Recipe, RunResult, federate, quiet
from bench.tables import per_round
from fedtune_trainer.aggregation.reducers import WeightedMean
from fedtune_trainer.wire.delta_settings import DeltaSpec, QuantizationSpec

NAME = "communication"
TITLE = "Bytes uploaded per client per round, and the eval loss they buy"


def _ef(top_k: float = 1.0, **quantization: object) -> DeltaSpec:
    """bf16, error feedback, zstd; top-k and quantization as given."""
    return DeltaSpec(
        dtype="bf16",
        top_k=top_k,
        error_feedback=True,
        quantization=QuantizationSpec.model_validate(quantization),
    )


ENCODINGS: dict[str, DeltaSpec] = {
    "fp32 adapter delta": DeltaSpec(dtype="fp32", compression="none", error_feedback=False),
    "bf16 delta + zstd": DeltaSpec(dtype="bf16", compression="zstd", error_feedback=False),
    "8-bit + EF + zstd": _ef(bits=8),
    "top-k 10% + EF + 8-bit + zstd": _ef(0.1, bits=8),
    "top-k 10% + EF + nf4 + zstd": _ef(0.1, bits=4, codebook="nf4"),
    "top-k 5% + EF + 8-bit + zstd": _ef(0.05, bits=8),
}
"""The delta encodings compared; EF = error feedback (what was not sent is carried over); nf4
blocks are 64 values. Positions of top-k take the smallest coding (bitmap, int32 gaps or
Elias-Fano) on their own. The rows explore what reaches 30x smaller than the fp32 delta: the
default (bf16 + zstd, about 2.6x), quantization alone (about 4x, error feedback carrying the
rounding), then top-k at 10% and 5% (25-37x and 44x on Llama-7B shapes), the price in loss
being top-k's. Each trained row costs 10 rounds of four clients on a CPU (about 10 minutes),
so the set is kept small; SHAPE_ONLY's are measured in bytes on the Llama shapes alone."""
SHAPE_ONLY: dict[str, DeltaSpec] = {
    "nf4 + EF + zstd": _ef(bits=4, codebook="nf4"),
    "top-k 20% + EF + nf4 + zstd": _ef(0.2, bits=4, codebook="nf4"),
    "top-k 10% + EF + 4-bit SR + zstd": _ef(0.1, bits=4, stochastic_rounding=True),
    "top-k 1% + EF + 4-bit + zstd": _ef(0.01, bits=4),
}
"""Encodings measured on the Llama shapes only (bytes; no training, so no loss)."""
REFERENCE = "fp32 adapter delta"
"""What every encoding's loss cost is measured against: the lossless delta, at the same round."""
REPORT_ENCODING = "top-k 10% + EF + 8-bit + zstd"
"""The run whose report (report/ as the aggregator writes it) is kept as the sample report."""
FULL_MODEL = "full-model fp32 FedAvg"
COLUMNS = [
    "model",
    "config",
    "bytes_per_client_round",
    "state_bytes_per_client_round",
    "run_bytes_per_client",
    "ratio_vs_fp32_delta",
    "ratio_vs_full_model",
    "eval_loss",
    "loss_cost",
]
FORMATS = {
    "bytes_per_client_round": fmt_int,
    "state_bytes_per_client_round": fmt_int,
    "run_bytes_per_client": fmt_int,
    "ratio_vs_fp32_delta": fmt_ratio,
    "ratio_vs_full_model": fmt_ratio,
    "eval_loss": fmt_float(4),
    "loss_cost": "signed-percent:2",
}
REPRODUCIBLE = ("bytes_per_client_round", "run_bytes_per_client", "eval_loss")
"""Columns a rerun must reproduce (bench/records.py compare): seeded training, exact sizes."""


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture model (enough to build it on the meta device)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    tied_embeddings: bool


LLAMA_1B = LlamaShape("llama-1b", 128256, 2048, 8192, 16, 32, 8, True)
"""Llama 3.2 1B's published dimensions (1.24B parameters)."""
LLAMA_7B = LlamaShape("llama-7b", 32000, 4096, 11008, 32, 32, 32, False)
"""Llama 2 7B's published dimensions (6.74B parameters)."""
LLAMA_TEST = LlamaShape("llama-test", 1024, 256, 512, 2, 4, 2, True)
"""A miniature of the same architecture, for the smoke test only."""
SHAPE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Sizes:
    model: str = "real"
    """`real`: SmolLM2-135M-Instruct on real text, an all-linear adapter, full-model rows computed
    from its parameter count; `tiny`: the random model, full-model FedAvg trained too."""
    real: RealSizes = field(default_factory=RealSizes)
    tiny: TinySizes = field(default_factory=TinySizes)
    recipe: Recipe = field(
        default_factory=lambda: Recipe(
            rounds=10,
            local_steps=3,
            batch_size=4,
            learning_rate=1e-3,
            rank=16,
            target_modules=("all-linear",),
        )
    )
    shapes: tuple[LlamaShape, ...] = (LLAMA_1B, LLAMA_7B)
    shape_rank: int = 16
    full_model_low_lr: float | None = 0.001
    """(tiny) Full-model FedAvg again at this learning rate: training every weight at the
    adapter's learning rate is unstable, and a baseline should not look better or worse than it
    is."""


FULL = Sizes()
SMOKE = Sizes(
    model="tiny",
    tiny=TinySizes(clients=2, samples=16, eval_samples=8, hidden_size=32, layers=1),
    recipe=Recipe(rounds=1, local_steps=2, batch_size=4, rank=2),
    shapes=(LLAMA_TEST,),
)


# --------------------------------------------------------------------------------------------
# Full-model FedAvg: the baseline without GradualDiff
# --------------------------------------------------------------------------------------------


def full_model_fedavg(assets: Assets, recipe: Recipe, clients: dict[str, Path]) -> RunResult:
    """Classic FedAvg of the whole model: each client trains every weight from the global model
    and uploads all of them (fp32 safetensors); the server takes the sample-weighted mean.

    Same data, rounds, local steps, batch, learning rate and seeds as the delta runs; the only
    differences are what is trained (every weight instead of a LoRA adapter) and what is sent.
    """
    import safetensors.torch
    import torch

    from fedtune_trainer.learning.data import load_examples
    from fedtune_trainer.learning.loading import load_base, load_tokenizer
    from fedtune_trainer.learning.runtime import Runtime, derive_seed, pick_runtime, seed_everything
    from fedtune_trainer.learning.training import mean_loss, train
    from fedtune_trainer.wire.settings import TrainingSpec

    auto = pick_runtime("auto")
    # Trained weights stay fp32 (as LoRA weights do); autocast as the LoRA runs use it.
    runtime = Runtime(auto.device, torch.float32, auto.autocast_dtype)
    tok = load_tokenizer(str(assets.model))
    pad = tok.pad_token_id
    evals = load_examples(str(assets.eval_data), "chat", tok, recipe.max_seq_length, None)
    data = {
        n: load_examples(str(p), "chat", tok, recipe.max_seq_length, None)
        for n, p in clients.items()
    }
    model = load_base(str(assets.model), runtime)
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())  # tied weights appear once, as they are sent

    def load(weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n].to(p.device, p.dtype))

    global_ = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    result = RunResult(full_model_bytes=sum(p.numel() for p in params.values()) * 4)
    result.eval_loss.append(mean_loss(model, evals, runtime, pad))
    result.train_loss.append(None)
    spec = TrainingSpec(
        local_steps=recipe.local_steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        max_seq_length=recipe.max_seq_length,
        seed=recipe.seed,
    )
    for r in range(1, recipe.rounds + 1):
        mean = WeightedMean()
        loss_sum, samples = 0.0, 0
        for name in sorted(clients):
            load(global_)
            generator = seed_everything(derive_seed(recipe.seed, "bench", r, name))
            trained = train(model, data[name], spec, runtime, pad, generator, quiet)
            blob = safetensors.torch.save(
                {n: p.detach().float().cpu().contiguous() for n, p in params.items()}
            )
            result.bytes_per_client.append(len(blob))
            result.raw_bytes_per_client.append(result.full_model_bytes)
            mean.add(safetensors.torch.load(blob), float(trained.samples))
            loss_sum += trained.loss * trained.samples
            samples += trained.samples
        global_ = mean.result()
        load(global_)
        result.eval_loss.append(mean_loss(model, evals, runtime, pad))
        result.train_loss.append(loss_sum / samples)
    return result


# --------------------------------------------------------------------------------------------
# Llama shapes: computed, not trained
# --------------------------------------------------------------------------------------------


def shape_of(shape: LlamaShape) -> tuple[int, dict[str, tuple[int, int]]]:
    """Parameter count of the model, and (in, out) features of each LoRA target projection."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied_embeddings,
    )
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    targets = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in SHAPE_TARGETS
    }
    return count, targets


def shape_rows(shape: LlamaShape, rank: int, seed: int = 0) -> list[dict[str, Any]]:
    """Full-model bytes (computed) and each encoding's bytes (the real codec on a delta of the
    adapter's exact shapes) for one round's upload."""
    import torch

    from fedtune_trainer.codec import encoding as codec

    count, targets = shape_of(shape)
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for name, (fan_in, fan_out) in sorted(targets.items()):
        prefix = f"base_model.model.{name}"
        delta[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 1e-3
        delta[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 1e-3
    values = sum(t.numel() for t in delta.values())
    full = count * 4
    label = (
        f"{shape.name} ({human_count(count)} params; LoRA r={rank} q/k/v/o, {human_count(values)})"
    )
    rows = [
        _row(label, "full model fp32", full, full, None),
        _row(label, "full model bf16", count * 2, full, None),
    ]
    reference = None
    for config, spec in (ENCODINGS | SHAPE_ONLY).items():
        size = codec.encode(delta, spec).encoded_bytes
        reference = reference or (size if config == REFERENCE else None)
        row = _row(label, config, size, full, None)
        row["ratio_vs_fp32_delta"] = reference / size if reference else None
        rows.append(row)
    return rows


def _row(
    model: str, config: str, size: float | None, full: float, eval_loss: float | None
) -> dict[str, Any]:
    return {
        "model": model,
        "config": config,
        "bytes_per_client_round": round(size) if size is not None else None,
        "ratio_vs_full_model": full / size if size else None,
        "eval_loss": eval_loss,
    }


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def plot(runs: dict[str, RunResult], out: Path) -> Path:
    """Eval loss against the bytes a client has uploaded so far (one point per round), and
    the eval loss per round: where each encoding sits on the loss-bytes frontier."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    frontier_ax, loss_ax = fig.subplots(1, 2)
    for config, result in runs.items():
        sent = cumulative_bytes_per_client(result)
        losses = result.eval_loss[1:]
        frontier_ax.plot(sent, losses, "o-", ms=3, label=config)
        rounds = [r for r, v in enumerate(result.eval_loss) if v is not None]
        loss_ax.plot(rounds, [result.eval_loss[r] for r in rounds], "o-", ms=3, label=config)
    frontier_ax.set_xscale("log")
    frontier_ax.set(
        xlabel="bytes uploaded per client so far (log)",
        ylabel="eval loss",
        title="Eval loss against bytes sent (one point per round)",
    )
    loss_ax.set(xlabel="round", ylabel="eval loss", title="Eval loss per round")
    for ax in (frontier_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=7)
    return save_figure(fig, out, NAME)


def cumulative_bytes_per_client(result: RunResult) -> list[float]:
    """After each round, what one client has uploaded in all (the mean over the clients)."""
    per_round = len(result.bytes_per_client) // max(1, len(result.eval_loss) - 1)
    out, total = [], 0.0
    for r in range(len(result.eval_loss) - 1):
        chunk = result.bytes_per_client[r * per_round : (r + 1) * per_round]
        total += sum(chunk) / max(1, len(chunk))
        out.append(total)
    return out


def record_tables(doc: dict[str, Any]) -> dict[str, str]:
    """The per-round tables of a record (bench/records.py): each encoding's eval loss, and its
    cost against the lossless delta at the same round."""
    losses: dict[str, list[float | None]] = doc["settings"]["eval_loss_per_round"]
    reference = losses.get(REFERENCE)
    costs = {
        config: [loss_cost(loss, ref) for loss, ref in zip(series, reference, strict=True)]
        for config, series in losses.items()
        if reference is not None and config != REFERENCE
    }
    return {
        "loss-per-round": per_round(losses, "float:4"),
        "cost-per-round": per_round(costs, "signed-percent:1", first_round=1),
    }


def loss_cost(loss: float | None, reference: float | None) -> float | None:
    """How much higher an encoding's eval loss is than the lossless delta's (0.01 = 1% worse)."""
    if loss is None or reference is None:
        return None
    return loss / reference - 1


def run(sizes: Sizes, work: Path, out: Path) -> Result:
    from fedtune_trainer.storage import store as st
    from fedtune_trainer.wire.layout import REPORT_PREFIX

    real = sizes.model == "real"
    assets = real_assets(work, sizes.real) if real else tiny_assets(work, sizes.tiny)
    n = assets.sizes.clients
    clients = {f"client-{i}": assets.client_data(i) for i in range(n)}
    recipe = sizes.recipe
    runs: dict[str, RunResult] = {}
    if not real:  # training every weight of the real model is beyond a CPU's bench budget
        runs[FULL_MODEL] = full_model_fedavg(assets, recipe, clients)
    if not real and sizes.full_model_low_lr is not None:
        slow = dataclasses.replace(recipe, learning_rate=sizes.full_model_low_lr)
        runs[f"{FULL_MODEL}, lr {slow.learning_rate:g}"] = full_model_fedavg(assets, slow, clients)
    report_dir = out / f"{NAME}-report"
    for config, spec in ENCODINGS.items():
        storage = work / f"{NAME}-{len(runs)}"
        keep = config == REPORT_ENCODING
        runs[config] = federate(assets, storage, recipe, clients, spec, report=keep)
        if keep:
            shutil.rmtree(report_dir, ignore_errors=True)
            st.fetch_committed(st.FileStore(storage), REPORT_PREFIX, report_dir)
        shutil.rmtree(storage, ignore_errors=True)
    targets = "/".join(recipe.target_modules or ("q", "v"))
    label = (
        f"{'smollm2-135m' if real else 'tiny'} ({human_count(assets.parameters)} params; "
        f"LoRA r={recipe.rank} {targets})"
    )
    if real:  # computed: the fp32 / bf16 weights a full-model FedAvg client would upload
        full = assets.parameters * 4
        rows = [
            _row(label, "full model fp32", full, full, None),
            _row(label, "full model bf16", assets.parameters * 2, full, None),
        ]
    else:
        full = runs[FULL_MODEL].mean_bytes_per_client or 0
        rows = []
    reference = runs[REFERENCE]
    for config, r in runs.items():
        row = _row(label, config, r.mean_bytes_per_client, full, r.final_eval_loss)
        rounds_sent = cumulative_bytes_per_client(r)
        row["run_bytes_per_client"] = round(rounds_sent[-1]) if rounds_sent else None
        # The residual each client commits per round: over its link too, unless it keeps its
        # state on a volume of its own (FEDTUNE_STATE_DIR).
        state = r.state_bytes_per_client
        row["state_bytes_per_client_round"] = round(sum(state) / len(state)) if state else None
        row["ratio_vs_fp32_delta"] = (
            (reference.mean_bytes_per_client or 0) / r.mean_bytes_per_client
            if r.mean_bytes_per_client
            else None
        )
        row["loss_cost"] = loss_cost(r.final_eval_loss, reference.final_eval_loss)
        rows.append(row)
    for shape in sizes.shapes:
        rows += shape_rows(shape, sizes.shape_rank)
    plot_path = plot(runs, out)
    initial = runs[REPORT_ENCODING].eval_loss[0]
    return Result(
        name=NAME,
        title=TITLE,
        columns=COLUMNS,
        rows=rows,
        formats=FORMATS,
        settings={
            "device": device_name(),
            "model": str(assets.model),
            "parameters": assets.parameters,
            "clients": n,
            "client_data": assets.kinds(),
            "data": str(assets.data),
            "max_seq_length": recipe.max_seq_length,
            "adapter_targets": list(recipe.target_modules or ("q_proj", "v_proj")),
            "rounds": recipe.rounds,
            "local_steps": recipe.local_steps,
            "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate,
            "lora_rank": recipe.rank,
            "aggregation": "fedavg (sample-weighted), server lr 1",
            "eval_loss_round0": initial,
            "eval_loss_per_round": {c: r.eval_loss for c, r in runs.items()},
            "bytes_per_round": {c: r.bytes_per_client for c, r in runs.items()},
            "shape_rank": sizes.shape_rank,
            "shape_targets": list(SHAPE_TARGETS),
        },
        notes=[
            f"eval loss before training (round 0) is {initial:.4f}; every trained row trains "
            f"{recipe.rounds} rounds x {n} clients x {recipe.local_steps} steps "
            f"at lr {recipe.learning_rate:g} unless it says otherwise.",
            "ratio_vs_full_model = full-model fp32 bytes / row bytes (x times smaller).",
            "Llama rows are computed (not trained): eval_loss is empty; encodings run the real "
            "codec on one round's delta with Gaussian values.",
        ],
        plots=[plot_path.name, f"{report_dir.name}/report.html"],
    )
