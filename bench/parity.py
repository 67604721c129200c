"""`parity`: how close federated training gets to centralized training on the same data.

Centralized: one trainer holds the union of the clients' data and takes every optimizer step
(rounds x clients x local steps) in one go, from the same initial adapter. Federated: the clients
keep their non-IID shards (full size: the pretrained SmolLM2-135M-Instruct, one real-text source
per client: the Python language reference, standard-library docstrings, package READMEs, license
texts; the eval set holds out whole documents of all four), train `local steps` per round from
the global adapter, and the server merges their deltas under each variant: the LoRA aggregation
mode, the drift control, the server rule. Everything runs through the trainer's own client and
aggregator code with lossless fp32 deltas, so the gap measured is the federation's (client drift
on non-IID data, the server rule, averaging LoRA factors), not compression's (the `communication`
benchmark measures that).

FedAdam's server learning rate has no neutral value (FedAvg's 1.0 is plain averaging), so it is
run at a few values and every one is reported: the best is what tuning would find, the spread is
what a wrong guess costs.

`ratio_vs_centralized` = eval loss / centralized eval loss: 1.0 is parity, above 1 is worse.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    RealSizes,
    Result,
    TinySizes,
    device_name,
    fmt_float,
    real_assets,
    save_figure,
    tiny_assets,
)
from bench.federation import Recipe, RunResult, Variant, federate
from bench.tables import per_round
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import AggregationSpec

NAME = "parity"
TITLE = "Federated against centralized training (same data, same total optimizer steps)"
LOSSLESS = DeltaSpec(dtype="fp32", compression="none", error_feedback=False)
REPRODUCIBLE = ("eval_loss",)
"""Columns a rerun must reproduce (bench/records.py compare); timings are not among them."""


def variants(fedadam_server_lrs: tuple[float, ...]) -> dict[str, Variant]:
    """The federated settings compared, by the name their row carries."""
    out = {
        "fedavg": Variant(),
        # Averaging K clients' deltas moves the adapter about as far as one client's local steps
        # on a K-times larger batch; a server step above 1 gives back the sequential progress.
        "fedavg (server lr 2)": Variant(AggregationSpec(server_learning_rate=2.0)),
        "fedavg, freezeA (FFA-LoRA)": Variant(adapter={"freeze_a": True}),
        "fedavg, exact LoRA (SVD)": Variant(AggregationSpec(lora="exact")),
        "fedprox (mu 0.01)": Variant(training={"proximal_mu": 0.01}),
        "scaffold": Variant(training={"drift_control": "scaffold"}),
    }
    for lr in fedadam_server_lrs:
        out[f"fedadam (server lr {lr:g})"] = Variant(
            AggregationSpec(algorithm="fedadam", server_learning_rate=lr)
        )
    return out


@dataclass(frozen=True)
class Sizes:
    model: str = "real"
    """`real` (SmolLM2-135M-Instruct on real text) or `tiny` (the smoke test's random model)."""
    real: RealSizes = field(default_factory=RealSizes)
    tiny: TinySizes = field(default_factory=TinySizes)
    recipe: Recipe = field(
        default_factory=lambda: Recipe(
            rounds=3, local_steps=3, batch_size=2, learning_rate=2e-3, rank=8
        )
    )
    fedadam_server_lrs: tuple[float, ...] = (0.003, 0.01)
    """FedAdam at these server learning rates: around the clients' per-round change of a weight
    (learning rate x local steps = 0.006 at full size), where its first steps move each
    coordinate by about the server rate."""


FULL = Sizes()
SMOKE = Sizes(
    model="tiny",
    tiny=TinySizes(clients=2, samples=16, eval_samples=8, hidden_size=32, layers=1),
    recipe=Recipe(rounds=1, local_steps=2, batch_size=4, rank=2),
    fedadam_server_lrs=(0.01,),
)


def union(files: list[Path], dest: Path) -> Path:
    """Every client's records in one file: the centralized trainer's data."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(f.read_text() for f in files))
    return dest


def plot(runs: dict[str, RunResult], centralized: float | None, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for config, result in runs.items():
        points = [(r, v) for r, v in enumerate(result.eval_loss) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=config)
    if centralized is not None:
        ax.axhline(centralized, color="k", ls="--", lw=1, label="centralized (all steps)")
    ax.set(xlabel="round", ylabel="eval loss", title="Federated eval loss per round")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, out, NAME)


def run(sizes: Sizes, work: Path, out: Path) -> Result:
    assets = (
        real_assets(work, sizes.real) if sizes.model == "real" else tiny_assets(work, sizes.tiny)
    )
    recipe = sizes.recipe
    n = assets.sizes.clients
    clients = {f"client-{i}": assets.client_data(i) for i in range(n)}
    total_steps = recipe.rounds * n * recipe.local_steps

    central = federate(
        assets,
        work / f"{NAME}-centralized",
        Recipe(**{**recipe.__dict__, "rounds": 1}),
        {"central": union(list(clients.values()), work / "union.jsonl")},
        LOSSLESS,
        steps={"central": total_steps},
    )
    shutil.rmtree(work / f"{NAME}-centralized", ignore_errors=True)
    reference = central.final_eval_loss

    runs: dict[str, RunResult] = {}
    for i, (config, variant) in enumerate(variants(sizes.fedadam_server_lrs).items()):
        storage = work / f"{NAME}-{i}"
        runs[config] = federate(assets, storage, recipe, clients, LOSSLESS, variant)
        shutil.rmtree(storage, ignore_errors=True)

    def row(config: str, loss: float | None, steps: int, rounds: int) -> dict[str, Any]:
        ratio = loss / reference if loss is not None and reference else None
        return {
            "config": config,
            "eval_loss": loss,
            "ratio_vs_centralized": ratio,
            "rounds": rounds,
            "optimizer_steps": steps,
        }

    initial = central.eval_loss[0]
    rows = [
        row("centralized (union of the clients' data)", reference, total_steps, 1),
        *(
            row(f"federated {config}", r.final_eval_loss, total_steps, recipe.rounds)
            for config, r in runs.items()
        ),
        row("no training (initial adapter)", initial, 0, 0),
    ]
    plot_path = plot(runs, reference, out)
    return Result(
        name=NAME,
        title=TITLE,
        columns=["config", "eval_loss", "ratio_vs_centralized", "rounds", "optimizer_steps"],
        rows=rows,
        formats={"eval_loss": fmt_float(4), "ratio_vs_centralized": fmt_float(3)},
        settings={
            "device": device_name(),
            "model": str(assets.model),
            "parameters": assets.parameters,
            "clients": n,
            "client_data": assets.kinds(),
            "data": str(assets.data),
            "max_seq_length": recipe.max_seq_length,
            "rounds": recipe.rounds,
            "local_steps": recipe.local_steps,
            "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate,
            "lora_rank": recipe.rank,
            "delta": "fp32, lossless",
            "fedadam": {k: getattr(AggregationSpec(), k) for k in ("beta1", "beta2", "epsilon")},
            "eval_loss_per_round": {c: r.eval_loss for c, r in runs.items()},
        },
        notes=[
            f"{n} clients with one kind of data each ({', '.join(assets.kinds())}); the eval "
            "set mixes all of them in equal parts.",
            f"every trained row takes {total_steps} optimizer steps of {recipe.batch_size} "
            f"examples: centralized in one run, federated as {recipe.rounds} rounds x {n} "
            f"clients x {recipe.local_steps} local steps.",
            "ratio_vs_centralized = eval loss / centralized eval loss (1.0 = parity).",
        ],
        plots=[plot_path.name],
    )


def record_tables(doc: dict[str, Any]) -> dict[str, str]:
    """A record's eval loss after every round, one row per federated setting (bench/records.py):
    where each setting gains or loses its distance to centralized training."""
    return {"loss-per-round": per_round(doc["settings"]["eval_loss_per_round"], "float:4")}
