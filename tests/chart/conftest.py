"""Fixtures of the chart tests: the helm binary, and (for the install tests) a tiny model and demo
data in the devcluster's S3 server, made here so that the chart tests depend on no other package's
fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from devcluster.testing import DevCluster, make_tiny_assets
from tests.chart.install import BUCKET, Assets


@pytest.fixture(scope="session")
def helm_bin(binaries: Path) -> Path:
    return binaries / "helm"


@pytest.fixture(scope="session")
def chart_assets(devcluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Two clients' chat data and a tiny Llama model built for it, uploaded to s3://BUCKET."""
    model, data = make_tiny_assets(
        tmp_path_factory.mktemp("chart-assets"), clients=2, samples=16, hidden_size=32
    )
    devcluster.s3.bucket(BUCKET)
    devcluster.upload_dir(model, BUCKET, "models/tiny")
    devcluster.upload_dir(data, BUCKET, "data")
    return Assets(
        model_uri=f"s3://{BUCKET}/models/tiny",
        data_uris=[f"s3://{BUCKET}/data/client-{i}.jsonl" for i in range(2)],
    )
