"""The FederatedSite resource (fedtune.dev/v1alpha1): "this cluster's client X takes part in run R".

A data owner creates it in its own cluster, where the operator runs in site mode (docs/sites.md).
Everything the site keeps to itself is here and nowhere else: its storage identity, its signing
key, its data and data credentials, where its Jobs run, and the policy it holds every task of the
run to. The run's cluster never sees any of it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fedtune_operator.api.pod import PodTemplate
from fedtune_operator.api.schema import (
    RUN_NAME_MAX,
    RUN_NAME_PATTERN,
    Count,
    DataUri,
    EndpointUri,
    ObjectName,
    SecretKey,
    StorageUri,
    Timestamp,
    bounded_str,
)
from fedtune_operator.api.spec import S3Credentials
from fedtune_operator.api.status import StatusModel
from fedtune_trainer.wire.contract import SIGNING_KEY_SECRET_KEY
from fedtune_trainer.wire.settings import ClientName, Model, PublicKey, StorageLocation
from fedtune_trainer.wire.site import SitePolicy

SITE_KIND = "FederatedSite"
SITE_PLURAL = "federatedsites"
SITE_SINGULAR = "federatedsite"
SITE_SHORT_NAMES = ("fsite",)
REFUSALS_LIMIT = 20
"""status.refusals keeps the latest this many."""


class SiteStorage(StorageLocation):
    """The run's storage root, reached with the site's own identity (scoped by the storage
    server's policy to what a site may touch: `fedtune storage-policy` prints it)."""

    uri: StorageUri = Field(description="The run's root, as the run's author gives it.")
    endpoint: EndpointUri | None = Field(None, description="S3 endpoint override; s3:// only.")
    credentials_secret: S3Credentials | None = Field(
        None, description="The site's storage identity (a Secret in this namespace)."
    )

    def location(self) -> StorageLocation:
        return StorageLocation.model_validate(
            self.model_dump(include=set(StorageLocation.model_fields))
        )


class SiteRun(Model):
    """The run the site takes part in, as its author announced it."""

    name: str = Field(
        max_length=RUN_NAME_MAX, pattern=RUN_NAME_PATTERN, description="The run's name."
    )
    storage: SiteStorage
    task_public_key: PublicKey = Field(
        description="The run's task-signing key (`ed25519:...`): a task it did not sign is refused."
    )


class SiteSigning(Model):
    """The site's private signing key (its public half is the run's clients[].site.publicKey)."""

    secret_name: ObjectName = Field(description="The Secret that holds it (PEM).")
    secret_key: SecretKey = Field(SIGNING_KEY_SECRET_KEY, description="Its key in the Secret.")


class FederatedSiteSpec(Model):
    """A site's part in a run: the client it trains, the data it trains on, where its Jobs run,
    and what it accepts of the run."""

    client: ClientName = Field(description="The client's name in the run (clients[].name).")
    run: SiteRun
    signing: SiteSigning
    data_uri: DataUri = Field(description="The site's data; never leaves the site.")
    data_credentials_secret: S3Credentials | None = Field(
        None, description="Credentials for the data; default: the site's storage identity."
    )
    template: PodTemplate = Field(
        default_factory=PodTemplate,
        description="The site's Jobs: resources, nodeSelector, tolerations, priorityClassName, "
        "labels (e.g. kueue.x-k8s.io/queue-name). image is the site's own trainer image, which "
        "runs its watch Jobs; its client Jobs run the image the run's task names, when "
        "policy.images allows it.",
    )
    state_claim: ObjectName | None = Field(
        None,
        description="A PersistentVolumeClaim of the site's where its client keeps what it "
        "carries from round to round: the error-feedback residual (fp32, the adapter's size) and "
        "SCAFFOLD's control variate. Without one they go to the run's storage, written and read "
        "over the site's link every round; with a lossy delta encoding that is more bytes than "
        "the delta itself.",
    )
    policy: SitePolicy = Field(default_factory=SitePolicy)
    leave: bool = Field(False, description="Take no more tasks of the run, for good.")


SitePhase = Literal["Pending", "Waiting", "Training", "Paused", "Left", "Completed", "Failed"]


class SiteRefusal(StatusModel):
    """A round the site did not train, and why (its policy, a task that did not verify, a
    failed client Job)."""

    round: int = Field(ge=0)
    reason: Annotated[str, bounded_str(None, 1024)] = Field(description="For people.")
    time: Timestamp


class FederatedSiteStatus(StatusModel):
    """What the site's operator observed. `afterRound` and `watchAttempt` are its memory: the
    last round it handled, and how many watches it started after it."""

    phase: SitePhase = Field("Pending", description="A one-word summary for people.")
    observed_generation: int | None = Field(None, description="metadata.generation decided on.")
    run_round: int | None = Field(None, description="The round of the run's last task seen.")
    after_round: int = Field(0, ge=0, description="The last round handled (trained or refused).")
    watch_attempt: int = Field(0, ge=0, description="Watches started after afterRound.")
    rounds_contributed: Count = Field(0, description="Rounds the site trained and committed.")
    bytes_sent: Count = Field(0, description="Bytes of the deltas it committed, in all.")
    last_heartbeat: Timestamp | None = Field(
        None, description="When a Job of the site last reported (the site's clock)."
    )
    refusals: list[SiteRefusal] = Field(
        default_factory=list,
        max_length=REFUSALS_LIMIT,
        description="The latest rounds it did not train, and why.",
    )
    message: Annotated[str, bounded_str(None, 1024, min_length=0)] | None = Field(
        None, description="One line on the current phase."
    )
