"""A federated run across clusters: the run's cluster and N sites' (docs/sites.md), set up as
their people would set them up, for the sites e2e test and `make demo SITES=N`.

Everything goes through the user-facing commands: `fedtune-trainer keygen` makes the keys,
`fedtune storage-policy` prints the bucket policy that confines each site's account, `kubectl`
applies the resources, and each cluster gets its own operator (`fedtune operator`, `--mode
site` on the sites). The run's cluster holds its own identity and the task key; each site holds
its storage identity, its signing key and its data, on its own disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devcluster.federation import Federation
from devcluster.testing import DevCluster, OperatorProcess, wait_for

BIN = Path(sys.executable).parent
NAMESPACE = "fed"
SITE_NAMESPACE = "ml"
LOCAL = "clinic"
ROUNDS = 2
RUN_TIMEOUT = 600


def keygen(out: Path) -> tuple[str, str]:
    """A new key pair as `fedtune-trainer keygen` makes it: (private PEM, public key)."""
    out.unlink(missing_ok=True)
    public = subprocess.run(
        [str(BIN / "fedtune-trainer"), "keygen", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.read_text(), public


def resource(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def get(dc: DevCluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(dc.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def condition(obj: dict[str, Any], type_: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


@dataclass
class Sites:
    """The federation with its operators, keys and accounts (`prepare` once; then `start` runs)."""

    fed: Federation
    bucket: str
    data: Path
    """client-0.jsonl (the local client's, uploaded), client-<i>.jsonl (site i's, on disk)."""
    work: Path
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    operators: list[OperatorProcess] = field(default_factory=list)
    statements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run(self) -> DevCluster:
        return self.fed.run

    @property
    def names(self) -> list[str]:
        return sorted(self.fed.sites)

    def site(self, name: str) -> DevCluster:
        return self.fed.sites[name].dc

    def data_of(self, site: str) -> Path:
        return self.data / f"client-{self.names.index(site) + 1}.jsonl"

    def secret(self, dc: DevCluster, namespace: str, name: str, **data: str) -> None:
        literals = [f"--from-literal={k}={v}" for k, v in data.items()]
        dc.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)

    def prepare(self, model: Path) -> None:
        run, root = self.run, self.run.s3
        run.upload_dir(model, self.bucket, "models/tiny")
        root.client().upload_file(
            str(self.data / "client-0.jsonl"), self.bucket, "data/clinic.jsonl"
        )
        for dc in self.fed.clusters().values():
            dc.apply_crds()
        self.keys = {n: keygen(self.work / f"{n}.key") for n in ["run", *self.names, "wrong"]}
        # The run's cluster: its own identity (the bucket's owner) and the task key, no more.
        run.kubectl("create", "namespace", NAMESPACE)
        self.secret(run, NAMESPACE, "run-s3", AWS_ACCESS_KEY_ID=root.access_key,
                    AWS_SECRET_ACCESS_KEY=root.secret_key)  # fmt: skip
        self.secret(run, NAMESPACE, "task-key", **{"task-signing.key": self.keys["run"][0]})
        # Each site's cluster: its storage identity and its signing key (and a key the run never
        # pins, for a site that signs with the wrong one).
        for s in self.names:
            dc, account = self.site(s), self.fed.sites[s].s3
            dc.kubectl("create", "namespace", SITE_NAMESPACE)
            self.secret(dc, SITE_NAMESPACE, "site-s3", AWS_ACCESS_KEY_ID=account.access_key,
                        AWS_SECRET_ACCESS_KEY=account.secret_key)  # fmt: skip
            self.secret(dc, SITE_NAMESPACE, "site-key", **{"signing.key": self.keys[s][0]})
            self.secret(dc, SITE_NAMESPACE, "wrong-key", **{"signing.key": self.keys["wrong"][0]})
            self.operators.append(
                OperatorProcess(dc, SITE_NAMESPACE, self.work / f"{s}.log", mode="site")
            )
        self.operators.append(OperatorProcess(run, NAMESPACE, self.work / "run.log"))
        for op in self.operators:
            op.start()

    def stop(self) -> None:
        for op in self.operators:
            op.stop()

    def run_spec(self, name: str, min_clients: int) -> dict[str, Any]:
        root = self.run.s3
        return {
            "baseModel": f"s3://{self.bucket}/models/tiny",
            "rounds": ROUNDS,
            "adapter": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {
                "localSteps": 3,
                "batchSize": 4,
                "maxSeqLength": 64,
                "learningRate": 0.003,
            },
            "data": {"format": "chat"},
            "storage": {
                "uri": f"s3://{self.bucket}/runs/{name}",
                "endpoint": root.endpoint,
                "credentialsSecret": {"name": "run-s3"},
            },
            "clients": [
                {"name": LOCAL, "dataUri": f"s3://{self.bucket}/data/clinic.jsonl"},
                *({"name": s, "site": {"publicKey": self.keys[s][1]}} for s in self.names),
            ],
            "taskSigning": {"secretName": "task-key"},
            "aggregation": {"minClients": min_clients},
            "backoffLimit": 0,
        }

    def confine(self, name: str, spec: dict[str, Any]) -> None:
        """Add the run's identities to the bucket policy, as `fedtune storage-policy` prints
        them: each site's account to what its client may touch."""
        manifest = self.work / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(resource("FederatedFineTune", name, NAMESPACE, spec)))
        accounts = [f"run-s3={self.run.s3.name}"]
        accounts += [f"site-{s}={self.fed.sites[s].s3.name}" for s in self.names]
        printed = subprocess.run(
            [str(BIN / "fedtune"), "storage-policy", "-f", str(manifest), "--flavor", "versitygw",
             *(f"--account={a}" for a in accounts)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        self.statements += json.loads(printed)[self.bucket]["policy"]["Statement"]
        policy = {"Version": "2012-10-17", "Statement": self.statements}
        self.run.s3.put_bucket_policy(self.bucket, policy)

    def site_run(self, name: str) -> dict[str, Any]:
        """A FederatedSite's `run`: how the run's author announced run `name` to the sites."""
        return {
            "name": name,
            "storage": {
                "uri": f"s3://{self.bucket}/runs/{name}",
                "endpoint": self.run.s3.endpoint,
                "credentialsSecret": {"name": "site-s3"},
            },
            "taskPublicKey": self.keys["run"][1],
        }

    def get_run(self, name: str) -> dict[str, Any]:
        return get(self.run, "fft", NAMESPACE, name)

    def start(self, name: str, min_clients: int, **sites: dict[str, Any]) -> None:
        """Run `name`: the bucket policy for it, each site's FederatedSite (`sites`: overrides of
        a site's spec), then the run."""
        spec = self.run_spec(name, min_clients)
        self.confine(name, spec)
        for s in self.names:
            site_spec = {
                "client": s,
                "run": self.site_run(name),
                "signing": {"secretName": "site-key"},
                "dataUri": self.data_of(s).as_uri(),
                "policy": {"images": ["ghcr.io/fedtune/"], "maxLocalSteps": 10},
            } | sites.get(s, {})
            body = resource("FederatedSite", f"{s}-in-{name}", SITE_NAMESPACE, site_spec)
            self.site(s).kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
        body = resource("FederatedFineTune", name, NAMESPACE, spec)
        self.run.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))

    def succeeded(self, name: str, each: Callable[[], None] | None = None) -> dict[str, Any]:
        """Wait for the run to succeed (`each` runs at every look: the demo's views)."""

        def check() -> dict[str, Any] | None:
            if each is not None:
                each()
            obj = get(self.run, "fft", NAMESPACE, name)
            if condition(obj, "Failed"):
                raise AssertionError(f"{name} failed:\n{self.diagnose(name)}")
            return obj if condition(obj, "Succeeded") else None

        return wait_for(
            check,
            timeout=RUN_TIMEOUT,
            what=f"{name} to succeed",
            interval=2.0,
            diagnose=lambda: self.diagnose(name),
        )

    def site_status(self, site: str, run: str, phase: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = get(self.site(site), "fsite", SITE_NAMESPACE, f"{site}-in-{run}")
            return obj if (obj.get("status") or {}).get("phase") == phase else None

        return wait_for(
            check,
            timeout=120,
            what=f"{site} in {run} to be {phase}",
            diagnose=lambda: self.diagnose(run),
        )

    def views(self) -> str:
        """What `kubectl get` shows in each cluster: the run's, then each site's."""
        parts = [f"run cluster $ kubectl get fft -n {NAMESPACE}"]
        parts.append(self.run.kubectl("get", "fft", "-n", NAMESPACE).stdout.rstrip())
        for s in self.names:
            parts.append(f"{s} cluster $ kubectl get fsite -n {SITE_NAMESPACE}")
            parts.append(self.site(s).kubectl("get", "fsite", "-n", SITE_NAMESPACE).stdout.rstrip())
        return "\n".join(parts)

    def diagnose(self, run: str) -> str:
        logs = [f"--- {o.log.name}\n{o.log_tail(40)}" for o in self.operators]
        return "\n".join([*logs, self.views(), self.run.logs()])
