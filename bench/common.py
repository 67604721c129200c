"""What every benchmark shares: the machine description, results (table, JSON), child processes
measured one by one, and the tiny model with its non-IID demo data."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tables import markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
"""Where `make bench` writes: scratch, ignored by git (bench/records/ holds what the docs cite)."""
BENCHMARKS = {
    "communication": "bench.communication",
    "parity": "bench.parity",
    "client": "bench.client_throughput",
    "aggregation": "bench.aggregation",
    "operator": "bench.operator_overhead",
}
"""Each benchmark's module: `run(sizes, work, out)`, FULL and SMOKE sizes, and optionally
`REPRODUCIBLE` columns and `record_tables(doc)` (bench/records.py)."""
VENV_BIN = Path(sys.executable).parent
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def _meminfo_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers come from: every result carries this, so numbers from different
    machines are never compared by accident."""
    import torch

    mem = _meminfo_kib("MemTotal")
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem / (1 << 20), 1) if mem else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "git_commit": _git_commit(),
        # Other work on the machine skews timings: the 1/5/15-minute load when this started.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

Formatter = str
"""A format name of bench.tables.cell ("int", "float:4"): a name, so that the JSON carries it."""

fmt_int: Formatter = "int"
fmt_ratio: Formatter = "ratio"


def fmt_float(digits: int) -> Formatter:
    return f"float:{digits}"


def human_count(n: float) -> str:
    """1,235,814,400 -> 1.24B; 361,088 -> 361K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(round(n))


@dataclass
class Result:
    """One benchmark's outcome: rows (the JSON), how to show them, and how it was measured."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    formats: dict[str, Formatter] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The rows as a GitHub markdown table (numbers right-aligned)."""
        return markdown(self.columns, self.rows, self.formats)

    def document(self, machine_info: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "title": self.title,
            "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "seconds": round(self.seconds, 1),
            "machine": dict(machine_info),
            "settings": self.settings,
            "columns": self.columns,
            "formats": self.formats,
            "rows": [_jsonable(r) for r in self.rows],
            "notes": self.notes,
            "plots": self.plots,
        }

    def write(self, out: Path, machine_info: Mapping[str, Any]) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(self.document(machine_info), indent=1) + "\n")
        return path


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and inf become null: JSON has no spelling for them."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def save_figure(fig: Any, out: Path, name: str) -> Path:
    """Write a matplotlib Figure as out/<name>.png (no Software metadata: stable bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, metadata={"Software": None})
    return path


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# Child processes, measured one at a time
# --------------------------------------------------------------------------------------------


def proc_status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM"), in bytes.

    Measured children report their own VmHWM as their peak: wait4's ru_maxrss also carries the
    parent's high-water mark across fork and exec, so a child of a large benchmark process would
    report at least the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{key} not in /proc/self/status")


@dataclass(frozen=True)
class Child:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_child(argv: Sequence[str], env: Mapping[str, str], timeout: float = 1800) -> Child:
    """Run one measured process to completion: its exit status, output and wall time.

    A fresh process per configuration: nothing from an earlier configuration (allocator caches,
    imported modules) can raise or lower the next one's memory, as it would inside one
    long-lived process; the child reports its own peak (`proc_status_bytes("VmHWM")`) on stdout.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), env=dict(env), stdout=out, stderr=err, cwd=REPO_ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Child(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            seconds=seconds,
        )


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured child: this one, the venv first on PATH, repo importable."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# The tiny model and its non-IID data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySizes:
    """How big the tiny model and the demo data set are."""

    clients: int = 4
    samples: int = 200
    eval_samples: int = 80
    hidden_size: int = 128
    layers: int = 2


@dataclass(frozen=True)
class _DataFiles:
    """The files a federated benchmark reads: one jsonl per client and the eval set."""

    model: Path
    data: Path
    parameters: int

    def client_data(self, i: int) -> Path:
        return self.data / f"client-{i}.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.data / "eval.jsonl"


@dataclass(frozen=True)
class TinyAssets(_DataFiles):
    sizes: TinySizes

    def kinds(self) -> list[str]:
        layout = json.loads((self.data / "layout.json").read_text())
        return [layout["clients"][f"client-{i}"]["task"] for i in range(self.sizes.clients)]


def tiny_assets(work: Path, sizes: TinySizes) -> TinyAssets:
    """The demo data (one task kind per client: the non-IID split) and the tiny Llama trained
    tokenizer + random model on it; made once per work directory and sizes, then reused."""
    from fedtune_trainer.fixtures.demo_data import make_demo_data
    from fedtune_trainer.fixtures.tiny import TinyConfig, make_tiny_model

    s = sizes
    root = work / f"tiny-c{s.clients}-s{s.samples}-e{s.eval_samples}-h{s.hidden_size}-l{s.layers}"
    data, model = root / "data", root / "model"
    info_file = model / "fedtune-tiny.json"
    if not info_file.exists():
        layout = make_demo_data(
            data, sizes.clients, sizes.samples, sizes.eval_samples, fmt="chat", seed=0
        )
        (data / "layout.json").write_text(json.dumps(layout, indent=1))
        make_tiny_model(
            model,
            sorted(data.glob("*.jsonl")),
            TinyConfig(
                hidden_size=sizes.hidden_size,
                intermediate_size=2 * sizes.hidden_size,
                num_hidden_layers=sizes.layers,
            ),
        )
    info = json.loads(info_file.read_text())
    return TinyAssets(model=model, data=data, sizes=sizes, parameters=int(info["parameters"]))


# --------------------------------------------------------------------------------------------
# The real model and real text
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealSizes:
    """How much of the real-text corpus the real-model benchmarks use."""

    clients: int = 4
    records: int = 96
    """Per client: more than the steps of any benchmark take, so no record repeats in a round."""
    eval_records: int = 32
    chunk_chars: int = 400
    """About 100 tokens of text per record: with the chat prompt it fits 128-token sequences."""


@dataclass(frozen=True)
class RealAssets(_DataFiles):
    """SmolLM2-135M-Instruct (converted once into the machine's cache by `make model`) and the
    project's real-text corpus, one source per client (the non-IID split)."""

    sizes: RealSizes

    def kinds(self) -> list[str]:
        layout = json.loads((self.data / "corpus.json").read_text())
        return [layout["clients"][f"client-{i}"]["source"] for i in range(self.sizes.clients)]


Assets = TinyAssets | RealAssets
"""What a federated benchmark trains: a model directory, one data file per client, eval data."""


def real_assets(work: Path, sizes: RealSizes) -> RealAssets:
    """The pretrained model from the cache and the corpus (a few seconds, made once per work
    directory and sizes)."""
    from devcluster.corpus import build_corpus
    from devcluster.pretrained import ensure_model

    model = ensure_model()
    s = sizes
    data = work / f"real-c{s.clients}-r{s.records}-e{s.eval_records}-k{s.chunk_chars}"
    if not (data / "corpus.json").exists():
        build_corpus(
            data,
            clients=s.clients,
            fmt="chat",
            records=s.records,
            eval_records=s.eval_records,
            chunk_chars=s.chunk_chars,
        )
    config = json.loads((model / "config.json").read_text())
    return RealAssets(model=model, data=data, sizes=sizes, parameters=parameter_count(config))


def parameter_count(config: Mapping[str, Any]) -> int:
    """The parameters of a Llama-architecture model from its config, counted on the meta device
    (no memory, exact)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    return sum(p.numel() for p in model.parameters())
