"""The aggregator's intake: one client's committed delta, fetched and verified before anything
is spent on it, and kept on local disk as an `Accepted` delta for the merge.

Validate before spending (trainer-image/README.md): the manifest first, then the declared size
against what this adapter and codec can produce, then the header alone (a ranged read), and only
then the body, streamed and cut off past the declared size, its SHA-256, the header again from
the verified bytes, and the decode. Every failure is the client's own Rejection, never the round's.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune_trainer.aggregation import bounds
from fedtune_trainer.codec import precheck
from fedtune_trainer.codec.container import DELTA_FILE, DeltaFormatError
from fedtune_trainer.codec.decoding import Layout, decode_one
from fedtune_trainer.learning.drift import CONTROL_FILE
from fedtune_trainer.storage import signing
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import client_prefix
from fedtune_trainer.wire.results import Contribution
from fedtune_trainer.wire.task import AggregateTask


@dataclass(frozen=True)
class Accepted:
    """A verified client delta, kept on local disk (never all of them in memory).

    `collect` fills in what the client's files say; `weigh` then sets how it enters the merge
    (weight after the share cap, clip scale, Krum's selection).
    """

    client: str
    path: Path
    layout: Layout
    """Its layout, checked against the adapter: what decoding it again may read."""
    samples: int
    weight: float
    train_loss: float | None
    encoded_bytes: int
    raw_bytes: int
    norm: float
    sha256: str = ""
    """The SHA-256 of its delta file (verified): what the round record keeps of it."""
    scale: float = 1.0
    """The factor its delta is scaled by: the smaller of the DP clip and the outlier clip."""
    capped: bool = False
    outlier: bool = False
    selected: bool | None = None
    share: float = 0.0
    control: tuple[Path, Layout] | None = None
    """SCAFFOLD's checked control change (its file and layout), when the run uses it."""

    def contribution(self) -> Contribution:
        return Contribution(
            client=self.client,
            samples=self.samples,
            weight=self.weight,
            share=self.share,
            capped=self.capped,
            scale=self.scale,
            outlier=self.outlier,
            selected=self.selected,
            train_loss=self.train_loss,
            encoded_bytes=self.encoded_bytes,
            raw_bytes=self.raw_bytes,
            norm=self.norm,
            sha256=self.sha256 or None,
        )

    def tensors(self) -> Callable[[str], torch.Tensor]:
        """A lazy decoder of its tensors, already scaled by `scale` (float32)."""
        decode = decode_file(self.path, self.layout)
        if self.scale == 1.0:
            return decode
        return lambda name: decode(name) * self.scale

    def delta(self) -> Mapping[str, torch.Tensor]:
        """Its tensors unscaled, each decoded when it is read (for the streaming mean, which
        folds `scale` into the client's factor rather than copying the tensor)."""
        return LazyDelta(decode_file(self.path, self.layout), tuple(sorted(self.layout.tensors)))

    def control_change(self) -> Callable[[str], torch.Tensor]:
        """A lazy decoder of its control change (never scaled: clips bound the delta only)."""
        assert self.control is not None
        return decode_file(*self.control)


class LazyDelta(Mapping[str, torch.Tensor]):
    """A delta file's tensors as a read-only mapping that decodes a tensor each time it is read."""

    def __init__(self, decode: Callable[[str], torch.Tensor], names: tuple[str, ...]) -> None:
        self._decode, self._names = decode, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._decode(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# --------------------------------------------------------------------------------------------
# Reading one client's delta: validate before spending
# --------------------------------------------------------------------------------------------


def decode_file(path: Path, layout: Layout) -> Callable[[str], torch.Tensor]:
    """A lazy decoder of the tensors of a delta file whose header was checked (`layout`).

    Each part is read into a buffer of its own with an explicit read at its byte range, not
    through safetensors' memory map: a map keeps every page it touched resident (and counted
    in the pod's RSS) until it is closed, which while a file is decoded tensor by tensor is the
    whole file on top of the merge's own memory. Read this way, one part is held at a time.
    Whatever goes wrong while decoding is a DeltaFormatError, "undecodable delta: ...", the
    client's own rejection.
    """
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
    except (OSError, ValueError, struct.error) as e:
        raise DeltaFormatError(f"undecodable delta: {reason_of(e)}") from e
    body = 8 + size

    def part(key: str) -> torch.Tensor:
        info = header.get(key)
        if not isinstance(info, dict):
            raise DeltaFormatError(f"missing part {key!r}")
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(body + begin)
            if f.readinto(buffer) != len(buffer):
                raise DeltaFormatError(f"part {key!r} runs past the end of the file")
        dtype = precheck.TORCH_DTYPES[info["dtype"]]
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(info["shape"])

    def tensor(name: str) -> torch.Tensor:
        try:
            return decode_one(layout, name, part)
        except Exception as e:
            raise DeltaFormatError(f"undecodable delta: {reason_of(e)}") from e

    return tensor


def check_manifest(
    manifest: Mapping[str, Any], task: AggregateTask, client: str, limit: int
) -> tuple[int, int]:
    """The manifest's sample count and declared file size, or the reason it is refused.

    Every number is checked as the type it must be before any arithmetic: a JSON int may have
    309 digits, and `true` is an int to Python.
    """
    if (
        manifest.get("run") != task.run
        or manifest.get("round") != task.round
        or manifest.get("client") != client
    ):
        raise ValueError(
            f"replayed: the manifest names run {str(manifest.get('run'))[:40]!r} "
            f"round {str(manifest.get('round'))[:12]} client {str(manifest.get('client'))[:40]!r}"
        )
    samples = bounds.sample_count(manifest.get("samples"))
    loss = manifest.get("train_loss")
    if loss is not None and not (type(loss) in (int, float) and math.isfinite(loss)):
        raise ValueError(f"bad train loss {str(loss)[:40]!r}")
    raw = manifest.get("raw_bytes", 0)
    if type(raw) is not int or not 0 <= raw <= 1 << 50:
        raise ValueError(f"bad raw byte count {str(raw)[:40]!r}")
    return samples, declared_size(manifest, DELTA_FILE, limit)


def declared_size(manifest: Mapping[str, Any], name: str, limit: int) -> int:
    """The size the manifest declares for the encoded file `name`, checked against `limit`."""
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise st.IntegrityError(f"{name}: not listed in the manifest")
    size, digest = entry.get("bytes"), entry.get("sha256")
    if type(size) is not int or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise st.IntegrityError(f"{name}: bad size or checksum in the manifest")
    if size > limit:
        raise st.IntegrityError(
            f"{name}: oversized, declares {size} bytes where a delta of this "
            f"adapter is at most {limit}"
        )
    return size


_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch_client(
    store: st.Store,
    task: AggregateTask,
    client: str,
    workdir: Path,
    expected: precheck.ExpectedLayout,
) -> tuple[dict[str, Any], Path, Layout]:
    """The client's manifest, its delta file on local disk and the file's checked layout.

    In the order that spends least on a bad delta: the manifest (at most 1 MiB), its signature
    when the run pins the client's key (an unsigned or mis-signed commit goes no further), and its
    fields (the run, round and client it names: a signed manifest of another is a replay);
    the declared size against the largest delta of this adapter; the file's header alone (a
    ranged read) against the layout the adapter and the run's codec settings prescribe; only
    then the file, streamed and abandoned as soon as it passes its declared size; then size and
    SHA-256; then the header again from the verified bytes (authoritative). Raises with the
    reason.
    """
    prefix = client_prefix(task.round, client)
    key = task.client_keys.get(client)
    manifest = st.read_manifest(store, prefix, signing.verifier(key) if key else None)
    if manifest is None:
        raise LookupError("no committed delta (manifest.json missing)")
    _, size = check_manifest(manifest, task, client, expected.max_size())
    path, layout = fetch_file(store, prefix, manifest, DELTA_FILE, size, workdir / client, expected)
    return manifest, path, layout


def fetch_file(
    store: st.Store,
    prefix: str,
    manifest: Mapping[str, Any],
    name: str,
    size: int,
    workdir: Path,
    expected: precheck.ExpectedLayout,
) -> tuple[Path, Layout]:
    """One encoded file of a commit whose manifest declares it `size` bytes: header checked
    first (a ranged read), then streamed to `workdir`, verified and its header checked again."""
    key = st.join(prefix, name)
    head_size = 8 + expected.max_header()
    precheck.check_file_layout(store.get_range(key, 0, head_size), expected, size)
    path = workdir / name
    try:
        store.get_file(key, path, max_bytes=size)
    except st.ObjectNotFound as e:
        raise st.IntegrityError(f"{name}: listed in the manifest but missing") from e
    st.verify_entry(manifest, name, path.stat().st_size, st.sha256_file(path))
    with open(path, "rb") as f:
        layout = precheck.check_file_layout(f.read(head_size), expected, size)
    return path, layout


def fetch_control(
    store: st.Store,
    task: AggregateTask,
    client: str,
    manifest: Mapping[str, Any],
    workdir: Path,
    expected: precheck.ExpectedLayout,
) -> tuple[Path, Layout]:
    """SCAFFOLD's control change a client committed with its delta, checked like the delta
    (same layout, same size bound, then decoded and finite): its file and layout."""
    prefix = client_prefix(task.round, client)
    size = declared_size(manifest, CONTROL_FILE, expected.max_size())
    path, layout = fetch_file(
        store, prefix, manifest, CONTROL_FILE, size, workdir / client, expected
    )
    try:
        bounds.checked_norm(decode_file(path, layout), expected.shapes, None)
    except ValueError as e:
        raise ValueError(f"control change: {reason_of(e)}") from e
    return path, layout


def reason_of(error: BaseException) -> str:
    """A one-line reason of at most 200 characters (task.Rejection's bound)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]
