"""Signed commits: a client proves that a delta is its own, with a key only it holds.

A manifest's SHA-256s prove that the files are the ones it lists, not who wrote it: anyone who can
write under a client's prefix could commit a delta in that client's name. So a client with a key
signs the exact bytes of its manifest (which names the run, the round and the client, and holds
the hash of every file of the commit) with Ed25519, and the commit protocol writes the signature
as `manifest.sig` just before the manifest (store.commit, store.read_manifest). The aggregator
verifies it against the public key the run pins for that client before it reads anything else of
the commit. A signature made for another run, round or
client does not help a replay: the fields it vouches for are checked against the task.

Keys: the private key is PKCS#8 PEM (what `fedtune-trainer keygen` writes, kept in a Secret of
the client's own); the public key is `ed25519:` and the base64 of its 32 raw bytes, short enough
to pin in a run's spec. `cryptography` does the maths; nothing here is hand-written crypto.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune_trainer.wire.errors import SettingError

DOMAIN = b"fedtune.manifest-signature/v1\x00"
"""Prefixed to what is signed, so that a fedtune signature means nothing anywhere else."""
TASK_DOMAIN = b"fedtune.task-signature/v1\x00"
"""The run's signatures of remote tasks (storage/tasks.py): another domain, so that a manifest
signature can never pass for a task's, whoever holds both keys."""
PUBLIC_PREFIX = "ed25519:"


class SignatureError(ValueError):
    """A commit is unsigned, or its signature does not verify with the pinned key."""


def generate() -> tuple[bytes, str]:
    """A new key pair: the private key as PEM, the public key as `ed25519:<base64>`."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_text(key.public_key())


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def load_private(pem: bytes) -> Ed25519PrivateKey:
    """The private key of a PEM, refused unless it is an unencrypted Ed25519 key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"the signing key is {type(key).__name__}, not Ed25519")
    return key


def load_public(text: str) -> Ed25519PublicKey:
    """`ed25519:<base64 of 32 bytes>` as a key."""
    if not text.startswith(PUBLIC_PREFIX):
        raise SignatureError(f"a public key starts with {PUBLIC_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise SignatureError(f"not an Ed25519 public key: {e}") from e


def signer(key: Ed25519PrivateKey, domain: bytes = DOMAIN) -> Callable[[bytes], bytes]:
    """What the commit protocol calls with a manifest's bytes to get their signature (with
    TASK_DOMAIN: what the run signs a remote task with)."""
    return lambda document: key.sign(domain + document)


def signer_from_env(
    environ: Mapping[str, str], name: str, missing: str, domain: bytes = DOMAIN
) -> Callable[[bytes], bytes]:
    """The signer of the private key PEM in variable `name` (a client's own key, or the run's
    task key). A missing or unusable key is a SettingError (exit 2): its Secret must change, and
    a retry cannot fix that; `missing` says whose key it is."""
    pem = environ.get(name, "")
    if not pem.strip():
        raise SettingError(missing)
    try:
        return signer(load_private(pem.encode()), domain)
    except SignatureError as e:
        raise SettingError(f"{name}: {e}") from e


def verifier(public: str, domain: bytes = DOMAIN) -> Callable[[bytes, bytes | None], None]:
    """What a reader calls with a manifest's (or, with TASK_DOMAIN, a task's) bytes and its
    signature (None: there is none)."""
    key = load_public(public)
    what = "task" if domain == TASK_DOMAIN else "manifest"

    def verify(document: bytes, signature: bytes | None) -> None:
        if signature is None:
            raise SignatureError(f"unsigned: no {what} signature, but a key is pinned for it")
        try:
            key.verify(signature, domain + document)
        except InvalidSignature as e:
            raise SignatureError(
                "mis-signed: the signature does not verify with the pinned key"
            ) from e

    return verify
