"""`make demo`: a whole federated fine-tune on the devcluster, as a new user would run it.

Starts the devcluster (or reuses a running one), installs the operator with its Helm chart, writes
a tiny model, a non-IID instruction data set (one kind of task per client) and an eval set into
the S3 server, applies examples/demo.yaml, shows the run's progress round by round, and ends with
the final status and where the adapter is. Exits non-zero when the run fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import REPO_ROOT, Cluster, StartupError
from devcluster.testing import DevCluster

NAMESPACE = "fedtune-demo"
OPERATOR_NAMESPACE = "fedtune-system"
BUCKET = "fedtune-demo"
CLIENTS = ("alice", "bob", "carol")
TIMEOUT_SECONDS = 900


def say(text: str) -> None:
    print(f"\033[1m==>\033[0m {text}", flush=True)


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def prepare_assets(dc: DevCluster, work: Path) -> None:
    trainer = str(Path(sys.executable).parent / "fedtune-trainer")
    data = work / "data"
    sh(
        [
            trainer,
            "make-demo-data",
            "--out",
            str(data),
            "--clients",
            str(len(CLIENTS)),
            "--samples",
            "96",
            "--eval-samples",
            "32",
            "--format",
            "text",
        ]
    )
    model = work / "model"
    sh(
        [
            trainer,
            "make-tiny-model",
            "--out",
            str(model),
            "--data",
            *map(str, sorted(data.glob("*.jsonl"))),
        ]
    )
    dc.s3.bucket(BUCKET)
    s3 = dc.s3.client()
    for path in sorted(model.iterdir()):
        s3.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
    for i, client in enumerate(CLIENTS):
        s3.upload_file(str(data / f"client-{i}.jsonl"), BUCKET, f"data/{client}.jsonl")
    s3.upload_file(str(data / "eval.jsonl"), BUCKET, "data/eval.jsonl")


def demo_manifest(dc: DevCluster) -> dict[str, Any]:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "demo.yaml").read_text())
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"]["storage"]["endpoint"] = dc.s3.endpoint
    manifest["spec"].setdefault("evaluation", {})["dataUri"] = f"s3://{BUCKET}/data/eval.jsonl"
    return manifest


def install_operator(dc: DevCluster) -> None:
    helm = str(dc.bin_dir / "helm")
    dc.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    dc.kubectl(
        "label",
        "--overwrite",
        "namespace",
        OPERATOR_NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    )
    sh(
        [
            helm,
            "upgrade",
            "--install",
            "fedtune",
            str(REPO_ROOT / "charts" / "fedtune-operator"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--kubeconfig",
            str(dc.kubeconfig),
            "--wait",
            "--timeout",
            "120s",
        ]
    )


def progress_line(run: dict[str, Any]) -> str:
    s = run.get("status") or {}
    comm = s.get("communication") or {}
    parts = [
        f"{s.get('phase', 'Pending'):<11}",
        f"round {s.get('roundProgress', '-'):>5}",
        f"clients {s.get('clientProgress') or '-':>5}",
    ]
    if s.get("lastTrainLoss") is not None:
        parts.append(f"train loss {s['lastTrainLoss']:.4f}")
    if s.get("lastEvalLoss") is not None:
        parts.append(f"eval loss {s['lastEvalLoss']:.4f}")
    if comm.get("bytesSent"):
        parts.append(
            f"sent {comm['bytesSent'] / 1024:.1f} KiB "
            f"({comm.get('reduction', '?')} less than full-model FedAvg)"
        )
    return "  ".join(parts)


def watch(dc: DevCluster) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        run = json.loads(dc.kubectl("get", "fft", "demo", "-n", NAMESPACE, "-o", "json").stdout)
        line = progress_line(run)
        if line != last:
            print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)
            last = line
        if (run.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return run
        time.sleep(2)
    raise SystemExit(f"demo: the run did not finish within {TIMEOUT_SECONDS}s")


def main() -> int:
    cluster = Cluster(REPO_ROOT / ".devcluster")
    say("starting the devcluster (kube-apiserver, kube-controller-manager, etcd, S3, kubelet)")
    try:
        state = cluster.up(pod_env={"OMP_NUM_THREADS": "1"})
    except StartupError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    dc = DevCluster(cluster, state)
    dc.apply_crds()
    say("installing the operator with Helm (charts/fedtune-operator)")
    install_operator(dc)
    dc.kubectl("create", "namespace", NAMESPACE, check=False)
    dc.kubectl(
        "label",
        "--overwrite",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    )
    dc.kubectl("delete", "fft", "demo", "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    s3 = dc.s3
    secret = dc.kubectl(
        "create",
        "secret",
        "generic",
        "fedtune-s3",
        "-n",
        NAMESPACE,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
        "--dry-run=client",
        "-o",
        "json",
    ).stdout
    dc.kubectl("apply", "-f", "-", input=secret)
    say(f"writing a tiny model and three clients' data to s3://{BUCKET}")
    with tempfile.TemporaryDirectory() as work:
        prepare_assets(dc, Path(work))
    say("applying examples/demo.yaml: 3 clients x 3 rounds")
    dc.kubectl("apply", "-f", "-", input=json.dumps(demo_manifest(dc)))
    run = watch(dc)

    print()
    print(dc.kubectl("get", "fft", "-n", NAMESPACE, "-o", "wide").stdout)
    status = run["status"]
    kubeconfig = f"--kubeconfig {dc.kubeconfig}"
    if status["phase"] != "Succeeded":
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        print(f"The run failed: {failed.get('reason')}: {failed.get('message')}")
        print(f"  kubectl {kubeconfig} describe fft demo -n {NAMESPACE}")
        print("  make cluster-logs")
        return 1
    print(f"The adapter (PEFT format):  {status['finalAdapterUri']}")
    if status.get("reportUri"):
        print(f"The run report:             {status['reportUri']}")
    print(f"The S3 server:              {s3.endpoint} (credentials: make -s cluster-env)")
    print(f"Details:                    kubectl {kubeconfig} describe fft demo -n {NAMESPACE}")
    print("Stop the cluster:           make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
