"""`fedtune-trainer aggregate`: turn round r's client deltas into global adapter r.

Round 0 writes the initial adapter (LoRA initialised with the task's seed from the base model's
config alone: no base weight is read).
Round r >= 1 is `merge_round`, steps over the committed global adapter r-1, one function each:

1. collect: for each client, one at a time, validate before spending (`fetch_client`): the
   manifest (bounded) and its fields, the declared size against the largest delta this adapter
   and the run's codec settings allow, the file's header alone against the layout they
   prescribe, and only then the file, streamed and cut off past its declared size, its SHA-256,
   then decoding (zstd bounded by the part's size), finiteness and the norm limit; the client's
   weight too. A failing delta is recorded as a Rejection and skipped; fewer accepted deltas
   than the quorum fail the round, writing nothing global;
2. weigh: bounded influence: a norm above outlierNormFactor x the round's median rejected,
   one above outlierClipFactor x the median clipped, the DP clip, and the share cap on weights
   (maxClientShare: twice a fair share by default);
3. reduce (aggregation/reducers.py, robust.py): the weighted mean is folded from step 1's
   decode when step 2 changed no client's factor, else streamed again client by client from
   the verified files on disk (memory: the global tensors, a float64 accumulator and one
   decoded tensor, whatever the number of clients); median and trimmed mean go tensor by
   tensor (memory: one tensor times the number of clients); krum/multiKrum compute pairwise
   distances tensor by tensor, then average the selected deltas;
4. privatise (aggregation/privacy.py): client-level DP when configured: Gaussian noise of std
   noise_multiplier * clip_norm / n on the reduced delta (uniform weights when noise is on, so
   that one client's influence, the sensitivity, is clip_norm / n);
5. server step (aggregation/server.py): the server rule with its state read from the newest
   version before r and written as version r, so that a rerun of round r reads the same state
   and never steps twice; SCAFFOLD's server control (learning/drift.py) is versioned alike. The
   new global and state must be finite or the attempt fails (NonFiniteError, retryable) having
   committed nothing;
6. publish: the round record as rounds/<r>/metrics.json, then global r (checked finite again)
   as a PEFT directory with its manifest last, and on the last round the same adapter under
   final/.

Then the run report (report/, see report.py) from every round's record in storage, and the
round's client deltas are deleted (unless the run retains them), the record keeping each merged
delta's hash and size. A rerun of the same attempt after the commit reports the committed round
(`committed`). Evaluation is a Job of its own (evaluate.py): the aggregator never needs the base
model's weights for it.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedtune_trainer import report
from fedtune_trainer.adapter import exact, lora
from fedtune_trainer.adapter.lora import read_global
from fedtune_trainer.aggregation import bounds, privacy
from fedtune_trainer.aggregation.intake import (
    Accepted,
    decode_file,
    fetch_client,
    fetch_control,
    reason_of,
)
from fedtune_trainer.aggregation.privacy import privatise
from fedtune_trainer.aggregation.reducers import (
    FirstPass,
    reduce_exact,
    reduce_krum,
    reduce_mean,
    reduce_robust,
)
from fedtune_trainer.aggregation.server import server_update
from fedtune_trainer.codec import precheck
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.learning import drift
from fedtune_trainer.learning.loading import config_source
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.storage.marker import claim_root
from fedtune_trainer.wire.errors import QuorumError
from fedtune_trainer.wire.layout import (
    FINAL_PREFIX,
    global_prefix,
    round_prefix,
)
from fedtune_trainer.wire.results import AggregateSummary, Rejection, RoundRecord, initial_record
from fedtune_trainer.wire.settings import KRUM_ALGORITHMS, MEAN_ALGORITHMS
from fedtune_trainer.wire.task import AggregateTask

METRICS_FILE = "metrics.json"
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The round
# --------------------------------------------------------------------------------------------


def discover_clients(store: st.Store, round_: int) -> list[str]:
    """Clients with anything under rounds/<r>/clients/ (used when the task lists none)."""
    prefix = st.join(round_prefix(round_), "clients") + "/"
    return sorted({key[len(prefix) :].split("/", 1)[0] for key in store.list(prefix)})


def client_weight(task: AggregateTask, client: str, samples: int) -> float:
    """The client's weight before the share cap; `samples` is already a validated count."""
    if task.privacy.noise_multiplier > 0:
        return 1.0
    configured = task.client_weights.get(client, 1.0)
    weight = configured * (samples if task.aggregation.weighting == "samples" else 1)
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"bad weight {weight} (samples {samples}, clientWeight {configured})")
    return float(weight)


@dataclass(frozen=True)
class Merged:
    """A round's outcome before it is published: the record and the new global adapter."""

    record: RoundRecord
    tensors: Mapping[str, torch.Tensor]
    config: bytes


@dataclass(frozen=True)
class Weighing:
    """How the accepted deltas enter the merge, for the round record."""

    max_client_share: float | None = None
    median_norm: float | None = None
    outlier_norm_bound: float | None = None
    clip_norm: float | None = None
    clip_fraction: float | None = None


def collect(
    task: AggregateTask,
    store: st.Store,
    shapes: Mapping[str, tuple[int, ...]],
    workdir: Path,
    log: Log,
    first: FirstPass | None = None,
) -> tuple[list[Accepted], list[Rejection]]:
    """Step 1: fetch, verify, decode and check each client's delta, one at a time.

    Everything a client controls is checked inside its own guard (the weight included), so a
    bad delta or manifest is a Rejection and never fails the round; its verified file stays in
    `workdir` for the reduce step. With `first`, the weighted mean is folded from the same
    decode (one tensor in memory at a time), so that the reduce step need not decode again.
    Fetching (download and SHA-256, both I/O or GIL-free hashing) runs one client ahead in a
    thread, so that the next client's transfer overlaps this one's decode and checks.
    """
    clients = list(dict.fromkeys(task.clients)) or discover_clients(store, task.round)
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    # Each client's shapes: the adapter's, at the client's own rank in exact mode.
    own = {c: exact.shapes_at_rank(shapes, task.client_ranks.get(c)) for c in clients}
    expected = {c: precheck.ExpectedLayout(own[c], task.delta) for c in clients}
    # The fetches run one at a time in a worker thread, ahead of the checks; on any way out, the
    # ones not yet started are cancelled (an error must not wait for every remaining download).
    fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch")
    try:
        fetches = [
            fetcher.submit(fetch_client, store, task, client, workdir, expected[client])
            for client in clients
        ]
        for client, fetch in zip(clients, fetches, strict=True):
            folding = first is not None and not first.spoiled
            try:
                manifest, path, layout = fetch.result()
                samples = manifest["samples"]
                weight = client_weight(task, client, samples)
                control, control_bytes, control_raw = None, 0, 0
                if task.drift_control == "scaffold":
                    control = fetch_control(
                        store, task, client, manifest, workdir, expected[client]
                    )
                    control_bytes = control[0].stat().st_size
                    control_raw = 4 * sum(math.prod(s) for s in own[client].values())
                norm = bounds.checked_norm(
                    decode_file(path, layout),
                    own[client],
                    task.aggregation.max_delta_norm,
                    each=first.fold(weight) if first is not None and folding else None,
                )
                item = Accepted(
                    client=client,
                    path=path,
                    layout=layout,
                    samples=samples,
                    weight=weight,
                    train_loss=manifest.get("train_loss"),
                    encoded_bytes=path.stat().st_size + control_bytes,
                    raw_bytes=manifest.get("raw_bytes", 0) + control_raw,
                    norm=norm,
                    sha256=manifest["files"][DELTA_FILE]["sha256"],
                    control=control,
                )
            except Exception as e:
                rejected.append(Rejection(client=client, reason=reason_of(e)))
                log(f"rejected {client}: {reason_of(e)}")
                continue
            if first is not None and folding:
                first.done(client, weight)
            accepted.append(item)
            log(f"accepted {client}: {samples} samples, norm {norm:.4g}, {item.encoded_bytes} B")
    finally:
        fetcher.shutdown(wait=True, cancel_futures=True)
    check_quorum(task, len(clients), accepted, rejected)
    return accepted, rejected


def weigh(
    task: AggregateTask, accepted: list[Accepted], log: Log
) -> tuple[list[Accepted], list[Rejection], Weighing]:
    """Step 2, bounded influence: far outliers out, each delta's clip scale, each weight's cap.

    Against the lower median of the round's norms (which a minority cannot move): a norm above
    outlierNormFactor x median is an attack, not a straggler, and is rejected (from 3 clients);
    one above outlierClipFactor x median is brought down to that; the DP clip (privacy.clipNorm)
    applies to all. Weights apply to the mean-based rules, capped at maxClientShare (twice a fair
    share of the accepted clients by default); the unweighted rules give every client 1.
    """
    spec = task.aggregation
    norms = [a.norm for a in accepted]
    median = bounds.lower_median(norms) if norms else None
    reject = bounds.outlier_bound(norms, spec.outlier_norm_factor, min_clients=3)
    clip = bounds.outlier_bound(norms, spec.outlier_clip_factor)
    items, rejected = [], []
    for a in accepted:
        if reject is not None and a.norm > reject:
            assert median is not None
            reason = (
                f"outlier: norm {a.norm:.4g} above {spec.outlier_norm_factor:g} x the round's "
                f"median norm {median:.4g} (outlierNormFactor)"
            )
            rejected.append(Rejection(client=a.client, reason=reason))
            log(f"rejected {a.client}: {reason}")
            continue
        scale = bounds.clip_factor(a.norm, task.privacy.clip_norm)
        outlier = clip is not None and a.norm > clip
        if outlier:
            assert clip is not None
            scale = min(scale, clip / a.norm)
            log(f"clipped {a.client}: norm {a.norm:.4g} above {clip:.4g} (outlier bound)")
        items.append(replace(a, scale=scale, outlier=outlier))
    check_quorum(task, len(accepted) + len(rejected), items, rejected)
    cap: float | None = None
    if spec.algorithm in MEAN_ALGORITHMS:
        share = bounds.share_cap(spec.max_client_share, len(items))
        weights, cap = bounds.capped_weights([a.weight for a in items], share)
        total = sum(weights)
        items = [
            replace(a, weight=w, share=w / total, capped=w < a.weight)
            for a, w in zip(items, weights, strict=True)
        ]
        for a in items:
            if a.capped:
                log(f"capped {a.client}: weight lowered to {a.share:.3g} of the round")
    else:
        items = [replace(a, weight=1.0, share=1.0 / len(items)) for a in items]
    return items, rejected, Weighing(cap, median, clip)


def check_quorum(
    task: AggregateTask, clients: int, accepted: list[Accepted], rejected: list[Rejection]
) -> None:
    """Fewer valid deltas than the quorum fail the round (QuorumError: exit 2), writing nothing
    global; the reasons of the rejections go with it."""
    if len(accepted) >= task.min_clients:
        return
    detail = "; ".join(f"{x.client}: {x.reason}" for x in rejected)[:1500]
    raise QuorumError(
        f"round {task.round}: {len(accepted)} valid deltas of {clients}, "
        f"quorum is {task.min_clients}" + (f" (rejected {detail})" if detail else "")
    )


def scaffold_control(
    task: AggregateTask,
    store: st.Store,
    accepted: list[Accepted],
    shapes: Mapping[str, tuple[int, ...]],
    log: Log,
) -> tuple[int | None, dict[str, torch.Tensor]] | None:
    """SCAFFOLD's new server control c + |S|/N mean(dc_i) over the accepted clients, and the
    version it was read from (the newest before r: a rerun of r computes the same c again)."""
    if task.drift_control != "scaffold":
        return None
    version, old = drift.read_control(store, task.round)
    total = max(task.total_clients or len(task.clients), len(accepted))
    new = drift.server_control(old, [a.control_change() for a in accepted], shapes, total)
    bounds.check_finite(new, f"round {task.round}: the SCAFFOLD server control has")
    log(f"scaffold: server control of round {version} + {len(accepted)}/{total} mean change")
    return version, new


def round_record(
    task: AggregateTask, accepted: list[Accepted], rejected: list[Rejection], weighing: Weighing
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
        weighting="uniform" if task.privacy.noise_multiplier > 0 else task.aggregation.weighting,
        max_client_share=weighing.max_client_share,
        median_norm=weighing.median_norm,
        outlier_norm_bound=weighing.outlier_norm_bound,
        clip_norm=weighing.clip_norm,
        clip_fraction=weighing.clip_fraction,
        contributions=[a.contribution() for a in accepted],
        rejections=rejected,
    )


def merge_round(task: AggregateTask, store: st.Store, log: Log) -> Merged:
    """Round r >= 1: global r-1 and the clients' deltas -> global r, in steps 1-5 above."""
    global_tensors, config = read_global(store, task.round - 1)
    names = lora.trainable_names(list(global_tensors), task.adapter)
    shapes = {n: tuple(global_tensors[n].shape) for n in names}
    algorithm = task.aggregation.algorithm
    plan, clip = privacy.round_clip(store, task, log)
    mean_based = algorithm in MEAN_ALGORITHMS and task.aggregation.lora != "exact"
    first = FirstPass() if mean_based else None
    with tempfile.TemporaryDirectory(prefix="fedtune-aggregate-") as tmp:
        accepted, rejected = collect(plan, store, shapes, Path(tmp), log, first)  # 1
        accepted, outliers, weighing = weigh(plan, accepted, log)  # 2
        rejected += outliers
        if clip is not None:
            fraction = privacy.adapt_clip(store, task, accepted, clip, log)
            weighing = replace(weighing, clip_norm=clip, clip_fraction=fraction)
        if task.aggregation.lora == "exact":  # 3 and 5 at once, layer by layer
            new_global, cut = reduce_exact(task, accepted, global_tensors, names)
            bounds.check_finite(new_global, f"round {task.round}: the exact merge gives")
            log(f"exact merge: truncation error {cut.total:.3g} (largest layer {cut.max:.3g})")
            record = round_record(task, accepted, rejected, weighing).model_copy(
                update={"truncation_error": cut.total, "truncation_error_max": cut.max}
            )
            return Merged(privacy.account(task, store, record, log), new_global, config)
        if mean_based:  # 3
            update = reduce_mean(accepted, first, log)
        elif algorithm in KRUM_ALGORITHMS:
            accepted, update = reduce_krum(task, accepted, shapes, log)
        else:
            update = reduce_robust(accepted, shapes, task)
        control = scaffold_control(task, store, accepted, shapes, log)
    privatise(plan, update, len(accepted))  # 4
    server_update(task, store, global_tensors, update, log)  # 5: global_tensors is now global r
    if control is not None:
        drift.write_control(store, task.run, task.round, control[1], control[0])
    record = round_record(task, accepted, rejected, weighing)
    return Merged(privacy.account(task, store, record, log), global_tensors, config)


def initialize(task: AggregateTask, store: st.Store, log: Log) -> Merged:
    """Round 0: the initial adapter, seeded, from the base model's config alone (its shapes on
    the meta device): the aggregator never loads base weights."""
    privacy.check_run_budget(task, log)
    claim_root(store, task.run, task.run_uid, required=task.cleanup_policy == "Delete", log=log)
    tensors = lora.initial_adapter(config_source(task.base_model), task.adapter, task.seed)
    values = sum(t.numel() for t in tensors.values())
    log(f"initial adapter: {len(tensors)} tensors, {values} values")
    config = lora.config_json(task.adapter, task.base_model)
    return Merged(initial_record(task.run, task.aggregation.algorithm), tensors, config)


def publish(
    task: AggregateTask, store: st.Store, merged: Merged, start: float, log: Log
) -> AggregateSummary:
    """Step 6: the round record, then global r (manifest last) and, on the last round, final/."""
    r = task.round
    bounds.check_finite(merged.tensors, f"round {r}: the global adapter to publish has")
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
        "attempt": task.attempt,
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
    view of what storage already holds (`fedtune-trainer report` can render it later), so a plotting
    problem must not fail, and so retry, a round whose adapter is already written.
    """
    try:
        uri = report.write(store, task.run, task.round)
    except Exception as e:
        log(f"warning: run report not written: {type(e).__name__}: {reason_of(e)}")
        return summary
    log(f"round {task.round}: report at {uri}")
    return summary.model_copy(update={"report_uri": uri})


def committed(task: AggregateTask, store: st.Store, log: Log) -> AggregateSummary | None:
    """The summary of this very attempt of the round when it is already committed, else None.

    A rerun of the attempt (the Job's pod retried after the commit, before it reported) reports
    what was committed instead of computing the round again: the deltas it merged may be gone
    already, and fresh DP noise would be a second release of the round. A later attempt (the
    operator retried the round) does not match and computes the round anew. Global r is
    committed after its record and before final/, so a committed global has its record; on the
    last round final/ must be committed too, or the round is computed again (its deltas are
    deleted only after final/).
    """
    manifest = st.read_manifest(store, global_prefix(task.round))
    if manifest is None or (manifest.get("run"), manifest.get("attempt")) != (
        task.run,
        task.attempt,
    ):
        return None
    final_uri = None
    if task.round == task.rounds:
        if st.read_manifest(store, FINAL_PREFIX) is None:
            return None
        final_uri = store.url(FINAL_PREFIX)
    raw = store.get_bytes(st.join(round_prefix(task.round), METRICS_FILE))
    record = RoundRecord.model_validate_json(raw)
    log(f"round {task.round}: attempt {task.attempt} is already committed; reporting it")
    global_uri = store.url(global_prefix(task.round))
    return AggregateSummary(record=record, global_uri=global_uri, final_uri=final_uri)


def discard_client_deltas(task: AggregateTask, store: st.Store, log: Log) -> None:
    """Individual deltas do not outlive their use: once round r is committed, every client
    commit under rounds/<r>/clients/ goes (the round record keeps each merged delta's hash and
    size), unless the run retains them for audits."""
    if task.retain_client_deltas:
        return
    prefix = st.join(round_prefix(task.round), "clients") + "/"
    deleted = store.delete_prefix(prefix)
    log(f"round {task.round}: deleted the clients' deltas ({deleted} objects)")


def run(task: AggregateTask, store: st.Store | None = None, log: Log = _stderr) -> AggregateSummary:
    """Aggregate (or, at round 0, initialise) one round, then render the report and delete the
    round's client deltas."""
    store = store or open_store(task.storage)
    start = time.perf_counter()
    summary = committed(task, store, log) if task.round > 0 else None
    if summary is None:
        merged = initialize(task, store, log) if task.round == 0 else merge_round(task, store, log)
        summary = publish(task, store, merged, start, log)
    summary = write_report(task, store, summary, log)
    if task.round > 0:  # also after a rerun: the attempt that committed may have died first
        discard_client_deltas(task, store, log)
    return summary
