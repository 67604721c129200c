"""What a Job imports before it works: only what its task uses.

Measured with the interpreter's own `-X importtime` on a real `fedtune-trainer aggregate` of
round 0 (which imports peft to initialise the adapter), so the test sees every module the Job's
process loaded, however indirectly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask
from tests.trainer.support import Demo


def imported_modules(importtime: str) -> set[str]:
    """The module names of `-X importtime`'s lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


@pytest.mark.parametrize(
    ("base_quantization", "bitsandbytes_loaded"),
    [
        ("none", False),  # every full-precision run: peft and transformers must not load it
        ("nf4", True),  # a QLoRA run's Jobs keep it (the client quantizes the base with it)
    ],
)
def test_bitsandbytes_is_imported_only_for_a_4bit_base(
    demo: Demo, tmp_path: Path, base_quantization: str, bitsandbytes_loaded: bool
) -> None:
    task = AggregateTask(
        run="startup",
        round=0,
        rounds=1,
        base_model=str(demo.model),
        adapter=AdapterSpec(r=4, base_quantization=base_quantization),
        storage=StorageLocation(uri=(tmp_path / "run").as_uri()),
    )
    env = {
        **os.environ,
        "FEDTUNE_TASK": json.dumps(task.wire()),
        "FEDTUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedtune_trainer", "aggregate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = imported_modules(done.stderr)
    assert "peft" in modules  # the measurement sees the libraries that would import it
    # A module refused by a None in sys.modules still prints a line of its own (the lookup that
    # failed): what shows bitsandbytes loaded are its submodules.
    assert any(m.startswith("bitsandbytes.") for m in modules) is bitsandbytes_loaded
    log = "\n".join(ln for ln in done.stderr.splitlines() if not ln.startswith("import time:"))
    if not bitsandbytes_loaded:  # nor its warning about a missing package, read as an error
        assert "kernels-community" not in log
