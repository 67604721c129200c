"""Types and helpers shared by the trainer tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Demo:
    """The tiny model and the demo data set of one test session."""

    model: Path
    data: Path

    def client_data(self, i: int) -> Path:
        return self.data / f"client-{i}.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.data / "eval.jsonl"


@dataclass(frozen=True)
class Storage:
    """A fresh run root, and the environment a process needs to reach it."""

    uri: str
    env: dict[str, str] = field(default_factory=dict)

    def open(self) -> st.Store:
        return open_store(self.uri)


# `fedtune-trainer <kind>` (cli.main, what the console script runs) that writes its own peak RSS
# (VmHWM: the high-water mark of the memory map exec gave it) to a file when it exits. Not
# ru_maxrss from wait4: Linux folds the parent's high-water mark into the child's at fork/exec,
# so a child of a large pytest process would report at least the pytest process's size.
_PEAK_WRAPPER = """
import atexit, os, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(os.environ['FEDTUNE_TEST_PEAK_FILE'], 'w').write(line.split()[1])
atexit.register(_peak)
from fedtune_trainer.cli import main
sys.exit(main([sys.argv[1]]))
"""


@dataclass(frozen=True)
class JobRun:
    returncode: int
    stderr: str
    peak_rss: int
    """Bytes: the process's own peak resident set."""


def run_job_measured(kind: str, env: dict[str, str]) -> JobRun:
    """Run `fedtune-trainer <kind>` in a fresh process with `env`; its exit code, stderr, peak."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_WRAPPER, kind],
            env={**env, "FEDTUNE_TEST_PEAK_FILE": str(peak_file)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else -1
    return JobRun(proc.returncode, proc.stderr.decode(errors="replace"), peak)


def job_environment(cache: Path) -> dict[str, str]:
    """Environment for trainer processes: the venv's bin first, one thread, its own cache."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["FEDTUNE_CACHE_DIR"] = str(cache)
    return env
