"""What a finished Job reports: the client's summary, the round record and the aggregator's summary.

The round record (`RoundRecord`) is the one account of an aggregation round. The aggregator
writes it as `rounds/<r>/metrics.json`, the run report renders it, and the aggregator's
termination message carries it to the operator, which maps it into `status.history`. Its counts
(`accepted`, `rejected`) are fields of their own, not the lengths of its lists, so that cutting a
list to fit the kubelet's 4 KiB termination message can never change a number the operator
records or a metric it exports. The history's fields that come from here take their types,
bounds and descriptions from here (`fedtune_operator.api.status`): write them for both readers.

Torch-free, like task.py: the operator imports it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fedtune_trainer.wire.contract import SUMMARY_MAX_BYTES
from fedtune_trainer.wire.settings import Algorithm, Model

REASON_MAX = 200
"""A rejection's reason is one line, so that many of them still fit a status and a report."""


class ClientSummary(Model):
    """A client Job's result: what it trained on and what it uploaded."""

    kind: Literal["client"] = "client"
    round: int
    client: str
    samples: int
    steps: int
    train_loss: float | None = None
    bytes_sent: int = Field(
        description="Encoded bytes uploaded: the delta, and SCAFFOLD's control change if any."
    )
    raw_bytes: int = Field(description="The same upload as dense fp32.")
    control_bytes: int = Field(0, ge=0, description="Of bytes_sent, SCAFFOLD's control change.")
    full_model_bytes: int = Field(description="The whole model as fp32: what FedAvg would send.")
    truncated_records: int = Field(
        0, description="Records cut to maxSeqLength (prompt from the left, answer from the right)."
    )
    dropped_records: int = Field(0, description="Records left with no token to train on.")
    sha256: str
    seconds: float
    base_model_bytes_downloaded: int = Field(
        0,
        ge=0,
        description="Bytes of the base model this Job downloaded: all of it without a cache "
        "volume or in the client's first round, none once its cache holds it (spec.modelCache).",
    )
    last_heartbeat: float | None = Field(
        None,
        ge=0,
        description="A site's client (its relay's summary): the Unix time of the site's last "
        "heartbeat the relay saw, on the site's clock.",
    )


class WatchSummary(Model):
    """A site's watch Job's result: the task it accepted for `round`, or the run's end."""

    kind: Literal["watch"] = "watch"
    client: str
    outcome: Literal["task", "finished"]
    round: int = Field(ge=0, description="The accepted task's round; the last round when finished.")
    task_sha256: str | None = Field(None, description="The accepted task's digest.")
    image: str | None = Field(None, description="The image the accepted task runs.")
    seconds: float = 0.0


class Rejection(Model):
    """A client delta the aggregator refused, and why (for people: one line)."""

    client: str
    reason: Annotated[str, StringConstraints(max_length=REASON_MAX)]


class Contribution(Model):
    """An accepted client delta, as it entered the round's merge."""

    client: str
    samples: int = Field(ge=0, description="The sample count it reported (validated).")
    weight: float = Field(
        ge=0,
        description="The weight it got in the mean, after the share cap (1 in the unweighted "
        "rules; for krum/multiKrum 1 when selected, else 0).",
    )
    share: float = Field(
        0.0, ge=0, le=1, description="Its share of the round's total weight: weight / sum."
    )
    capped: bool = Field(False, description="Its weight was lowered to the round's share cap.")
    scale: float = Field(
        1.0,
        ge=0,
        le=1,
        description="The factor its delta was scaled by before merging: the smaller of the "
        "privacy clip and the outlier clip (1: unchanged).",
    )
    outlier: bool = Field(
        False, description="Its norm was above outlierClipFactor x the round's median: clipped."
    )
    selected: bool | None = Field(None, description="krum/multiKrum: whether it was selected.")
    train_loss: float | None = None
    encoded_bytes: int = Field(ge=0, description="Bytes it uploaded.")
    raw_bytes: int = Field(ge=0, description="The same delta as dense fp32.")
    norm: float = Field(ge=0, description="L2 norm of the decoded delta (before any clip).")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of its delta file: what remains of the delta once it is deleted.",
    )


class RoundRecord(Model):
    """One aggregation round: its true counts, losses and bytes, and the per-client detail."""

    run: str
    round: int = Field(ge=0, description="The round; 0 writes the initial adapter.")
    algorithm: Algorithm
    accepted: int = Field(0, ge=0, description="Client deltas merged into the new adapter.")
    rejected: int = Field(0, ge=0, description="Client deltas the aggregator refused.")
    train_loss: float | None = Field(None, description="Sample-weighted mean of the clients'.")
    eval_loss: float | None = Field(
        None, description="Loss of the new global adapter on held-out data."
    )
    bytes_received: int = Field(0, ge=0, description="Encoded bytes of the merged deltas.")
    raw_bytes: int = Field(0, ge=0, description="The merged deltas as dense fp32.")
    adapter_bytes: int | None = Field(None, ge=0, description="The published adapter's weights.")
    seconds: float = Field(0.0, ge=0)
    weighting: Literal["samples", "uniform"] | None = Field(
        None, description="How client weights were formed (None when nothing was merged)."
    )
    max_client_share: float | None = Field(
        None,
        description="The share cap applied: maxClientShare (by default 2 / accepted), at "
        "least 1 / accepted.",
    )
    median_norm: float | None = Field(
        None,
        description="The lower median of the norms of the deltas that passed intake (before "
        "outliers were rejected).",
    )
    outlier_norm_bound: float | None = Field(
        None,
        description="outlierClipFactor x median_norm: larger deltas were clipped to it (and "
        "those above outlierNormFactor x median_norm rejected).",
    )
    clip_norm: float | None = Field(
        None, ge=0, description="privacy.adaptiveClipping: the clip norm this round used."
    )
    clip_fraction: float | None = Field(
        None, description="privacy.adaptiveClipping: the (noised) fraction of clients within it."
    )
    truncation_error: float | None = Field(
        None,
        ge=0,
        description="aggregation.lora exact: relative Frobenius norm of what the rank-r "
        "truncation dropped from the new adapter's products, over all layers together.",
    )
    truncation_error_max: float | None = Field(
        None, ge=0, description="aggregation.lora exact: the largest of any one layer."
    )
    epsilon: float | None = Field(
        None,
        ge=0,
        description="Client-level DP: the epsilon spent by the rounds so far, at privacy.delta "
        "(RDP accountant of dp-accounting, Poisson-subsampled Gaussian).",
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="Client-level DP: the noise multiplier of this round."
    )
    sampling_rate: float | None = Field(
        None, gt=0, le=1, description="Client-level DP: the clients' sampling rate this round."
    )
    contributions: list[Contribution] = Field(default_factory=list)
    rejections: list[Rejection] = Field(default_factory=list)

    @property
    def bytes_per_client(self) -> float | None:
        """Mean encoded bytes one accepted client uploaded this round."""
        return self.bytes_received / self.accepted if self.accepted else None

    @property
    def raw_bytes_per_client(self) -> float | None:
        """The same deltas as dense fp32: what the encoding is measured against."""
        return self.raw_bytes / self.accepted if self.accepted else None

    @property
    def compression(self) -> float | None:
        """Dense fp32 bytes over encoded bytes (how many times smaller the upload was)."""
        return self.raw_bytes / self.bytes_received if self.bytes_received else None


def initial_record(run: str, algorithm: Algorithm) -> RoundRecord:
    """Round 0's record: the initial adapter, nothing merged."""
    return RoundRecord(run=run, round=0, algorithm=algorithm)


class AggregateSummary(Model):
    """An aggregator Job's result: the round record and where the adapter went."""

    kind: Literal["aggregate"] = "aggregate"
    record: RoundRecord
    global_uri: str
    final_uri: str | None = None
    report_uri: str | None = None

    @property
    def round(self) -> int:
        return self.record.round


class EvaluationSummary(Model):
    """An evaluation Job's result: the loss of global adapter `round` on the held-out data.

    Also written as rounds/<r>/evaluation.json, from which the report takes the round's eval loss.
    """

    kind: Literal["evaluate"] = "evaluate"
    round: int = Field(ge=0)
    eval_loss: float
    examples: int = Field(ge=0, description="Held-out records evaluated.")
    tokens: int = Field(ge=0, description="Tokens the loss was taken over.")
    seconds: float = Field(0.0, ge=0)


AnySummary = ClientSummary | AggregateSummary | EvaluationSummary | WatchSummary
Summary = Annotated[AnySummary, Field(discriminator="kind")]


class _SummaryDoc(BaseModel):
    model_config = ConfigDict(frozen=True)
    summary: Summary


def parse_summary(text: str) -> AnySummary:
    return _SummaryDoc.model_validate({"summary": json.loads(text)}).summary


def _compact(summary: AnySummary) -> str:
    return json.dumps(summary.wire(), separators=(",", ":"))


def dump_summary(summary: AnySummary) -> str:
    """Compact JSON within the kubelet's termination-message limit.

    An aggregator's summary too long for it first loses the per-client contributions (the round
    record in storage keeps them), then the rejections beyond those that fit; the counts stay.
    """
    text = _compact(summary)
    if len(text.encode()) <= SUMMARY_MAX_BYTES or not isinstance(summary, AggregateSummary):
        if len(text.encode()) > SUMMARY_MAX_BYTES:
            raise ValueError(f"summary is {len(text.encode())} bytes, over {SUMMARY_MAX_BYTES}")
        return text
    record = summary.record.model_copy(update={"contributions": []})
    rejections = list(record.rejections)
    while True:
        cut = summary.model_copy(
            update={"record": record.model_copy(update={"rejections": rejections})}
        )
        text = _compact(cut)
        if len(text.encode()) <= SUMMARY_MAX_BYTES:
            return text
        if not rejections:
            raise ValueError(f"summary is {len(text.encode())} bytes, over {SUMMARY_MAX_BYTES}")
        rejections = rejections[: len(rejections) // 2]
