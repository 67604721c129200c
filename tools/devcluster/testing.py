"""Handles that tests, the demo and the benchmarks use to drive a running devcluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import ClientError
from kubernetes import client, config

from devcluster.cluster import Cluster, ClusterState
from devcluster.s3 import S3Account

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]


class WaitTimeout(AssertionError):
    pass


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` (and a diagnosis)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def refused(call: Callable[[], Any]) -> bool:
    """Whether the server answered 403 AccessDenied (False when the call went through); any
    other error propagates. A transfer (upload_fileobj) wraps the ClientError, and DeleteObjects
    reports a refused key inside a 200 answer: both count as refused."""
    try:
        result = call()
    except Exception as e:
        error: BaseException | None = e
        while error is not None and not isinstance(error, ClientError):
            error = error.__cause__ or error.__context__
        if error is None:
            raise
        status = error.response["ResponseMetadata"]["HTTPStatusCode"]
        code = error.response["Error"]["Code"]
        if status == 403 and code in ("AccessDenied", "403"):  # HEAD answers have no body
            return True
        raise
    if isinstance(result, dict) and result.get("Errors"):
        codes = {e["Code"] for e in result["Errors"]}
        assert codes == {"AccessDenied"}, result["Errors"]
        return True
    return False


def make_tiny_assets(
    work: Path, *, clients: int, samples: int, hidden_size: int, eval_samples: int = 60
) -> tuple[Path, Path]:
    """Demo chat data (client-<i>.jsonl and eval.jsonl under work/data) and a tiny random Llama
    whose tokenizer is built from all of it (work/model), made by the trainer's own commands as
    a user would make them: (model directory, data directory)."""
    trainer = str(Path(sys.executable).parent / "fedtune-trainer")
    data, model = work / "data", work / "model"
    demo = ["make-demo-data", "--out", str(data), "--clients", str(clients)]
    demo += ["--samples", str(samples), "--eval-samples", str(eval_samples)]
    subprocess.run([trainer, *demo], check=True, capture_output=True, timeout=120)
    tiny = ["make-tiny-model", "--out", str(model), "--hidden-size", str(hidden_size), "--data"]
    tiny += [str(p) for p in sorted(data.glob("*.jsonl"))]
    subprocess.run([trainer, *tiny], check=True, capture_output=True, timeout=300)
    return model, data


@dataclass
class DevCluster:
    cluster: Cluster
    state: ClusterState

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def bin_dir(self) -> Path:
        return Path(self.state.bin_dir)

    @property
    def s3(self) -> S3Account:
        return self.cluster.s3_account()

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        as_user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig)]
        if as_user:
            argv += ["--as", as_user]
        result = subprocess.run(
            [*argv, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def upload_dir(self, local: Path, bucket: str, key_prefix: str) -> None:
        """Every file under `local` to s3://bucket/key_prefix/<its relative path>."""
        s3 = self.s3.client()
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{key_prefix}/{path.relative_to(local)}")

    def api(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def apply_crds(self) -> None:
        """Apply the CRDs and wait until the API server serves each. Not `kubectl wait
        --for=condition=Established`: on a CRD whose status has no conditions yet it fails at
        once ("<nil> is of the type <nil>") instead of waiting."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
        established = "{.status.conditions[?(@.type=='Established')].status}"

        # crds/<group>_<plural>.yaml holds the CRD <plural>.<group>.
        for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            group, plural = path.stem.split("_", 1)
            crd = f"crd/{plural}.{group}"

            def served(crd: str = crd) -> bool:
                # Not check=True: while the CRD has no conditions yet, the jsonpath filter fails.
                got = self.kubectl("get", crd, "-o", f"jsonpath={established}", check=False)
                return got.returncode == 0 and got.stdout.strip() == "True"

            wait_for(served, timeout=60, what=f"{crd} to be Established")

    def logs(self, lines: int = 40) -> str:
        """The controller manager's and kubelet's warnings and every recent pod log, for a
        failure message (informational lines of the control plane would drown them)."""
        parts = []
        for c in ("kube-controller-manager", "kubelet"):
            tail = self.cluster.log_tail(c, 2000).splitlines()
            noisy = ("extension-apiserver-authentication", "Caches are synced")
            wanted = [ln for ln in tail if ln[:1] in "EW" or " WARNING " in ln or " ERROR " in ln]
            wanted = [ln for ln in wanted if not any(n in ln for n in noisy)]
            parts.append(f"==> {c} (warnings and errors) <==\n" + "\n".join(wanted[-lines:]))
        for f in sorted(
            (self.cluster.log_dir / "pods").glob("*.log"), key=lambda p: p.stat().st_mtime
        )[-6:]:
            tail = "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"==> pod {f.stem} <==\n{tail}")
        return "\n".join(parts)

    def kill_pod(self, namespace: str, name: str) -> None:
        """SIGKILL the containers of a running pod, as a crash or the OOM killer would: the
        process kubelet reports exit 137 and the Job controller takes it from there."""
        pod = json.loads(self.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)
        pid_files = sorted((self.cluster.pid_dir / "pods").glob(f"{pod['metadata']['uid']}_*.pid"))
        if not pid_files:
            raise AssertionError(f"pod {namespace}/{name} has no running container")
        for f in pid_files:
            os.killpg(int(f.read_text()), signal.SIGKILL)

    def events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """The Events about one object, as `kubectl describe` lists them."""
        out = self.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind={kind}",
            "-o",
            "json",
        ).stdout
        return json.loads(out)["items"]


class OperatorProcess:
    """`fedtune operator` as a local process (admin credentials), killable like a pod on a
    failing node: what the e2e tests and the benchmarks run against the devcluster."""

    def __init__(
        self,
        dc: DevCluster,
        namespace: str,
        log: Path,
        resync_seconds: float | None = 5,
        mode: str = "run",
    ) -> None:
        """`mode` site runs the operator's site mode (FederatedSites, docs/sites.md)."""
        self.dc, self.namespace, self.log = dc, namespace, log
        self.resync_seconds = resync_seconds
        self.mode = mode
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """None as resync_seconds leaves the operator's default (the benchmarks measure it)."""
        env = {**os.environ, "KUBECONFIG": str(self.dc.kubeconfig)}
        env.pop("FEDTUNE_RESYNC_SECONDS", None)
        if self.resync_seconds is not None:
            env["FEDTUNE_RESYNC_SECONDS"] = str(self.resync_seconds)
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "fedtune"),
                    "operator",
                    "--mode",
                    self.mode,
                    "--namespace",
                    self.namespace,
                    "--liveness-port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies under it."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
