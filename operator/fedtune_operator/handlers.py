"""The kopf shell: observe, decide (engine.decide), act; nothing else.

Each FederatedFineTune gets one reconcile loop (loops.py), which runs whenever something about
the run changes (its own watch events and its Jobs' wake it) and at least every RESYNC_SECONDS
(which is what makes round timeouts fire). One loop per run serialises its reconciles without
locks, and it holds no memory: a restarted operator resumes every run from its status and Jobs.
A reconcile that raises is retried with exponential backoff, not at every resync.

What a reconcile reads comes from the operator's watches where they hold it (loops.View): the
run as its latest event had it (or the answer to the operator's own status write, when no event
came since), and kopf indexes of the runs' Jobs, pods and NetworkPolicies. The Jobs are read
after the run so that they are as recent as it; pods matter only for the Jobs that just
finished, whose termination messages hold the results the status does not have yet. The API
server is asked only for what the watches lack (the run after a conflict or an error, or when an
event came during the operator's own write; pods the index has not seen end): under load each
request waits its turn there, and a hand-off that made five one after another took seconds.
Only a Job change the engine can see (compact_job: conditions, suspension, deletion) wakes its
run: the Job controller's other status updates (active, ready, start time) would each cost a
reconcile.

The order of a reconcile is fixed: decide; when the decision creates pods, apply the run's
NetworkPolicy unless its watch shows it as wanted, and record what that came to
(network_policy.settle: a policy of its name that the run does not own holds those Jobs back);
write the status (guarded by resourceVersion; on a conflict, re-read and decide again, which is
also what makes acting on a watched run safe), then create or delete Jobs, then post events.
A status that says round r therefore always exists before round r's Jobs, and an event never
announces what was not recorded. The Jobs one decision creates are created at once, each in its
own request: they do not depend on each other, and one after another they made a round's
hand-off as slow as its number of clients.

The Kubernetes client is synchronous: its calls run in a thread pool of the shell's own, sized
for many runs handing off rounds at once (kube.API_CONCURRENCY), never on the event loop. A
reconcile that creates Jobs logs how long after the event that woke the run its writes were done,
and how much of that it waited on the API server (`created Jobs ... s after the event that woke
the run, ... s of it waiting on the API server`); fedtune_handoff_seconds counts the first: the
operator's share of a round's hand-off, which the `operator` benchmark reports with the second
taken out as well.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from fedtune_operator import (
    actions,
    decision,
    engine,
    manifests,
    metrics,
    network_policy,
    objects,
)
from fedtune_operator.api import (
    GROUP,
    PLURAL,
    VERSION,
    FederatedFineTuneSpec,
    FederatedFineTuneStatus,
)
from fedtune_operator.kube import Conflict, Kube, NamespaceTerminating, NotOwned, shared
from fedtune_operator.loops import Loops, Outcome, View, in_thread
from fedtune_operator.observe import (
    JOB_NAME,
    compact_job,
    compact_pod,
    compact_policy,
    failure_message,
    indexed_pods,
    jobs_needing_pods,
    observe_jobs,
)
from fedtune_operator.validation import SpecError, parse_spec, parse_status, validate_spec
from fedtune_trainer.wire.contract import FINALIZER, LABEL_RUN

log = logging.getLogger("fedtune.operator")

ANNOTATION_PREFIX = GROUP
"""kopf keeps its own state (progress, last-handled configuration) under this prefix."""


def kube() -> Kube:
    return shared()


# ---------------------------------------------------------------------------------------------
# Startup
# ---------------------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Watches that go quiet are re-established instead of hanging forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.INFO


# ---------------------------------------------------------------------------------------------
# Wake-ups
# ---------------------------------------------------------------------------------------------


loops = Loops(lambda *args: reconcile(*args))


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def run_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """Every Job of a run, by (namespace, run), as much of it as the engine reads."""
    return {(namespace, str(labels[LABEL_RUN])): compact_job(body)}


@kopf.index("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT, JOB_NAME: kopf.PRESENT})
def run_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """The runs' pods by (namespace, Job), as much of each as observe_jobs reads: a finished
    Job's result is its pod's termination message, and the index spares a reconcile a list call
    for it (observe.indexed_pods says when it must still list)."""
    return {(namespace, str(labels[JOB_NAME])): compact_pod(body)}


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels={LABEL_RUN: kopf.PRESENT})
def run_policies(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """The runs' NetworkPolicies by (namespace, name): a policy already as the run wants it is
    not applied again before every Job (network_policy.in_place)."""
    return {(namespace, name): compact_policy(body)}


def _indexes(run_jobs: kopf.Index, run_pods: kopf.Index, run_policies: kopf.Index) -> None:
    """kopf hands its live indexes to handlers only: the first event gives them to the loops."""
    loops.jobs, loops.pods, loops.policies = run_jobs, run_pods, run_policies


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(
    name: str,
    namespace: str | None,
    type: str | None,
    meta: kopf.Meta,
    body: kopf.Body,
    run_jobs: kopf.Index,
    run_pods: kopf.Index,
    run_policies: kopf.Index,
    **_: Any,
) -> None:
    _indexes(run_jobs, run_pods, run_policies)
    if namespace is None:
        return
    if type == "DELETED" or meta.get("deletionTimestamp"):
        loops.stop(namespace, name)
        if type == "DELETED":
            metrics.forget_run(namespace, name)
    else:
        loops.saw_run((namespace, name), copy.deepcopy(dict(body)))
        loops.wake(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def job_changed(
    labels: kopf.Labels,
    namespace: str | None,
    uid: str,
    type: str | None,
    body: kopf.Body,
    run_jobs: kopf.Index,
    run_pods: kopf.Index,
    run_policies: kopf.Index,
    **_: Any,
) -> None:
    _indexes(run_jobs, run_pods, run_policies)
    if not loops.job_news(uid, None if type == "DELETED" else compact_job(body)):
        return
    run = labels.get(LABEL_RUN)
    if namespace and run and (namespace, run) in loops.tasks:
        loops.wake(namespace, run)


@kopf.on.cleanup()
async def stop_loops(**_: Any) -> None:
    await loops.stop_all()


def _status_json(status: FederatedFineTuneStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


class Stopwatch:
    """The time spent inside its `with` blocks: a reconcile's waits on the API server, which the
    hand-off line reports apart from the rest (the operator's own work and queueing)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds += time.monotonic() - self._start


async def reconcile(namespace: str, name: str, view: View, woken: float | None = None) -> Outcome:
    """One observe-decide-act pass over the run and its Jobs, as `view` shows them (reading from
    the API server what it lacks): then wait for the next wake-up, go again at once (the run
    changed under a status write, or must be read afresh), or stop (the run is gone or going).
    `woken` is when (monotonic) the event it serves came: a reconcile that creates Jobs logs how
    long after it its writes were done.

    The Jobs are read after the run, not before: read before, a Job this loop created in its
    previous pass could be missing from them while the run's read waited, and be created again
    (a request answered 409)."""
    k = kube()
    api = Stopwatch()
    watched = view.run()
    if watched is None:
        with api:
            obj = await in_thread(k.get_run, namespace, name)
    else:
        obj = watched
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return "gone"
    meta = obj["metadata"]
    now = dt.datetime.now(dt.UTC)
    status = parse_status(obj.get("status"))
    spec: FederatedFineTuneSpec | None = None
    try:
        spec = parse_spec(obj.get("spec") or {})
        problems = validate_spec(spec, name=name)
    except SpecError as e:
        problems = e.problems
    if problems or spec is None:
        decided = engine.invalid_spec(status, problems, meta.get("generation", 0), now)
    else:
        jobs = view.jobs()
        needed = jobs_needing_pods(meta["uid"], status, jobs)
        pods = indexed_pods(jobs, needed, view.pods) if needed else []
        if pods is None:
            with api:
                pods = await in_thread(k.job_pods, namespace, needed)
        run = decision.Run(
            name=name,
            namespace=namespace,
            uid=meta["uid"],
            generation=meta.get("generation", 0),
            spec=spec,
        )
        decided = engine.decide(run, status, observe_jobs(meta["uid"], jobs, pods), now)
        applied, refused = False, None
        if spec.network_policy.enabled and network_policy.creates_pods(decided):
            try:
                with api:
                    await _ensure_network_policy(k, obj, spec, view.policy)
                applied = True
            except NotOwned as e:
                refused = str(e)
            except NamespaceTerminating:
                log.info("namespace %s is being deleted: not acting on run %s", namespace, name)
                return "gone"
        decided = network_policy.settle(
            decided,
            name,
            spec,
            applied=applied,
            refused=refused,
            now=now,
            generation=run.generation,
        )

    if _status_json(decided.status) != _status_json(status):
        try:
            with api:
                answer = await in_thread(k.write_status, obj, _status_json(decided.status))
        except Conflict:
            view.forget()  # someone changed the run since: read it from the API server
            return "again"
        except BaseException:
            view.forget()  # written or not: read the run from the API server
            raise
        view.wrote(obj, answer)  # the newest run, unless the watch shows a newer one by now
        _count(namespace, name, decided.facts)
    elif watched is not None and (decided.actions or decided.events):
        # Nothing written, so nothing checked that the watched run is the newest: acting on an
        # older one could redo what a newer status already records. Read it and decide again.
        return "again"

    try:
        with api:
            for batch in actions.action_batches(decided.actions):
                await asyncio.gather(*(in_thread(actions.apply, k, obj, spec, a) for a in batch))
    except NamespaceTerminating:
        log.info("namespace %s is being deleted: not acting on run %s", namespace, name)
        return "gone"
    created = [a for a in decided.actions if isinstance(a, actions.CREATES)]
    if created and woken is not None:
        seconds = time.monotonic() - woken
        metrics.HANDOFF_SECONDS.observe(seconds)
        log.info(
            "created Jobs %s of %s/%s %.3f s after the event that woke the run, "
            "%.3f s of it waiting on the API server",
            ", ".join(actions.created_job_name(name, a) for a in created),
            namespace,
            name,
            seconds,
            api.seconds,
        )
    for event in decided.events:
        kopf.event(obj, type=event.type, reason=event.reason, message=event.message)
    return "wait"


async def _ensure_network_policy(
    k: Kube,
    obj: Mapping[str, Any],
    spec: FederatedFineTuneSpec,
    watched: Callable[[str], Mapping[str, Any] | None] = lambda _: None,
) -> None:
    """Apply the run's NetworkPolicy before any of its pods can exist: a pod created first would
    run unconfined. Failing closed, a policy that cannot be applied (no RBAC, an invalid peer)
    stops the Jobs from being created and is retried with the reconcile's backoff; the warning
    event says why (the HTTP status and reason only, nothing from the request). A policy of
    that name that the run does not own is NotOwned, for the caller to record: never patched.
    A policy the watch (`watched`) shows already as the manifest, owned by the run, is left
    as it is: no request."""
    meta = obj["metadata"]
    manifest = network_policy.network_policy(
        run=meta["name"], namespace=meta["namespace"], uid=meta["uid"], spec=spec
    )
    if network_policy.in_place(watched(manifest["metadata"]["name"]), manifest):
        return
    try:
        await in_thread(k.apply_network_policy, manifest)
    except ApiException as e:
        kopf.warn(
            obj,
            reason="NetworkPolicyFailed",
            message=f"cannot apply NetworkPolicy {manifest['metadata']['name']}: "
            f"{e.status} {e.reason}; the run's Jobs wait for it "
            "(spec.networkPolicy.enabled: false runs them without one)",
        )
        raise


def _count(namespace: str, name: str, facts: list[decision.Fact]) -> None:
    """Metrics from the facts a written decision recorded (each is reported exactly once)."""
    for fact in facts:
        match fact:
            case decision.RoundCompleted(record=record, deltas_rejected=rejected):
                metrics.ROUNDS_COMPLETED.labels(namespace, name).inc()
                metrics.BYTES_RECEIVED.labels(namespace, name).inc(record.bytes_received)
                metrics.DELTAS_REJECTED.labels(namespace, name).inc(rejected)
                if record.started_at and record.completed_at:
                    metrics.ROUND_DURATION.observe(
                        (record.completed_at - record.started_at).total_seconds()
                    )
            case decision.ClientFailed():
                metrics.CLIENT_FAILURES.labels(namespace, name).inc()
            case decision.RunFinished(outcome=outcome):
                metrics.RUNS_FINISHED.labels(outcome).inc()


# ---------------------------------------------------------------------------------------------
# Deletion: storage cleanup through a Job (the operator holds no storage credentials)
# ---------------------------------------------------------------------------------------------


def _cleanup_wanted(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("storage") or {}).get("cleanupPolicy") == "Delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_cleanup_wanted, timeout=900)
async def cleanup_storage(name: str, namespace: str, uid: str, body: kopf.Body, **_: Any) -> None:
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
    except SpecError as e:
        kopf.warn(body, reason="StorageCleanupSkipped", message=f"invalid spec: {e}"[:250])
        return
    k = kube()
    job_name = objects.cleanup_job_name(name)
    job = await in_thread(k.job_state, namespace, job_name)
    if job is None:
        manifest = manifests.cleanup_job(run=name, namespace=namespace, uid=uid, spec=spec)
        try:
            # Normally in place since the run's first Job; a run that never started has none.
            if spec.network_policy.enabled:
                await _ensure_network_policy(k, body, spec)
            await in_thread(k.create_job, manifest)
        except NotOwned as e:
            # No Job runs without the run's own policy, and none ever will: leave it in place.
            message = f"{e}: no cleanup Job runs unconfined; {spec.storage.uri} is left in place"
            kopf.warn(body, reason="StorageCleanupSkipped", message=message[:250])
            return
        except NamespaceTerminating:
            # No Job can run here any more; holding the run would hold the namespace forever.
            log.warning(
                "namespace %s is being deleted: %s is left in place", namespace, spec.storage.uri
            )
            return
        kopf.info(body, reason="StorageCleanup", message=f"deleting {spec.storage.uri}")
        raise kopf.TemporaryError("waiting for the storage cleanup Job", delay=2)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            kopf.info(body, reason="StorageDeleted", message=f"deleted {spec.storage.uri}")
            return
        if cond.get("type") == "Failed":
            # The trainer's reason: a refusal (exit 2: not this run's marker, a whole bucket)
            # or what failed; either way nothing more is tried.
            pods = await in_thread(k.job_pods, namespace, [job_name])
            why = failure_message(cond, pods, limit=800)
            kopf.warn(
                body,
                reason="StorageCleanupFailed",
                message=f"did not delete {spec.storage.uri} ({why}); it is left in place"[:1000],
            )
            return
    raise kopf.TemporaryError("waiting for the storage cleanup Job", delay=2)
