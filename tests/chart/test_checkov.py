"""checkov, a real Kubernetes scanner, over what fedtune puts on a cluster: the chart as rendered
by `helm template`, and every Job (client, aggregator, evaluation, cleanup) plus the
NetworkPolicy that the operator builds for examples/full.yaml.

Every finding must be either fixed or justified, and the justifications live in one place: the
table between the `checkov-justified` markers in docs/install.md, which this test reads. A
justification that no longer matches a finding fails too, so the table cannot rot. Two
"hardened" scenarios set the values the table says close a finding (image digests, pull policy
Always, CPU limits, the chart's NetworkPolicy) and must come out clean of those.

checkov has a large dependency tree; tools/setup-checkov.sh installs a pinned version into a venv
of its own in the cache, so that it cannot change the versions the project runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.cluster import REPO_ROOT
from fedtune_operator import manifests, network_policy, remote
from fedtune_operator.validation import parse_spec
from tests.chart.support import Values, template

INSTALL_DOC = REPO_ROOT / "docs" / "install.md"
FULL_EXAMPLE = REPO_ROOT / "examples" / "full.yaml"
DIGEST = "sha256:" + "0123456789abcdef" * 4

CHART_SCENARIOS: dict[str, Values] = {
    "chart-defaults": {},
    "chart-namespaced": {"watchNamespaces": ["team-a"], "metrics": {"service": {"enabled": True}}},
    "chart-hardened": {
        "image": {"digest": DIGEST, "pullPolicy": "Always"},
        "resources": {"limits": {"cpu": "1", "memory": "512Mi"}},
        "networkPolicy": {"enabled": True, "apiServerCidrs": ["192.0.2.10/32"]},
    },
}
RUN_SCENARIOS: dict[str, dict[str, Any]] = {
    "run-full": {},
    "run-hardened": {
        "template": {
            "image": f"ghcr.io/fedtune/trainer@{DIGEST}",
            "imagePullPolicy": "Always",
            "resources": {"limits": {"cpu": "8", "memory": "32Gi"}},
        }
    },
}
HARDENED_CLOSES = {"CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43", "CKV2_K8S_6"}
"""What docs/install.md says the values of the hardened scenarios close."""


@dataclass(frozen=True)
class Finding:
    scenario: str
    check: str
    resource: str

    @property
    def target(self) -> str:
        """What the docs table names: `chart` (the operator's objects) or `Jobs` (a run's)."""
        return "chart" if self.scenario.startswith("chart-") else "Jobs"


@dataclass(frozen=True)
class Justified:
    check: str
    targets: frozenset[str]
    why: str


def justified() -> dict[str, Justified]:
    """The table in docs/install.md: | `CKV_...` | chart, Jobs | what | why |."""
    text = INSTALL_DOC.read_text()
    match = re.search(
        r"<!-- checkov-justified:start -->(.*?)<!-- checkov-justified:end -->", text, re.S
    )
    assert match, "docs/install.md has no checkov-justified table"
    out: dict[str, Justified] = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`CKV"):
            continue
        check = cells[0].strip("`")
        targets = frozenset(k.strip() for k in cells[1].split(","))
        assert targets <= {"chart", "Jobs"}, f"{check}: applies to chart and/or Jobs"
        assert check not in out, f"{check} is justified twice"
        assert len(cells[3]) > 40, f"{check}: say why"
        out[check] = Justified(check, targets, cells[3])
    assert out, "the checkov-justified table is empty"
    return out


def run_objects(overrides: dict[str, Any], ns: str) -> list[dict[str, Any]]:
    """Every Job kind the operator creates for examples/full.yaml (a relay for its site's
    client), and the run's NetworkPolicy."""
    doc = yaml.safe_load(FULL_EXAMPLE.read_text())
    raw = doc["spec"]
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    spec = parse_spec(raw)
    run, uid = doc["metadata"]["name"], "0c0ffee0-0000-4000-8000-000000000001"
    common = {"run": run, "namespace": ns, "uid": uid, "spec": spec}
    clients = [c.name for c in spec.clients]
    return [
        network_policy.network_policy(**common),
        # A site's client is a relay Job; the others train here.
        *(remote.job_for_client(**common, round_=1, attempt=0, client=c) for c in clients),
        manifests.aggregate_job(**common, round_=1, attempt=0, clients=clients),
        manifests.evaluate_job(**common, round_=1),
        manifests.cleanup_job(**common),
    ]


def scan(checkov: Path, directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(checkov), "--directory", str(directory), "--framework", "kubernetes",
         "--output", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    # 0: nothing failed, 1: findings; anything else is checkov itself failing.
    assert result.returncode in (0, 1), result.stderr[-4000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def findings_of(reports: list[dict[str, Any]], scenario: str) -> Iterator[Finding]:
    for report in reports:
        for failed in report["results"]["failed_checks"]:
            yield Finding(scenario, failed["check_id"], failed["resource"])


@pytest.fixture(scope="module")
def checkov() -> Path:
    out = subprocess.run(
        [str(REPO_ROOT / "tools" / "setup-checkov.sh")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"could not install checkov:\n{out.stderr[-4000:]}"
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def scanned(
    checkov: Path, helm_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Finding], dict[str, int]]:
    """The findings of every scenario, and how many objects each one has. One checkov run per
    scenario: checkov matches NetworkPolicies to pods by labels across all the files it reads
    (whatever their namespace), so one scenario's policy would cover another's pods."""
    root = tmp_path_factory.mktemp("checkov")
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for name, values in CHART_SCENARIOS.items():
        rendered = template(helm_bin, values, namespace=name).stdout
        scenarios[name] = [o for o in yaml.safe_load_all(rendered) if o]
    for name, overrides in RUN_SCENARIOS.items():
        scenarios[name] = run_objects(overrides, ns=name)
    findings: list[Finding] = []
    for name, objects in scenarios.items():
        (root / name).mkdir()
        (root / name / "objects.yaml").write_text(yaml.safe_dump_all(objects))
        reports = scan(checkov, root / name)
        assert sum(r["summary"]["resource_count"] for r in reports) >= len(objects), name
        findings += findings_of(reports, name)
    return findings, {name: len(objects) for name, objects in scenarios.items()}


def test_the_scanner_finds_what_it_should(checkov: Path, tmp_path: Path) -> None:
    """A privileged, root pod must fail the checks this suite relies on: a checkov that parsed
    nothing, or skipped the graph checks, would otherwise pass everything."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "ns"},
        "spec": {
            "containers": [
                {"name": "c", "image": "busybox:latest", "securityContext": {"privileged": True}}
            ]
        },
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pod.yaml").write_text(yaml.safe_dump(pod))
    checks = {f.check for f in findings_of(scan(checkov, tmp_path), "bad")}
    assert {"CKV_K8S_16", "CKV_K8S_38", "CKV2_K8S_6", "CKV_K8S_43"} <= checks


def test_every_finding_is_fixed_or_justified(
    scanned: tuple[list[Finding], dict[str, int]],
) -> None:
    findings, _ = scanned
    table = justified()
    open_ = sorted(
        {(f.scenario, f.check, f.resource) for f in findings
         if f.check not in table or f.target not in table[f.check].targets}
    )  # fmt: skip
    assert open_ == [], "checkov findings neither fixed nor justified in docs/install.md"


def test_every_justification_still_matches_a_finding(
    scanned: tuple[list[Finding], dict[str, int]],
) -> None:
    findings, _ = scanned
    seen = {(f.check, f.target) for f in findings}
    stale = sorted(
        (j.check, target)
        for j in justified().values()
        for target in j.targets
        if (j.check, target) not in seen
    )
    assert stale == [], "justified in docs/install.md but no longer found: drop them"


def test_the_run_pods_hold_no_api_token_and_sit_behind_a_network_policy(
    scanned: tuple[list[Finding], dict[str, int]],
) -> None:
    """The two findings this work fixed for the Jobs stay fixed (and are not justified away)."""
    findings, _ = scanned
    fixed = {"CKV_K8S_38", "CKV2_K8S_6"}
    assert not [f for f in findings if f.scenario.startswith("run-") and f.check in fixed]
    table = justified()
    assert not [c for c in fixed if c in table and "Jobs" in table[c].targets]


def test_the_hardened_values_close_what_the_docs_say_they_close(
    scanned: tuple[list[Finding], dict[str, int]],
) -> None:
    findings, _ = scanned
    left = sorted(
        (f.scenario, f.check, f.resource) for f in findings
        if f.scenario.endswith("-hardened") and f.check in HARDENED_CLOSES
    )  # fmt: skip
    assert left == []


def test_every_scenario_was_scanned(scanned: tuple[list[Finding], dict[str, int]]) -> None:
    findings, expected = scanned
    # Each scenario has open findings (the justified ones), which proves checkov read its file.
    assert {f.scenario for f in findings} == set(expected)
