"""`fedtune-trainer client`: one client's round r.

Load the base model and global adapter r-1, train locally, encode `delta = local - global` and
commit it to rounds/<r>/clients/<client>/ (delta.safetensors, then manifest.json), signed with
the client's own key when the run pins one (storage/signing.py).

Idempotent by construction: every key written is round-scoped and a rerun overwrites it, and the
error-feedback residual is versioned by round: round r reads the newest residual written *before*
r and writes its own as version r, so a rerun of r starts from the same residual and nothing is
fed back twice. (The newest, not exactly r-1: a client that sat out a round keeps its residual.)
SCAFFOLD's control variate is kept the same way (drift.py), and its change is uploaded next to
the delta, in the same commit, encoded by the same codec. Both are the client's own state: kept
with the client where FEDTUNE_STATE_DIR names a volume of its own (`state_store`), else in the
run's storage.

On several processes (a client with several GPUs, see launch.py and parallel.py) every process
loads the model and the data and trains on its share of each batch; the gradients are summed, so
every process ends with the same adapter, and rank 0 alone computes, encodes and uploads the
delta and reports the summary.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fedtune_trainer.adapter import exact, lora
from fedtune_trainer.aggregation.privacy import privatise_at_client
from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.learning import drift as dc
from fedtune_trainer.learning.data import load_dataset
from fedtune_trainer.learning.loading import load_base, load_tokenizer
from fedtune_trainer.learning.parallel import World
from fedtune_trainer.learning.runtime import (
    Runtime,
    derive_seed,
    parameter_count,
    pick_runtime,
    seed_everything,
)
from fedtune_trainer.learning.training import enable_gradient_checkpointing, train
from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.cache import bytes_downloaded
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.contract import SIGNING_KEY_ENV, STATE_DIR_ENV
from fedtune_trainer.wire.layout import client_prefix, client_state_prefix, global_prefix
from fedtune_trainer.wire.results import ClientSummary
from fedtune_trainer.wire.task import ClientTask

RESIDUAL_FILE = "residual.safetensors"
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(_: str) -> None:
    """The log of processes other than rank 0: one progress log per client is enough."""


def state_store(
    store: st.Store, task: ClientTask, environ: Mapping[str, str] | None = None
) -> st.Store:
    """Where this client keeps what it carries from round to round: the directory
    FEDTUNE_STATE_DIR names (a volume of the client's that outlives its pods: the operator mounts
    the client's modelCache claim there, a site its stateClaim), else the run's storage.

    Why it matters: the error-feedback residual is a dense fp32 copy of the adapter, written and
    read once a round. In the run's storage that is more bytes over the client's link than the
    compressed delta itself (32x more for top-k 10% + nf4); kept at the client it never leaves.
    The same versioned layout either way, so reruns behave the same."""
    directory = (os.environ if environ is None else environ).get(STATE_DIR_ENV)
    return st.FileStore(Path(directory) / task.run) if directory else store


def read_residual(
    store: st.Store, task: ClientTask
) -> tuple[int | None, dict[str, torch.Tensor] | None]:
    """The newest committed residual of this client from a round before this one."""
    prefix = client_state_prefix(task.client)
    version = st.latest_version_before(store, prefix, task.round)
    if version is None:
        return None, None
    _, files = st.read_committed(store, st.versioned_prefix(prefix, version), [RESIDUAL_FILE])
    return version, lora.parse_weights(files[RESIDUAL_FILE])


def write_residual(
    store: st.Store, task: ClientTask, residual: dict[str, torch.Tensor], previous: int | None
) -> None:
    """Commit this round's residual; drop versions no rerun can need any more."""
    prefix = client_state_prefix(task.client)
    st.commit(
        store,
        st.versioned_prefix(prefix, task.round),
        {RESIDUAL_FILE: lora.weights_bytes(residual)},
        {"kind": "residual", "run": task.run, "client": task.client, "round": task.round},
    )
    if previous is not None:
        st.prune_versions_before(store, prefix, previous)


def _check_finite(encoded: codec.Encoded, what: str, task: ClientTask) -> None:
    for name, t in encoded.sent.items():
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(
                f"{what} of {name} is not finite after {task.delta.dtype} encoding"
            )


def run(
    task: ClientTask, store: st.Store | None = None, log: Log = _stderr
) -> ClientSummary | None:
    """Train and upload one client's delta for `task.round`; returns the summary (None on the
    processes other than rank 0 of a multi-process client: they upload nothing)."""
    start = time.perf_counter()
    if task.round < 1:
        raise ValueError("client rounds start at 1 (round 0 is the initial adapter)")
    world = World.from_env()
    # Settings this Job cannot honour fail here, before anything is downloaded.
    runtime = pick_runtime(
        task.training.precision, task.adapter.base_quantization, world.local_rank
    )
    sign = commit_signer(task)
    world.start()
    finished = False
    try:
        summary = _run(task, store or open_store(task.storage), log, world, runtime, start, sign)
        finished = True
        return summary
    finally:
        world.stop(finished)


def commit_signer(
    task: ClientTask, environ: Mapping[str, str] | None = None
) -> Callable[[bytes], bytes] | None:
    """What signs this client's commit when the run pins its key: its private key, from its own
    Secret through FEDTUNE_SIGNING_KEY. A task that must sign without a usable key fails before
    any work (exit 2: the Secret must change, a retry cannot fix it)."""
    if not task.sign:
        return None
    return signing.signer_from_env(
        os.environ if environ is None else environ,
        SIGNING_KEY_ENV,
        f"the run pins a signing key for {task.client}, but {SIGNING_KEY_ENV} is empty",
    )


def _run(
    task: ClientTask,
    store: st.Store,
    log: Log,
    world: World,
    runtime: Runtime,
    start: float,
    sign: Callable[[bytes], bytes] | None,
) -> ClientSummary | None:
    if not world.main:
        log = _quiet
    # The data order is the client's (the same on every process); dropout is each process's own.
    generator = seed_everything(derive_seed(task.training.seed, task.run, task.round, task.client))
    if world.rank:
        torch.manual_seed(
            derive_seed(task.training.seed, task.run, task.round, task.client, world.rank)
        )

    tok = load_tokenizer(task.tokenizer or task.base_model)
    data = load_dataset(
        task.data_uri, task.data.format, tok, task.training.max_seq_length, task.data.max_samples
    )
    log(f"data: {data.stats.describe()}")
    examples = data.examples
    _, files = st.read_committed(store, global_prefix(task.round - 1), [lora.ADAPTER_WEIGHTS])
    # A client of a smaller rank (exact mode) starts from the global's top singular directions.
    global_tensors = exact.at_rank(lora.parse_weights(files[lora.ADAPTER_WEIGHTS]), task.adapter.r)
    base = load_base(task.base_model, runtime)
    full_model_bytes = parameter_count(base) * 4
    model = lora.attach(base, task.adapter, global_tensors)
    if task.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    processes = f", {world.size} processes" if world.size > 1 else ""
    log(
        f"client {task.client} round {task.round}: {len(examples)} examples, "
        f"{trainable} trainable parameters, {runtime.name}{processes}"
    )

    state = state_store(store, task)
    scaffold = task.training.drift_control == "scaffold"
    server_control = own_control = own_version = None
    if scaffold:
        server_version, server_control = dc.read_control(store, task.round)
        own_version, own_control = dc.read_control(state, task.round, task.client)
        log(f"scaffold: server control of round {server_version}, own of round {own_version}")
    drift = dc.Drift.create(
        lora.trainable_parameters(model),
        task.training.proximal_mu,
        server_control,
        own_control,
        scaffold,
    )
    result = train(
        model, examples, task.training, runtime, tok.pad_token_id, generator, log, world, drift
    )
    if not world.main:
        return None

    names = lora.trainable_names(list(global_tensors), task.adapter)
    delta = codec.compute_delta(lora.adapter_tensors(model), global_tensors, names)
    if task.local_privacy is not None:
        norm = privatise_at_client(delta, task.local_privacy)
        log(
            f"local privacy: delta norm {norm:.4g} clipped to {task.local_privacy.clip_norm:g}, "
            f"noise multiplier {task.local_privacy.noise_multiplier:g}"
        )
    previous, residual = read_residual(state, task)
    if residual is not None:
        log(f"error feedback: residual of round {previous}")
    # Seeds stochastic rounding (if on): reproducible per run, round and client, and apart from
    # the training's seeds so that rounding noise never correlates with the data order.
    seed = derive_seed(task.training.seed, "delta", task.run, task.round, task.client)
    encoded = codec.encode(delta, task.delta, residual, seed=seed)
    _check_finite(encoded, "delta", task)
    files = {DELTA_FILE: encoded.blob}
    control: codec.Encoded | None = None
    if scaffold:
        assert drift is not None
        # No error feedback of its own: the client keeps what the server decodes (kept_control).
        change = dc.control_change(drift.new_control(), own_control)
        control = codec.encode(change, task.delta, seed=derive_seed(seed, "control"))
        _check_finite(control, "control change", task)
        kept = dc.kept_control(own_control, control.sent)
        dc.write_control(state, task.run, task.round, kept, own_version, task.client)
        files[dc.CONTROL_FILE] = control.blob
    if encoded.residual is not None:
        write_residual(state, task, encoded.residual, previous)
        log(f"error feedback: this round's residual kept in {state.uri}")
    meta = codec.manifest_fields(
        encoded,
        run=task.run,
        round_=task.round,
        client=task.client,
        samples=result.samples,
        steps=result.steps,
        train_loss=result.loss,
    )
    meta |= {
        "truncated_records": data.stats.truncated,
        "dropped_records": data.stats.dropped,
    }
    st.commit(store, client_prefix(task.round, task.client), files, meta, sign=sign)
    control_bytes = control.encoded_bytes if control is not None else 0
    sent = encoded.encoded_bytes + control_bytes
    raw = encoded.raw_bytes + (control.raw_bytes if control is not None else 0)
    log(
        f"sent {sent} bytes (dense fp32 {raw}, {raw / max(1, sent):.1f}x smaller) "
        f"to {store.url(client_prefix(task.round, task.client))}"
    )
    return ClientSummary(
        round=task.round,
        client=task.client,
        samples=result.samples,
        steps=result.steps,
        train_loss=result.loss,
        bytes_sent=sent,
        raw_bytes=raw,
        control_bytes=control_bytes,
        full_model_bytes=full_model_bytes,
        truncated_records=data.stats.truncated,
        dropped_records=data.stats.dropped,
        sha256=meta["sha256"],
        seconds=round(time.perf_counter() - start, 3),
        base_model_bytes_downloaded=bytes_downloaded(task.base_model),
    )
