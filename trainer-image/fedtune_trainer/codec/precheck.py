"""Validation before spending: a delta file's layout checked against the adapter the aggregator
expects, before anything beyond the manifest is downloaded, decompressed or decoded.

From the adapter's shapes and the run's codec settings alone (`ExpectedLayout`) follow the most
bytes a legitimate delta can have (`max_encoded_size`) and what its header must say, part by part
(`check_header`). A file that lies in its header (a giant declared tensor, an unreferenced part,
a path-like name) is refused on its header; the body is read only after that.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from fedtune_trainer.codec.container import (
    FORMAT,
    METADATA_KEY,
    DeltaFormatError,
    kept_count,
    position_coding,
    position_codings,
)
from fedtune_trainer.codec.decoding import Layout, part_spec
from fedtune_trainer.codec.encoding import run_encoding
from fedtune_trainer.wire.delta_settings import DeltaSpec

PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*")
"""A tensor name as PEFT writes them: words joined by dots (no '/', '\\', '..', leading dot)."""
NAME_MAX = 512
_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
}
TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}
"""safetensors' dtype names -> torch's, for the parts a checked header may name."""
_HEADER_SLACK = 64
"""Bytes of slack in the header bound, for what the bound does not model exactly (none known)."""


@dataclass(frozen=True)
class PartPlan:
    """One stored part as a file made with the run's settings must hold it."""

    key: str
    name: str
    part: str
    dtype: torch.dtype
    count: int

    @property
    def nbytes(self) -> int:
        """Its size stored raw; stored as a zstd frame it must be smaller (the encoder keeps a
        frame only when it shrinks the part)."""
        return self.count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ExpectedLayout:
    """What a delta of the adapter `shapes` encoded with the run's DeltaSpec must look like.

    Derived from the global adapter and the run's settings alone, never from the file, so that
    every size a reader allocates or downloads is bounded before it reads the file.
    """

    shapes: Mapping[str, tuple[int, ...]]
    spec: DeltaSpec

    @property
    def encoding(self) -> dict[str, Any]:
        return run_encoding(self.spec)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(sorted(self.shapes))}

    def entry(self, name: str) -> dict[str, Any]:
        """The layout entry of tensor `name` (without "z", which the file chooses), with the
        largest position coding it may use (the file may choose a smaller one: `positions`)."""
        shape = self.shapes[name]
        n = math.prod(shape)
        entry: dict[str, Any] = {"i": self._index[name], "shape": list(shape)}
        if self.spec.top_k < 1.0:
            k = kept_count(n, self.spec.top_k)
            entry["k"] = k
            entry["pos"] = position_coding(n, k)
        return entry

    def positions(self, name: str) -> tuple[str, ...]:
        """The position codings tensor `name` may use; none when it is sent dense."""
        if self.spec.top_k == 1.0:
            return ()
        n = math.prod(self.shapes[name])
        return position_codings(n, kept_count(n, self.spec.top_k))

    def _plans(self, name: str, position: str) -> list[PartPlan]:
        entry = self.entry(name)
        n = math.prod(self.shapes[name])
        k = int(entry.get("k", n))
        scales = ["s"] if self.spec.quantization.bits else []
        plans = []
        for part in filter(None, ["v", *scales, position]):
            dtype, shape = part_spec(part, n, k, self.encoding)
            key = f"{entry['i']}.{part}"
            plans.append(PartPlan(key, name, part, dtype, shape[0]))
        return plans

    @cached_property
    def _parts(self) -> dict[str, PartPlan]:
        return {
            plan.key: plan
            for name in sorted(self.shapes)
            for plan in self._plans(name, self.entry(name).get("pos", ""))
        }

    def parts(self, positions: Mapping[str, str] | None = None) -> dict[str, PartPlan]:
        """Every stored part, by key: with the largest position codings (what bounds a file),
        or with those a checked layout chose (`positions`: tensor name -> coding)."""
        if positions is None:
            return dict(self._parts)
        return {
            plan.key: plan
            for name in sorted(self.shapes)
            for plan in self._plans(name, positions.get(name, ""))
        }

    def max_body(self) -> int:
        return sum(p.nbytes for p in self.parts().values())

    def max_header(self) -> int:
        """An upper bound of the safetensors header (length prefix excluded) of such a file.

        Built as the encoder writes it, with every part's longest possible entry: the longest
        dtype name it may have, the largest count and offsets, every part compressed (the
        longest "z") and error_feedback false (the longer literal).
        """
        return self._max_header

    @cached_property
    def _max_header(self) -> int:
        tensors = {
            name: {**self.entry(name), **({"z": "vsmx"} if self.spec.compression == "zstd" else {})}
            for name in sorted(self.shapes)
        }
        encoding = {**self.encoding, "error_feedback": False}
        document = {"format": FORMAT, "encoding": encoding, "tensors": tensors}
        compact = {"separators": (",", ":")}
        metadata = json.dumps(document, **compact)
        top = int("9" * len(str(self.max_body())))  # as many digits as any offset can have
        header: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata}}
        for plan in self.parts().values():
            header[plan.key] = {
                "dtype": "BF16",  # the longest dtype name
                "shape": [max(plan.count, plan.nbytes)],
                "data_offsets": [top, top],
            }
        size = len(json.dumps(header, **compact))
        return size + 7 + _HEADER_SLACK  # safetensors pads the header to 8 bytes with spaces

    def max_size(self) -> int:
        """The largest file a legitimate delta of this adapter and these settings can be."""
        return 8 + self.max_header() + self.max_body()


def max_encoded_size(shapes: Mapping[str, tuple[int, ...]], spec: DeltaSpec) -> int:
    """The largest delta file a client of this adapter, with the run's settings, can send.

    Every part has a size fixed by the tensor's shape and the settings (zstd only ever makes a
    part smaller), so the bound is the uncompressed file plus the longest header: within a few
    dozen bytes of what an incompressible delta really takes.
    """
    return ExpectedLayout(shapes, spec).max_size()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DeltaFormatError(f"duplicate key {key[:60]!r} in the header")
        out[key] = value
    return out


def header_size(prefix: bytes, expected: ExpectedLayout, file_size: int) -> int:
    """The header length from a file's first 8 bytes, checked against what the adapter allows."""
    if len(prefix) < 8:
        raise DeltaFormatError("truncated: no header")
    (size,) = struct.unpack("<Q", prefix[:8])
    limit = expected.max_header()
    if size > limit:
        raise DeltaFormatError(f"header of {size} bytes, above the {limit} this adapter can need")
    if 8 + size > file_size:
        raise DeltaFormatError("truncated: the header runs past the end of the file")
    return size


def _plain(name: object) -> str:
    if not isinstance(name, str) or len(name) > NAME_MAX or not PLAIN_NAME.fullmatch(name):
        raise DeltaFormatError(f"path-like or malformed tensor name {str(name)[:80]!r}")
    return name


def _int_list(value: object) -> list[int] | None:
    if isinstance(value, list) and all(type(v) is int for v in value):
        return value
    return None


def check_header(header: bytes, expected: ExpectedLayout, body_size: int) -> Layout:
    """The layout of a delta file whose header is `header`, checked against `expected`.

    Touches no tensor data: names (plain, exactly the expected ones), shapes, the encoding (the
    run's), k and position coding, which parts are stored and how (dtype, shape, byte ranges that
    tile the body exactly), so that decoding afterwards reads only what the adapter needs and
    no part of the file goes unreferenced. Raises DeltaFormatError with the first reason found.
    """
    try:
        doc = json.loads(header, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaFormatError(f"corrupt header: {e}") from e
    if not isinstance(doc, dict):
        raise DeltaFormatError("corrupt header: not an object")
    metadata = doc.pop("__metadata__", None)
    if not isinstance(metadata, dict) or set(metadata) != {METADATA_KEY}:
        raise DeltaFormatError(f"not a {FORMAT} file (metadata)")
    try:
        document = json.loads(metadata[METADATA_KEY], object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, TypeError) as e:
        raise DeltaFormatError(f"bad metadata: {e}") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise DeltaFormatError(f"not a {FORMAT} file")
    if set(document) != {"format", "encoding", "tensors"}:
        raise DeltaFormatError(f"unknown metadata keys: {sorted(document)[:4]}")
    encoding, tensors = document["encoding"], document["tensors"]
    if not isinstance(encoding, dict) or not isinstance(tensors, dict):
        raise DeltaFormatError("bad encoding metadata")
    for name in tensors:
        _plain(name)
    missing = sorted(set(expected.shapes) - set(tensors))
    extra = sorted(set(tensors) - set(expected.shapes))
    if extra:
        raise DeltaFormatError(
            f"unknown tensors: {', '.join(extra[:2])}" + (" ..." * (len(extra) > 2))
        )
    if missing:
        raise DeltaFormatError(
            f"missing tensors: {', '.join(missing[:2])}" + (" ..." * (len(missing) > 2))
        )
    feedback = encoding.get("error_feedback")
    declared = {k: v for k, v in encoding.items() if k != "error_feedback"}
    if declared != expected.encoding or not isinstance(feedback, bool):
        raise DeltaFormatError(f"encoding {json.dumps(declared)[:120]} is not the run's")
    zstd = expected.spec.compression == "zstd"
    for name in sorted(expected.shapes):
        entry, want = tensors[name], expected.entry(name)
        if not isinstance(entry, dict):
            raise DeltaFormatError(f"{name}: bad layout entry")
        shape = _int_list(entry.get("shape"))
        if shape is None:
            raise DeltaFormatError(f"{name}: bad shape {str(entry.get('shape'))[:60]}")
        if shape != want["shape"]:
            raise DeltaFormatError(f"shape of {name}: {tuple(shape)} != {tuple(want['shape'])}")
        z = entry.get("z", "")
        if not isinstance(z, str) or (z and not zstd) or len(set(z)) != len(z):
            raise DeltaFormatError(f"{name}: bad compressed-parts list {str(z)[:20]!r}")
        position, allowed = entry.get("pos"), expected.positions(name)
        if allowed and position not in allowed:
            raise DeltaFormatError(
                f"{name}: position coding {str(position)[:8]!r} is not one of {', '.join(allowed)}"
            )
        chosen = {"pos": position} if allowed else {}
        if {k: v for k, v in entry.items() if k != "z"} != {**want, **chosen}:
            raise DeltaFormatError(f"{name}: layout {json.dumps(entry)[:120]} is not the run's")
    parts = expected.parts({name: tensors[name].get("pos", "") for name in expected.shapes})
    stored = set(doc)
    if unreferenced := sorted(stored - set(parts)):
        raise DeltaFormatError(
            f"unreferenced parts: {', '.join(str(k)[:40] for k in unreferenced[:3])}"
        )
    if absent := sorted(set(parts) - stored):
        raise DeltaFormatError(f"missing parts: {', '.join(absent[:3])}")
    ranges = []
    for key, plan in parts.items():
        info = doc[key]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise DeltaFormatError(f"{key}: bad part entry")
        offsets = _int_list(info["data_offsets"])
        shape = _int_list(info["shape"])
        if offsets is None or len(offsets) != 2 or shape is None:
            raise DeltaFormatError(f"{key}: bad part entry")
        begin, end = offsets
        if plan.part in tensors[plan.name].get("z", ""):
            ok = info["dtype"] == "U8" and len(shape) == 1 and 0 < shape[0] < plan.nbytes
            length = shape[0] if ok else -1
            wanted = f"a U8 zstd frame under {plan.nbytes} bytes"
        else:
            dtype = _ST_DTYPES[plan.dtype]
            ok = info["dtype"] == dtype and shape == [plan.count]
            length = plan.nbytes
            wanted = f"{dtype} [{plan.count}]"
        if not ok:
            raise DeltaFormatError(
                f"{plan.name}.{plan.part}: stored as {str(info['dtype'])[:8]} {str(shape)[:40]}, "
                f"expected {wanted}"
            )
        if end - begin != length:
            raise DeltaFormatError(f"{key}: byte range {begin}-{end} is not its {length} bytes")
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise DeltaFormatError(f"parts do not tile the file (gap or overlap at byte {begin})")
        position = end
    if position != body_size:
        raise DeltaFormatError(f"parts hold {position} bytes of a {body_size}-byte body")
    return Layout(encoding=encoding, tensors=tensors)


def check_file_layout(blob_head: bytes, expected: ExpectedLayout, file_size: int) -> Layout:
    """check_header on the first bytes of a file (at least 8 + its header) of `file_size`."""
    size = header_size(blob_head, expected, file_size)
    if len(blob_head) < 8 + size:
        raise DeltaFormatError("truncated header")
    return check_header(blob_head[8 : 8 + size], expected, file_size - 8 - size)
