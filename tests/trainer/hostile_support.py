"""Crafting hostile delta files: real safetensors bytes, edited below the codec's level.

A hostile client does not use our encoder, so these helpers take a legitimate file apart into
its header document and raw parts, let a test change any of it, and put it back together as
safetensors would (8-byte length, JSON header padded with spaces, parts back to back).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import (
    DELTA_FILE,
    METADATA_KEY,
    ef_low_bits,
    ef_sizes,
    to_bytes,
)
from fedtune_trainer.codec.decoding import unpack_bits
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import client_prefix


@dataclass
class RawPart:
    dtype: str
    shape: list[int]
    data: bytes


@dataclass
class RawDelta:
    """A delta file as its bytes say: the fedtune document and the stored parts."""

    document: dict[str, Any]
    parts: dict[str, RawPart] = field(default_factory=dict)

    @classmethod
    def parse(cls, blob: bytes) -> RawDelta:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + size])
        document = json.loads(header.pop("__metadata__")[METADATA_KEY])
        body = blob[8 + size :]
        parts = {
            key: RawPart(
                info["dtype"],
                info["shape"],
                body[info["data_offsets"][0] : info["data_offsets"][1]],
            )
            for key, info in header.items()
        }
        return cls(document, parts)

    def tensor(self, name: str) -> dict[str, Any]:
        return self.document["tensors"][name]

    def key(self, name: str, part: str) -> str:
        return f"{self.tensor(name)['i']}.{part}"

    def build(self) -> bytes:
        header: dict[str, Any] = {
            "__metadata__": {METADATA_KEY: json.dumps(self.document, separators=(",", ":"))}
        }
        offset = 0
        for key, part in self.parts.items():
            header[key] = {
                "dtype": part.dtype,
                "shape": part.shape,
                "data_offsets": [offset, offset + len(part.data)],
            }
            offset += len(part.data)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + b"".join(p.data for p in self.parts.values())


def delta_manifest(
    blob_size: int, sha256: str, round_: int, client: str, **overrides: Any
) -> dict[str, Any]:
    """What a client's manifest says of its delta (the fields `codec.manifest_fields` writes)."""
    meta: dict[str, Any] = {
        "kind": "delta",
        "run": "t",
        "round": round_,
        "client": client,
        "samples": 10,
        "steps": 1,
        "train_loss": 1.0,
        "raw_bytes": 0,
        "encoded_bytes": blob_size,
        "sha256": sha256,
    }
    meta.update(overrides)
    return meta


def commit_blob(
    store: st.Store,
    round_: int,
    client: str,
    blob: bytes | Path,
    manifest: Mapping[str, Any] | None = None,
) -> None:
    """Commit `blob` as the client's delta with a self-consistent manifest (size, SHA-256),
    its fields overridden by `manifest`."""
    if isinstance(blob, Path):
        size, digest = blob.stat().st_size, st.sha256_file(blob)
    else:
        size, digest = len(blob), hashlib.sha256(blob).hexdigest()
    meta = {**delta_manifest(size, digest, round_, client), **(manifest or {})}
    st.commit(store, client_prefix(round_, client), {DELTA_FILE: blob}, meta)


def zstd_bomb(content_bytes: int, window_log: int | None = None) -> bytes:
    """A zstd frame of `content_bytes` zeros (declared in its header): a few KB on the wire.

    With window_log set, the frame needs only that window to decode, so only a bound on the
    output (not on the window) stops it.
    """
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=window_log or 0, write_content_size=True
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    chunk = bytes(1 << 20)
    out = compressor.compressobj(size=content_bytes)
    frame = bytearray()
    left = content_bytes
    while left:
        frame += out.compress(chunk[: min(left, len(chunk))])
        left -= min(left, len(chunk))
    frame += out.flush()
    return bytes(frame)


def oversized_file(path: Path, base: bytes, extra_bytes: int) -> Path:
    """A self-consistent safetensors file: `base`'s parts plus one unreferenced part of
    `extra_bytes` zeros, streamed to disk (never held in memory)."""
    raw = RawDelta.parse(base)
    raw.parts["99.v"] = RawPart("U8", [extra_bytes], b"")
    header: dict[str, Any] = {
        "__metadata__": {METADATA_KEY: json.dumps(raw.document, separators=(",", ":"))}
    }
    offset = 0
    for key, part in raw.parts.items():
        size = extra_bytes if key == "99.v" else len(part.data)
        header[key] = {
            "dtype": part.dtype,
            "shape": part.shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, part in raw.parts.items():
            if key != "99.v":
                f.write(part.data)
        zeros = bytes(1 << 20)
        left = extra_bytes
        while left:
            f.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
    return path


# --------------------------------------------------------------------------------------------
# Elias-Fano positions, edited bit by bit
# --------------------------------------------------------------------------------------------

HighBitsEdit = Callable[[torch.Tensor, int], None]
"""Edits, in place, the unary high half of an Elias-Fano part: its bits (padding included) and
how many of them the coding uses."""


def edit_elias_fano(data: bytes, n: int, k: int, edit: HighBitsEdit) -> bytes:
    """An Elias-Fano part of k of n positions with its high half edited by `edit`."""
    low_bytes, _ = ef_sizes(n, k)
    part = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bits = unpack_bits(part[low_bytes:]).clone()
    edit(bits, k + ((n - 1) >> ef_low_bits(n, k)) + 1)
    return to_bytes(torch.cat([part[:low_bytes], codec.pack_bits(bits)]))


def ef_extra_index(bits: torch.Tensor, used: int) -> None:
    """One set bit more within the coding: k + 1 indices."""
    bits[int(torch.nonzero(bits[:used] == 0)[0])] = 1


def ef_no_indices(bits: torch.Tensor, used: int) -> None:
    bits[:] = 0


def ef_padding_bit(bits: torch.Tensor, used: int) -> None:
    bits[-1] = 1


def ef_past_the_tensor(bits: torch.Tensor, used: int) -> None:
    """The last index's unary code moved to the coding's last bit: its high part one past the
    largest that n allows, so the index is n or more."""
    bits[int(torch.nonzero(bits).max())] = 0
    bits[used - 1] = 1


def ef_repeated_index(bits: torch.Tensor, used: int) -> None:
    """Every high part 0: the indices are the low parts alone, out of order and repeated."""
    k = int(bits.sum())
    bits[:] = 0
    bits[:k] = 1
