"""The Job contract: every name the operator and the trainer must agree on, defined here only.

The operator builds Jobs from these names and reads their results by them; the trainer reads its
task and writes its summary by them. Keeping them in one torch-free module (imported by both
sides, and by the operator image, which has no torch) means a renamed label or a new exit code
cannot drift between the two. docs/architecture.md describes the contract as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

# --------------------------------------------------------------------------------------------
# The API group and the keys under it
# --------------------------------------------------------------------------------------------

GROUP: Final = "fedtune.dev"
"""The API group of FederatedFineTune, and the prefix of every label, annotation and finalizer
the operator owns."""
RESERVED_PREFIX: Final = f"{GROUP}/"
"""Label and annotation keys under this prefix belong to the operator; users may not set them."""

LABEL_RUN: Final = f"{GROUP}/run"
LABEL_ROUND: Final = f"{GROUP}/round"
LABEL_ROLE: Final = f"{GROUP}/role"
LABEL_CLIENT: Final = f"{GROUP}/client"
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
LABEL_SITE: Final = f"{GROUP}/site"
"""On a site's Jobs (in the site's cluster): the FederatedSite they belong to."""
ANNOTATION_STORAGE_CREDENTIALS: Final = f"{GROUP}/storage-credentials"
ANNOTATION_DATA_CREDENTIALS: Final = f"{GROUP}/data-credentials"
"""On every Job: which Secret its pods reach storage (and a client its data) with, so that
`kubectl describe job` shows who holds what."""

Role = Literal["client", "aggregator", "evaluator", "cleanup", "relay", "watch"]
ROLE_CLIENT: Final = "client"
ROLE_AGGREGATOR: Final = "aggregator"
ROLE_EVALUATOR: Final = "evaluator"
ROLE_CLEANUP: Final = "cleanup"
ROLE_RELAY: Final = "relay"
"""The run's Job for a remote client's round: publishes its signed task, waits for its commit."""
ROLE_WATCH: Final = "watch"
"""A site's Job that waits for its next task and checks it against the site's policy."""

FINALIZER: Final = f"{GROUP}/cleanup"
"""Held only by runs with storage.cleanupPolicy Delete, until their storage is deleted."""

# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------

CONTAINER: Final = "trainer"
"""The one container of every Job's pod; the operator reads its termination state by this name."""
COMMAND: Final = "fedtune-trainer"
"""The trainer's entry point; a Job runs `fedtune-trainer <kind>`."""
CLIENT_COMMAND: Final = (COMMAND, "client")
USER_ID: Final = 10001
"""The numeric non-root user of the trainer image and of every pod the operator creates."""

TERMINATION_LOG: Final = "/dev/termination-log"
"""Where a finished container writes its summary (success) or `error: <reason>` (failure)."""
TERMINATION_LOG_ENV: Final = "FEDTUNE_TERMINATION_LOG"
"""Overrides TERMINATION_LOG outside a pod (tests, local runs)."""
SUMMARY_MAX_BYTES: Final = 4096
"""The kubelet keeps at most this much of a termination message."""

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""A failure a retry may fix (storage hiccup, preempted node, out of memory)."""
EXIT_INVALID_INPUT: Final = 2
"""Input that fails the same way on every retry: a bad task, a bad data record, a malformed
delta, a round below its quorum. Jobs stop at once on this code (podFailurePolicy FailJob)
instead of burning their backoffLimit."""

# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------

RESERVED_ENV_PREFIX: Final = "FEDTUNE_"
"""Every variable the operator sets starts with this; users may not set such names."""
TASK_ENV: Final = "FEDTUNE_TASK"
"""Carries the task JSON inline."""
TASK_FILE_ENV: Final = "FEDTUNE_TASK_FILE"
"""Names a mounted file that holds the task JSON (wins over TASK_ENV)."""
DATA_CREDENTIALS_PREFIX: Final = "FEDTUNE_DATA_"
"""A client's own data credentials arrive as FEDTUNE_DATA_AWS_ACCESS_KEY_ID and so on."""
CACHE_DIR_ENV: Final = "FEDTUNE_CACHE_DIR"
"""Where the trainer caches downloaded models and data."""
STATE_DIR_ENV: Final = "FEDTUNE_STATE_DIR"
"""A directory on a volume that outlives the pod, where a client keeps what it carries from round
to round (its error-feedback residual, its SCAFFOLD control variate); unset, that state goes to
the run's storage."""
SIGNING_KEY_ENV: Final = "FEDTUNE_SIGNING_KEY"
"""A client's Ed25519 private key (PEM), from its own Secret: it signs the client's commits."""
SIGNING_KEY_SECRET_KEY: Final = "signing.key"
"""The key in that Secret's data (the file name `fedtune-trainer keygen` writes)."""
TASK_SIGNING_KEY_ENV: Final = "FEDTUNE_TASK_SIGNING_KEY"
"""The run's Ed25519 private key (PEM) that signs remote tasks: relay Jobs alone get it."""
TASK_SIGNING_SECRET_KEY: Final = "task-signing.key"
"""The key in the run's task-signing Secret."""
REFUSED_PREFIX: Final = "Refused: "
"""How a relay or watch Job's failure reason begins when the site refused the round's task."""


def refused(round_: int, reason: str) -> str:
    """A Job's failure reason for a refused round: `Refused: round <r>: <reason>`, so that the
    operator that reads it (the site's, the run's) knows which round, without storage."""
    return f"{REFUSED_PREFIX}round {round_}: {reason}"


def refused_round(text: str) -> int | None:
    """The round a `refused` reason names; None when `text` is no refusal."""
    head, _, _ = text.removeprefix(REFUSED_PREFIX).partition(":")
    if not text.startswith(REFUSED_PREFIX) or not head.startswith("round "):
        return None
    number = head.removeprefix("round ")
    return int(number) if number.isdigit() else None


SITE_PAUSED: Final = "SitePaused"
SITE_SILENT: Final = "SiteSilent"
SITE_LEFT: Final = "SiteLeft"
"""A relay Job's failure reasons when the site paused, went silent or left: each reason begins
with its word, and may go on after ': ' with what the relay saw. A retry may find a silent site
back (exit 1); a pause or a departure stands (exit 2)."""
SITE_UNVERIFIED: Final = "SiteUnverified"
SITE_MOVED_ON: Final = "SiteMovedOn"
"""A relay's failure when the site waits for a later round: its client failed this one, and its
operator has moved on (the site's own status says why)."""
"""A relay Job's failure when the site's commit for the round stays there without verifying
against its pinned key (a key that differs at either end: no retry helps)."""
NOISE_KEY_ENV: Final = "FEDTUNE_DP_NOISE_KEY"
"""The aggregator's key of its DP noise (privacy.noiseKeySecret), from a Secret only it gets."""
NOISE_KEY_SECRET_KEY: Final = "noise.key"
"""The key in that Secret's data."""
AWS_CREDENTIAL_ENV: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""What the storage credentials become inside a Job (boto3's standard names)."""
AWS_ENDPOINT_ENV: Final = "AWS_ENDPOINT_URL"
AWS_REGION_ENV: Final = "AWS_REGION"


# --------------------------------------------------------------------------------------------
# The client's command: one process per GPU
# --------------------------------------------------------------------------------------------


def client_command(processes: int = 1) -> list[str]:
    """The client container's command for `processes` processes (one per GPU)."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    if processes == 1:
        return list(CLIENT_COMMAND)
    return [*CLIENT_COMMAND, "--nproc-per-node", str(processes)]


def gpu_count(resources: Mapping[str, Any] | None) -> int:
    """GPUs a container's resources ask for: the limits (else the requests) of every
    `<vendor>/gpu` resource (nvidia.com/gpu, amd.com/gpu, ...), as a Pod spells them."""
    resources = resources or {}
    for kind in ("limits", "requests"):
        amounts = resources.get(kind) or {}
        total = sum(int(str(v)) for k, v in amounts.items() if str(k).endswith("/gpu"))
        if total:
            return total
    return 0


def processes_for(resources: Mapping[str, Any] | None) -> int:
    """One process per GPU the container asks for, at least one."""
    return max(1, gpu_count(resources))
