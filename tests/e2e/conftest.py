"""Fixtures for the operator end to end: the operator as a process, a namespace with the S3
credentials Secret, and a tiny model, its data and an eval set in the devcluster's S3 server."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.testing import DevCluster
from tests.e2e.support import BUCKET, CLIENTS, Assets, Manifest, Operator


def _upload_dir(dc: DevCluster, local: Path, key_prefix: str) -> None:
    s3 = dc.s3.client()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"{key_prefix}/{path.relative_to(local)}")


@pytest.fixture(scope="session")
def assets(devcluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("assets")
    trainer = Path(sys.executable).parent / "fedtune-trainer"
    data = root / "data"
    subprocess.run(
        [
            str(trainer),
            "make-demo-data",
            "--out",
            str(data),
            "--clients",
            "3",
            "--samples",
            "48",
            "--eval-samples",
            "24",
        ],
        check=True,
        capture_output=True,
    )
    model = root / "model"
    subprocess.run(
        [
            str(trainer),
            "make-tiny-model",
            "--out",
            str(model),
            "--data",
            *map(str, sorted(data.glob("*.jsonl"))),
            "--hidden-size",
            "64",
        ],
        check=True,
        capture_output=True,
    )
    broken = root / "broken.jsonl"
    good = (data / "client-0.jsonl").read_text().splitlines()
    broken.write_text("\n".join([*good[:5], '{"messages": [ broken', *good[5:]]) + "\n")
    devcluster.s3.bucket(BUCKET)
    _upload_dir(devcluster, model, "models/tiny")
    _upload_dir(devcluster, data, "data")
    devcluster.s3.client().upload_file(str(broken), BUCKET, "data/broken.jsonl")
    return Assets(
        model_uri=f"s3://{BUCKET}/models/tiny",
        data_uris={c: f"s3://{BUCKET}/data/client-{i}.jsonl" for i, c in enumerate(CLIENTS)},
        eval_uri=f"s3://{BUCKET}/data/eval.jsonl",
        broken_data_uri=f"s3://{BUCKET}/data/broken.jsonl",
        local_model=model,
    )


@pytest.fixture(scope="session")
def namespace(devcluster: DevCluster) -> str:
    ns = "fedtune-e2e"
    devcluster.kubectl("create", "namespace", ns)
    devcluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    s3 = devcluster.s3
    devcluster.kubectl(
        "create",
        "secret",
        "generic",
        "fedtune-s3",
        "-n",
        ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )
    devcluster.apply_crds()
    return ns


@pytest.fixture(scope="session")
def operator(
    devcluster: DevCluster, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    op = Operator(devcluster, namespace, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def run_name() -> str:
    return f"run-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def manifest(assets: Assets, namespace: str, devcluster: DevCluster) -> Callable[..., Manifest]:
    """A small but complete run: 3 clients x 3 rounds of a few steps each."""

    def build(name: str, **spec: Any) -> Manifest:
        base: dict[str, Any] = {
            "baseModel": assets.model_uri,
            "rounds": 3,
            "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {
                "localSteps": 4,
                "batchSize": 4,
                "maxSeqLength": 64,
                "learningRate": 0.003,
            },
            "data": {"format": "chat"},
            "delta": {"dtype": "bf16", "topK": 0.5, "quantization": {"bits": 8}},
            # Round 0 (the baseline) and the last round; a test asks for more when it needs them.
            "evaluation": {"dataUri": assets.eval_uri, "maxSamples": 16, "everyRounds": 100},
            "storage": {
                "uri": f"s3://{BUCKET}/runs/{name}",
                "endpoint": devcluster.s3.endpoint,
                "credentialsSecret": {"name": "fedtune-s3"},
            },
            "clients": [{"name": c, "dataUri": assets.data_uris[c]} for c in CLIENTS],
            "backoffLimit": 0,
        }
        for key, value in spec.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return {
            "apiVersion": "fedtune.dev/v1alpha1",
            "kind": "FederatedFineTune",
            "metadata": {"name": name, "namespace": namespace},
            "spec": base,
        }

    return build
