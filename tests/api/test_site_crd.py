"""The FederatedSite CRD: generated from its models, and on a real API server the example is
accepted as the models default it, invalid sites are refused naming the field, and `kubectl get
fsite` shows the site's columns."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any

import pytest
import yaml

from devcluster.testing import DevCluster
from fedtune_operator import crd
from fedtune_operator.api.site import FederatedSiteSpec, FederatedSiteStatus
from tests.api.api_cases import EXAMPLES, REPO
from tests.api.test_crd_apiserver import columns, create

SITE_CRD_FILE = REPO / "crds" / "fedtune.dev_federatedsites.yaml"


def site() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "site.yaml").read_text())


def test_committed_site_crd_is_generated() -> None:
    """Run `python -m fedtune_operator.crd --site > crds/fedtune.dev_federatedsites.yaml`."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert crd.main(["--site"]) == 0
    assert SITE_CRD_FILE.read_text() == out.getvalue()
    assert (REPO / "charts" / "fedtune-operator" / "crds" / SITE_CRD_FILE.name).read_text() == (
        out.getvalue()
    )


def test_the_site_crd_names() -> None:
    body = yaml.safe_load(SITE_CRD_FILE.read_text())
    assert body["metadata"]["name"] == "federatedsites.fedtune.dev"
    assert body["spec"]["names"]["shortNames"] == ["fsite"]
    assert body["spec"]["versions"][0]["subresources"] == {"status": {}}


@pytest.fixture(scope="module")
def namespace(devcluster: DevCluster) -> Iterator[str]:
    devcluster.apply_crds()
    name = f"site-{uuid.uuid4().hex[:8]}"
    devcluster.kubectl("create", "namespace", name)
    yield name
    devcluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.e2e
def test_the_example_site_is_accepted_and_defaulted_like_the_models(
    devcluster: DevCluster, namespace: str
) -> None:
    result = create(devcluster, namespace, site())
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["spec"]
    assert server == FederatedSiteSpec.model_validate(site()["spec"]).wire()


INVALID = [
    ("task-key-not-ed25519", {"run": {"taskPublicKey": "rsa:abc"}}, "spec.run.taskPublicKey"),
    ("client-not-dns", {"client": "Bank_D"}, "spec.client"),
    ("storage-not-a-uri", {"run": {"storage": {"uri": "ftp://x"}}}, "spec.run.storage.uri"),
    ("max-rounds-zero", {"policy": {"maxRounds": 0}}, "spec.policy.maxRounds"),
    ("noise-negative", {"policy": {"privacy": {"clipNorm": 1, "noiseMultiplier": -1}}},
     "spec.policy.privacy.noiseMultiplier"),
]  # fmt: skip


def merged(patch: dict[str, Any]) -> dict[str, Any]:
    body = site()

    def merge(into: dict[str, Any], over: dict[str, Any]) -> None:
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(body["spec"], patch)
    return body


@pytest.mark.e2e
@pytest.mark.parametrize(("case", "patch", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_site_is_refused_naming_the_field(
    devcluster: DevCluster, namespace: str, case: str, patch: dict[str, Any], field: str
) -> None:
    result = create(devcluster, namespace, merged(patch))
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


@pytest.mark.e2e
def test_kubectl_get_fsite_shows_the_columns(devcluster: DevCluster, namespace: str) -> None:
    body = site()
    body["metadata"]["name"] = f"bank-{uuid.uuid4().hex[:6]}"
    assert create(devcluster, namespace, body, dry_run=False).returncode == 0
    status = FederatedSiteStatus(
        phase="Training", run_round=4, after_round=3, rounds_contributed=3, bytes_sent=891_515
    )
    devcluster.kubectl(
        "patch", "fsite", body["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status.wire()}),
    )  # fmt: skip
    [row] = columns(devcluster.kubectl("get", "fsite", "-n", namespace).stdout)
    assert list(row)[:7] == ["NAME", "PHASE", "RUN", "CLIENT", "ROUND", "CONTRIBUTED", "SENT"]
    assert (row["PHASE"], row["RUN"], row["CLIENT"], row["ROUND"]) == (
        "Training", "support-bot", "bank-d", "4",
    )  # fmt: skip
    assert row["CONTRIBUTED"] == "3"
