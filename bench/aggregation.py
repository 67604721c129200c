"""`aggregation`: the streaming aggregator against a load-everything baseline.

N client deltas of a fixed size (full size: 64 MiB each, a rank-64 LoRA on the q projections of 32
layers of a 4096-wide model, as lossless fp32 so that the size is exact) are committed to a local
store as clients would commit them. Then, for N in {2, 8, 32}, each method merges round 1 in a
fresh process of its own (wall time, and the peak RSS the process reports, its own VmHWM):

- `streaming`: the aggregator's real round (`aggregate.merge_round`): fetch, verify, decode and
  check one client at a time, fold it into a float64 running mean as it is checked, drop it;
- `load-everything` (the baseline, written here): fetch, decode and check every client's delta
  into memory first, then average them tensor by tensor, which is the obvious implementation.

Both decode each delta once (the checks' decode).

Both read the same files, verify the same checksums, run the same checks, server step and publish
(metrics and global adapter), so the difference is only what is held at once. The bench checks
that both wrote the same global adapter. `seconds` is the merge alone (measured inside the
process, after the imports); `process_seconds` adds the interpreter and imports;
`rss_after_import_mb` is what the process held before merging (mostly torch itself). Each
configuration runs `repeats` times (methods interleaved) and every number is the median.

The workers run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every large buffer to the
kernel when it is freed: without it, the peak depends on the order of frees (+-15 MiB between
identical runs) rather than on what is held at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MiB,
    Result,
    child_env,
    fmt_float,
    fmt_int,
    proc_status_bytes,
    run_child,
    save_figure,
)
from fedtune_trainer.adapter.lora import read_global
from fedtune_trainer.aggregation.server import server_step
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask

NAME = "aggregation"
TITLE = "Streaming aggregation against load-everything: wall time and peak RSS"
LOSSLESS = DeltaSpec(dtype="fp32", compression="none", error_feedback=False)
METHODS = ("streaming", "load-everything")
REPRODUCIBLE = ("deltas_mb",)
"""Columns a rerun must reproduce (bench/records.py compare); timings are not among them."""


@dataclass(frozen=True)
class Sizes:
    clients: tuple[int, ...] = (2, 8, 32)
    layers: int = 32
    rank: int = 64
    width: int = 4096
    repeats: int = 3

    @property
    def values(self) -> int:
        return self.layers * 2 * self.rank * self.width

    @property
    def delta_bytes(self) -> int:
        return self.values * 4


FULL = Sizes()
SMOKE = Sizes(clients=(2, 4), layers=2, rank=8, width=256, repeats=1)


def adapter(sizes: Sizes) -> AdapterSpec:
    return AdapterSpec(r=sizes.rank, alpha=2.0 * sizes.rank, target_modules=["q_proj"])


def shapes(sizes: Sizes) -> dict[str, tuple[int, int]]:
    out = {}
    for layer in range(sizes.layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        out[f"{prefix}.lora_A.weight"] = (sizes.rank, sizes.width)
        out[f"{prefix}.lora_B.weight"] = (sizes.width, sizes.rank)
    return out


def client_names(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


def task_for(store_uri: str, sizes: Sizes, n: int) -> AggregateTask:
    """Round 1 of a long run over the first n clients, no evaluation (no model needed)."""
    return AggregateTask(
        run="bench",
        round=1,
        rounds=1000,
        base_model="/nonexistent-base-model",
        adapter=adapter(sizes),
        storage=StorageLocation(uri=store_uri),
        clients=client_names(n),
        min_clients=n,
        delta=LOSSLESS,  # the aggregator accepts only deltas in the run's encoding
    )


def prepare(root: Path, sizes: Sizes) -> None:
    """Global adapter 0 and max(clients) committed deltas, as the clients would commit them."""
    import torch

    from fedtune_trainer.adapter import lora
    from fedtune_trainer.codec import encoding as codec
    from fedtune_trainer.storage import store as st
    from fedtune_trainer.wire.layout import client_prefix, global_prefix

    store = st.FileStore(root)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes(sizes).items()}
    config = lora.config_json(adapter(sizes), "/nonexistent-base-model")
    st.commit(store, global_prefix(0), lora.peft_files(tensors, config), {"round": 0})
    for i, name in enumerate(client_names(max(sizes.clients))):
        gen = torch.Generator().manual_seed(i + 1)
        delta = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes(sizes).items()}
        encoded = codec.encode(delta, LOSSLESS)
        meta = codec.manifest_fields(
            encoded,
            run="bench",
            round_=1,
            client=name,
            samples=100 + i,
            steps=10,
            train_loss=1.0,
        )
        st.commit(store, client_prefix(1, name), {DELTA_FILE: encoded.blob}, meta)
        del delta, encoded


# --------------------------------------------------------------------------------------------
# The baseline: load every delta, then average
# --------------------------------------------------------------------------------------------


def load_everything(task: AggregateTask, store: Any, log: Any) -> Any:
    """The load-everything baseline: the aggregator's own collect and weigh steps (the same
    fetch, verification, checks and weights) and the same server step, but every client's delta,
    decoded once by the checks, is held in memory before the weighted mean is taken tensor by
    tensor (torch.stack over clients)."""
    import torch

    from fedtune_trainer import aggregate
    from fedtune_trainer.adapter import lora
    from fedtune_trainer.aggregation.reducers import FirstPass

    class Hold(FirstPass):
        """collect's per-tensor hook keeps every checked tensor instead of summing it."""

        def __init__(self) -> None:
            super().__init__()
            self.held: dict[str, dict[str, torch.Tensor]] = {}
            self.current: dict[str, torch.Tensor] = {}

        def fold(self, weight: float) -> Any:
            self.current = {}
            return self.current.__setitem__

        def done(self, client: str, weight: float) -> None:
            self.held[client] = self.current

    global_tensors, config = read_global(store, task.round - 1)
    names = lora.trainable_names(list(global_tensors), task.adapter)
    expected = {n: tuple(global_tensors[n].shape) for n in names}
    hold = Hold()
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-baseline-") as tmp:
        accepted, rejected = aggregate.collect(task, store, expected, Path(tmp), log, hold)
        accepted, outliers, weighing = aggregate.weigh(task, accepted, log)
        rejected += outliers
    w = torch.tensor([a.weight for a in accepted], dtype=torch.float64)
    update = {}
    for name in names:
        stack = torch.stack([hold.held[a.client][name] * a.scale for a in accepted]).double()
        update[name] = (torch.tensordot(w, stack, dims=1) / w.sum()).float()
        del stack
    new_global, _ = server_step(task.aggregation, global_tensors, update, None)
    record = aggregate.round_record(task, accepted, rejected, weighing)
    return aggregate.Merged(record, new_global, config)


# --------------------------------------------------------------------------------------------
# One measured process per (method, N)
# --------------------------------------------------------------------------------------------


def worker(method: str, root: Path, sizes: Sizes, n: int) -> dict[str, Any]:
    """Inside the measured process: import, note the RSS, merge, print what it took."""
    import torch  # noqa: F401  (imported before the RSS reading: the same for both methods)

    from fedtune_trainer import aggregate
    from fedtune_trainer.storage import store as st

    store = st.FileStore(root)
    task = task_for(store.uri, sizes, n)
    rss = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    merge = aggregate.merge_round if method == "streaming" else load_everything
    merged = merge(task, store, lambda _: None)
    summary = aggregate.publish(task, store, merged, start, lambda _: None)
    return {
        "seconds": time.perf_counter() - start,
        "rss_after_import": rss,
        "peak_rss": proc_status_bytes("VmHWM"),
        "accepted": summary.record.accepted,
    }


def global_adapter(root: Path) -> dict[str, Any]:
    from fedtune_trainer.adapter import lora
    from fedtune_trainer.storage import store as st
    from fedtune_trainer.wire.layout import global_prefix

    _, files = st.read_committed(st.FileStore(root), global_prefix(1), [lora.ADAPTER_WEIGHTS])
    return lora.parse_weights(files[lora.ADAPTER_WEIGHTS])


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    time_ax, rss_ax = fig.subplots(1, 2)
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        x = [r["clients"] for r in mine]
        time_ax.plot(x, [r["seconds"] for r in mine], "o-", label=method)
        rss_ax.plot(x, [r["peak_rss_mb"] for r in mine], "o-", label=method)
    for ax, ylabel, title in (
        (time_ax, "seconds", "Merge time"),
        (rss_ax, "peak RSS (MiB)", "Peak memory of the aggregator process"),
    ):
        ax.set(xlabel="clients", ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2)
        clients = sorted({r["clients"] for r in rows})
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.minorticks_off()
        ax.legend()
        ax.grid(True, alpha=0.3)
    return save_figure(fig, out, NAME)


def measure_once(root: Path, sizes: Sizes, method: str, n: int, env: dict[str, str]) -> dict:
    """One fresh, measured process merging round 1 of the first n clients with `method`."""
    argv = [sys.executable, "-m", "bench.aggregation", method, str(root), str(n)]
    argv += ["--layers", str(sizes.layers), "--rank", str(sizes.rank), "--width", str(sizes.width)]
    child = run_child(argv, env)
    if child.returncode != 0:
        raise RuntimeError(f"{method} with {n} clients failed:\n{child.stderr[-3000:]}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    if report["accepted"] != n:
        raise RuntimeError(f"{method}: {report['accepted']} of {n} deltas accepted")
    return {
        "seconds": report["seconds"],
        "peak_rss_mb": report["peak_rss"] / MiB,
        "process_seconds": child.seconds,
        "rss_after_import_mb": report["rss_after_import"] / MiB,
    }


def measure(root: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Commit the deltas under `root`, then `repeats` measured processes per (N, method), the
    methods interleaved so that a burst of other load on the machine hits both alike. Rows hold
    the median of each number; seconds_min/max show the spread."""
    prepare(root, sizes)
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    rows: list[dict[str, Any]] = []
    for n in sizes.clients:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        written: dict[str, dict[str, Any]] = {}
        for _ in range(sizes.repeats):
            for method in METHODS:
                runs[method].append(measure_once(root, sizes, method, n, env))
                written[method] = global_adapter(root)
        for method in METHODS:
            seconds = [r["seconds"] for r in runs[method]]
            row: dict[str, Any] = {"clients": n, "method": method}
            for key in ("seconds", "peak_rss_mb", "process_seconds", "rss_after_import_mb"):
                row[key] = statistics.median(r[key] for r in runs[method])
            row |= {
                "seconds_min": min(seconds),
                "seconds_max": max(seconds),
                "repeats": len(seconds),
                "deltas_mb": n * sizes.delta_bytes / MiB,
                "x_adapter": (row["peak_rss_mb"] - row["rss_after_import_mb"])
                * MiB
                / sizes.delta_bytes,
                "max_abs_diff_vs_streaming": max_abs_diff(written[method], written["streaming"]),
            }
            rows.append(row)
    return rows


def run(sizes: Sizes, work: Path, out: Path) -> Result:
    root = work / f"{NAME}-store"
    try:
        rows = measure(root, sizes)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # up to 2 GiB of deltas
    plot_path = plot(rows, out)
    return Result(
        name=NAME,
        title=TITLE,
        columns=[
            "clients",
            "method",
            "seconds",
            "peak_rss_mb",
            "process_seconds",
            "rss_after_import_mb",
            "x_adapter",
            "deltas_mb",
        ],
        rows=rows,
        formats={
            "seconds": fmt_float(2),
            "peak_rss_mb": fmt_int,
            "process_seconds": fmt_float(2),
            "rss_after_import_mb": fmt_int,
            "x_adapter": fmt_float(1),
            "deltas_mb": fmt_int,
        },
        settings={
            "delta_bytes": sizes.delta_bytes,
            "delta_values": sizes.values,
            "delta_shapes": f"{sizes.layers} layers x (A {sizes.rank}x{sizes.width}, "
            f"B {sizes.width}x{sizes.rank})",
            "encoding": "fp32, lossless, no zstd",
            "algorithm": "fedavg (sample-weighted)",
            "storage": "file:// on local disk (fetch = copy + SHA-256 verification)",
            "malloc_mmap_threshold": 65536,
        },
        notes=[
            f"each delta is {sizes.delta_bytes / MiB:.0f} MiB; peak RSS is the whole process's "
            "(its own VmHWM), torch included; every number is the median of "
            f"{sizes.repeats} fresh processes.",
            "x_adapter: (peak RSS - RSS after the imports) / the adapter's fp32 size, what the "
            "merge holds beyond the runtime, in adapters (the target: about 3).",
            "max |global(load-everything) - global(streaming)| over every weight: "
            + ", ".join(
                f"N={r['clients']}: {r['max_abs_diff_vs_streaming']:.1e}"
                for r in rows
                if r["method"] != "streaming"
            ),
        ],
        plots=[plot_path.name],
    )


def main(argv: list[str] | None = None) -> int:
    """The measured child: `python -m bench.aggregation METHOD STORE N [--layers ...]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.aggregation")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("store", type=Path)
    parser.add_argument("clients", type=int)
    parser.add_argument("--layers", type=int, default=FULL.layers)
    parser.add_argument("--rank", type=int, default=FULL.rank)
    parser.add_argument("--width", type=int, default=FULL.width)
    args = parser.parse_args(argv)
    sizes = Sizes(clients=(args.clients,), layers=args.layers, rank=args.rank, width=args.width)
    print(json.dumps(worker(args.method, args.store, sizes, args.clients)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
