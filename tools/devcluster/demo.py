"""`make demo`: a whole federated fine-tune on the devcluster, as a new user would run it.

Starts the devcluster (or reuses a running one), installs the operator with its Helm chart, writes
a model, a non-IID data set (one kind of text per client) and an eval set into the S3 server,
applies the model's example manifest, shows the run's progress as it changes, and ends with a
round-by-round table, the final status and where the adapter is. Exits non-zero when the run
fails.

Two models (`python -m devcluster.demo --model NAME`, `make demo MODEL=NAME`):

- `smollm2`: the pretrained SmolLM2-135M-Instruct (`devcluster.pretrained`) on real text
  (`devcluster.corpus`: the Python language reference, the standard library's docstrings and the
  installed packages' READMEs, one source per client, in the chat format),
  examples/demo-smollm2.yaml. What fedtune is for: a real model's held-out loss falls by round.
- `tiny`: a 361K-parameter random Llama and generated instruction data, examples/demo.yaml. Seconds
  per round; it shows the machinery, not learning a language model can show.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import REPO_ROOT, Cluster
from devcluster.corpus import build_corpus
from devcluster.federation import remove_federation, start_federation
from devcluster.net import free_port
from devcluster.pretrained import ensure_model
from devcluster.processes import StartupError
from devcluster.sites import Sites
from devcluster.testing import DevCluster, make_tiny_assets

NAMESPACE = "fedtune-demo"
OPERATOR_NAMESPACE = "fedtune-system"
BUCKET = "fedtune-demo"
CLIENTS = ("alice", "bob", "carol")


def say(text: str) -> None:
    print(f"\033[1m==>\033[0m {text}", flush=True)


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def prepare_tiny(dc: DevCluster, work: Path) -> None:
    """A tiny random Llama whose vocabulary is built from generated instruction data."""
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
    upload(dc, model, data, "tiny")


SMOLLM2_RECORDS = 64
SMOLLM2_EVAL_RECORDS = 24
SMOLLM2_CHUNK_CHARS = 400
"""About 100 tokens of text per record: with the chat prompt it fits the demo's 128-token
sequences (a CPU's budget), so truncation keeps most of every answer."""


def prepare_smollm2(dc: DevCluster, work: Path) -> None:
    """The pretrained model from the machine's cache (converted on first use) and real text, one
    source per client, with an eval set of documents no client trains on."""
    data = work / "data"
    build_corpus(
        data,
        clients=len(CLIENTS),
        fmt="chat",
        records=SMOLLM2_RECORDS,
        eval_records=SMOLLM2_EVAL_RECORDS,
        chunk_chars=SMOLLM2_CHUNK_CHARS,
    )
    upload(dc, ensure_model(), data, "smollm2-135m-instruct")


def upload(dc: DevCluster, model: Path, data: Path, model_name: str) -> None:
    """The model under models/<model_name>/, client-<i>.jsonl as data/<client i>.jsonl, and
    data/eval.jsonl: the paths the example manifests name."""
    dc.s3.bucket(BUCKET)
    s3 = dc.s3.client()
    for path in sorted(model.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"models/{model_name}/{path.name}")
    for i, client in enumerate(CLIENTS):
        s3.upload_file(str(data / f"client-{i}.jsonl"), BUCKET, f"data/{client}.jsonl")
    s3.upload_file(str(data / "eval.jsonl"), BUCKET, "data/eval.jsonl")


@dataclass(frozen=True)
class DemoModel:
    """What `--model NAME` runs: the assets it writes and the example manifest it applies."""

    description: str
    example: str
    prepare: Callable[[DevCluster, Path], None]
    timeout_seconds: int


MODELS: dict[str, DemoModel] = {
    "smollm2": DemoModel(
        "the pretrained SmolLM2-135M-Instruct and real text (Python's docs, one source per client)",
        "demo-smollm2.yaml",
        prepare_smollm2,
        1800,
    ),
    "tiny": DemoModel(
        "a tiny random model and generated instruction data", "demo.yaml", prepare_tiny, 900
    ),
}
DEFAULT_MODEL = "smollm2"


def demo_manifest(dc: DevCluster, model: DemoModel) -> dict[str, Any]:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / model.example).read_text())
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
            # Pods share the host's network on the devcluster: free ports instead of the chart's
            # 8080 and 8081, so the demo's operator never blocks another operator on this machine
            # (a chart test, a second checkout's demo).
            "--set",
            f"operator.livenessPort={free_port()},metrics.port={free_port()}",
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
        # Which adapter the loss is of: the newest evaluated round in the history, or round 0
        # (the base model) when no trained round has been evaluated yet.
        evaluated = [h["round"] for h in s.get("history") or [] if h.get("evalLoss") is not None]
        of = f"round {max(evaluated)}" if evaluated else "base"
        parts.append(f"eval loss {s['lastEvalLoss']:.4f} ({of})")
    if comm.get("bytesSent"):
        parts.append(
            f"sent {comm['bytesSent'] / 1024:.1f} KiB "
            f"({comm.get('reduction', '?')} less than full-model FedAvg)"
        )
    return "  ".join(parts)


def watch(dc: DevCluster, timeout_seconds: int) -> dict[str, Any]:
    """Print the run's progress line whenever it changes, until the run ends or the timeout."""
    deadline = time.monotonic() + timeout_seconds
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
    raise SystemExit(f"demo: the run did not finish within {timeout_seconds}s")


def round_table(run: dict[str, Any]) -> str:
    """Round by round: the clients' mean train loss and the global adapter's held-out loss, round
    0 being the base model (status.initialEvalLoss)."""
    rows = [f"  {'ROUND':>5}  {'TRAIN LOSS':>10}  {'EVAL LOSS':>9}  {'CLIENTS':>7}"]
    initial = (run.get("status") or {}).get("initialEvalLoss")
    base = f"{initial:.4f}" if initial is not None else "-"  # no evaluation data, or it failed
    rows.append(f"  {0:>5}  {'(base)':>10}  {base:>9}  {'-':>7}")
    for h in (run.get("status") or {}).get("history") or []:
        train = f"{h['trainLoss']:.4f}" if h.get("trainLoss") is not None else "-"
        ev = f"{h['evalLoss']:.4f}" if h.get("evalLoss") is not None else "-"
        rows.append(f"  {h['round']:>5}  {train:>10}  {ev:>9}  {h.get('clientsSucceeded', 0):>7}")
    return "\n".join(rows)


SITES_DIR = REPO_ROOT / ".devcluster" / "demo-sites"
SITES_ASSETS = REPO_ROOT / "build" / "demo-sites"
"""The sites' data lives on this machine's disk, where their pods read it; not under /tmp,
which a pod has of its own."""


def sites_demo(count: int) -> int:
    """`make demo SITES=N`: the run's cluster and N sites' clusters side by side, one client
    training in the run's cluster and one at each site, meeting only in the run's S3 storage
    (docs/sites.md); the three views as the run goes, then the clusters are stopped."""
    started = time.monotonic()
    names = {f"site-{chr(ord('a') + i)}": f"runs/site-{i}/" for i in range(count)}
    say(f"writing a tiny model and {count + 1} clients' data to {SITES_ASSETS}")
    shutil.rmtree(SITES_ASSETS, ignore_errors=True)
    model, data = make_tiny_assets(
        SITES_ASSETS, clients=count + 1, samples=48, hidden_size=64, eval_samples=16
    )
    remove_federation(SITES_DIR)
    say(f"starting {count + 1} control planes (the run's and {', '.join(names)}'s), one S3 server")
    with (
        start_federation(
            SITES_DIR, names, bucket="fedsites", pod_env={"OMP_NUM_THREADS": "1"}
        ) as fed,
        tempfile.TemporaryDirectory() as work,
    ):
        sites = Sites(fed, "fedsites", data, Path(work))
        try:
            say("keys (fedtune-trainer keygen), each cluster's Secrets, and its operator")
            sites.prepare(model)
            say("the run: clinic trains in the run's cluster, each site in its own")
            sites.start("chatbot", min_clients=count + 1)
            shown = [0.0]

            def show() -> None:
                if time.monotonic() - shown[0] >= 10:
                    shown[0] = time.monotonic()
                    print(f"\n{sites.views()}", flush=True)

            sites.succeeded("chatbot", each=show)
            for s in sites.names:
                sites.site_status(s, "chatbot", "Completed")
            print(f"\n{sites.views()}\n")
        except AssertionError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 1
        finally:
            sites.stop()
    say(f"done in {time.monotonic() - started:.0f} s; the clusters are stopped (docs/sites.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL)
    parser.add_argument(
        "--sites",
        type=int,
        default=0,
        help="N > 0: a run whose clients train in N other clusters too (the tiny model)",
    )
    args = parser.parse_args(argv)
    if args.sites:
        return sites_demo(args.sites)
    model = MODELS[args.model]
    started = time.monotonic()
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
    say(f"writing {model.description} to s3://{BUCKET}")
    with tempfile.TemporaryDirectory() as work:
        model.prepare(dc, Path(work))
    manifest = demo_manifest(dc, model)
    clients, rounds = len(manifest["spec"]["clients"]), manifest["spec"]["rounds"]
    say(f"applying examples/{model.example}: {clients} clients x {rounds} rounds")
    dc.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    run = watch(dc, model.timeout_seconds)

    print()
    print(round_table(run))
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
    print(f"The demo took {time.monotonic() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
