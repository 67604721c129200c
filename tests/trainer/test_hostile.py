"""The hostile-delta table: one row per class of bad delta, each through a real aggregator process.

Each row commits three honest deltas and one hostile client's files (real codec, real zstd,
real safetensors bytes, crafted below the codec where an attacker would), runs
`fedtune-trainer aggregate` as a Job would, and asserts that the hostile client is rejected with
its reason (or, for the rows the rules bound rather than refuse, accepted within the bound),
that the honest deltas are merged and the round succeeds, and that the aggregator's peak RSS
stays within a bound derived from the adapter: the clean round's peak (the runtime baseline)
plus a small multiple of the adapter's fp32 size, never anything the hostile file declares.

The adapter is 2 MiB as fp32, so the bound (baseline + 4 adapters) is far below what the
hostile files declare (zstd bombs and a giant tensor of 1 GiB, files of 64-256 MiB).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune_trainer import aggregate
from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.delta_settings import DeltaSpec, QuantizationSpec
from fedtune_trainer.wire.layout import client_prefix
from fedtune_trainer.wire.results import AggregateSummary, parse_summary
from fedtune_trainer.wire.settings import AggregationSpec
from tests.trainer.aggregation_support import random_tensors, task, write_global
from tests.trainer.hostile_support import (
    HighBitsEdit,
    RawDelta,
    RawPart,
    commit_blob,
    edit_elias_fano,
    ef_extra_index,
    ef_padding_bit,
    ef_past_the_tensor,
    ef_repeated_index,
    oversized_file,
    zstd_bomb,
)
from tests.trainer.support import Storage, job_environment, run_job_measured

PREFIX = "base_model.model.model.layers.0.self_attn"
SHAPES = {
    f"{PREFIX}.q_proj.lora_A.weight": (16, 8192),
    f"{PREFIX}.q_proj.lora_B.weight": (8192, 16),
    f"{PREFIX}.v_proj.lora_A.weight": (16, 8192),
    f"{PREFIX}.v_proj.lora_B.weight": (8192, 16),
}
FIRST = sorted(SHAPES)[0]
ADAPTER_BYTES = 4 * sum(a * b for a, b in SHAPES.values())  # 2 MiB as fp32
SPEC = DeltaSpec()  # the defaults: bf16 + zstd
HONEST = ["h1", "h2", "h3"]
HOSTILE = "x"
RSS_MULTIPLE = 4
"""The bound: the clean round's peak + 4 adapters (a decoded delta, the float64 accumulator,
slack for allocator noise)."""
GIB = 1 << 30


def honest_delta(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    return random_tensors(seed, scale, shapes=SHAPES)


def encode(delta: dict[str, torch.Tensor], spec: DeltaSpec = SPEC) -> bytes:
    return codec.encode(delta, spec).blob


# ------------------------------------------------------------------------------------------
# The hostile client's files, one maker per class
# ------------------------------------------------------------------------------------------

Maker = Callable[[st.Store, Path, str], None]


def _commit(blob: bytes, **manifest: Any) -> Maker:
    return lambda store, _, client: commit_blob(store, 1, client, blob, manifest)


def _with_value(value: float) -> Maker:
    def make(store: st.Store, _: Path, client: str) -> None:
        d = honest_delta(9)
        d[FIRST][0, 0] = value
        commit_blob(store, 1, client, encode(d))

    return make


def _wrong_shape(store: st.Store, _: Path, client: str) -> None:
    d = honest_delta(9)
    d[FIRST] = d[FIRST][:, :-1].contiguous()
    commit_blob(store, 1, client, encode(d))


def _wrong_part_dtype(store: st.Store, _: Path, client: str) -> None:
    """The values of a tensor stored as F32 (the same byte count), where BF16 is the run's."""
    raw = RawDelta.parse(encode(honest_delta(9), SPEC.model_copy(update={"compression": "none"})))
    raw.document["encoding"]["compression"] = SPEC.compression  # all else as the run's
    key = raw.key(FIRST, "v")
    raw.parts[key] = RawPart("F32", [len(raw.parts[key].data) // 4], raw.parts[key].data)
    commit_blob(store, 1, client, raw.build())


def _truncated(store: st.Store, _: Path, client: str) -> None:
    blob = encode(honest_delta(9))
    commit_blob(store, 1, client, blob)
    store.put_bytes(st.join(client_prefix(1, client), DELTA_FILE), blob[:-100])


def _bad_checksum(store: st.Store, _: Path, client: str) -> None:
    blob = bytearray(encode(honest_delta(9)))
    commit_blob(store, 1, client, bytes(blob))
    blob[-3] ^= 0xFF
    store.put_bytes(st.join(client_prefix(1, client), DELTA_FILE), bytes(blob))


def _path_like_name(store: st.Store, _: Path, client: str) -> None:
    d = honest_delta(9)
    d["../../../etc/cron.d/x"] = d.pop(FIRST)
    commit_blob(store, 1, client, encode(d))


def _extra_tensor(store: st.Store, _: Path, client: str) -> None:
    """One tensor more than the adapter has: its header alone is longer than any legitimate."""
    d = {**honest_delta(9), f"{PREFIX}.k_proj.lora_A.weight": torch.zeros(16, 64)}
    commit_blob(store, 1, client, encode(d))


def _renamed_tensor(store: st.Store, _: Path, client: str) -> None:
    """A tensor the adapter does not have in place of one it has: the same sizes throughout."""
    d = honest_delta(9)
    d[FIRST.replace("q_proj", "k_proj")] = d.pop(FIRST)
    commit_blob(store, 1, client, encode(d))


def _unreferenced_part(store: st.Store, _: Path, client: str) -> None:
    raw = RawDelta.parse(encode(honest_delta(9)))
    raw.parts["99.v"] = RawPart("U8", [4096], bytes(4096))
    commit_blob(store, 1, client, raw.build())


def _bomb(window_log: int | None) -> Maker:
    """The values of the first tensor replaced by a zstd frame that inflates to 1 GiB."""

    def make(store: st.Store, _: Path, client: str) -> None:
        raw = RawDelta.parse(encode(honest_delta(9)))
        frame = zstd_bomb(GIB, window_log)
        raw.parts[raw.key(FIRST, "v")] = RawPart("U8", [len(frame)], frame)
        raw.tensor(FIRST)["z"] = "v"
        commit_blob(store, 1, client, raw.build())

    return make


def _giant_tensor(store: st.Store, _: Path, client: str) -> None:
    """A 2 KB file whose layout declares 2^28 values for one tensor (1 GiB dense): the run's
    encoding, every part a tiny zstd frame (a delta of zeros), one shape rewritten."""
    raw = RawDelta.parse(encode({n: torch.zeros(s) for n, s in SHAPES.items()}))
    raw.tensor(FIRST)["shape"] = [16384, 16384]
    blob = raw.build()
    assert len(blob) < 2048
    commit_blob(store, 1, client, blob)


def _declared_oversized(store: st.Store, tmp: Path, client: str) -> None:
    """256 MiB, self-consistent: the manifest declares (and hashes) every byte."""
    path = oversized_file(tmp / f"{client}.safetensors", encode(honest_delta(9)), 256 << 20)
    commit_blob(store, 1, client, path)


def _undeclared_oversized(store: st.Store, tmp: Path, client: str) -> None:
    """The manifest vouches for a normal file; the object stored is that file and 64 MiB more
    (its header still the normal one): only the transfer's own count can stop it."""
    blob = encode(honest_delta(9))
    commit_blob(store, 1, client, blob)
    path = tmp / f"{client}.safetensors"
    with open(path, "wb") as f:
        f.write(blob)
        for _ in range(64):
            f.write(bytes(1 << 20))
    store.put_file(st.join(client_prefix(1, client), DELTA_FILE), path)


def _manifest_bomb(store: st.Store, _: Path, client: str) -> None:
    blob = encode(honest_delta(9))
    commit_blob(store, 1, client, blob, {"padding": "x" * (64 << 20)})


def _garbage(store: st.Store, _: Path, client: str) -> None:
    commit_blob(store, 1, client, b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not a header" * 8)


def _missing(store: st.Store, _: Path, client: str) -> None:
    pass


def _samples(value: Any) -> Maker:
    return _commit(encode(honest_delta(9)), samples=value)


@dataclass(frozen=True)
class Row:
    """One hostile class: how to make it, and what the aggregator must make of it."""

    name: str
    make: Maker
    reason: str
    """Regex the rejection reason must match (rejected rows), or the log line (bounded rows)."""
    outcome: str = "rejected"
    batch: str = "layout"
    """The aggregator process it runs in: "storage" (rejected from the manifest or the
    transfer), "layout" (from the header or the decoded values), "norm" (maxDeltaNorm set)."""


ROWS = [
    Row("nan", _with_value(float("nan")), r"non-finite values \(NaN or Inf\) in .*q_proj.lora_A"),
    Row("inf", _with_value(float("inf")), r"non-finite values \(NaN or Inf\)"),
    Row("wrong-shape", _wrong_shape, r"shape of .*: \(16, 8191\) != \(16, 8192\)"),
    Row("wrong-part-dtype", _wrong_part_dtype, r"lora_A.weight.v: stored as F32 \[65536\]"),
    Row(
        "wrong-encoding",
        _commit(encode(honest_delta(9), SPEC.model_copy(update={"dtype": "fp16"}))),
        r'encoding \{"dtype": "fp16".* is not the run\'s',
    ),
    Row("truncated", _truncated, r"truncated, \d+ bytes where the manifest says \d+"),
    Row("bad-checksum", _bad_checksum, r"checksum mismatch"),
    Row(
        "wrong-round",
        _commit(encode(honest_delta(9)), round=0),
        r"replayed: the manifest names run 't' round 0 client 'wrong-round'",
    ),
    Row(
        "wrong-client",
        _commit(encode(honest_delta(9)), client="h1"),
        r"replayed: the manifest names run 't' round 1 client 'h1'",
    ),
    Row("path-like-name", _path_like_name, r"path-like or malformed tensor name '\.\./\.\./"),
    Row("extra-tensor", _extra_tensor, r"header of \d+ bytes, above the \d+ this adapter can need"),
    Row("renamed-tensor", _renamed_tensor, r"unknown tensors: .*k_proj.lora_A.weight"),
    Row("unreferenced-part", _unreferenced_part, r"unreferenced parts: 99.v"),
    Row(
        "huge-norm-default",
        _commit(encode(honest_delta(9, scale=1e4))),
        r"outlier: norm \S+ above 10 x the round's median norm \S+ \(outlierNormFactor\)",
    ),
    Row(
        "mild-outlier",
        _commit(encode(honest_delta(9, scale=0.05))),  # 5 medians: between the clip and reject
        r"clipped mild-outlier: norm \S+ above \S+ \(outlier bound\)",
        outcome="clipped",
    ),
    Row(
        "huge-norm-max-delta-norm",
        _commit(encode(honest_delta(9, scale=1e4))),
        r"delta norm \S+ exceeds maxDeltaNorm 100",
        batch="norm",
    ),
    Row("zstd-bomb", _bomb(None), r"lora_A.weight.v: zstd: .*(window|memory)"),
    Row("zstd-bomb-small-window", _bomb(17), r"zstd frame inflates past the 262144 bytes"),
    Row("giant-declared-tensor", _giant_tensor, r"shape of .*: \(16384, 16384\) != \(16, 8192\)"),
    Row(
        "oversized-declared",
        _declared_oversized,
        r"oversized, declares 2\d{8} bytes where a delta of this adapter is at most \d+",
    ),
    Row("oversized-undeclared", _undeclared_oversized, r"oversized: more than \d+ bytes"),
    Row("manifest-bomb", _manifest_bomb, r"oversized: more than 1048576 bytes"),
    Row("garbage", _garbage, r"corrupt header"),
    Row("missing", _missing, r"no committed delta"),
    Row("samples-0", _samples(0), r"bad sample count 0: outside \[1, 1000000000\]"),
    Row("samples--1", _samples(-1), r"bad sample count -1: outside"),
    Row("samples-1e12", _samples(10**12), r"bad sample count 1000000000000: outside"),
    Row("samples-1e309", _samples(10**309), r"bad sample count ~10\^309: outside"),
    Row("samples-true", _samples(True), r"bad sample count 'True': not an integer"),
    Row("samples-str", _samples("12"), r"bad sample count '12': not an integer"),
    Row(
        "samples-1e8-dominant",
        _samples(10**8),
        r"capped samples-1e8-dominant: weight lowered to \S+ of the round",
        outcome="capped",
    ),
]

SPARSE = DeltaSpec(top_k=0.01, quantization=QuantizationSpec(bits=8))
"""A sparse run: k 1311 of 131072 per tensor, positions as Elias-Fano (1404 bytes, l 6)."""
SPARSE_N, SPARSE_K = 131072, 1311


def _elias_fano(edit: Callable[[bytes], bytes], pos: str = "e") -> Maker:
    """A SPARSE delta with its first tensor's Elias-Fano part replaced by `edit(part)` (stored
    raw, as the file says) and its coding declared `pos`."""

    def make(store: st.Store, _: Path, client: str) -> None:
        plain = SPARSE.model_copy(update={"compression": "none"})
        raw = RawDelta.parse(encode(honest_delta(9), plain))
        raw.document["encoding"]["compression"] = SPARSE.compression  # all else as the run's
        key = raw.key(FIRST, "e")
        data = edit(raw.parts[key].data)
        raw.parts[key] = RawPart("U8", [len(data)], data)
        raw.tensor(FIRST)["pos"] = pos
        commit_blob(store, 1, client, raw.build())

    return make


def _high_bits(edit: HighBitsEdit) -> Callable[[bytes], bytes]:
    return lambda data: edit_elias_fano(data, SPARSE_N, SPARSE_K, edit)


SPARSE_ROWS = [
    Row("ef-truncated", _elias_fano(lambda p: p[:-1]), r"lora_A.weight.e: stored as U8 \[1403\]"),
    Row("ef-oversized", _elias_fano(lambda p: p + p), r"lora_A.weight.e: stored as U8 \[2808\]"),
    Row("ef-extra-index", _elias_fano(_high_bits(ef_extra_index)), "holds 1312 indices"),
    Row("ef-padding-bit", _elias_fano(_high_bits(ef_padding_bit)), r"padding bits 1\)"),
    Row("ef-past-the-tensor", _elias_fano(_high_bits(ef_past_the_tensor)),
        "sparse positions do not match the values"),
    Row("ef-repeated-index", _elias_fano(_high_bits(ef_repeated_index)),
        "not strictly increasing"),
    Row("unknown-position-coding", _elias_fano(lambda p: p, pos="q"),
        "position coding 'q' is not one of x, e"),
]  # fmt: skip
"""Sparse positions that lie, in a run of SPARSE (batch "positions")."""
ROWS += [replace(r, batch="positions") for r in SPARSE_ROWS]

STORAGE_ROWS = {
    "truncated",
    "bad-checksum",
    "wrong-round",
    "wrong-client",
    "oversized-declared",
    "oversized-undeclared",
    "manifest-bomb",
    "missing",
}
ROWS = [
    replace(r, batch="storage") if r.name in STORAGE_ROWS or r.name.startswith("samples") else r
    for r in ROWS
]


# ------------------------------------------------------------------------------------------
# Running a round in a real aggregator process
# ------------------------------------------------------------------------------------------

BATCHES: dict[str, tuple[dict[str, Any], list[Row], DeltaSpec]] = {
    # One aggregator process per batch keeps the table under two minutes on a shared machine
    # (a process costs seconds to import torch and render the report); each row is its own
    # client of the round and is checked on its own.
    "storage-and-manifest": ({}, [r for r in ROWS if r.batch == "storage"], SPEC),
    "layout-and-decoding": ({}, [r for r in ROWS if r.batch == "layout"], SPEC),
    "max-delta-norm": ({"max_delta_norm": 100.0}, [r for r in ROWS if r.batch == "norm"], SPEC),
    "sparse-positions": ({}, [r for r in ROWS if r.batch == "positions"], SPARSE),
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    summary: AggregateSummary | None
    stderr: str
    peak_rss: int
    seconds: float


def aggregate_in_subprocess(
    store: st.FileStore,
    root: Path,
    clients: list[str],
    env: dict[str, str],
    delta: DeltaSpec = SPEC,
    **aggregation: Any,
) -> Outcome:
    """Round 1 by `fedtune-trainer aggregate` in its own process, as a Job runs it."""
    spec = AggregationSpec(**aggregation)
    job = task(store, 1, clients, aggregation=spec, delta=delta, min_clients=len(HONEST))
    termination = root / "termination-log"
    job_env = {
        **env,
        "FEDTUNE_TASK": json.dumps(job.wire()),
        "FEDTUNE_TERMINATION_LOG": str(termination),
        # As in test_memory: a fixed mmap threshold returns large buffers to the kernel on free,
        # so the peak measures what is held at once, not the order of frees.
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    start = time.perf_counter()
    run = run_job_measured("aggregate", job_env)
    seconds = time.perf_counter() - start
    summary = None
    if run.returncode == 0:
        parsed = parse_summary(termination.read_text())
        assert isinstance(parsed, AggregateSummary)
        summary = parsed
    return Outcome(run.returncode, summary, run.stderr, run.peak_rss, seconds)


def honest_round(root: Path, spec: DeltaSpec = SPEC) -> st.FileStore:
    """Global 0 and the three honest deltas, committed under `root`."""
    store = st.FileStore(root / "store")
    write_global(store, 0, random_tensors(0, shapes=SHAPES))
    for i, client in enumerate(HONEST):
        blob = encode(honest_delta(i + 1), spec)
        commit_blob(store, 1, client, blob, {"samples": 10 * (i + 1)})
    return store


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return job_environment(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, job_env: dict[str, str]) -> Outcome:
    """The clean round (an honest fourth client): the runtime baseline of the RSS bound."""
    root = tmp_path_factory.mktemp("clean")
    store = honest_round(root)
    commit_blob(store, 1, "h4", encode(honest_delta(9)), {"samples": 15})
    outcome = aggregate_in_subprocess(store, root, [*HONEST, "h4"], job_env)
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert outcome.summary is not None
    assert outcome.summary.record.accepted == 4
    rss = outcome.peak_rss / 2**20
    print(f"\nclean round: 4 merged, peak RSS {rss:.1f} MiB, {outcome.seconds:.1f} s")
    return outcome


def check_row(row: Row, summary: AggregateSummary, stderr: str) -> str:
    """Assert what the round made of this row's client; returns the reason shown in the table."""
    record = summary.record
    rejections = {r.client: r.reason for r in record.rejections}
    merged = {c.client: c for c in record.contributions}
    if row.outcome == "rejected":
        assert row.name in rejections, f"{row.name} not rejected"
        reason = rejections[row.name]
        assert re.search(row.reason, reason), f"{row.name}: {reason}"
        return reason
    assert row.name in merged, f"{row.name}: {rejections.get(row.name)}"
    found = re.search(row.reason, stderr)
    assert found, f"{row.name}: no log line {row.reason!r}"
    hostile = merged[row.name]
    if row.outcome == "clipped":
        assert hostile.outlier
        assert record.outlier_norm_bound is not None
        assert hostile.norm * hostile.scale == pytest.approx(record.outlier_norm_bound)
    else:
        assert hostile.capped
        assert record.max_client_share == pytest.approx(2 / record.accepted)  # the default cap
        assert hostile.share == pytest.approx(record.max_client_share)
    return found.group(0)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_hostile_deltas_are_refused_within_bounded_memory_and_the_round_succeeds(
    batch: str,
    tmp_path: Path,
    baseline: Outcome,
    job_env: dict[str, str],
    record_property: pytest.RecordProperty,
) -> None:
    aggregation, rows, spec = BATCHES[batch]
    store = honest_round(tmp_path, spec)
    for row in rows:
        row.make(store, tmp_path, row.name)
    clients = [*HONEST, *(r.name for r in rows)]
    outcome = aggregate_in_subprocess(store, tmp_path, clients, job_env, spec, **aggregation)
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert outcome.summary is not None
    record = outcome.summary.record
    # The honest clients are merged, the round succeeds, and the counts are true.
    assert [c.client for c in record.contributions][:3] == HONEST
    rejected = [r.name for r in rows if r.outcome == "rejected"]
    assert sorted(r.client for r in record.rejections) == sorted(rejected)
    assert (record.accepted, record.rejected) == (len(clients) - len(rejected), len(rejected))
    assert record.bytes_received < (len(clients) - len(rejected)) * ADAPTER_BYTES
    bound = baseline.peak_rss + RSS_MULTIPLE * ADAPTER_BYTES
    failures, lines = [], []
    for row in rows:
        try:
            reason = check_row(row, outcome.summary, outcome.stderr)
        except AssertionError as e:
            failures.append(str(e))
            reason = f"FAILED: {e}"
        lines.append(f"| {row.name} | {row.outcome} | {reason[:100]} |")
    rss = f"{outcome.peak_rss / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)"
    table = "\n".join(lines)
    print(f"\nbatch {batch}: peak RSS {rss}, {outcome.seconds:.1f} s\n{table}")
    record_property("peak_rss", outcome.peak_rss)
    assert not failures, "\n".join(failures)
    assert outcome.peak_rss <= bound, rss


# ------------------------------------------------------------------------------------------
# The rows where storage matters, through the real S3 server as well as file://
# ------------------------------------------------------------------------------------------


def _declared_oversized_small(store: st.Store, tmp: Path, client: str) -> None:
    path = oversized_file(tmp / f"{client}.safetensors", encode(honest_delta(9)), 8 << 20)
    commit_blob(store, 1, client, path)


def _undeclared_oversized_small(store: st.Store, tmp: Path, client: str) -> None:
    blob = encode(honest_delta(9))
    commit_blob(store, 1, client, blob)
    store.put_bytes(st.join(client_prefix(1, client), DELTA_FILE), blob + bytes(4 << 20))


def _manifest_bomb_small(store: st.Store, _: Path, client: str) -> None:
    commit_blob(store, 1, client, encode(honest_delta(9)), {"padding": "x" * (2 << 20)})


STORAGE_CASES: list[tuple[str, Maker, str]] = [
    ("truncated", _truncated, r"truncated, \d+ bytes where the manifest says \d+"),
    ("bad-checksum", _bad_checksum, "checksum mismatch"),
    ("missing", _missing, "no committed delta"),
    ("unreferenced-part", _unreferenced_part, "unreferenced parts: 99.v"),
    ("oversized-declared", _declared_oversized_small, r"oversized, declares 9\d{6} bytes"),
    ("oversized-undeclared", _undeclared_oversized_small, r"oversized: more than \d+ bytes"),
    ("manifest-bomb", _manifest_bomb_small, "oversized: more than 1048576 bytes"),
]


def test_storage_level_rows_on_file_and_s3(storage: Storage, tmp_path: Path) -> None:
    """Ranged header reads, transfers cut off past the declared size and bounded manifests
    behave the same through boto3 against a real S3 server as on a local directory."""
    store = storage.open()
    write_global(store, 0, random_tensors(0, shapes=SHAPES))
    for i, client in enumerate(HONEST):
        commit_blob(store, 1, client, encode(honest_delta(i + 1)), {"samples": 10 * (i + 1)})
    for name, make, _ in STORAGE_CASES:
        make(store, tmp_path, name)
    clients = [*HONEST, *(name for name, _, _ in STORAGE_CASES)]
    job = task(store, 1, clients, delta=SPEC, min_clients=len(HONEST))
    record = aggregate.run(job, store, lambda _: None).record
    assert [c.client for c in record.contributions] == HONEST
    reasons = {r.client: r.reason for r in record.rejections}
    assert list(reasons) == [name for name, _, _ in STORAGE_CASES]
    for name, _, pattern in STORAGE_CASES:
        assert re.search(pattern, reasons[name]), f"{name}: {reasons[name]}"
