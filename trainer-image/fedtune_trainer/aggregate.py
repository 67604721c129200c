"""`fedtune-trainer aggregate`: turn round r's client deltas into global adapter r.

Round 0 writes the initial adapter (LoRA initialised with the task's seed from the base model's
config alone: no base weight is read).
Round r >= 1:

1. read the committed global adapter r-1;
2. for each client, one at a time: fetch its committed delta to local disk, verify size and
   SHA-256 against its manifest, decode, check tensor names and shapes against the global,
   finiteness and the norm limit; a failing delta is recorded as a Rejection and skipped;
3. fewer accepted deltas than the quorum: fail, writing nothing global;
4. reduce: the weighted mean streams client by client (memory: the global tensors, a float64
   accumulator and one client's delta, whatever the number of clients); median and trimmed mean
   stream tensor by tensor (memory: one tensor times the number of clients, read lazily from the
   verified files on disk);
5. client-level DP when configured: each delta clipped to clip_norm, Gaussian noise of std
   noise_multiplier * clip_norm / n added to the reduced delta (uniform weights when noise is on,
   so that one client's influence, the sensitivity, is clip_norm / n);
6. the server rule (merge.server_step) with its state read from the newest version before r and
   written as version r, so that a rerun of round r reads the same state and never steps twice;
7. write the per-round metrics, then global r as a PEFT directory with its manifest last, and on
   the last round the same adapter under final/;
8. render the run report (report/, see report.py) from every round's metrics in storage.
"""

from __future__ import annotations

import json
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
from .runtime import derive_seed, pick_runtime
from .task import (
    FINAL_PREFIX,
    SERVER_STATE_PREFIX,
    AggregateSummary,
    AggregateTask,
    Rejection,
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


def reduce_robust(
    accepted: list[Accepted], shapes: Mapping[str, tuple[int, ...]], task: AggregateTask
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median or trimmed mean, one tensor at a time across all clients."""
    readers = [(a, decode_file(a.path)[1]) for a in accepted]
    out = {}
    for name in sorted(shapes):
        stack = torch.stack([tensor(name) * a.scale for a, tensor in readers])
        out[name] = merge.robust_reduce(stack, task.aggregation)
        del stack
    return out


def merge_round(task: AggregateTask, store: st.Store, log: Log) -> AggregateSummary:
    start = time.perf_counter()
    r = task.round
    _, files = st.read_committed(
        store, global_prefix(r - 1), [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    )
    global_tensors = lora.parse_weights(files[lora.ADAPTER_WEIGHTS])
    config = files[lora.ADAPTER_CONFIG]
    names = lora.trainable_names(list(global_tensors), task.adapter)
    shapes = {n: tuple(global_tensors[n].shape) for n in names}
    clients = list(dict.fromkeys(task.clients)) or discover_clients(store, r)
    streaming = task.aggregation.algorithm in merge.MEAN_ALGORITHMS
    mean = merge.WeightedMean()
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    with tempfile.TemporaryDirectory(prefix="fedtune-aggregate-") as tmp:
        for client in clients:
            try:
                manifest, path = fetch_client(store, task, client, Path(tmp))
                delta = load_delta(path)
                if reason := merge.check_delta(delta, shapes, task.aggregation.max_delta_norm):
                    raise ValueError(reason)
            except Exception as e:
                rejected.append(Rejection(client=client, reason=reason_of(e)))
                log(f"rejected {client}: {reason_of(e)}")
                continue
            norm = merge.l2_norm(delta)
            scale = merge.clip_factor(norm, task.privacy.clip_norm)
            samples = manifest["samples"]
            item = Accepted(
                client=client,
                path=path,
                samples=samples,
                weight=client_weight(task, client, samples),
                scale=scale,
                train_loss=manifest.get("train_loss"),
                encoded_bytes=path.stat().st_size,
                raw_bytes=manifest.get("raw_bytes", 0),
                norm=norm,
            )
            if streaming:
                mean.add({k: v * scale for k, v in delta.items()}, item.weight)
            del delta
            accepted.append(item)
            log(
                f"accepted {client}: {samples} samples, norm {norm:.4g}, {item.encoded_bytes} bytes"
            )
        if len(accepted) < task.min_clients:
            detail = "; ".join(f"{x.client}: {x.reason}" for x in rejected)[:1500]
            raise QuorumError(
                f"round {r}: {len(accepted)} valid deltas of {len(clients)}, "
                f"quorum is {task.min_clients}" + (f" (rejected {detail})" if detail else "")
            )
        update = mean.result() if streaming else reduce_robust(accepted, shapes, task)
    std = merge.dp_noise_std(task.privacy.noise_multiplier, task.privacy.clip_norm, len(accepted))
    if std > 0:
        gen = torch.Generator().manual_seed(derive_seed(task.seed, task.run, r, "dp-noise"))
        update = {
            n: t + merge.gaussian_noise(tuple(t.shape), std, gen) for n, t in sorted(update.items())
        }
    state_version, state = read_server_state(store, task, log)
    new_global, new_state = merge.server_step(task.aggregation, global_tensors, update, state)
    if new_state:
        st.commit(
            store,
            st.versioned_prefix(SERVER_STATE_PREFIX, r),
            {STATE_FILE: lora.weights_bytes(new_state)},
            {"kind": "server-state", "algorithm": task.aggregation.algorithm, "round": r},
        )
        if state_version is not None:
            st.prune_versions_before(store, SERVER_STATE_PREFIX, state_version)
    total = sum(a.samples for a in accepted if a.train_loss is not None)
    train_loss = (
        sum(a.samples * a.train_loss for a in accepted if a.train_loss is not None) / total
        if total
        else None
    )
    summary = AggregateSummary(
        round=r,
        accepted=[a.client for a in accepted],
        rejected=rejected,
        global_uri=store.url(global_prefix(r)),
        train_loss=train_loss,
        bytes_received=sum(a.encoded_bytes for a in accepted),
    )
    clients_metrics = [
        {
            "client": a.client,
            "samples": a.samples,
            "train_loss": a.train_loss,
            "bytes": a.encoded_bytes,
            "raw_bytes": a.raw_bytes,
            "norm": a.norm,
        }
        for a in accepted
    ]
    return publish(task, store, new_global, config, summary, clients_metrics, start, log)


def initialize(task: AggregateTask, store: st.Store, log: Log) -> AggregateSummary:
    """Round 0: the initial adapter, seeded, from the base model's config alone."""
    from .runtime import config_source

    start = time.perf_counter()
    tensors = lora.initial_adapter(config_source(task.base_model), task.adapter, task.seed)
    values = sum(t.numel() for t in tensors.values())
    log(f"initial adapter: {len(tensors)} tensors, {values} values")
    config = lora.config_json(task.adapter, task.base_model)
    summary = AggregateSummary(round=0, global_uri=store.url(global_prefix(0)))
    return publish(task, store, tensors, config, summary, [], start, log)


def publish(
    task: AggregateTask,
    store: st.Store,
    tensors: Mapping[str, torch.Tensor],
    config: bytes,
    summary: AggregateSummary,
    clients_metrics: list[dict[str, Any]],
    start: float,
    log: Log,
) -> AggregateSummary:
    """Evaluate, then write metrics, global r (manifest last) and, on the last round, final/."""
    r = task.round
    eval_loss = None
    ev = task.evaluation
    if ev.data_uri and (r % ev.every_rounds == 0 or r == task.rounds):
        eval_loss = evaluate(task, tensors)
        log(f"round {r}: eval loss {eval_loss:.4f}")
    files = lora.peft_files(tensors, config)
    meta = {
        "kind": "adapter",
        "run": task.run,
        "round": r,
        "accepted": summary.accepted,
        "adapter": lora.config_summary(config),
    }
    final_uri = None
    summary = summary.model_copy(
        update={"eval_loss": eval_loss, "seconds": round(time.perf_counter() - start, 3)}
    )
    metrics = {
        "run": task.run,
        "round": r,
        "train_loss": summary.train_loss,
        "eval_loss": eval_loss,
        "bytes_received": summary.bytes_received,
        "raw_bytes": sum(c["raw_bytes"] for c in clients_metrics),
        "adapter_bytes": len(files[lora.ADAPTER_WEIGHTS]),
        "accepted": summary.accepted,
        "rejected": [x.wire() for x in summary.rejected],
        "clients": clients_metrics,
        "algorithm": task.aggregation.algorithm,
        "seconds": summary.seconds,
    }
    store.put_bytes(st.join(round_prefix(r), METRICS_FILE), json.dumps(metrics, indent=1).encode())
    st.commit(store, global_prefix(r), files, meta)
    if r == task.rounds:
        st.commit(store, FINAL_PREFIX, files, meta)
        final_uri = store.url(FINAL_PREFIX)
    log(f"round {r}: wrote {summary.global_uri}" + (f" and {final_uri}" if final_uri else ""))
    return summary.model_copy(update={"final_uri": final_uri})


def evaluate(task: AggregateTask, tensors: Mapping[str, torch.Tensor]) -> float:
    """Mean token loss of base + adapter on the evaluation data."""
    from .data import load_examples
    from .runtime import load_base, load_tokenizer
    from .training import mean_loss

    assert task.evaluation.data_uri is not None
    runtime = pick_runtime("auto")
    tok = load_tokenizer(task.tokenizer or task.base_model)
    examples = load_examples(
        task.evaluation.data_uri,
        task.data.format,
        tok,
        task.max_seq_length,
        task.evaluation.max_samples,
    )
    model = lora.attach(load_base(task.base_model, runtime), task.adapter, tensors)
    loss = mean_loss(model, examples, runtime, tok.pad_token_id)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation loss is {loss}")
    return loss


def write_report(
    task: AggregateTask, store: st.Store, summary: AggregateSummary, log: Log
) -> AggregateSummary:
    """Render report/ from the committed metrics and name it in the summary.

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
    """Aggregate (or, at round 0, initialise) one round, then render the run report."""
    store = store or st.open_store(task.storage)
    summary = initialize(task, store, log) if task.round == 0 else merge_round(task, store, log)
    return write_report(task, store, summary, log)
