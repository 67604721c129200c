"""Signed deltas: a client whose key the run pins is believed only on its own signature.

The aggregator verifies the signature of a pinned client's manifest before it reads anything else
of the commit, so a forged, unsigned or tampered commit costs one small read and is never
downloaded; a genuine signature made for another run, round or client is a replay, refused on the
fields it vouches for.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from fedtune_trainer import aggregate
from fedtune_trainer.client import commit_signer
from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import DELTA_FILE
from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.contract import SIGNING_KEY_ENV
from fedtune_trainer.wire.errors import SettingError
from fedtune_trainer.wire.layout import client_prefix
from fedtune_trainer.wire.settings import PublicKey
from fedtune_trainer.wire.task import ClientTask
from tests.trainer.aggregation_support import LOSSLESS, random_tensors, task, write_global

ALICE, BOB, MALLORY = (signing.generate() for _ in range(3))  # (private PEM, public text)


class CountingStore(st.FileStore):
    """A file store that remembers which objects were read past their manifest."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.body_reads: list[str] = []

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.body_reads.append(key)
        return super().get_range(key, start, length)

    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> None:
        self.body_reads.append(key)
        super().get_file(key, path, max_bytes)


def commit_delta(
    store: st.Store, round_: int, client: str, *, key: bytes | None, run: str = "t"
) -> None:
    enc = codec.encode(random_tensors(round_ * 10 + len(client), 0.01), LOSSLESS)
    meta = codec.manifest_fields(
        enc, run=run, round_=round_, client=client, samples=10, steps=1, train_loss=1.0
    )
    sign = signing.signer(signing.load_private(key)) if key else None
    st.commit(store, client_prefix(round_, client), {DELTA_FILE: enc.blob}, meta, sign=sign)


def copy_commit(store: st.Store, source: str, target: str) -> None:
    store.delete_prefix(target + "/")
    for key in store.list(source + "/"):
        store.put_bytes(target + key[len(source) :], store.get_bytes(key))


def tamper(store: st.Store, key: str, edit: Callable[[bytes], bytes]) -> None:
    store.put_bytes(key, edit(store.get_bytes(key)))


ALICE_ROUND_2 = client_prefix(2, "alice")
MAKERS: dict[str, Callable[[st.Store], None]] = {
    "signed": lambda s: commit_delta(s, 2, "alice", key=ALICE[0]),
    "unsigned": lambda s: commit_delta(s, 2, "alice", key=None),
    "forged": lambda s: commit_delta(s, 2, "alice", key=MALLORY[0]),
    "another-client's": lambda s: (
        commit_delta(s, 2, "bob-elsewhere", key=BOB[0]),
        copy_commit(s, client_prefix(2, "bob-elsewhere"), ALICE_ROUND_2),
    ),
    "another-round's": lambda s: (
        commit_delta(s, 1, "alice", key=ALICE[0]),
        copy_commit(s, client_prefix(1, "alice"), ALICE_ROUND_2),
    ),
    "another-run's": lambda s: commit_delta(s, 2, "alice", key=ALICE[0], run="other"),
    "tampered-manifest": lambda s: (
        commit_delta(s, 2, "alice", key=ALICE[0]),
        tamper(s, f"{ALICE_ROUND_2}/manifest.json", lambda b: b.replace(b": 10,", b": 1000,")),
    ),
    "tampered-delta": lambda s: (
        commit_delta(s, 2, "alice", key=ALICE[0]),
        tamper(s, f"{ALICE_ROUND_2}/{DELTA_FILE}", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
    ),
}
CASES = [
    # (case, the reason in the round record or None when accepted, whether the body was read)
    ("signed", None, True),
    ("unsigned", r"^unsigned: no manifest signature", False),
    ("forged", r"^mis-signed: the signature does not verify", False),
    ("another-client's", r"^mis-signed", False),
    ("another-round's", r"^replayed: the manifest names run 't' round 1 client 'alice'", False),
    ("another-run's", r"^replayed: the manifest names run 'other' round 2", False),
    ("tampered-manifest", r"^mis-signed", False),
    ("tampered-delta", r"checksum mismatch", True),  # the signed manifest's hash catches it
]


@pytest.mark.parametrize(("case", "reason", "body_read"), CASES, ids=[c[0] for c in CASES])
def test_a_pinned_client_counts_only_on_its_own_signature(
    tmp_path: Path, case: str, reason: str | None, body_read: bool
) -> None:
    store = CountingStore(tmp_path / "run")
    write_global(store, 1, random_tensors(0))
    commit_delta(store, 2, "carol", key=None)  # an honest client without a key: as before
    MAKERS[case](store)
    store.body_reads.clear()
    lines: list[str] = []
    t = task(store, 2, ["alice", "carol"], client_keys={"alice": ALICE[1]})
    record = aggregate.run(t, store, lines.append).record
    rejected = {r.client: r.reason for r in record.rejections}
    assert "carol" not in rejected
    if reason is None:
        assert record.accepted == 2
        assert not rejected
    else:
        assert record.accepted == 1
        assert re.search(reason, rejected["alice"]), rejected["alice"]
    alice_body = [k for k in store.body_reads if k.startswith(ALICE_ROUND_2 + "/")]
    assert bool(alice_body) is body_read, alice_body


def test_a_signing_client_needs_its_key_before_any_work() -> None:
    base = {"run": "t", "round": 1, "client": "alice", "base_model": "m", "data_uri": "d"}
    t = ClientTask(**base, storage={"uri": "/tmp/x"}, sign=True)
    with pytest.raises(SettingError, match=SIGNING_KEY_ENV):
        commit_signer(t, {})
    with pytest.raises(SettingError, match="not an unencrypted PEM"):
        commit_signer(t, {SIGNING_KEY_ENV: "not a key"})
    sign = commit_signer(t, {SIGNING_KEY_ENV: ALICE[0].decode()})
    assert sign is not None
    signing.verifier(ALICE[1])(b"manifest", sign(b"manifest"))  # raises unless it verifies
    assert commit_signer(t.model_copy(update={"sign": False}), {}) is None


def test_keygen_writes_a_private_key_for_the_owner_alone(tmp_path: Path) -> None:
    trainer = str(Path(sys.executable).parent / "fedtune-trainer")
    out = tmp_path / "signing.key"
    made = subprocess.run(
        [trainer, "keygen", "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    TypeAdapter(PublicKey).validate_python(public)  # what the run's spec accepts
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = signing.load_private(out.read_bytes())
    signing.verifier(public)(b"m", signing.signer(key)(b"m"))
    again = subprocess.run(
        [trainer, "keygen", "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert again.returncode == 1
    assert "not overwriting" in again.stderr
    assert signing.public_text(signing.load_private(out.read_bytes()).public_key()) == public
