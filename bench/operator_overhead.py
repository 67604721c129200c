"""`operator`: what the operator adds to each round, and what it costs in memory.

On a devcluster of its own (`.devcluster/bench`: a real kube-apiserver, controller manager, etcd
and the process kubelet), with the operator running as a local process (`fedtune operator`,
exactly as in the e2e tests) and a FAKE trainer on the pods' PATH (`bench/fake_trainer.py`: it
writes a valid summary and exits at once), so a round's wall time is orchestration only.

Latencies come from a watch on the namespace's Jobs kept by this process: each is the difference
of two event arrival times on the monotonic clock (never the API's one-second timestamps):

- (a) the last required client Job observed Complete -> the aggregator Job observed created;
- (b) the aggregator Job observed Complete -> the next round's first client Job observed created.

Both include the Job controller's status write reaching the watches, the operator's reconcile
(decide from what its watches hold, write the status, create the Jobs) and the create reaching
the watch. The operator's own share of each comes from
the operator's log: a reconcile that creates Jobs logs how long after the event that woke the run
(its kopf handler) its writes were done, and the first such line for each hand-off is its share.
Measured with one run alone, then twice with `concurrent_runs` runs of `clients` clients at once:
first with every process on an equal footing (80 pod processes sharing the machine's cores with
the control plane), then with the control plane and the operator ahead of the pods
(`control_plane_first`), as on a cluster whose pods run on nodes of their own. Each loaded phase
also reports the API server's own time for the operator's requests (its
apiserver_request_duration_seconds histograms) and the CPU seconds each process used, which is
where a loaded hand-off's seconds go. The operator's resident memory is sampled from /proc
(VmRSS, and VmHWM at the end).

The operator runs with its default FEDTUNE_RESYNC_SECONDS (15 s): the periodic resync only
matters for round timeouts; every transition here is driven by Job watch events.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO_ROOT, VENV_BIN, Result, fmt_float, fmt_int, percentile
from devcluster.testing import DevCluster
from devcluster.testing import OperatorProcess as SharedOperatorProcess

NAME = "operator"
TITLE = "Operator overhead per round (fake trainer) and operator memory"
NAMESPACE = "fedtune-bench"
CLUSTER_DIR = REPO_ROOT / ".devcluster" / "bench"
LABEL_RUN = "fedtune.dev/run"
LABEL_ROUND = "fedtune.dev/round"
LABEL_ROLE = "fedtune.dev/role"
COLUMNS = ["metric", "median_s", "p95_s", "mb", "cpu_s", "samples"]


@dataclass(frozen=True)
class Sizes:
    latency_rounds: int = 30
    clients: int = 4
    concurrent_runs: int = 20
    concurrent_rounds: int = 2
    timeout_s: float = 900


FULL = Sizes()
SMOKE = Sizes(latency_rounds=2, clients=2, concurrent_runs=2, concurrent_rounds=1, timeout_s=240)


# --------------------------------------------------------------------------------------------
# The fake trainer on the pods' PATH
# --------------------------------------------------------------------------------------------


def fake_trainer_dir(where: Path) -> Path:
    """A directory whose only entry is a `fedtune-trainer` that runs bench.fake_trainer.

    `where` is the devcluster's directory: the process kubelet never mounts a pod volume (such
    as the Jobs' /tmp emptyDir) over it, so the pods always see the fake trainer.
    """
    bin_dir = where / "fake-trainer-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "fedtune-trainer"
    script.write_text(
        "#!/bin/sh\n"
        "# FAKE fedtune-trainer: the operator benchmark's stand-in that exits at once\n"
        "# (bench/fake_trainer.py). Only ever first on the PATH of the benchmark's devcluster.\n"
        f'PYTHONPATH="{REPO_ROOT}" exec "{sys.executable}" -m bench.fake_trainer "$@"\n'
    )
    script.chmod(0o755)
    return bin_dir


def pod_path(where: Path) -> str:
    """A PATH that finds the fake `fedtune-trainer` (kept in `where`) before anything else."""
    return f"{fake_trainer_dir(where)}:{VENV_BIN}:/usr/bin:/bin"


# --------------------------------------------------------------------------------------------
# The operator process and its memory
# --------------------------------------------------------------------------------------------


class OperatorProcess(SharedOperatorProcess):
    """The tests' operator process, at the default resync, plus what the benchmark reads of it."""

    def __init__(self, dc: DevCluster, namespace: str, log: Path) -> None:
        super().__init__(dc, namespace, log, resync_seconds=None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status_kib(self, key: str) -> int:
        """VmRSS / VmHWM of the operator process, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RssSampler(threading.Thread):
    """Samples the operator's VmRSS while runs are in flight; keeps the maximum."""

    def __init__(self, op: OperatorProcess, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.op, self.interval = op, interval
        self.max_kib = 0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.max_kib = max(self.max_kib, self.op.status_kib("VmRSS"))
                self.samples += 1
            self.stopped.wait(self.interval)


# --------------------------------------------------------------------------------------------
# The watch: arrival times of Job events
# --------------------------------------------------------------------------------------------


@dataclass
class JobTimes:
    run: str
    round: int
    role: str
    created: float | None = None
    completed: float | None = None


@dataclass
class JobWatch:
    """Keeps, per Job, when its creation and its Complete condition first reached this process."""

    dc: DevCluster
    namespace: str
    jobs: dict[str, JobTimes] = field(default_factory=dict)
    events: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Job watch did not start")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        from kubernetes import client, watch

        try:
            batch = client.BatchV1Api(self.dc.api())
            listed = batch.list_namespaced_job(self.namespace, label_selector=LABEL_RUN)
            version = listed.metadata.resource_version
            self._ready.set()
            while not self._stop.is_set():
                w = watch.Watch()
                for event in w.stream(
                    batch.list_namespaced_job,
                    self.namespace,
                    label_selector=LABEL_RUN,
                    resource_version=version,
                    timeout_seconds=2,
                    allow_watch_bookmarks=True,
                ):
                    now = time.monotonic()
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again, go on from there
                        listed = batch.list_namespaced_job(self.namespace, label_selector=LABEL_RUN)
                        version = listed.metadata.resource_version
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._record(obj, now)
                    if self._stop.is_set():
                        w.stop()
        except BaseException as e:  # reported by the caller, not lost in a thread
            self.error = e
            self._ready.set()

    def _record(self, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        if LABEL_ROLE not in labels:
            return
        self.events += 1
        times = self.jobs.setdefault(
            meta["name"],
            JobTimes(labels[LABEL_RUN], int(labels[LABEL_ROUND]), labels[LABEL_ROLE], now),
        )
        conditions = (obj.get("status") or {}).get("conditions") or []
        done = any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)
        if done and times.completed is None:
            times.completed = now

    def latencies(self, runs: set[str]) -> tuple[list[float], list[float]]:
        """(a) last client complete -> aggregator created, (b) aggregator complete -> next
        round's first client created, over every round of `runs`."""
        by_round: dict[tuple[str, int], list[JobTimes]] = {}
        for t in self.jobs.values():
            if t.run in runs:
                by_round.setdefault((t.run, t.round), []).append(t)
        to_aggregate, to_next = [], []
        for (run, r), jobs in sorted(by_round.items()):
            clients = [j for j in jobs if j.role == "client"]
            aggregator = next((j for j in jobs if j.role == "aggregator"), None)
            if clients and aggregator and aggregator.created is not None:
                done = [j.completed for j in clients]
                if all(d is not None for d in done):
                    to_aggregate.append(aggregator.created - max(d for d in done if d))
            following = [j for j in by_round.get((run, r + 1), []) if j.role == "client"]
            if aggregator and aggregator.completed is not None and following:
                first = min(j.created for j in following if j.created is not None)
                to_next.append(first - aggregator.completed)
        return to_aggregate, to_next


HANDOFF_LINE = re.compile(
    r"created Jobs (?P<jobs>\S+(?:, \S+)*) of (?P<namespace>[^/\s]+)/(?P<run>\S+) "
    r"(?P<seconds>\d+(?:\.\d+)?) s after the event that woke the run"
    r"(?:, (?P<api>\d+(?:\.\d+)?) s of it waiting on the API server)?"
)
"""The operator's line for a reconcile that created Jobs (fedtune_operator.handlers.reconcile)."""


@dataclass(frozen=True)
class Share:
    """The operator's share of one hand-off, and the part of it spent waiting on the API server
    (its requests: the status write, the Job creations, any read the watches could not answer)."""

    seconds: float
    api_seconds: float

    @property
    def own_seconds(self) -> float:
        """The rest: the operator's own work and its queueing (the event loop, the run's
        previous reconcile, the thread pool)."""
        return self.seconds - self.api_seconds


def operator_shares(
    log: str, jobs: dict[str, JobTimes], runs: set[str]
) -> tuple[list[Share], list[Share]]:
    """The operator's own share of (a) and (b) of `runs`, from its log: per hand-off, the first
    reconcile that created its Job (an aggregator of round >= 1 for (a), a client for (b)),
    from the event that woke the run to that reconcile's writes done."""
    to_aggregate: dict[tuple[str, int], Share] = {}
    to_next: dict[tuple[str, int], Share] = {}
    for match in HANDOFF_LINE.finditer(log):
        if match["run"] not in runs:
            continue
        share = Share(float(match["seconds"]), float(match["api"] or 0.0))
        for name in match["jobs"].split(", "):
            job = jobs.get(name)
            if job is None:
                continue
            if job.role == "aggregator" and job.round >= 1:
                to_aggregate.setdefault((job.run, job.round), share)
            elif job.role == "client":
                to_next.setdefault((job.run, job.round), share)
    return list(to_aggregate.values()), list(to_next.values())


# --------------------------------------------------------------------------------------------
# The API server's side of the operator's requests
# --------------------------------------------------------------------------------------------

OPERATOR_REQUESTS = {
    "status write": ("PUT", "federatedfinetunes", "status"),
    "Job create": ("POST", "jobs", ""),
    "read of a run": ("GET", "federatedfinetunes", ""),
}
"""The requests of a hand-off, by (verb, resource, subresource), and the read of a run its
watches could not answer: in this benchmark only the operator makes them (the benchmark lists
its runs), so the API server's histograms of them are the operator's requests alone."""

Histogram = dict[float, float]
"""Cumulative counts by upper bound (le), as Prometheus keeps them."""


def samples(metrics: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of each sample called `name` in Prometheus's text format, as
    prometheus_client's parser reads it."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def request_histograms(metrics: str) -> dict[tuple[str, str, str], Histogram]:
    """apiserver_request_duration_seconds by (verb, resource, subresource), summed over the
    other labels: how long the API server took to answer, from its own clock."""
    out: dict[tuple[str, str, str], Histogram] = {}
    for labels, value in samples(metrics, "apiserver_request_duration_seconds_bucket"):
        key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        hist = out.setdefault(key, {})
        le = float(labels["le"])
        hist[le] = hist.get(le, 0.0) + value
    return out


def histogram_delta(after: Histogram, before: Histogram) -> Histogram:
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket that holds the q-quantile
    (q in [0, 1]); None without observations, the highest finite bound past it."""
    bounds = sorted(hist)
    total = hist.get(math.inf, hist[bounds[-1]] if bounds else 0.0)
    if not bounds or total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        if hist[le] >= rank:
            if math.isinf(le):
                return lower
            inside = hist[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, hist[le]
    return lower


def refused_status_writes(metrics: str) -> float:
    """Status writes of runs the API server refused with 409 (apiserver_request_total): each a
    decision made from a run older than the stored one, read again and made again."""
    wanted = (*OPERATOR_REQUESTS["status write"], "409")
    return sum(
        value
        for labels, value in samples(metrics, "apiserver_request_total")
        if tuple(labels.get(k) for k in ("verb", "resource", "subresource", "code")) == wanted
    )


def server_metrics(dc: DevCluster) -> str:
    return dc.kubectl("get", "--raw", "/metrics").stdout


# --------------------------------------------------------------------------------------------
# Where the machine's CPU went
# --------------------------------------------------------------------------------------------

CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager")
COMPONENTS = (*CONTROL_PLANE, "kubelet")
"""The devcluster's processes whose CPU time is told apart (pids/<name>.pid)."""

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy, over all its cores (/proc/stat's cpu line:
    user, nice, system, irq and softirq; not idle, iowait, or the time the hypervisor stole)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / _TICKS


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, and of the machine ("machine")."""
    return {
        **{name: process_cpu_seconds(pid) for name, pid in pids.items()},
        "machine": machine_busy_seconds(),
    }


def cpu_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two snapshots, and "the rest": the machine's busy
    seconds that no named process used (the pods, which come and go, and anything else)."""
    used = {name: after[name] - before[name] for name in after if name != "machine"}
    used["the pods and the rest"] = after["machine"] - before["machine"] - sum(used.values())
    return used


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def manifest(
    name: str, sizes: Sizes, rounds: int, job_env: dict[str, str] | None
) -> dict[str, Any]:
    """A run whose Jobs never touch storage (the fake trainer reads none of it)."""
    spec: dict[str, Any] = {
        "baseModel": "s3://fedtune-bench/models/none",
        "rounds": rounds,
        "storage": {"uri": f"s3://fedtune-bench/runs/{name}"},
        "clients": [
            {"name": f"c{i}", "dataUri": f"s3://fedtune-bench/data/c{i}.jsonl"}
            for i in range(sizes.clients)
        ],
        "backoffLimit": 0,
    }
    if job_env:
        spec["template"] = {"env": [{"name": k, "value": v} for k, v in job_env.items()]}
    return {
        "apiVersion": "fedtune.dev/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def wait_runs(
    dc: DevCluster,
    names: list[str],
    timeout: float,
    op: OperatorProcess,
    watcher: JobWatch,
) -> None:
    """Until every run has succeeded; fail loudly on a failed run, a dead operator or watch."""
    from kubernetes import client

    api = client.CustomObjectsApi(dc.api())
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        if watcher.error is not None:
            raise RuntimeError(f"the Job watch failed: {watcher.error!r}")
        if not op.alive():
            raise RuntimeError(f"the operator exited:\n{op.log_tail()}")
        # One list a poll, not a read per run: the benchmark's own requests queue on the same
        # API server as the operator's it measures.
        listed = api.list_namespaced_custom_object(
            "fedtune.dev", "v1alpha1", NAMESPACE, "federatedfinetunes"
        )["items"]
        for obj in listed:
            name = obj["metadata"]["name"]
            if name not in pending:
                continue
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Succeeded":
                pending.discard(name)
            elif phase == "Failed":
                conditions = (obj.get("status") or {}).get("conditions") or []
                why = next((c for c in conditions if c["type"] == "Failed"), {})
                raise RuntimeError(
                    f"run {name} failed: {why.get('reason')}: {why.get('message')}\n"
                    f"{op.log_tail()}\n{dc.logs()}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs {sorted(pending)} not done in {timeout:.0f}s\n{dc.logs()}")
        time.sleep(0.5)


def apply(dc: DevCluster, manifests: list[dict[str, Any]]) -> None:
    import json

    items = {"apiVersion": "v1", "kind": "List", "items": manifests}
    dc.kubectl("apply", "-f", "-", input=json.dumps(items))


def prepare_namespace(dc: DevCluster) -> None:
    dc.apply_crds()
    dc.kubectl("create", "namespace", NAMESPACE, check=False)
    dc.kubectl(
        "label",
        "--overwrite",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    )


FIRST_NICE = -10
"""The nice value the second loaded phase gives the control plane and the operator."""


@contextlib.contextmanager
def control_plane_first(pids: list[int], nice: int = FIRST_NICE) -> Iterator[None]:
    """Give these processes the nice value `nice` while inside: in the second loaded phase the
    control plane and the operator run before the pods' processes, as on a cluster whose
    control plane has machines of its own. Then back: the autogroups to what they had, the
    threads to 0, their default (the smoke test runs on the test session's cluster).

    Two places hold it. With the scheduler's autogroups on, CPU is first shared between
    sessions, each weighted by its group's nice value (/proc/<pid>/autogroup), and every pod and
    every component runs in a session of its own: a thread's nice value alone would only order
    it within its session (measured: no change). And Linux keeps a nice value per thread, which
    threads started later inherit from their starter. The kubelet keeps its own, or the pods it
    starts would inherit it. Lowering a nice value needs root, as the devcluster does."""
    groups = {pid: Path(f"/proc/{pid}/autogroup") for pid in pids}
    before = {pid: int(f.read_text().split()[-1]) for pid, f in groups.items() if f.exists()}
    try:
        for pid in pids:
            if pid in before:
                groups[pid].write_text(str(nice))
            set_thread_nice(pid, nice)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                if pid in before:
                    groups[pid].write_text(str(before[pid]))
                set_thread_nice(pid, 0)


def set_thread_nice(pid: int, nice: int) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


@dataclass
class Load:
    """What one loaded phase measured: `concurrent_runs` runs applied at once."""

    label: str
    seconds: float
    latencies: tuple[list[float], list[float]]
    shares: tuple[list[Share], list[Share]]
    server: dict[tuple[str, str, str], Histogram]
    refused: float
    cpu: dict[str, float]


def load_phase(
    dc: DevCluster,
    op: OperatorProcess,
    watcher: JobWatch,
    sizes: Sizes,
    job_env: dict[str, str] | None,
    names: list[str],
    label: str,
) -> Load:
    pids = {name: pid for name in COMPONENTS if (pid := dc.cluster.processes.pid(name))}
    pids |= {"operator": op.pid}
    server_before = server_metrics(dc)
    cpu_before = cpu_snapshot(pids)
    start = time.monotonic()
    apply(dc, [manifest(n, sizes, sizes.concurrent_rounds, job_env) for n in names])
    wait_runs(dc, names, sizes.timeout_s, op, watcher)
    seconds = time.monotonic() - start
    cpu = cpu_split(cpu_before, cpu_snapshot(pids))
    server_after = server_metrics(dc)
    after, before = request_histograms(server_after), request_histograms(server_before)
    return Load(
        label=label,
        seconds=seconds,
        latencies=watcher.latencies(set(names)),
        shares=operator_shares(op.log.read_text(errors="replace"), watcher.jobs, set(names)),
        server={
            key: histogram_delta(after.get(key, {}), before.get(key, {}))
            for key in OPERATOR_REQUESTS.values()
        },
        refused=refused_status_writes(server_after) - refused_status_writes(server_before),
        cpu=cpu,
    )


def measure(
    dc: DevCluster, sizes: Sizes, work: Path, job_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The phases against a running cluster whose pods find the fake trainer (through the
    cluster's pod PATH, or `job_env` set on the runs' Jobs): one run alone; `concurrent_runs`
    at once with every process on an equal footing; the same again with the control plane and
    the operator first (control_plane_first)."""
    prepare_namespace(dc)
    stamp = f"{int(time.time()) % 100000:05d}"
    op = OperatorProcess(dc, NAMESPACE, work / "operator.log")
    watcher = JobWatch(dc, NAMESPACE)
    watcher.start()
    op.start()
    sampler: RssSampler | None = None
    load = f"{sizes.concurrent_runs} runs x {sizes.clients} clients"
    try:
        time.sleep(5)  # let it list and watch; nothing to reconcile yet
        idle_kib = op.status_kib("VmRSS")

        alone = f"lat-{stamp}"
        apply(dc, [manifest(alone, sizes, sizes.latency_rounds, job_env)])
        wait_runs(dc, [alone], sizes.timeout_s, op, watcher)
        single = watcher.latencies({alone})
        single_share = operator_shares(op.log.read_text(errors="replace"), watcher.jobs, {alone})

        sampler = RssSampler(op)
        sampler.start()
        shared = load_phase(
            dc,
            op,
            watcher,
            sizes,
            job_env,
            [f"load-{stamp}-{i:02d}" for i in range(sizes.concurrent_runs)],
            load,
        )
        sampler.stopped.set()
        sampler.join()
        control_plane = [pid for c in CONTROL_PLANE if (pid := dc.cluster.processes.pid(c))]
        with control_plane_first([*control_plane, op.pid]):
            ahead = load_phase(
                dc,
                op,
                watcher,
                sizes,
                job_env,
                [f"first-{stamp}-{i:02d}" for i in range(sizes.concurrent_runs)],
                f"{load}, control plane first",
            )
        hwm_kib = op.status_kib("VmHWM")
    finally:
        if sampler is not None:
            sampler.stopped.set()
        if op.alive():  # while it runs: it removes its finalizer from what is deleted
            dc.kubectl(
                "delete",
                "fft",
                "--all",
                "-n",
                NAMESPACE,
                "--timeout=120s",
                check=False,
                timeout=180,
            )
        op.stop()
        watcher.stop()

    assert sampler is not None
    return [
        timing("(a) last client Job complete -> aggregator Job created, 1 run", single[0]),
        *shares("(a)", "1 run", single_share[0]),
        timing(
            "(b) aggregator complete -> next round's first client Job created, 1 run", single[1]
        ),
        *shares("(b)", "1 run", single_share[1]),
        *load_rows(shared, sizes),
        *load_rows(ahead, sizes),
        memory("operator RSS, idle (no runs)", idle_kib, 1),
        memory(
            f"operator peak RSS (sampled VmRSS), {load} in flight", sampler.max_kib, sampler.samples
        ),
        memory("operator VmHWM at the end (peak over the whole benchmark)", hwm_kib, 1),
    ]


def row(metric: str, **values: Any) -> dict[str, Any]:
    return {"metric": metric} | dict.fromkeys(COLUMNS[1:]) | values


def timing(metric: str, values: list[float]) -> dict[str, Any]:
    return row(
        metric, median_s=percentile(values, 50), p95_s=percentile(values, 95), samples=len(values)
    )


def memory(metric: str, kib: int, samples: int) -> dict[str, Any]:
    return row(metric, mb=kib / 1024, samples=samples)


def shares(which: str, of: str, values: list[Share]) -> list[dict[str, Any]]:
    return [
        timing(
            f"{which} the operator's own: first event its reconcile served -> its writes done, "
            f"{of}",
            [v.seconds for v in values],
        ),
        timing(
            f"{which} of which not waiting on the API server, {of}", [v.own_seconds for v in values]
        ),
    ]


def load_rows(load: Load, sizes: Sizes) -> list[dict[str, Any]]:
    """A loaded phase's rows: the hand-offs, the operator's share of them, the API server's
    own time for the operator's requests, and where the machine's CPU went."""
    of = load.label
    server = [
        row(
            f"the API server's own time for the operator's {what}, {of}",
            median_s=histogram_quantile(0.5, load.server[key]),
            p95_s=histogram_quantile(0.95, load.server[key]),
            samples=round(load.server[key].get(math.inf, 0.0)),
        )
        for what, key in OPERATOR_REQUESTS.items()
    ]
    server.append(
        row(
            f"the operator's status writes refused as stale (409), {of}",
            samples=round(load.refused),
        )
    )
    during = f"CPU while {of} x {sizes.concurrent_rounds} rounds ran"
    cpu = [
        row(f"{during}: {name}", cpu_s=seconds)
        for name, seconds in sorted(load.cpu.items(), key=lambda item: -item[1])
    ]
    cpu.append(
        row(
            f"{during}: the machine, busy, of its {os.cpu_count()} cores x {load.seconds:.1f} s",
            cpu_s=sum(load.cpu.values()),
        )
    )
    return [
        timing(f"(a) last client Job complete -> aggregator Job created, {of}", load.latencies[0]),
        *shares("(a)", of, load.shares[0]),
        timing(
            f"(b) aggregator complete -> next round's first client Job created, {of}",
            load.latencies[1],
        ),
        *shares("(b)", of, load.shares[1]),
        *server,
        row(
            f"wall time of {of} x {sizes.concurrent_rounds} rounds",
            median_s=load.seconds,
            samples=1,
        ),
        *cpu,
    ]


def with_cluster(work: Path, body: Callable[[DevCluster], list[dict[str, Any]]]) -> Any:
    """A fresh devcluster in .devcluster/bench whose pods run the fake trainer; always torn
    down, with every process it started, and its directory removed."""
    from devcluster.cluster import Cluster

    if CLUSTER_DIR.exists():
        Cluster(CLUSTER_DIR).down(quiet=True)
        shutil.rmtree(CLUSTER_DIR)
    cluster = Cluster(CLUSTER_DIR)
    try:
        path = pod_path(CLUSTER_DIR)
        state = cluster.up(pod_env={"PATH": path, "OMP_NUM_THREADS": "1"})
        return body(DevCluster(cluster, state))
    finally:
        cluster.down(quiet=True)
        shutil.rmtree(CLUSTER_DIR, ignore_errors=True)


def run(sizes: Sizes, work: Path, out: Path) -> Result:
    rows = with_cluster(work, lambda dc: measure(dc, sizes, work))
    return Result(
        name=NAME,
        title=TITLE,
        columns=COLUMNS,
        rows=rows,
        formats={
            "median_s": fmt_float(3),
            "p95_s": fmt_float(3),
            "mb": fmt_int,
            "cpu_s": fmt_float(1),
        },
        settings={
            "clients_per_run": sizes.clients,
            "latency_rounds": sizes.latency_rounds,
            "concurrent_runs": sizes.concurrent_runs,
            "concurrent_rounds": sizes.concurrent_rounds,
            "trainer": "FAKE (bench/fake_trainer.py): valid summary, exits at once",
            "resync_seconds": "default (15)",
            "cluster": "devcluster: kube-apiserver, kube-controller-manager, etcd, process kubelet",
            "clock": "monotonic arrival of Job watch events in the benchmark process",
        },
        notes=[
            "(a) and (b) include the Job controller's status update reaching the watches, the "
            "operator's reconcile and its create reaching the watch; pods are local processes, "
            "so pod start is not in them.",
            "The operator's own share is what its log says of the reconcile that created each "
            "hand-off's Job: from its kopf handler for the first event that reconcile served to "
            "its writes done (waiting for the run's previous reconcile included). That event "
            "can be an earlier one than the hand-off's (another client's completion that "
            "waited for a reconcile in flight), so the share can exceed the hand-off itself.",
            f"MiB of the operator process; memory is sampled every 0.2 s while {load_label(sizes)}"
            " are in flight (the first loaded phase).",
            "The API server's own time is its apiserver_request_duration_seconds histogram of "
            "the request kind over the phase (only the operator makes these requests here), "
            "read as Prometheus's histogram_quantile reads it: linear within a bucket.",
            "CPU seconds are each process's (all threads) over the phase; the pods and the rest "
            "is the machine's busy time less theirs. 'Control plane first': the API server, etcd, "
            f"the controller manager and the operator at nice {FIRST_NICE} (their autogroups and "
            "threads), the kubelet and the pods at 0.",
        ],
    )


def load_label(sizes: Sizes) -> str:
    return f"{sizes.concurrent_runs} runs x {sizes.clients} clients"
