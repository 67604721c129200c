"""Which Secret each Job's pods get, and for what: the run's storage identity or a client's or the
evaluation's own, a client's data credentials, signing key and the aggregator's noise key.

All of them reach the pods as `secretKeyRef`s only (the operator never reads a Secret), each in
the pods of the Job it is named for and no other; `secret_name` is what a Job's annotations say
it holds (`kubectl describe job`).
"""

from __future__ import annotations

from typing import Any

from fedtune_operator.api import ClientSigning, FederatedFineTuneSpec, S3Credentials, TaskSigning
from fedtune_trainer.wire.contract import (
    AWS_CREDENTIAL_ENV,
    NOISE_KEY_ENV,
    NOISE_KEY_SECRET_KEY,
    SIGNING_KEY_ENV,
    TASK_SIGNING_KEY_ENV,
)


def secret_env(prefix: str, creds: S3Credentials | None) -> list[dict[str, Any]]:
    if creds is None:
        return []
    key_id, secret = AWS_CREDENTIAL_ENV
    return [
        {
            "name": f"{prefix}{key_id}",
            "valueFrom": {"secretKeyRef": {"name": creds.name, "key": creds.access_key_id_key}},
        },
        {
            "name": f"{prefix}{secret}",
            "valueFrom": {"secretKeyRef": {"name": creds.name, "key": creds.secret_access_key_key}},
        },
    ]


def secret_name(creds: S3Credentials | None) -> str:
    """What the credentials annotation says: the Secret, or that there is none."""
    return f"secret/{creds.name}" if creds else "none (the pod's ambient identity)"


def client_credentials(
    spec: FederatedFineTuneSpec, client: str
) -> tuple[S3Credentials | None, S3Credentials | None, str]:
    """A client's storage identity, its data credentials, and what it reads its data with.

    Its own storage identity when it has one (never the run's, then); its data with its own data
    Secret, else with its storage identity: never a credential the spec names for anyone else."""
    entry = next(c for c in spec.clients if c.name == client)
    storage = entry.storage_credentials_secret or spec.storage.credentials_secret
    if entry.credentials_secret is not None:
        return storage, entry.credentials_secret, secret_name(entry.credentials_secret)
    return storage, None, f"the storage credentials ({secret_name(storage)})"


def signing_env(signing: ClientSigning | None) -> list[dict[str, Any]]:
    """The client's private signing key, in its own pods alone (a secretKeyRef: the operator
    never reads it)."""
    if signing is None:
        return []
    ref = {"name": signing.secret_name, "key": signing.secret_key}
    return [{"name": SIGNING_KEY_ENV, "valueFrom": {"secretKeyRef": ref}}]


def task_signing_env(signing: TaskSigning | None) -> list[dict[str, Any]]:
    """The run's key that signs its remote clients' tasks, in its relay Jobs' pods alone."""
    if signing is None:
        return []
    ref = {"name": signing.secret_name, "key": signing.secret_key}
    return [{"name": TASK_SIGNING_KEY_ENV, "valueFrom": {"secretKeyRef": ref}}]


def noise_key_env(secret: str | None) -> list[dict[str, Any]]:
    """The key of the DP noise, in the aggregator's pods alone (privacy.noiseKeySecret)."""
    if secret is None:
        return []
    ref = {"name": secret, "key": NOISE_KEY_SECRET_KEY}
    return [{"name": NOISE_KEY_ENV, "valueFrom": {"secretKeyRef": ref}}]
