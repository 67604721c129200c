"""Helpers of the operator end-to-end tests: the operator process and reads of run state."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.testing import DevCluster, OperatorProcess, wait_for

Operator = OperatorProcess

BUCKET = "fedtune-e2e"
CLIENTS = ("alice", "bob", "carol")
PAIR = CLIENTS[:2]
Manifest = dict[str, Any]


@dataclass
class Assets:
    """What the runs read: the model and one data file per client, all under s3://BUCKET."""

    model_uri: str
    data_uris: dict[str, str]
    eval_uri: str
    local_model: Path
    broken_data_uri: str | None = None
    """A client file with one malformed line (the tiny assets only)."""


def kubectl_json(dc: DevCluster, *args: str) -> Any:
    """`kubectl <args> -o json`, parsed."""
    return json.loads(dc.kubectl(*args, "-o", "json").stdout)


def get_run(dc: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    return kubectl_json(dc, "get", "fft", name, "-n", namespace)


def labelled(dc: DevCluster, namespace: str, kind: str, selector: str) -> list[dict[str, Any]]:
    """The objects of `kind` (jobs, pods, pvc, ...) in `namespace` that `selector` matches."""
    return kubectl_json(dc, "get", kind, "-n", namespace, "-l", selector)["items"]


def patch_spec(dc: DevCluster, namespace: str, name: str, **spec: Any) -> None:
    """A merge patch of the run's spec, as `kubectl patch fft --type=merge` sends it."""
    body = json.dumps({"spec": spec})
    dc.kubectl("patch", "fft", name, "-n", namespace, "--type=merge", "-p", body)


def delete_run(dc: DevCluster, namespace: str, name: str, timeout: int = 60) -> None:
    """`kubectl delete fft`, returning once the run is gone (its finalizer, if any, lifted)."""
    dc.kubectl("delete", "fft", name, "-n", namespace, "--wait=true", f"--timeout={timeout}s")


def condition(run: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (run.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def wait_condition(
    dc: DevCluster, op: Operator, namespace: str, name: str, type_: str, timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = get_run(dc, namespace, name)
        c = condition(run, type_)
        failed = condition(run, "Failed")
        if type_ != "Failed" and failed and failed["status"] == "True":
            raise AssertionError(
                f"run failed: {failed['reason']}: {failed['message']}\n{op.log_tail()}\n{dc.logs()}"
            )
        return run if c and c["status"] == "True" else None

    return wait_for(
        check,
        timeout=timeout,
        what=f"{name} to be {type_}",
        interval=1.0,
        diagnose=lambda: f"{op.log_tail()}\n{dc.logs()}",
    )


def jobs_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return labelled(dc, namespace, "jobs", f"fedtune.dev/run={name}")


def pods_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return labelled(dc, namespace, "pods", f"fedtune.dev/run={name}")


def events_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return dc.events(namespace, "FederatedFineTune", name)


def apply(dc: DevCluster, manifest: Manifest) -> None:
    dc.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def job_keys(jobs: list[dict]) -> Counter[tuple[str, str, str]]:
    labels = [j["metadata"]["labels"] for j in jobs]
    return Counter(
        (lb["fedtune.dev/round"], lb["fedtune.dev/role"], lb.get("fedtune.dev/client", "-"))
        for lb in labels
    )


def storage_keys(dc: DevCluster, prefix: str) -> list[str]:
    s3 = dc.s3.client()
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def _jobs_running(dc: DevCluster, namespace: str, name: str, round_: str, role: str) -> bool:
    for job in jobs_of(dc, namespace, name):
        labels = job["metadata"]["labels"]
        if (
            labels["fedtune.dev/round"] == round_
            and labels["fedtune.dev/role"] == role
            and (job.get("status", {}).get("active"))
        ):
            return True
    return False


def wait_running(
    dc: DevCluster,
    op: Operator,
    namespace: str,
    name: str,
    round_: int,
    role: str,
    timeout: float = 180,
) -> None:
    wait_for(
        lambda: _jobs_running(dc, namespace, name, str(round_), role),
        timeout=timeout,
        what=f"round {round_}'s {role} Jobs to run",
        interval=0.5,
        diagnose=op.log_tail,
    )


def small_run(
    manifest: Callable[..., Manifest], assets: Assets, name: str, **spec: Any
) -> Manifest:
    """Two clients, one round unless asked, no evaluation Jobs: the least a test of the
    machinery needs. Every trainer pod costs its Python imports (about 15 s of CPU for torch,
    transformers and peft), so a test that is not about three clients or evaluation runs this."""
    m = manifest(
        name,
        **{
            "rounds": 1,
            "clients": [{"name": c, "dataUri": assets.data_uris[c]} for c in PAIR],
            **spec,
        },
    )
    del m["spec"]["evaluation"]
    return m
