"""The settings a run is made of: adapter, training, data, aggregation, privacy, evaluation and
storage location (the delta codec's are in delta_settings.py). The `FederatedFineTune` spec
(`fedtune_operator.api`) is built from these models and the tasks carry them, so a default, a
bound or a cross-field rule is written exactly once, here.

Field names are snake_case in Python and camelCase on the wire (the CRD and the task JSON alike).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

# DNS-1123 label, at most 40 characters so that `<run>-r<round>-<client>` stays readable.
ClientName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]
ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
PublicKey = Annotated[
    str,
    StringConstraints(
        min_length=52, max_length=52, pattern=r"^ed25519:[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
    ),
]
"""A client's Ed25519 public key: `ed25519:` and the base64 of its 32 bytes (`fedtune-trainer
keygen` prints it). The pattern admits exactly the encodings of 32 bytes."""


RunUid = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9-]+$")]
"""A Kubernetes object's metadata.uid (a UUID)."""


class Model(BaseModel):
    """Base of every contract model: camelCase on the wire, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def wire(self) -> dict:
        """The JSON-ready camelCase form, defaults included (what `kubectl get -o yaml` shows)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# Settings shared by the spec and the task
# --------------------------------------------------------------------------------------------


ALL_LINEAR = "all-linear"
"""PEFT's shorthand target: every linear layer of the model except its output head."""


class AdapterSpec(Model):
    """A LoRA adapter. `type` leaves room for other PEFT methods later."""

    type: Literal["lora"] = Field("lora", description="The PEFT method; only lora for now.")
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Module names (suffixes) that get a LoRA adapter, or [all-linear]: every "
        "linear layer but the output head (PEFT's shorthand).",
    )
    bias_mode: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases are trained (PEFT's `bias`)."
    )
    freeze_a: bool = Field(
        False,
        description="Freeze LoRA A at its shared initialisation so that averaging B is exact "
        "(FFA-LoRA); only B is trained and sent.",
    )
    base_quantization: Literal["none", "nf4"] = Field(
        "none",
        description="nf4: hold the frozen base weights in 4-bit NormalFloat (QLoRA, bitsandbytes; "
        "needs a CUDA GPU, refused on a CPU-only Job). The adapter stays fp32.",
    )

    @model_validator(mode="after")
    def _all_linear_alone(self) -> AdapterSpec:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"targetModules: {ALL_LINEAR} already names every linear layer")
        return self


class TrainingSpec(Model):
    """Local training of one client in one round."""

    local_steps: int | None = Field(
        20, ge=1, le=1_000_000, description="Optimizer steps per round (unless localEpochs)."
    )
    local_epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Epochs over the client's data per round; wins over localSteps.",
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule over a round's steps, after warmup."
    )
    warmup_steps: int = Field(
        0, ge=0, le=1_000_000, description="Linear warmup steps at the start of each round."
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        1.0, gt=0, le=1e6, description="Gradients are clipped to this global L2 norm."
    )
    max_seq_length: int = Field(
        512,
        ge=8,
        le=131072,
        description="Tokens per example. A longer one loses the start of its prompt (down to half "
        "of this), then the end of its answer; the client's summary counts them.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 base weights on a GPU that supports it, else fp32; bf16 on the "
        "CPU only when asked for; fp16 needs a GPU. The adapter is fp32 in every mode.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of data order and dropout.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping "
        "them: far less memory for about a third more compute.",
    )
    packing: bool = Field(
        False,
        description="Pack each micro-batch's examples end to end into rows of maxSeqLength tokens "
        "instead of padding each to the longest; attention never crosses examples, so the "
        "gradient is the padded one's, with less padding computed.",
    )
    proximal_mu: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="FedProx: mu of the proximal term mu/2 ||w - w_global||^2 on the adapter "
        "weights, added to the gradient once per optimizer step; 0 turns it off.",
    )
    drift_control: Literal["none", "scaffold"] = Field(
        "none",
        description="scaffold: SCAFFOLD control variates; each client corrects its local "
        "gradients by (server control - its own) and uploads the change of its control next "
        "to its delta (encoded alike). Needs a mean-based aggregation and no DP noise.",
    )


class DataSpec(Model):
    """How every client's jsonl records are read."""

    format: Literal["text", "alpaca", "chat"] = Field(
        "text",
        description="text: {'text'}; alpaca: {'instruction','input','output'}; "
        "chat: {'messages': [{'role','content'}]} rendered with the tokenizer's chat template.",
    )
    max_samples: int | None = Field(
        None, ge=1, le=100_000_000, description="Read at most this many records per client."
    )


Algorithm = Literal[
    "fedavg", "fedavgm", "fedadam", "fedyogi", "median", "trimmedMean", "krum", "multiKrum"
]


SCAFFOLD_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
"""The rules SCAFFOLD goes with: every accepted client enters the mean, as its control update
c += |S|/N mean(dc_i) assumes (a median or Krum's selection would drop some deltas but not
their control changes)."""


KRUM_CLIENTS_PER_FAULTY = 2
KRUM_EXTRA_CLIENTS = 3
KRUM_QUORUM = f"{KRUM_CLIENTS_PER_FAULTY}f + {KRUM_EXTRA_CLIENTS}"
"""Krum's quorum, n >= 2f + 3 for f faulty clients, as people read it in messages and docs."""


def krum_min_clients(byzantine_clients: int) -> int:
    """The deltas a krum/multiKrum round needs to tolerate `byzantine_clients` faulty ones.

    Blanchard et al. (NeurIPS 2017) prove Krum resilient for n > 2f + 2: each delta's score sums
    its distances to its n - f - 2 nearest others, which must outnumber the faulty ones. The one
    statement of the rule: the aggregator refuses a round with fewer deltas, the operator a run
    that selects fewer clients, and the CRD's CEL rule is generated from the same constants.
    """
    return KRUM_CLIENTS_PER_FAULTY * byzantine_clients + KRUM_EXTRA_CLIENTS


class AggregationSpec(Model):
    algorithm: Algorithm = Field(
        "fedavg",
        description="fedavg (sample-weighted mean), fedavgm (with server momentum), fedadam and "
        "fedyogi (adaptive server optimizers), median (coordinate-wise), trimmedMean, krum (the "
        "one delta closest to its neighbours) and multiKrum (the mean of the "
        "multiKrumSelected closest).",
    )
    server_learning_rate: float = Field(
        1.0, gt=0, le=100, description="Step size of the server update of the global adapter."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum.")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    epsilon: float = Field(1e-3, gt=0, le=1, description="FedAdam/FedYogi adaptivity (tau).")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmedMean: cut per side.")
    min_clients: int | None = Field(
        None, ge=1, le=1000, description="Quorum per round; defaults to every selected client."
    )
    clients_per_round: int | None = Field(
        None, ge=1, le=1000, description="Clients sampled per round; defaults to all."
    )
    client_fraction: float | None = Field(
        None, gt=0, le=1, description="Fraction of the clients sampled per round, rounded up."
    )
    sampling_seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of the per-round client sampling."
    )
    round_timeout_seconds: int | None = Field(
        None, ge=1, le=7 * 24 * 3600, description="After this, aggregate if the quorum holds."
    )
    max_round_retries: int = Field(
        2, ge=0, le=100, description="Retries of a round that misses its quorum; then it fails."
    )
    max_delta_norm: float | None = Field(
        None, gt=0, description="Reject (not clip) any delta whose L2 norm exceeds this."
    )
    weighting: Literal["samples", "uniform"] = Field(
        "samples",
        description="Client weight in the mean: samples (the count each client reports, times "
        "its weight) or uniform (its weight alone: reported counts are ignored).",
    )
    max_client_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="No client gets more than this share of a round's total weight: larger "
        "weights are lowered to it (at least 1/clients; 1 turns the cap off). Null, the "
        "default, follows the round: twice a fair share, 2 / the accepted clients.",
    )
    outlier_clip_factor: float | None = Field(
        3.0,
        ge=1,
        le=1e6,
        description="A delta whose L2 norm exceeds this times the round's median norm is scaled "
        "down to that norm (needs 2 or more clients); null turns it off.",
    )
    outlier_norm_factor: float | None = Field(
        10.0,
        ge=1,
        le=1e6,
        description="A delta whose L2 norm exceeds this times the round's median norm is "
        "rejected as an attack, not clipped (needs 3 or more clients, so that the median is "
        "an honest client's); null turns it off.",
    )
    byzantine_clients: int = Field(
        1,
        ge=0,
        le=300,
        description="krum/multiKrum: f, the faulty clients tolerated; a round needs at least "
        f"{KRUM_QUORUM} accepted deltas.",
    )
    multi_krum_selected: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="multiKrum: how many deltas to average; defaults to accepted - f.",
    )

    lora: Literal["separate", "exact"] = Field(
        "separate",
        description="How LoRA factors merge. separate: each of lora_A and lora_B is averaged on "
        "its own (with adapter.freezeA only B trains, and this is exact: FFA-LoRA). exact: the "
        "weighted mean of the clients' products B_i A_i, re-factorised into the global rank by "
        "truncated SVD (FlexLoRA); the truncation error goes into each round's record, and "
        "clients may train at smaller ranks (clients[].adapter.r). Needs fedavg, no freezeA and "
        "no DP noise.",
    )

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> AggregationSpec:
        if self.clients_per_round is not None and self.client_fraction is not None:
            raise ValueError("set at most one of clientsPerRound and clientFraction")
        clip, reject = self.outlier_clip_factor, self.outlier_norm_factor
        if clip is not None and reject is not None and clip > reject:
            raise ValueError(
                f"outlierClipFactor ({clip:g}) must not exceed outlierNormFactor ({reject:g}): "
                "a delta is clipped before it is far enough out to be rejected"
            )
        return self


class AdaptiveClipping(Model):
    """Andrew et al., "Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021):
    the clip norm moves each round geometrically toward a quantile of the clients' norms."""

    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="The fraction of clients whose delta should fit the clip."
    )
    learning_rate: float = Field(
        0.2, gt=0, le=10, description="eta_C: clip *= exp(-eta_C (fraction under clip - quantile))."
    )
    count_noise_multiplier: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="sigma_b: std of the Gaussian noise on the count of clients under the clip "
        "(in clients). With noiseMultiplier z > 0 it must exceed z / 2: the delta's noise is then "
        "raised to (z^-2 - (2 sigma_b)^-2)^-1/2 so that both together cost what z alone does.",
    )


class PrivacySpec(Model):
    """Client-level differential privacy: clip each delta's norm, add Gaussian noise to the sum."""

    clip_norm: float | None = Field(
        None, gt=0, le=1e6, description="Each delta is clipped to this L2 norm."
    )
    noise_multiplier: float = Field(
        0.0, ge=0, le=100, description="Noise std in units of clipNorm / clients; 0 adds none."
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="The delta of the (epsilon, delta) guarantee that epsilon is reported at; "
        "well below 1 / clients.",
    )
    adaptive_clipping: AdaptiveClipping | None = Field(
        None,
        description="Adapt clipNorm (its initial value) each round toward a quantile of the "
        "clients' delta norms; null keeps it fixed.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="The privacy budget: the aggregator refuses to start a run whose configured "
        "rounds would spend more epsilon (at delta), and fails a round that would exceed it.",
    )
    noise_key_secret: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A Secret (key noise.key: 32 or more random bytes) that only the aggregator's "
        "pods get: the noise is then keyed by it, so a rerun of a round draws the same noise. "
        "Without it every draw comes fresh from the OS's CSPRNG. Never derivable from what the "
        "run makes public, either way.",
    )

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> PrivacySpec:
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noiseMultiplier > 0 needs clipNorm")
        adaptive = self.adaptive_clipping
        if adaptive is not None and self.clip_norm is None:
            raise ValueError("adaptiveClipping needs clipNorm (its initial value)")
        if (
            adaptive is not None
            and self.noise_multiplier > 0
            and 2 * adaptive.count_noise_multiplier <= self.noise_multiplier
        ):
            raise ValueError(
                "adaptiveClipping.countNoiseMultiplier must exceed noiseMultiplier / 2 when "
                "noise is on (the count is privatised from the same budget)"
            )
        if self.target_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("targetEpsilon needs noiseMultiplier > 0 (no noise: no guarantee)")
        return self


class LocalPrivacy(Model):
    """Clipping and Gaussian noise applied to a client's delta before it leaves the client (a
    site's own guarantee, whatever the run asks of its aggregator): the delta's L2 norm is
    clipped to clipNorm, then noise of std noiseMultiplier * clipNorm is added to every value."""

    clip_norm: float = Field(gt=0, le=1e6, description="The delta's L2 norm is clipped to this.")
    noise_multiplier: float = Field(
        0.0, ge=0, le=100, description="Noise std in units of clipNorm; 0 clips only."
    )


def lora_mode_problems(
    aggregation: AggregationSpec,
    adapter: AdapterSpec,
    privacy: PrivacySpec,
    client_ranks: dict[str, int],
    prefix: str = "",
) -> list[str]:
    """Why these settings cannot run together (spec paths under `prefix`), empty when they can.

    aggregation.lora exact merges the clients' products and re-factorises them, so: only with
    fedavg (a server optimizer's moments or a robust statistic on dense per-layer products would
    need state and memory of out x in per layer, and on the factors they are not exact); not with
    freezeA (the re-factorised A is no longer the shared frozen one); not with DP noise (the noise
    is calibrated to the factors' mean, not to the product). Per-client ranks (`client_ranks`,
    keyed by where a message should point) need exact mode (separate averaging needs every
    client's factors at one shape) and at most adapter.r.
    """
    problems = []
    where = f"{prefix}aggregation.lora"
    if aggregation.lora == "exact":
        if aggregation.algorithm != "fedavg":
            problems.append(f"{where}: exact needs algorithm fedavg, not {aggregation.algorithm}")
        if adapter.freeze_a:
            problems.append(f"{where}: exact re-factorises A; it cannot be frozen (freezeA)")
        if privacy.noise_multiplier > 0:
            problems.append(
                f"{where}: exact cannot add DP noise (noiseMultiplier): the noise is calibrated "
                "to the mean of the factors, not of their products"
            )
    for key, r in sorted(client_ranks.items()):
        if aggregation.lora != "exact":
            problems.append(f"{key}: a rank ({r}) other than the run's needs {where} exact")
        if r > adapter.r:
            problems.append(f"{key}: {r} exceeds the run's {prefix}adapter.r ({adapter.r})")
    return problems


class EvaluationSpec(Model):
    data_uri: Uri | None = Field(None, description="Held-out jsonl the aggregator evaluates.")
    every_rounds: int = Field(
        1, ge=1, le=100_000, description="Evaluate every this many rounds, and after the last."
    )
    max_samples: int | None = Field(
        256, ge=1, le=1_000_000, description="Evaluate at most this many records."
    )


CleanupPolicy = Literal["Retain", "Delete"]
"""storage.cleanupPolicy: keep the run's storage when the run is deleted, or delete it."""


class StorageLocation(Model):
    """Where a run keeps its artifacts. Credentials never appear here: they come as AWS_* env."""

    uri: Uri = Field(description="s3://bucket/prefix or file:///path; the run's root.")
    endpoint: Uri | None = Field(None, description="S3 endpoint override (MinIO, versitygw, ...).")
    region: str | None = Field(None, max_length=64, description="S3 region, if it needs one.")
    force_path_style: bool = Field(
        True, description="Address buckets as <endpoint>/<bucket> (MinIO and most self-hosted S3)."
    )


MEAN_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
"""Algorithms that reduce the deltas to a weighted mean and so can stream client by client."""
ROBUST_ALGORITHMS = ("median", "trimmedMean")
"""Coordinate-wise statistics that need every client's value of a tensor at once."""
KRUM_ALGORITHMS = ("krum", "multiKrum")
"""Select whole deltas by their distances to the others, then average the selected ones."""
STATELESS_ALGORITHMS = ("fedavg", *ROBUST_ALGORITHMS, *KRUM_ALGORITHMS)
