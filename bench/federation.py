"""A federated run (the tiny or the real model) through the trainer's own code, in this process.

Each round calls exactly what the Jobs call: `client.run` per client (load the global adapter,
train, encode the delta with error feedback state in storage, commit it) and the aggregator's
round (`aggregate.initialize` / `aggregate.merge_round`: fetch, verify, decode, check, merge,
server step; then `publish`), and the evaluation Job's `evaluate.run` after every round. Only the
Kubernetes part is left out, and the process start of each Job: the numbers are the algorithm's,
not the orchestration's (the `operator` benchmark measures that).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Assets
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import AdapterSpec, AggregationSpec


@dataclass(frozen=True)
class Recipe:
    """What a run trains and how it encodes and merges: the knobs the benchmarks vary."""

    rounds: int
    local_steps: int
    batch_size: int = 8
    learning_rate: float = 0.01
    rank: int = 8
    max_seq_length: int = 128
    seed: int = 0
    target_modules: tuple[str, ...] | None = None
    """The adapter's modules (None: AdapterSpec's default, the attention's q and v)."""


@dataclass
class RunResult:
    """Per round (round 0 is the initial adapter): eval loss, train loss, bytes per client."""

    eval_loss: list[float | None] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    bytes_per_client: list[float] = field(default_factory=list)
    raw_bytes_per_client: list[float] = field(default_factory=list)
    state_bytes_per_client: list[float] = field(default_factory=list)
    """What each client wrote to its own state in the round (the error-feedback residual):
    bytes over its link too, unless it keeps its state on a volume of its own."""
    full_model_bytes: int = 0
    report_uri: str | None = None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_loss[-1] if self.eval_loss else None

    @property
    def mean_bytes_per_client(self) -> float | None:
        """Mean over every client upload of every round."""
        if not self.bytes_per_client:
            return None
        return sum(self.bytes_per_client) / len(self.bytes_per_client)


def state_bytes(store: Any, client_name: str, round_: int) -> int:
    """The bytes of the residual `client_name` committed for `round_` (0 without one), as its
    commit's manifest lists them: a few hundred bytes read, not the residual itself."""
    from fedtune_trainer.storage import store as st
    from fedtune_trainer.wire.layout import client_state_prefix

    prefix = st.versioned_prefix(client_state_prefix(client_name), round_)
    manifest = st.read_manifest(store, prefix)
    return sum(entry["bytes"] for entry in manifest["files"].values()) if manifest else 0


def quiet(_: str) -> None:
    """The trainer's progress lines would drown the tables."""


@dataclass(frozen=True)
class Variant:
    """One algorithm setting of a run: the server rule, and what it changes in the adapter
    (e.g. freezeA) and in the clients' training (e.g. a proximal term), as spec field values."""

    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def adapter_spec(recipe: Recipe, **overrides: Any) -> AdapterSpec:
    # No dropout: the comparison between configurations should not depend on dropout masks.
    modules = {"target_modules": list(recipe.target_modules)} if recipe.target_modules else {}
    return AdapterSpec(r=recipe.rank, alpha=2.0 * recipe.rank, dropout=0.0, **modules, **overrides)


def federate(
    assets: Assets,
    storage: Path,
    recipe: Recipe,
    clients: dict[str, Path],
    delta: DeltaSpec,
    variant: Variant | None = None,
    *,
    steps: dict[str, int] | None = None,
    run: str = "bench",
    report: bool = False,
) -> RunResult:
    """Rounds 0..recipe.rounds of a run whose clients hold the given data files.

    `steps` overrides the local steps per client (the centralized baseline is one client that
    takes every step). With `report`, the aggregator also renders the run report each round.
    """
    from fedtune_trainer import aggregate, client, evaluate
    from fedtune_trainer.storage import store as st
    from fedtune_trainer.wire.settings import (
        DataSpec,
        EvaluationSpec,
        StorageLocation,
        TrainingSpec,
    )
    from fedtune_trainer.wire.task import AggregateTask, ClientTask, EvaluateTask

    variant = variant or Variant()
    agg = variant.aggregation
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store = st.FileStore(storage)
    store.delete_prefix("")
    common = {
        "run": run,
        "base_model": str(assets.model),
        "adapter": adapter_spec(recipe, **variant.adapter),
        "storage": StorageLocation(uri=store.uri),
    }
    data = DataSpec(format="chat")
    names = sorted(clients)
    result = RunResult()

    def aggregate_round(r: int) -> None:
        task = AggregateTask(
            **common,
            round=r,
            rounds=recipe.rounds,
            clients=names,
            min_clients=len(names),
            aggregation=agg,
            delta=delta,
            seed=recipe.seed,
            drift_control=variant.training.get("drift_control", "none"),
            total_clients=len(names),
        )
        start = time.perf_counter()
        if r == 0:
            merged = aggregate.initialize(task, store, quiet)
        else:
            merged = aggregate.merge_round(task, store, quiet)
        summary = aggregate.publish(task, store, merged, start, quiet)
        if report:
            summary = aggregate.write_report(task, store, summary, quiet)
            result.report_uri = summary.report_uri
        evaluation = EvaluateTask(
            **common,
            round=r,
            data=data,
            evaluation=EvaluationSpec(data_uri=str(assets.eval_data), max_samples=None),
            max_seq_length=recipe.max_seq_length,
        )
        result.eval_loss.append(evaluate.run(evaluation, store, quiet).eval_loss)
        result.train_loss.append(summary.record.train_loss)

    aggregate_round(0)
    for r in range(1, recipe.rounds + 1):
        for name in names:
            training = TrainingSpec(
                local_steps=(steps or {}).get(name, recipe.local_steps),
                batch_size=recipe.batch_size,
                learning_rate=recipe.learning_rate,
                max_seq_length=recipe.max_seq_length,
                precision="auto",
                seed=recipe.seed,
                **variant.training,
            )
            task = ClientTask(
                **common,
                round=r,
                client=name,
                data_uri=str(clients[name]),
                data=data,
                training=training,
                delta=delta,
            )
            summary = client.run(task, store, quiet)
            result.bytes_per_client.append(summary.bytes_sent)
            result.state_bytes_per_client.append(state_bytes(store, name, r))
            result.raw_bytes_per_client.append(summary.raw_bytes)
            result.full_model_bytes = summary.full_model_bytes
        aggregate_round(r)
    return result
