"""Fixtures of the trainer tests: a tiny model and demo data, and storage over file:// and s3."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedtune_trainer.storage import store as st
from tests.trainer.support import VENV_BIN, Demo, Storage

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    from fedtune_trainer.fixtures.demo_data import make_demo_data
    from fedtune_trainer.fixtures.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data", clients=3, samples=48, eval_samples=24, fmt="chat", seed=0)
    make_tiny_model(root / "model", sorted((root / "data").glob("*.jsonl")))
    return Demo(model=root / "model", data=root / "data")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Storage]:
    """A run root on a local directory, or on a fresh bucket of the session's real S3 server.

    For s3 the AWS_* variables are also set in this process, as a Job's environment would be.
    """
    if request.param == "file":
        yield Storage(uri=(tmp_path / "store").as_uri())
        return
    s3 = request.getfixturevalue("s3")
    bucket = s3.bucket(f"fedtune-{uuid.uuid4().hex[:12]}")
    env = s3.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield Storage(uri=f"{bucket}/runs/test", env=env)


@pytest.fixture
def file_store(tmp_path: Path) -> st.FileStore:
    return st.FileStore(tmp_path / "store")


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `fedtune-trainer` subprocesses: the venv's bin first, one thread."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["FEDTUNE_CACHE_DIR"] = str(tmp_path / "cache")
    return env
