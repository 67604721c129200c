"""Helpers of the operator end-to-end tests: the operator process, reads of run state and of
what the S3 server served."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from devcluster.s3 import parse_access_log
from devcluster.testing import DevCluster, OperatorProcess, wait_for
from fedtune_trainer.storage.store import S3Settings

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


def unique_name(prefix: str = "run") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


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


def claims_of(dc: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return labelled(dc, namespace, "pvc", f"fedtune.dev/run={name}")


def summaries(dc: DevCluster, namespace: str, name: str, role: str) -> list[dict[str, Any]]:
    """The summaries (termination messages) of the run's pods of `role` that succeeded."""
    result = []
    for pod in labelled(dc, namespace, "pods", f"fedtune.dev/run={name},fedtune.dev/role={role}"):
        for status in pod["status"].get("containerStatuses") or []:
            terminated = status["state"].get("terminated") or {}
            if terminated.get("exitCode") == 0:
                result.append(json.loads(terminated["message"]))
    return result


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


# -- what the S3 server served for a base model ---------------------------------------------------
# From versitygw's server access log (.devcluster/logs/s3-access.log), which the trainer cannot
# influence: every successful GetObject of a key under the base model's prefix. versitygw 1.8 logs
# 0 bytes sent for a GetObject and no range, so a GET counts its share of the object: the whole
# object, or for an object the trainer reads in ranged parts (its S3 transfer settings: from
# multipart_threshold up, in parts of multipart_chunksize) one part's share, so that a whole
# download counts the object's size once. Only the run being measured may read the model
# meanwhile: the e2e tests run one at a time.

TRANSFER = S3Settings()
"""The trainer's S3 transfer settings (the operator sets none: the pods use these defaults)."""


def gets_per_download(size: int) -> int:
    """The GETs in which the trainer downloads an object of `size` bytes."""
    if size < TRANSFER.multipart_threshold:
        return 1
    return -(-size // TRANSFER.multipart_chunksize)


@dataclass(frozen=True)
class ModelReads:
    served: int
    """Bytes served for the model's objects (each GET counts its share: see above)."""
    gets: Counter[str]
    """Successful GetObjects per key (ranged parts each count)."""
    size: int
    """The model's size: all its objects."""


def model_objects(dc: DevCluster, model_uri: str) -> dict[str, int]:
    """Key -> size of every object of the base model."""
    prefix = model_uri.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
    listing = dc.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing["Contents"]}


def access_log_until_marker(dc: DevCluster) -> str:
    """The access log up to a request made now: the server writes its log asynchronously, and
    once the marker is in, every earlier request is too."""
    marker = f"marker-{uuid.uuid4().hex}"
    s3 = dc.s3.client()
    s3.put_object(Bucket=BUCKET, Key=marker, Body=b"")
    path = dc.cluster.s3_access_log

    def logged() -> str | None:
        text = path.read_text()
        return text if marker in text else None

    return wait_for(logged, timeout=30, what="the S3 access log to record the marker request")


def count_model_reads(dc: DevCluster, model_uri: str) -> Callable[[], ModelReads]:
    """Starts counting what the S3 server serves of the model at `model_uri`: call the result
    when the run has finished for what was served since."""
    objects = model_objects(dc, model_uri)
    before = len(access_log_until_marker(dc))

    def since() -> ModelReads:
        gets: Counter[str] = Counter()
        served = Fraction(0)  # exact: a whole download's parts add up to the object's size
        for r in parse_access_log(access_log_until_marker(dc)[before:]):
            ok = 200 <= r.status < 300
            if ok and r.bucket == BUCKET and r.operation == "s3_GetObject" and r.key in objects:
                size = objects[r.key]
                gets[r.key] += 1
                served += r.bytes_sent or Fraction(size, gets_per_download(size))
        return ModelReads(round(served), gets, sum(objects.values()))

    return since


def downloads_by_round(clients: list[dict[str, Any]]) -> dict[int, list[int]]:
    """The clients' own account: baseModelBytesDownloaded of their summaries, by round."""
    by_round: dict[int, list[int]] = {}
    for s in clients:
        by_round.setdefault(s["round"], []).append(s["baseModelBytesDownloaded"])
    return by_round
