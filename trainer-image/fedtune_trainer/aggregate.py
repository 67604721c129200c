"""`fedtune-trainer aggregate`: turn round r's client deltas into global adapter r.

Round 0 writes the initial adapter (LoRA initialised from the base model with the task's seed).
Round r >= 1 is `merge_round`, five steps over the committed global adapter r-1, one function each:

1. collect: for each client, one at a time, fetch its committed delta to local disk, verify size
   and SHA-256 against its manifest, decode, check tensor names and shapes against the global,
   finiteness and the norm limit; a failing delta is recorded as a Rejection and skipped; fewer
   accepted deltas than the quorum fail the round, writing nothing global;
2. reduce: the weighted mean streams client by client as step 1 decodes them (memory: the global
   tensors, a float64 accumulator and one client's delta, whatever the number of clients); median
   and trimmed mean go tensor by tensor (memory: one tensor times the number of clients, read
   lazily from the verified files on disk);
3. privatise: client-level DP when configured: each delta was clipped to clip_norm in step 1, and
   Gaussian noise of std noise_multiplier * clip_norm / n is added to the reduced delta (uniform
   weights when noise is on, so that one client's influence, the sensitivity, is clip_norm / n);
4. server step: the server rule (merge.server_step) with its state read from the newest version
   before r and written as version r, so that a rerun of round r reads the same state and never
   steps twice;
5. publish: the round record as rounds/<r>/metrics.json, then global r as a PEFT directory with
   its manifest last, and on the last round the same adapter under final/.

Then the run report (report/, see report.py) from every round's record in storage. Evaluation
is a Job of its own (evaluate.py): the aggregator never needs the base model's weights for it.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import delta as codec
from . import lora, merge
from . import store as st
from .results import AggregateSummary, Contribution, Rejection, RoundRecord, initial_record
from .runtime import derive_seed, pick_runtime, seed_everything
from .task import (
    FINAL_PREFIX,
    SERVER_STATE_PREFIX,
    AggregateTask,
    client_prefix,
    global_prefix,
    round_prefix,
)

METRICS_FILE = "metrics.json"
STATE_FILE = "state.safetensors"
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class QuorumError(RuntimeError):
    """Too few valid deltas to make a global adapter this round."""


@dataclass(frozen=True)
class Accepted:
    """A verified client delta, kept on local disk (never all of them in memory)."""

    client: str
    path: Path
    samples: int
    weight: float
    scale: float
    """DP clip factor applied to this delta (1 without clipping)."""
    train_loss: float | None
    encoded_bytes: int
    raw_bytes: int
    norm: float

    def contribution(self) -> Contribution:
        return Contribution(
            client=self.client,
            samples=self.samples,
            weight=self.weight,
            train_loss=self.train_loss,
            encoded_bytes=self.encoded_bytes,
            raw_bytes=self.raw_bytes,
            norm=self.norm,
        )


# --------------------------------------------------------------------------------------------
# Reading one client's delta
# --------------------------------------------------------------------------------------------


def decode_file(path: Path) -> tuple[codec.Layout, Callable[[str], torch.Tensor]]:
    """The layout of a delta file and a lazy decoder of its tensors (memory-mapped parts)."""
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    layout = codec.layout_from_metadata(handle.metadata())
    keys = set(handle.keys())

    def get(key: str) -> torch.Tensor:
        if key not in keys:
            raise codec.DeltaFormatError(f"missing part {key!r}")
        return handle.get_tensor(key)

    return layout, lambda name: codec.decode_one(layout, name, get)


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a delta file, dense fp32."""
    try:
        layout, tensor = decode_file(path)
        return {name: tensor(name) for name in sorted(layout.tensors)}
    except Exception as e:  # safetensors and torch raise many types for corrupt bytes
        raise codec.DeltaFormatError(f"undecodable delta: {reason_of(e)}") from e


def fetch_client(
    store: st.Store, task: AggregateTask, client: str, workdir: Path
) -> tuple[dict[str, Any], Path]:
    """The client's manifest and its delta file on local disk, verified; raises with the reason."""
    prefix = client_prefix(task.round, client)
    manifest = st.read_manifest(store, prefix)
    if manifest is None:
        raise LookupError("no committed delta (manifest.json missing)")
    if manifest.get("round") != task.round or manifest.get("client") != client:
        raise ValueError(
            f"manifest names round {manifest.get('round')} client {manifest.get('client')!r}"
        )
    samples = manifest.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"bad sample count {samples!r}")
    loss = manifest.get("train_loss")
    if loss is not None and not (isinstance(loss, int | float) and math.isfinite(loss)):
        raise ValueError(f"bad train loss {loss!r}")
    if not isinstance(manifest.get("raw_bytes", 0), int):
        raise ValueError(f"bad raw byte count {manifest.get('raw_bytes')!r}")
    path = workdir / client / codec.DELTA_FILE
    st.fetch_committed(store, prefix, path.parent, [codec.DELTA_FILE])
    return manifest, path


def reason_of(error: BaseException) -> str:
    """A one-line reason of at most 200 characters (task.Rejection's bound)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------
# The round
# --------------------------------------------------------------------------------------------


def discover_clients(store: st.Store, round_: int) -> list[str]:
    """Clients with anything under rounds/<r>/clients/ (used when the task lists none)."""
    prefix = st.join(round_prefix(round_), "clients") + "/"
    return sorted({key[len(prefix) :].split("/", 1)[0] for key in store.list(prefix)})


def client_weight(task: AggregateTask, client: str, samples: int) -> float:
    if task.privacy.noise_multiplier > 0:
        return 1.0
    return samples * task.client_weights.get(client, 1.0)


@dataclass(frozen=True)
class Merged:
    """A round's outcome before it is published: the record and the new global adapter."""

    record: RoundRecord
    tensors: Mapping[str, torch.Tensor]
    config: bytes


DeltaSink = Callable[[Accepted, Mapping[str, torch.Tensor]], None]


def collect(
    task: AggregateTask,
    store: st.Store,
    shapes: Mapping[str, tuple[int, ...]],
    workdir: Path,
    log: Log,
    sink: DeltaSink | None = None,
) -> tuple[list[Accepted], list[Rejection]]:
    """Step 1: fetch, verify and decode each client's delta, one at a time.

    Every accepted delta is handed, already clipped, to `sink` while it is in memory (the
    streaming mean of step 2), then dropped; its verified file stays in `workdir` for reducers
    that need every client at once.
    """
    clients = list(dict.fromkeys(task.clients)) or discover_clients(store, task.round)
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    for client in clients:
        try:
            manifest, path = fetch_client(store, task, client, workdir)
            delta = load_delta(path)
            if reason := merge.check_delta(delta, shapes, task.aggregation.max_delta_norm):
                raise ValueError(reason)
        except Exception as e:
            rejected.append(Rejection(client=client, reason=reason_of(e)))
            log(f"rejected {client}: {reason_of(e)}")
            continue
        norm = merge.l2_norm(delta)
        samples = manifest["samples"]
        item = Accepted(
            client=client,
            path=path,
            samples=samples,
            weight=client_weight(task, client, samples),
            scale=merge.clip_factor(norm, task.privacy.clip_norm),
            train_loss=manifest.get("train_loss"),
            encoded_bytes=path.stat().st_size,
            raw_bytes=manifest.get("raw_bytes", 0),
            norm=norm,
        )
        if sink is not None:
            sink(item, {k: v * item.scale for k, v in delta.items()})
        del delta
        accepted.append(item)
        log(f"accepted {client}: {samples} samples, norm {norm:.4g}, {item.encoded_bytes} bytes")
    if len(accepted) < task.min_clients:
        detail = "; ".join(f"{x.client}: {x.reason}" for x in rejected)[:1500]
        raise QuorumError(
            f"round {task.round}: {len(accepted)} valid deltas of {len(clients)}, "
            f"quorum is {task.min_clients}" + (f" (rejected {detail})" if detail else "")
        )
    return accepted, rejected


def reduce_robust(
    accepted: list[Accepted], shapes: Mapping[str, tuple[int, ...]], task: AggregateTask
) -> dict[str, torch.Tensor]:
    """Step 2 for median and trimmed mean: one tensor at a time across all clients."""
    readers = [(a, decode_file(a.path)[1]) for a in accepted]
    out = {}
    for name in sorted(shapes):
        stack = torch.stack([tensor(name) * a.scale for a, tensor in readers])
        out[name] = merge.robust_reduce(stack, task.aggregation)
        del stack
    return out


def privatise(
    task: AggregateTask, update: dict[str, torch.Tensor], n_clients: int
) -> dict[str, torch.Tensor]:
    """Step 3: Gaussian noise on the reduced delta, seeded by the round (a rerun adds the same)."""
    std = merge.dp_noise_std(task.privacy.noise_multiplier, task.privacy.clip_norm, n_clients)
    if std <= 0:
        return update
    gen = torch.Generator().manual_seed(derive_seed(task.seed, task.run, task.round, "dp-noise"))
    return {
        n: t + merge.gaussian_noise(tuple(t.shape), std, gen) for n, t in sorted(update.items())
    }


def read_server_state(
    store: st.Store, task: AggregateTask, log: Log
) -> tuple[int | None, dict[str, torch.Tensor] | None]:
    """The newest server state written before this round, if it fits this algorithm."""
    if task.aggregation.algorithm not in merge.STATE_KEYS:
        return None, None
    version = st.latest_version_before(store, SERVER_STATE_PREFIX, task.round)
    if version is None:
        return None, None
    manifest, files = st.read_committed(
        store, st.versioned_prefix(SERVER_STATE_PREFIX, version), [STATE_FILE]
    )
    if manifest.get("algorithm") != task.aggregation.algorithm:
        log(f"server state of round {version} is for {manifest.get('algorithm')}; starting afresh")
        return version, None
    return version, lora.parse_weights(files[STATE_FILE])


def server_update(
    task: AggregateTask,
    store: st.Store,
    global_tensors: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    log: Log,
) -> dict[str, torch.Tensor]:
    """Step 4: the server rule, its state read from before round r and written as version r."""
    state_version, state = read_server_state(store, task, log)
    new_global, new_state = merge.server_step(task.aggregation, global_tensors, update, state)
    if new_state:
        r = task.round
        st.commit(
            store,
            st.versioned_prefix(SERVER_STATE_PREFIX, r),
            {STATE_FILE: lora.weights_bytes(new_state)},
            {"kind": "server-state", "algorithm": task.aggregation.algorithm, "round": r},
        )
        if state_version is not None:
            st.prune_versions_before(store, SERVER_STATE_PREFIX, state_version)
    return new_global


def round_record(
    task: AggregateTask, accepted: list[Accepted], rejected: list[Rejection]
) -> RoundRecord:
    """The record of a merged round (eval loss, adapter size and time are filled in later)."""
    with_loss = [a for a in accepted if a.train_loss is not None]
    total = sum(a.samples for a in with_loss)
    train_loss = sum(a.samples * a.train_loss for a in with_loss) / total if total else None  # type: ignore[operator]
    return RoundRecord(
        run=task.run,
        round=task.round,
        algorithm=task.aggregation.algorithm,
        accepted=len(accepted),
        rejected=len(rejected),
        train_loss=train_loss,
        bytes_received=sum(a.encoded_bytes for a in accepted),
        raw_bytes=sum(a.raw_bytes for a in accepted),
        contributions=[a.contribution() for a in accepted],
        rejections=rejected,
    )


def read_global(store: st.Store, round_: int) -> tuple[dict[str, torch.Tensor], bytes]:
    """The committed global adapter of `round_`: its tensors and its adapter_config.json."""
    _, files = st.read_committed(
        store, global_prefix(round_), [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    )
    return lora.parse_weights(files[lora.ADAPTER_WEIGHTS]), files[lora.ADAPTER_CONFIG]


def merge_round(task: AggregateTask, store: st.Store, log: Log) -> Merged:
    """Round r >= 1: global r-1 and the clients' deltas -> global r, in the five steps above."""
    global_tensors, config = read_global(store, task.round - 1)
    names = lora.trainable_names(list(global_tensors), task.adapter)
    shapes = {n: tuple(global_tensors[n].shape) for n in names}
    streaming = task.aggregation.algorithm in merge.MEAN_ALGORITHMS
    mean = merge.WeightedMean()
    with tempfile.TemporaryDirectory(prefix="fedtune-aggregate-") as tmp:

        def feed(item: Accepted, delta: Mapping[str, torch.Tensor]) -> None:
            mean.add(delta, item.weight)

        accepted, rejected = collect(  # 1
            task, store, shapes, Path(tmp), log, feed if streaming else None
        )
        update = mean.result() if streaming else reduce_robust(accepted, shapes, task)  # 2
    update = privatise(task, update, len(accepted))  # 3
    new_global = server_update(task, store, global_tensors, update, log)  # 4
    return Merged(round_record(task, accepted, rejected), new_global, config)


def initialize(task: AggregateTask, store: st.Store, log: Log) -> Merged:
    """Round 0: the initial adapter, seeded, from the base model."""
    from .runtime import load_base

    seed_everything(task.seed)
    base = load_base(task.base_model, pick_runtime("auto"))
    tensors = lora.adapter_tensors(lora.attach(base, task.adapter))
    del base
    values = sum(t.numel() for t in tensors.values())
    log(f"initial adapter: {len(tensors)} tensors, {values} values")
    config = lora.config_json(task.adapter, task.base_model)
    return Merged(initial_record(task.run, task.aggregation.algorithm), tensors, config)


def publish(
    task: AggregateTask, store: st.Store, merged: Merged, start: float, log: Log
) -> AggregateSummary:
    """Step 5: the round record, then global r (manifest last) and, on the last round, final/."""
    r = task.round
    files = lora.peft_files(merged.tensors, merged.config)
    record = merged.record.model_copy(
        update={
            "adapter_bytes": len(files[lora.ADAPTER_WEIGHTS]),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    write_record(store, record)
    meta = {
        "kind": "adapter",
        "run": task.run,
        "round": r,
        "accepted": [c.client for c in record.contributions],
        "adapter": lora.config_summary(merged.config),
    }
    st.commit(store, global_prefix(r), files, meta)
    final_uri = None
    if r == task.rounds:
        st.commit(store, FINAL_PREFIX, files, meta)
        final_uri = store.url(FINAL_PREFIX)
    global_uri = store.url(global_prefix(r))
    log(f"round {r}: wrote {global_uri}" + (f" and {final_uri}" if final_uri else ""))
    return AggregateSummary(record=record, global_uri=global_uri, final_uri=final_uri)


def write_record(store: st.Store, record: RoundRecord) -> None:
    """rounds/<r>/metrics.json: the round record, for the report and for people."""
    store.put_bytes(
        st.join(round_prefix(record.round), METRICS_FILE),
        record.model_dump_json(by_alias=True, indent=1).encode(),
    )


# --------------------------------------------------------------------------------------------
# After the merge: the report
# --------------------------------------------------------------------------------------------


def write_report(
    task: AggregateTask, store: st.Store, summary: AggregateSummary, log: Log
) -> AggregateSummary:
    """Render report/ from the committed records and name it in the summary.

    Runs after the round is committed, and a failure here is logged, not raised: the report is a
    view of what storage already holds (`fedtune report` can render it later), so a plotting
    problem must not fail, and so retry, a round whose adapter is already written.
    """
    from . import report

    try:
        uri = report.write(store, task.run, task.round)
    except Exception as e:
        log(f"warning: run report not written: {type(e).__name__}: {reason_of(e)}")
        return summary
    log(f"round {task.round}: report at {uri}")
    return summary.model_copy(update={"report_uri": uri})


def run(task: AggregateTask, store: st.Store | None = None, log: Log = _stderr) -> AggregateSummary:
    """Aggregate (or, at round 0, initialise) one round, then render the report."""
    store = store or st.open_store(task.storage)
    start = time.perf_counter()
    merged = initialize(task, store, log) if task.round == 0 else merge_round(task, store, log)
    summary = publish(task, store, merged, start, log)
    return write_report(task, store, summary, log)
