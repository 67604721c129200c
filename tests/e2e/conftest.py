"""Fixtures for the operator end to end: the operator as a process, a namespace with the S3
credentials Secret, and two sets of assets in the devcluster's S3 server: a tiny random model with
generated data (fast; most tests), and the pretrained SmolLM2-135M-Instruct with real text split
non-IID by source (tests/e2e/test_real_model.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.corpus import build_corpus
from devcluster.testing import DevCluster, make_tiny_assets
from tests.e2e.support import BUCKET, CLIENTS, Assets, Manifest, Operator, unique_name


@pytest.fixture(scope="session")
def assets(devcluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("assets")
    model, data = make_tiny_assets(root, clients=3, samples=48, eval_samples=24, hidden_size=64)
    broken = root / "broken.jsonl"
    good = (data / "client-0.jsonl").read_text().splitlines()
    broken.write_text("\n".join([*good[:5], '{"messages": [ broken', *good[5:]]) + "\n")
    devcluster.s3.bucket(BUCKET)
    devcluster.upload_dir(model, BUCKET, "models/tiny")
    devcluster.upload_dir(data, BUCKET, "data")
    devcluster.s3.client().upload_file(str(broken), BUCKET, "data/broken.jsonl")
    return Assets(
        model_uri=f"s3://{BUCKET}/models/tiny",
        data_uris={c: f"s3://{BUCKET}/data/client-{i}.jsonl" for i, c in enumerate(CLIENTS)},
        eval_uri=f"s3://{BUCKET}/data/eval.jsonl",
        broken_data_uri=f"s3://{BUCKET}/data/broken.jsonl",
        local_model=model,
    )


REAL_CHUNK_CHARS = 400
"""About 100 tokens of prose: with SmolLM2's chat prompt (about 30 tokens) a record fits the
128-token sequences a CPU run can afford, so the trainer's right truncation keeps whole answers."""
REAL_RECORDS = 64
REAL_EVAL_RECORDS = 24


@pytest.fixture(scope="session")
def real_assets(
    devcluster: DevCluster, real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Assets:
    """The pretrained model and real text in S3: client i trains on source i of
    `devcluster.corpus` (the language reference, the standard library's docstrings, the packages'
    READMEs) in the chat format, and the eval set holds out whole documents of all three."""
    data = tmp_path_factory.mktemp("real-data")
    build_corpus(
        data,
        clients=len(CLIENTS),
        fmt="chat",
        records=REAL_RECORDS,
        eval_records=REAL_EVAL_RECORDS,
        chunk_chars=REAL_CHUNK_CHARS,
    )
    devcluster.s3.bucket(BUCKET)
    devcluster.upload_dir(real_model, BUCKET, "models/smollm2")
    devcluster.upload_dir(data, BUCKET, "real-data")
    return Assets(
        model_uri=f"s3://{BUCKET}/models/smollm2",
        data_uris={c: f"s3://{BUCKET}/real-data/client-{i}.jsonl" for i, c in enumerate(CLIENTS)},
        eval_uri=f"s3://{BUCKET}/real-data/eval.jsonl",
        local_model=real_model,
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
    return unique_name()


@pytest.fixture(scope="session")
def manifest(
    request: pytest.FixtureRequest, namespace: str, devcluster: DevCluster
) -> Callable[..., Manifest]:
    """A small but complete run: 3 clients x 3 rounds of a few steps each, on `using` (the tiny
    assets unless a test passes others, such as real_assets; the tiny ones are built only when
    a test needs them). Session-scoped, so that a module's fixture can start a run that several
    tests share."""

    def build(name: str, using: Assets | None = None, **spec: Any) -> Manifest:
        assets: Assets = using or request.getfixturevalue("assets")
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
