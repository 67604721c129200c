"""What the operator asks of a Job: the settings models and the tasks built from them.

With contract.py (the names both sides agree on) and results.py (what a Job reports back), this
is the Job contract between the operator and the trainer. Torch-free on purpose: the operator
imports this module to build the task it hands each Job, and the settings models below are also
the building blocks of the `FederatedFineTune` spec (`fedtune_operator.api`), so a default or a
bound is written exactly once, here.

Field names are snake_case in Python and camelCase on the wire (the CRD and the task JSON alike).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from fedtune_trainer.wire.contract import TASK_ENV, TASK_FILE_ENV
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import (
    AdapterSpec,
    AggregationSpec,
    CleanupPolicy,
    ClientName,
    DataSpec,
    EvaluationSpec,
    LocalPrivacy,
    Model,
    PrivacySpec,
    PublicKey,
    RunUid,
    ShortStr,
    StorageLocation,
    TrainingSpec,
    Uri,
    lora_mode_problems,
)
from fedtune_trainer.wire.site import RelayTask, RemoteTask, SiteClientTask, WatchTask

# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class _TaskBase(Model):
    run: ShortStr
    round: int = Field(ge=0, le=1_000_000)
    base_model: Uri
    tokenizer: Uri | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    storage: StorageLocation


class ClientTask(_TaskBase):
    """Train round `round` (>= 1) from the global adapter of round `round - 1`."""

    kind: Literal["client"] = "client"
    client: ClientName
    data_uri: Uri
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    delta: DeltaSpec = Field(default_factory=DeltaSpec)
    sign: bool = Field(
        False,
        description="Sign the commit with the private key in FEDTUNE_SIGNING_KEY (the run pins "
        "the public key, and the aggregator refuses this client's unsigned deltas).",
    )
    local_privacy: LocalPrivacy | None = Field(
        None,
        description="Clip and noise the delta at the client, before encoding (a site's policy).",
    )

    @model_validator(mode="after")
    def _local_privacy_covers_what_is_sent(self) -> ClientTask:
        # SCAFFOLD also sends a control-variate change, which local noise would not cover.
        if self.local_privacy is not None and self.training.drift_control == "scaffold":
            raise ValueError("localPrivacy cannot protect SCAFFOLD's control variates: use none")
        return self


class AggregateTask(_TaskBase):
    """Round 0: write the initial adapter. Round r >= 1: merge round r's deltas into global r."""

    kind: Literal["aggregate"] = "aggregate"
    rounds: int = Field(ge=1, le=100_000, description="Total rounds: the last one writes final/.")
    clients: list[ClientName] = Field(default_factory=list, max_length=1000)
    client_weights: dict[str, float] = Field(default_factory=dict)
    client_ranks: dict[str, Annotated[int, Field(ge=1, le=512)]] = Field(
        default_factory=dict,
        description="Clients that train at a LoRA rank other than adapter.r (exact mode only).",
    )
    min_clients: int = Field(1, ge=1)
    attempt: int = Field(
        0,
        ge=0,
        description="The round's attempt: a rerun of this attempt after its commit reports the "
        "committed round; a later attempt computes the round again.",
    )
    retain_client_deltas: bool = Field(
        False,
        description="Keep the clients' deltas after the round is committed (for audits); by "
        "default they are deleted once the round that merged them is committed.",
    )
    client_keys: dict[str, PublicKey] = Field(
        default_factory=dict,
        description="Each signing client's pinned public key: its delta counts only when its "
        "manifest's signature verifies with it.",
    )
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    delta: DeltaSpec = Field(default_factory=DeltaSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    sampling_rate: float = Field(
        1.0, gt=0, le=1, description="Clients sampled per round / all clients (for accounting)."
    )
    run_uid: RunUid | None = Field(
        None,
        description="The run's metadata.uid: round 0 marks the storage root as this run's "
        "(layout.RUN_MARKER), the mark storage cleanup requires; None marks nothing.",
    )
    cleanup_policy: CleanupPolicy = Field(
        "Retain",
        description="storage.cleanupPolicy: with Delete, round 0 refuses a root it cannot mark as "
        "the run's (another run's marker, or objects and no marker), which deleting the run "
        "would delete; with Retain it only says so and goes on unmarked.",
    )

    @model_validator(mode="after")
    def _lora_mode(self) -> AggregateTask:
        ranks = {f"clientRanks[{c}]": r for c, r in self.client_ranks.items()}
        if problems := lora_mode_problems(self.aggregation, self.adapter, self.privacy, ranks):
            raise ValueError("; ".join(problems))
        return self

    drift_control: Literal["none", "scaffold"] = Field(
        "none", description="training.driftControl: scaffold also updates the server control."
    )
    total_clients: int | None = Field(
        None, ge=1, description="N of SCAFFOLD's c += |S|/N mean(dc_i); defaults to the round's."
    )


class EvaluateTask(_TaskBase):
    """Evaluate the committed global adapter of `round` on held-out data (its own Job, so that
    the aggregator never loads base weights and the evaluation can have a GPU of its own)."""

    kind: Literal["evaluate"] = "evaluate"
    data: DataSpec = Field(default_factory=DataSpec)
    evaluation: EvaluationSpec
    max_seq_length: int = Field(512, ge=8, le=131072)


class CleanupTask(Model):
    """Delete everything under the run's storage root (storage.cleanupPolicy: Delete), provided
    the root is a prefix (never a whole bucket) whose marker (layout.RUN_MARKER) names `run_uid`;
    anything else is refused and nothing deleted."""

    kind: Literal["cleanup"] = "cleanup"
    run: ShortStr
    run_uid: RunUid = Field(description="The run's metadata.uid, which its marker must hold.")
    storage: StorageLocation


def site_client_task(
    task: RemoteTask,
    data_uri: str,
    storage: StorageLocation,
    privacy: LocalPrivacy | None,
) -> ClientTask:
    """The ClientTask a site's client Job trains: the run's task, the site's data and storage
    location, the site's privacy, and always signed (the run pins the site's key)."""
    fields = task.model_dump(exclude={"kind", "run_uid", "image"})
    return ClientTask.model_validate(
        fields | {"data_uri": data_uri, "storage": storage, "sign": True, "local_privacy": privacy}
    )


AnyTask = (
    ClientTask | AggregateTask | EvaluateTask | CleanupTask | RelayTask | WatchTask | SiteClientTask
)
Task = Annotated[AnyTask, Field(discriminator="kind")]


class _TaskDoc(BaseModel):
    task: Task


def parse_task(text: str) -> AnyTask:
    return _TaskDoc.model_validate({"task": json.loads(text)}).task


def load_task(environ: dict[str, str] | None = None) -> AnyTask:
    """Read the task from the mounted file or the environment variable, in that order."""
    env = os.environ if environ is None else environ
    if path := env.get(TASK_FILE_ENV):
        return parse_task(Path(path).read_text())
    if text := env.get(TASK_ENV):
        return parse_task(text)
    raise RuntimeError(f"no task: set {TASK_FILE_ENV} or {TASK_ENV}")
