"""Types and helpers shared by the trainer tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedtune_trainer import store as st

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
        return st.open_store(self.uri)
