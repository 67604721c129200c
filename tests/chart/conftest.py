"""Fixtures of the chart tests: the helm binary, and (for the install tests) a tiny model and demo
data in the devcluster's S3 server, made here so that the chart tests depend on no other package's
fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devcluster.testing import DevCluster
from tests.chart.install import BUCKET, Assets


@pytest.fixture(scope="session")
def helm_bin(binaries: Path) -> Path:
    return binaries / "helm"


@pytest.fixture(scope="session")
def chart_assets(devcluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Two clients' chat data and a tiny Llama model built for it, uploaded to s3://BUCKET."""
    root = tmp_path_factory.mktemp("chart-assets")
    trainer = str(Path(sys.executable).parent / "fedtune-trainer")
    data, model = root / "data", root / "model"
    subprocess.run(
        [trainer, "make-demo-data", "--out", str(data), "--clients", "2", "--samples", "16"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [trainer, "make-tiny-model", "--out", str(model), "--hidden-size", "32", "--data"]
        + [str(p) for p in sorted(data.glob("client-*.jsonl"))],
        check=True,
        capture_output=True,
        timeout=300,
    )
    devcluster.s3.bucket(BUCKET)
    s3 = devcluster.s3.client()
    for local, prefix in ((model, "models/tiny"), (data, "data")):
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local)}")
    return Assets(
        model_uri=f"s3://{BUCKET}/models/tiny",
        data_uris=[f"s3://{BUCKET}/data/client-{i}.jsonl" for i in range(2)],
    )
