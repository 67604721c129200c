"""The keys a run pins and holds: each signing client's, each site's, and the run's own task key.

Public halves live in the spec; private halves only in Secrets that the one Job that signs with
them gets (a client's pods, the run's relay Jobs), never in the operator.
"""

from __future__ import annotations

from pydantic import Field

from fedtune_operator.api.schema import ObjectName, SecretKey
from fedtune_trainer.wire.contract import SIGNING_KEY_SECRET_KEY, TASK_SIGNING_SECRET_KEY
from fedtune_trainer.wire.settings import Model, PublicKey
from fedtune_trainer.wire.site import SILENCE_SECONDS


class ClientSigning(Model):
    """The client's signing key: its public half pinned in the run, its private half in a Secret
    that only this client's pods get (`fedtune-trainer keygen` makes both). The client signs each
    delta it commits; the aggregator refuses this client's unsigned, mis-signed or replayed deltas
    before it downloads them."""

    public_key: PublicKey = Field(
        description="The client's Ed25519 public key, `ed25519:<base64>` (keygen prints it)."
    )
    secret_name: ObjectName = Field(
        description="The Secret in the run's namespace that holds the private key (PEM)."
    )
    secret_key: SecretKey = Field(
        SIGNING_KEY_SECRET_KEY, description="Key of the private key in that Secret."
    )


class RemoteClient(Model):
    """A client trained at a site: in its data owner's own cluster, which joins the run through
    its storage alone (docs/sites.md). The run writes the client's signed tasks and waits for its
    signed commits through a relay Job; it never holds the site's data, data credentials,
    signing key or kubeconfig."""

    public_key: PublicKey = Field(
        description="The site's Ed25519 public key: only commits it signed count."
    )
    silence_seconds: int = Field(
        SILENCE_SECONDS,
        ge=10,
        le=86_400,
        description="A site without a heartbeat this long is given up for the round.",
    )


class TaskSigning(Model):
    """The run's key that signs the tasks of its remote clients: the private half in a Secret
    only the run's relay Jobs get; each site pins the public half (`fedtune-trainer keygen`)."""

    secret_name: ObjectName = Field(description="The Secret that holds the private key (PEM).")
    secret_key: SecretKey = Field(
        TASK_SIGNING_SECRET_KEY, description="Key of the private key in that Secret."
    )
