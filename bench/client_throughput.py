"""`client`: the client's training loop against the plain transformers + peft loop, and the peak
memory of a client step with and without gradient checkpointing.

Every configuration trains the same model (full size: the pretrained SmolLM2-135M-Instruct; LoRA
r=16 on all linear layers) on the same batches of the same data (chat records made of the
docstrings of this Python's standard library: real English text of very different lengths),
each in a fresh process of its own, so that its peak RSS (VmHWM) is that configuration's alone:

- `transformers + peft`: the loop everyone writes first: `model(input_ids, attention_mask,
  labels).loss.backward()`, AdamW, gradient clipping. transformers computes the logits of every
  position over the whole vocabulary, upcast to fp32, for its loss.
- `fedtune`: `training.train`, the client's loop (chunked loss on the labelled positions).
- `fedtune + packing`, `fedtune + checkpointing`: the same with `training.packing` or
  `training.gradientCheckpointing`.
- `fedtune, bf16 base` (only where the CPU has AVX512-BF16 or AMX, or on a GPU): base weights in
  bf16, the adapter in fp32.

A measured process loads the model, runs one warm-up step and then `steps` timed optimizer steps
(a fresh AdamW for the timed part in every method, so that all see the same updates). tokens/s
counts real (non-padding) tokens. The throughput methods run `repeats` times, interleaved, and
each number is the median. `loss_vs_plain` is the relative difference of the timed steps' token
-weighted mean loss against the plain loop's: the methods train the same thing, so it is float
noise (or bf16's rounding). `step_mb` is the peak RSS minus the RSS after loading, the memory a
training step adds.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MiB,
    Result,
    TinySizes,
    child_env,
    device_name,
    fmt_float,
    fmt_int,
    proc_status_bytes,
    run_child,
    tiny_assets,
)

NAME = "client"
TITLE = "Client training loop: tokens/s against plain transformers + peft, peak memory"
PLAIN = "transformers + peft"
METHODS = ("transformers + peft", "fedtune", "fedtune + packing", "fedtune + checkpointing")
BF16 = "fedtune, bf16 base"


@dataclass(frozen=True)
class Sizes:
    model: str = "real"
    """`real` (SmolLM2-135M-Instruct) or `tiny` (the smoke test's random model)."""
    records: int = 64
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 3
    repeats: int = 2
    rank: int = 16


FULL = Sizes()
SMOKE = Sizes(model="tiny", records=16, seq_len=64, batch_size=4, steps=2, repeats=1, rank=4)


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


def docstring_chats(n: int) -> list[dict[str, Any]]:
    """n chat records, each a question about a standard-library module and its docstring as
    the answer, in the sorted order of the module names (deterministic for a Python version)."""
    records = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or len(records) >= n:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        if doc and len(doc) >= 80:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": f"What is the Python module `{name}` for?"},
                        {"role": "assistant", "content": doc.strip()},
                    ]
                }
            )
    return records


def assets(sizes: Sizes, work: Path) -> tuple[Path, Path]:
    """(model directory, data file) for these sizes."""
    data = work / f"{NAME}-chats-{sizes.records}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in docstring_chats(sizes.records)))
    if sizes.model == "tiny":
        return tiny_assets(work, TinySizes(clients=2, samples=40, eval_samples=8)).model, data
    from devcluster.pretrained import ensure_model

    return ensure_model(), data


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# --------------------------------------------------------------------------------------------
# Inside the measured process
# --------------------------------------------------------------------------------------------


def worker(method: str, model_dir: Path, data: Path, sizes: Sizes) -> dict[str, Any]:
    """Load, warm up, time `sizes.steps` optimizer steps; report tokens, seconds and loss."""
    import torch

    from fedtune_trainer.adapter import lora
    from fedtune_trainer.learning.batches import batch_stream
    from fedtune_trainer.learning.data import load_dataset
    from fedtune_trainer.learning.loading import load_base, load_tokenizer, quiet_hf
    from fedtune_trainer.learning.runtime import pick_runtime
    from fedtune_trainer.learning.training import enable_gradient_checkpointing, train
    from fedtune_trainer.wire.settings import AdapterSpec, TrainingSpec

    quiet_hf()
    torch.manual_seed(0)
    runtime = pick_runtime("bf16" if method == BF16 else "fp32")
    tok = load_tokenizer(str(model_dir))
    examples = load_dataset(str(data), "chat", tok, sizes.seq_len).examples
    model = lora.attach(
        load_base(str(model_dir), runtime),
        AdapterSpec(r=sizes.rank, alpha=2 * sizes.rank, target_modules=["all-linear"]),
    )
    if method == "fedtune + checkpointing":
        enable_gradient_checkpointing(model)
    rss = proc_status_bytes("VmRSS")
    spec = TrainingSpec(
        batch_size=sizes.batch_size,
        learning_rate=1e-4,
        max_seq_length=sizes.seq_len,
        packing=method == "fedtune + packing",
    )

    def batches(seed: int, steps: int) -> list[list[Any]]:
        stream = batch_stream(examples, sizes.batch_size, torch.Generator().manual_seed(seed))
        return [next(stream) for _ in range(steps)]

    timed = batches(1, sizes.steps)
    tokens = sum(len(e) for b in timed for e in b)
    if method == PLAIN:
        seconds, loss = plain_loop(model, batches(0, 1), timed, tok.pad_token_id, runtime)
    else:
        quiet = lambda _: None  # noqa: E731
        warm = spec.model_copy(update={"local_steps": 1})
        train(
            model,
            examples,
            warm,
            runtime,
            tok.pad_token_id,
            torch.Generator().manual_seed(0),
            quiet,
        )
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(1)
        result = train(
            model, examples, spec.model_copy(update={"local_steps": sizes.steps}), runtime,
            tok.pad_token_id, gen, quiet,
        )  # fmt: skip
        seconds, loss = time.perf_counter() - start, result.loss
    peak = proc_status_bytes("VmHWM")
    return {"tokens": tokens, "seconds": seconds, "loss": loss, "rss_after_load": rss, "peak": peak}


def plain_loop(
    model: Any, warm: list[list[Any]], timed: list[list[Any]], pad_id: int, runtime: Any
) -> tuple[float, float]:
    """The plain transformers + peft loop over the given batches: (seconds of the timed ones,
    their token-weighted mean loss)."""
    import torch

    from fedtune_trainer.learning.batches import collate
    from fedtune_trainer.learning.data import IGNORE

    params = [p for p in model.parameters() if p.requires_grad]

    def run(batches: list[list[Any]]) -> float:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        total, count = 0.0, 0
        for examples in batches:
            batch = collate(examples, pad_id, runtime.device)
            with runtime.autocast():
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(out.loss.detach()) * n
            count += n
        return total / max(1, count)

    run(warm)
    start = time.perf_counter()
    loss = run(timed)
    return time.perf_counter() - start, loss


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def measure_once(
    method: str, model_dir: Path, data: Path, sizes: Sizes, env: dict[str, str]
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.client_throughput", method, str(model_dir), str(data)]
    argv += ["--seq-len", str(sizes.seq_len), "--batch-size", str(sizes.batch_size)]
    argv += ["--steps", str(sizes.steps), "--rank", str(sizes.rank)]
    child = run_child(argv, env)
    if child.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{child.stderr[-3000:]}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "tokens_per_s": report["tokens"] / report["seconds"],
        "loss": report["loss"],
        "peak_rss_mb": report["peak"] / MiB,
        "rss_after_load_mb": report["rss_after_load"] / MiB,
        "step_mb": (report["peak"] - report["rss_after_load"]) / MiB,
    }


def measure(sizes: Sizes, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model_dir, data = assets(sizes, work)
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    methods = list(METHODS) + ([BF16] if device_name() == "cuda" or cpu_has_bf16() else [])
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(sizes.repeats):
        for method in methods:
            runs[method].append(measure_once(method, model_dir, data, sizes, env))
    plain_rate = statistics.median(r["tokens_per_s"] for r in runs[PLAIN])
    plain_loss = statistics.median(r["loss"] for r in runs[PLAIN])
    rows = []
    for method in methods:
        rates = [r["tokens_per_s"] for r in runs[method]]
        row: dict[str, Any] = {"method": method}
        for key in ("tokens_per_s", "peak_rss_mb", "step_mb", "rss_after_load_mb", "loss"):
            row[key] = statistics.median(r[key] for r in runs[method])
        row |= {
            "vs_plain": row["tokens_per_s"] / plain_rate,
            "tokens_per_s_min": min(rates),
            "tokens_per_s_max": max(rates),
            "loss_vs_plain": abs(row["loss"] - plain_loss) / plain_loss,
            "repeats": len(rates),
        }
        rows.append(row)
    return rows, {"model": str(model_dir), "data": data.name}


def run(sizes: Sizes, work: Path, out: Path) -> Result:
    rows, where = measure(sizes, work)
    return Result(
        name=NAME,
        title=TITLE,
        columns=["method", "tokens_per_s", "vs_plain", "peak_rss_mb", "step_mb", "loss_vs_plain"],
        rows=rows,
        formats={
            "tokens_per_s": fmt_float(1),
            "vs_plain": "percent:1",
            "peak_rss_mb": fmt_int,
            "step_mb": fmt_int,
            "loss_vs_plain": "sci:1",
        },
        settings={
            **where,
            "model_kind": sizes.model,
            "records": sizes.records,
            "seq_len": sizes.seq_len,
            "batch_size": sizes.batch_size,
            "timed_steps": sizes.steps,
            "repeats": sizes.repeats,
            "adapter": f"LoRA r={sizes.rank} on all-linear",
            "device": device_name(),
            "malloc_mmap_threshold": 65536,
        },
        notes=[
            "tokens/s: real tokens per second over the timed steps, median of the repeats "
            "(methods interleaved); vs_plain: against the plain transformers + peft loop.",
            "peak RSS: the whole process's (its own VmHWM), model and torch included; step_mb: "
            "peak RSS minus the RSS after loading the model, what a training step adds.",
        ],
    )


def main(argv: list[str] | None = None) -> int:
    """The measured child: `python -m bench.client_throughput METHOD MODEL DATA [...]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.client_throughput")
    parser.add_argument("method", choices=[*METHODS, BF16])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--seq-len", type=int, default=FULL.seq_len)
    parser.add_argument("--batch-size", type=int, default=FULL.batch_size)
    parser.add_argument("--steps", type=int, default=FULL.steps)
    parser.add_argument("--rank", type=int, default=FULL.rank)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    sizes = Sizes(
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, rank=args.rank
    )
    print(json.dumps(worker(args.method, args.model, args.data, sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
