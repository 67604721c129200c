"""The FederatedFineTune spec (fedtune.dev/v1alpha1) as pydantic models, with its CEL rules.

This is the single source of truth for the spec's defaults and validation. The CRD
(`crds/fedtune.dev_federatedfinetunes.yaml`) and the field reference (`docs/api.md`) are generated
from it by `fedtune_operator.crd`, and tests hold the three in agreement. The training, data,
delta, aggregation, privacy and evaluation settings are the Job contract's own models from
`fedtune_trainer.wire.settings`, reused here as they are, so that a default or a bound is
written once.

Rules that span fields live beside the models they guard as CEL; `validation.py` checks the same
rules again in the operator (Helm never upgrades a CRD, so the installed schema may be older than
the operator). The rules on a change (ROOT_RULES: what is immutable once a run has started) need
the old object and are the API server's alone.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import ConfigDict, Field

from fedtune_operator.api.keys import ClientSigning, RemoteClient, TaskSigning
from fedtune_operator.api.network import NetworkPolicySpec
from fedtune_operator.api.pod import PodSettings, PodTemplate
from fedtune_operator.api.schema import (
    MAX_CLIENTS,
    MAX_ROUNDS,
    RESERVED_CLIENT_NAMES,
    DataUri,
    EndpointUri,
    ModelUri,
    ObjectName,
    Quantity,
    SecretKey,
    StorageUri,
    cel,
    cel_strings,
    k8s_extensions,
    map_list,
)
from fedtune_trainer.wire.delta_settings import CODEBOOK_BITS, DeltaSpec
from fedtune_trainer.wire.settings import (
    KRUM_ALGORITHMS,
    KRUM_CLIENTS_PER_FAULTY,
    KRUM_EXTRA_CLIENTS,
    AdapterSpec,
    AggregationSpec,
    CleanupPolicy,
    ClientName,
    DataSpec,
    EvaluationSpec,
    Model,
    PrivacySpec,
    StorageLocation,
    TrainingSpec,
)

# --------------------------------------------------------------------------------------------
# Storage, clients, evaluation
# --------------------------------------------------------------------------------------------


class S3Credentials(Model):
    """A Secret with S3 credentials, handed to Jobs as `env.valueFrom.secretKeyRef` only.

    The operator never reads it (and has no RBAC on Secrets); the Secret must live in the run's
    namespace.
    """

    name: ObjectName = Field(description="Name of the Secret.")
    access_key_id_key: SecretKey = Field(
        "AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret."
    )
    secret_access_key_key: SecretKey = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key in the Secret."
    )


BUCKET_ROOT_PATTERN = "^s3://[^/]+/?$"
"""A storage.uri that names a whole bucket, no prefix of its own."""
BUCKET_ROOT_MESSAGE = (
    "cleanupPolicy Delete needs a prefix of the run's own (s3://<bucket>/<prefix>), never a "
    "whole bucket"
)


class StorageSpec(StorageLocation):
    """Where the run keeps its artifacts (docs/architecture.md, "Storage layout").

    Narrows the contract's `StorageLocation` to what the operator can deliver: a root whose keys
    are safe S3 keys, an http(s) endpoint, and adds the credentials and the retention policy.
    """

    uri: StorageUri = Field(
        description="The run's root: s3://bucket/prefix or file:///path. Segments use S3's safe "
        "characters and are never '.' or '..'."
    )
    endpoint: EndpointUri | None = Field(
        None, description="S3 endpoint override (MinIO, versitygw, ...); s3:// only."
    )
    credentials_secret: S3Credentials | None = Field(
        None,
        description="Credentials for the storage root. Without it Jobs use the pod's ambient "
        "identity (e.g. workload identity through serviceAccountName).",
    )
    cleanup_policy: CleanupPolicy = Field(
        "Retain",
        description="Delete removes everything under uri when the FederatedFineTune is deleted, "
        "provided the run's round 0 marked uri as its own (a marker holding the run's UID, "
        "written only to an empty prefix); the cleanup refuses any other prefix, and uri must "
        "not be a whole bucket.",
    )
    client_delta_policy: Literal["Delete", "Retain"] = Field(
        "Delete",
        description="Delete: each client's delta (and its manifest) is deleted once the round "
        "that merged it is committed; the round record keeps its hash and size. Retain keeps "
        "them for audits.",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "!(self.uri.startsWith('file://') && has(self.endpoint))",
                "endpoint applies to s3:// storage only",
                field_path=".endpoint",
            ),
            cel(
                f"!(has(self.cleanupPolicy) && self.cleanupPolicy == 'Delete' "
                f"&& self.uri.matches('{BUCKET_ROOT_PATTERN}'))",
                BUCKET_ROOT_MESSAGE,
                field_path=".uri",
            ),
        )
    )

    def location(self) -> StorageLocation:
        """The part of the storage settings that goes into a Job's task."""
        return StorageLocation.model_validate(
            self.model_dump(include=set(StorageLocation.model_fields))
        )


class ClientAdapter(Model):
    """A client's own adapter settings, where they may differ from the run's."""

    r: int | None = Field(
        None,
        ge=1,
        le=512,
        description="This client's LoRA rank, at most the run's adapter.r (a client on a small "
        "GPU trains a smaller rank); needs aggregation.lora exact. It starts each round from the "
        "global adapter's top-r singular directions.",
    )


class _ClientData(Model):
    """The client's own fields; a separate base only so that they come first in the schema."""

    name: ClientName = Field(description="The client's name, unique in the run.")
    data_uri: DataUri | None = Field(
        None,
        description="The client's jsonl file or prefix: s3://, file:// or pvc://<claim>/<path>. "
        "Required unless the client is a site's.",
    )
    site: RemoteClient | None = Field(
        None,
        description="The client trains at a site, in its own cluster (docs/sites.md): no "
        "dataUri, credentials or signing here; the run relays its tasks through storage.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="Relative weight of this client's delta in the averaging algorithms, "
        "multiplied with its sample count; median and trimmedMean ignore it.",
    )
    adapter: ClientAdapter | None = Field(
        None, description="Per-client adapter settings (its rank); defaults to the run's."
    )
    credentials_secret: S3Credentials | None = Field(
        None,
        description="Credentials for this client's data, read through spec.storage.endpoint; "
        "defaults to the client's storage credentials (its storageCredentialsSecret, else the "
        "run's).",
    )
    signing: ClientSigning | None = Field(
        None, description="The client's signing key; without it its deltas are not signed."
    )
    storage_credentials_secret: S3Credentials | None = Field(
        None,
        description="The client's own storage identity, scoped by the storage server's policy "
        "to its own prefixes (`fedtune storage-policy` prints it): its pods get it instead of "
        "spec.storage.credentialsSecret, and read its data with it unless credentialsSecret is "
        "set.",
    )


class ClientSpec(PodSettings, _ClientData):
    """One federated client: its data and, optionally, how its Job's pod differs from the template.

    The name becomes part of the client's Job name (`<run>-r<round>-<client>`), its label value
    and its storage keys, hence a DNS label of at most 40 characters.
    """


class _EvaluationData(EvaluationSpec):
    """Narrows the contract's `EvaluationSpec.dataUri` to the schemes the operator can deliver;
    a separate base only so that these fields come first in the schema."""

    data_uri: DataUri | None = Field(
        None, description="Held-out jsonl (s3://, file:// or pvc://), in spec.data.format."
    )
    storage_credentials_secret: S3Credentials | None = Field(
        None,
        description="The evaluation's own storage identity (reads the global adapters, writes "
        "evaluation.json and the report; `fedtune storage-policy` prints its policy); defaults "
        "to spec.storage.credentialsSecret.",
    )


class Evaluation(PodSettings, _EvaluationData):
    """Held-out evaluation of the global adapter (none without dataUri).

    After every due round an evaluation Job of its own loads the base model with that round's
    adapter and reports the loss, while the next round's clients already train; the run succeeds
    once the last round's evaluation is in. Its pod settings override spec.template like a
    client's do (e.g. `resources.limits: {nvidia.com/gpu: 1}`).
    """

    def settings(self) -> EvaluationSpec:
        """The part of the evaluation settings that goes into the evaluation Job's task."""
        return EvaluationSpec.model_validate(
            self.model_dump(include=set(EvaluationSpec.model_fields))
        )


class ModelCache(Model):
    """Where client and evaluation Jobs keep the base model (and data) they download from s3://.

    Without a cache each Job downloads the whole base model into its pod's /tmp, once per client
    per round. The trainer's cache is keyed by the objects' ETags and sizes and filled
    atomically, so a volume that outlives the pod is reused safely.
    """

    mode: Literal["none", "perClient", "ephemeral"] = Field(
        "none",
        description="none: each pod downloads into its own /tmp. perClient: one "
        "PersistentVolumeClaim per client (<run>-cache-<client>) and one for the evaluation Jobs "
        "(<run>-cache-evaluate), created by the operator, deleted with the run; each client "
        "downloads the base model once per run. ephemeral: a generic ephemeral volume per pod, "
        "for disk space outside the node's ephemeral storage; nothing is reused across rounds. "
        "perClient and ephemeral need a StorageClass (storageClassName or the cluster's default); "
        "without one the pods stay Pending.",
    )
    size: Quantity = Field(
        "64Gi",
        description="Capacity of each volume: the base model plus the client's data, with "
        "room for a second version of the model while it changes. Claims that exist keep theirs.",
    )
    storage_class_name: ObjectName | None = Field(
        None, description="StorageClass of the volumes; the cluster's default when unset."
    )


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------

_SELECTED = (
    "(has(self.aggregation.clientsPerRound) ? self.aggregation.clientsPerRound "
    ": size(self.clients))"
)
_BYZANTINE = "(has(self.aggregation.byzantineClients) ? self.aggregation.byzantineClients : 1)"
_KRUM_MIN = f"({KRUM_CLIENTS_PER_FAULTY} * {_BYZANTINE} + {KRUM_EXTRA_CLIENTS})"
"""`krum_min_clients` in CEL, from the same constants."""
_CODEBOOK = "(has(self.quantization.codebook) ? self.quantization.codebook : 'uniform')"
_BITS = "(has(self.quantization.bits) ? self.quantization.bits : 0)"
"""delta.quantization's codebook and bits in CEL, their defaults where unset."""

_KRUM_CEL = (
    "!has(self.aggregation.algorithm) "
    f"|| !(self.aggregation.algorithm in {cel_strings(KRUM_ALGORITHMS)}) "
    # With clientFraction: ceil(fraction x clients) >= minimum, with rounds.clients_per_round's
    # epsilon (ceil(x) >= k is x > k - 1).
    "|| (has(self.aggregation.clientFraction) "
    "? self.aggregation.clientFraction * double(size(self.clients)) - 1e-9 "
    f"> double({_KRUM_MIN} - 1) "
    f": {_SELECTED} >= {_KRUM_MIN})"
)
"""Krum's quorum (`fedtune_trainer.wire.settings.krum_min_clients`) against the clients selected
per round."""


class FederatedFineTuneSpec(Model):
    """The desired federated fine-tuning run.

    Each round the operator starts one Job per selected client; each trains the global LoRA
    adapter on its own data and uploads `delta = local - global`; once the quorum of deltas is
    in, the aggregator Job merges them into the next global adapter.
    """

    base_model: ModelUri = Field(
        description="The base model, an HF-format directory: s3://, file://, "
        "pvc://<claim>/<path>, or a hub id such as Qwen/Qwen2.5-0.5B. Immutable once started."
    )
    tokenizer: ModelUri | None = Field(
        None, description="Tokenizer location; defaults to baseModel. Immutable once started."
    )
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    rounds: int = Field(
        10, ge=1, le=MAX_ROUNDS, description="Federated rounds; may grow while the run is live."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    clients: list[ClientSpec] = Field(
        min_length=1,
        max_length=MAX_CLIENTS,
        description="The clients; the set of names is immutable once started.",
        json_schema_extra=map_list(
            "name",
            cel(
                f"self.all(c, !(c.name in {cel_strings(RESERVED_CLIENT_NAMES)}))",
                "client names "
                + " and ".join(RESERVED_CLIENT_NAMES)
                + " are reserved for the aggregator's and the evaluation's Jobs",
                reason="FieldValueForbidden",
            ),
            cel(
                "self.all(c, has(c.dataUri) != has(c.site))",
                "each client has exactly one of dataUri (trained here) and site (trained at a "
                "site)",
                reason="FieldValueRequired",
            ),
            cel(
                "self.all(c, !has(c.site) || !(has(c.signing) || has(c.credentialsSecret) "
                "|| has(c.storageCredentialsSecret)))",
                "a site's client has no signing, credentialsSecret or storageCredentialsSecret "
                "here: its keys and credentials stay at the site (site.publicKey pins its key)",
                reason="FieldValueForbidden",
            ),
        ),
    )
    task_signing: TaskSigning | None = Field(
        None,
        description="The run's key that signs its remote clients' tasks; required when a client "
        "is a site's.",
    )
    aggregation: AggregationSpec = Field(
        default_factory=AggregationSpec,
        description="How the aggregator merges the deltas each round, which clients train in "
        "a round, and how long a round may take.",
        json_schema_extra=k8s_extensions(
            cel(
                "!(has(self.clientsPerRound) && has(self.clientFraction))",
                "set at most one of clientsPerRound and clientFraction",
            )
        ),
    )
    delta: DeltaSpec = Field(
        default_factory=DeltaSpec,
        json_schema_extra=k8s_extensions(
            cel(
                f"!has(self.quantization) || {_CODEBOOK} == 'uniform' "
                f"|| {_BITS} == {CODEBOOK_BITS}",
                f"codebooks other than uniform need quantization.bits {CODEBOOK_BITS}",
                field_path=".quantization.codebook",
            ),
            cel(
                "!has(self.quantization) || !has(self.quantization.stochasticRounding) "
                f"|| !self.quantization.stochasticRounding || ({_BITS} != 0 && {_CODEBOOK} "
                "== 'uniform')",
                "stochasticRounding needs quantization.bits 4 or 8 and the uniform codebook",
                field_path=".quantization.stochasticRounding",
            ),
        ),
    )
    privacy: PrivacySpec = Field(
        default_factory=PrivacySpec,
        json_schema_extra=k8s_extensions(
            cel(
                "!has(self.noiseMultiplier) || self.noiseMultiplier == 0.0 || has(self.clipNorm)",
                "noiseMultiplier > 0 needs clipNorm",
                field_path=".clipNorm",
                reason="FieldValueRequired",
            )
        ),
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)
    model_cache: ModelCache = Field(default_factory=ModelCache)
    storage: StorageSpec
    template: PodTemplate = Field(default_factory=PodTemplate)
    aggregator: PodSettings | None = Field(
        None, description="Overrides of spec.template for the aggregator Job."
    )
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    backoff_limit: int = Field(
        2, ge=0, le=100, description="Pod retries of each Job before it counts as failed."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=30 * 24 * 3600, description="Wall-clock limit of each Job."
    )
    suspend: bool = Field(
        False,
        description="Suspends the run: running Jobs are suspended and no new round starts "
        "until it is false again (condition Suspended).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=365 * 24 * 3600,
        description="Job-like: delete the FederatedFineTune (and so its Jobs) this long after it "
        "succeeds or fails. Stored artifacts follow storage.cleanupPolicy.",
    )

    model_config = ConfigDict(
        json_schema_extra=k8s_extensions(
            cel(
                "has(self.taskSigning) || !self.clients.exists(c, has(c.site))",
                "a run with a site's client needs taskSigning (the key its tasks are signed with)",
                field_path=".taskSigning",
                reason="FieldValueRequired",
            ),
            cel(
                "!has(self.aggregation.clientsPerRound) "
                "|| self.aggregation.clientsPerRound <= size(self.clients)",
                "clientsPerRound must not exceed the number of clients",
                field_path=".aggregation.clientsPerRound",
            ),
            cel(
                f"!has(self.aggregation.minClients) || self.aggregation.minClients <= {_SELECTED}",
                "minClients must not exceed the clients selected per round",
                field_path=".aggregation.minClients",
            ),
            cel(
                "!has(self.aggregation.minClients) || !has(self.aggregation.clientFraction) "
                "|| self.aggregation.minClients == 1 || double(self.aggregation.minClients - 1) "
                "< self.aggregation.clientFraction * double(size(self.clients)) - 1e-9",
                "minClients must not exceed the clients selected per round (clientFraction x "
                "clients, rounded up)",
                field_path=".aggregation.minClients",
            ),
            cel(
                _KRUM_CEL,
                f"{' and '.join(KRUM_ALGORITHMS)} need at least {KRUM_CLIENTS_PER_FAULTY} x "
                f"byzantineClients + {KRUM_EXTRA_CLIENTS} clients per round",
                field_path=".aggregation.byzantineClients",
            ),
        )
    )


# --------------------------------------------------------------------------------------------
# Rules on the whole object: the run's name, and what may not change once a run has started.
# --------------------------------------------------------------------------------------------

STARTED_CEL = (
    "has(oldSelf.status) && (has(oldSelf.status.startTime) "
    "|| (has(oldSelf.status.currentRound) && oldSelf.status.currentRound > 0))"
)
"""A run has started once the operator set status.startTime (or is past round 0)."""


class Immutable(NamedTuple):
    """A part of the spec that may not change once the run has started: one row of the table
    that the CRD's immutability rules are generated from."""

    path: str
    """Where the API server reports a change, e.g. spec.baseModel."""
    value: str
    """Its CEL value on `{o}` (self, then oldSelf); the rule holds when the two are equal."""
    message: str = ""
    """The API server's message, where "<path> is immutable once the run has started" would not
    say what is meant."""

    def rule(self) -> dict[str, str]:
        """The CEL rule: unchanged, or the run has not started."""
        new, old = self.value.format(o="self"), self.value.format(o="oldSelf")
        return cel(
            f"!({STARTED_CEL}) || {new} == {old}",
            self.message or f"{self.path} is immutable once the run has started",
            field_path=f".{self.path}",
            reason="FieldValueForbidden",
        )


IMMUTABLE_ONCE_STARTED: tuple[Immutable, ...] = (
    Immutable("spec.baseModel", "{o}.spec.baseModel"),
    Immutable("spec.tokenizer", "(has({o}.spec.tokenizer) ? {o}.spec.tokenizer : '')"),
    Immutable("spec.adapter", "{o}.spec.adapter"),
    Immutable("spec.storage.uri", "{o}.spec.storage.uri"),
    # A client's data and pod settings may change; its name is its Jobs', keys' and state's.
    Immutable(
        "spec.clients",
        "{o}.spec.clients.map(c, c.name)",
        "the client names (in order) are immutable once the run has started",
    ),
)
"""What may not change once a run has started: the API server enforces it through ROOT_RULES
(the operator keeps no copy; tests/api/test_crd_apiserver.py checks every row on a real one)."""

ROOT_RULES: tuple[dict[str, str], ...] = (
    *(immutable.rule() for immutable in IMMUTABLE_ONCE_STARTED),
    cel(
        "!has(oldSelf.status) || !has(oldSelf.status.currentRound) "
        "|| self.spec.rounds >= oldSelf.status.currentRound",
        "spec.rounds cannot go below status.currentRound",
        field_path=".spec.rounds",
    ),
)
"""CEL rules on the whole object (the CRD's root schema)."""
