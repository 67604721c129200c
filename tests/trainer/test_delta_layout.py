"""Validate before spending: a delta file's layout against the adapter, sizes, bounded zstd.

The bound on a file's size and the check of its header come from the adapter shapes and the
run's DeltaSpec alone. These tests hold them to both sides: every legitimate file fits and
passes (whatever the shapes, settings and values), and each way of lying in a header is caught
with its own reason before a tensor is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as stg

from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec import precheck
from fedtune_trainer.codec.container import DeltaFormatError, position_bytes
from fedtune_trainer.codec.decoding import decode, decompress_bounded, read_layout
from fedtune_trainer.wire.delta_settings import DeltaSpec, QuantizationSpec
from tests.trainer.hostile_support import RawDelta, RawPart, zstd_bomb

FAST = settings(max_examples=60, deadline=None)


@stg.composite
def adapters(draw: stg.DrawFn) -> dict[str, tuple[int, ...]]:
    """1-5 LoRA-like tensors of random shapes."""
    out = {}
    for i in range(draw(stg.integers(1, 5))):
        rank = draw(stg.integers(1, 16))
        width = draw(stg.integers(1, 600))
        shape = (rank, width) if i % 2 == 0 else (width, rank)
        out[f"base_model.model.layers.{i}.proj.lora_{'AB'[i % 2]}.weight"] = shape
    return out


@stg.composite
def delta_specs(draw: stg.DrawFn) -> DeltaSpec:
    bits = draw(stg.sampled_from([0, 4, 8]))
    codebook = draw(stg.sampled_from(["uniform", "nf4", "fp4"])) if bits == 4 else "uniform"
    stochastic = bits > 0 and codebook == "uniform" and draw(stg.booleans())
    return DeltaSpec(
        dtype=draw(stg.sampled_from(["fp32", "bf16", "fp16"])),
        top_k=draw(stg.sampled_from([1.0, 0.5, 0.1, 0.01, 1 / 3])),
        quantization=QuantizationSpec(
            bits=bits,
            block_size=draw(stg.sampled_from([8, 64])),
            codebook=codebook,
            stochastic_rounding=stochastic,
        ),
        compression=draw(stg.sampled_from(["zstd", "none"])),
        error_feedback=draw(stg.booleans()),
    )


def values(shapes: dict[str, tuple[int, ...]], seed: int, kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if kind == "zeros":
            out[name] = torch.zeros(shape)
        elif kind == "wide":  # magnitudes over many decades: hard to compress
            out[name] = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-8, 8, shape)
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out


@FAST
@given(
    shapes=adapters(),
    spec=delta_specs(),
    seed=stg.integers(0, 2**31 - 1),
    kind=stg.sampled_from(["randn", "wide", "zeros"]),
)
def test_every_legitimate_delta_fits_the_bound_and_passes_the_layout_check(
    shapes: dict[str, tuple[int, ...]], spec: DeltaSpec, seed: int, kind: str
) -> None:
    blob = codec.encode(values(shapes, seed, kind), spec).blob
    expected = precheck.ExpectedLayout(shapes, spec)
    bound = precheck.max_encoded_size(shapes, spec)
    assert len(blob) <= bound
    (header,) = struct.unpack("<Q", blob[:8])
    assert header <= expected.max_header()
    layout = precheck.check_file_layout(blob, expected, len(blob))
    assert layout.shapes == shapes


@FAST
@given(shapes=adapters(), spec=delta_specs(), seed=stg.integers(0, 2**31 - 1))
def test_the_bound_is_tight(shapes: dict[str, tuple[int, ...]], spec: DeltaSpec, seed: int) -> None:
    """The bound is the uncompressed file, with the largest position coding the format allows,
    plus header slack: a file 10x a legitimate one (or even 10% larger, beyond a few hundred
    bytes) never fits."""
    plain = spec.model_copy(update={"compression": "none", "error_feedback": False})
    blob = codec.encode(values(shapes, seed, "randn"), plain).blob
    # The encoder picked the smallest coding; a file with the largest allowed (the v1 one, as a
    # client before Elias-Fano sends) is larger by the difference.
    tensors = read_layout(blob).tensors
    smaller_by = 0
    for name, entry in tensors.items():
        if "pos" in entry:
            n, k = math.prod(shapes[name]), entry["k"]
            largest_coding = precheck.ExpectedLayout(shapes, spec).positions(name)[0]
            smaller_by += position_bytes(largest_coding, n, k) - position_bytes(entry["pos"], n, k)
    largest = len(blob) + smaller_by
    bound = precheck.max_encoded_size(shapes, spec)
    assert largest <= bound
    # (8 bytes more per tensor than before Elias-Fano: a smaller part's count and offsets in the
    # header have fewer digits than the v1 coding's would.)
    assert bound - largest <= 128 + 24 * len(shapes)
    assert 10 * len(blob) > bound


SHAPES = {"m.q.lora_A.weight": (8, 256), "m.q.lora_B.weight": (256, 8)}
RUN = DeltaSpec()  # bf16 + zstd
FIRST = "m.q.lora_A.weight"


def legit() -> RawDelta:
    return RawDelta.parse(codec.encode(values(SHAPES, 1, "randn"), RUN).blob)


def _edit(change: Callable[[RawDelta], None]) -> bytes:
    raw = legit()
    change(raw)
    return raw.build()


def _set(path: list[str], value: object) -> Callable[[RawDelta], None]:
    def change(raw: RawDelta) -> None:
        target = raw.document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _rename(new: str) -> Callable[[RawDelta], None]:
    def change(raw: RawDelta) -> None:
        raw.document["tensors"][new] = raw.document["tensors"].pop(FIRST)

    return change


def _part(key: str, part: RawPart | None) -> Callable[[RawDelta], None]:
    def change(raw: RawDelta) -> None:
        if part is None:
            del raw.parts[key]
        else:
            raw.parts[key] = part

    return change


def _retype_first(raw: RawDelta) -> None:
    data = raw.parts["0.v"].data
    raw.tensor(FIRST)["z"] = ""
    raw.parts["0.v"] = RawPart("F32", [len(data) // 4], data)


def _duplicate_key(raw: RawDelta) -> None:
    pass  # handled in the test: the JSON text gets a key twice


def _overlap(raw: RawDelta) -> None:
    pass  # handled in the test: offsets rewritten


HEADER_CASES: list[tuple[str, Callable[[RawDelta], None], str]] = [
    ("path-like name", _rename("../../x"), r"path-like or malformed tensor name '\.\./\.\./x'"),
    ("absolute name", _rename("/etc/passwd"), "path-like"),
    ("backslash name", _rename("a\\b"), "path-like"),
    ("unknown name", _rename("m.k.lora_A.weight"), "unknown tensors: m.k.lora_A.weight"),
    ("missing tensor", lambda r: r.document["tensors"].pop(FIRST), f"missing tensors: {FIRST}"),
    ("other dtype", _set(["encoding", "dtype"], "fp16"), r"encoding .*fp16.* is not the run's"),
    ("other top-k", _set(["encoding", "top_k"], 0.5), "is not the run's"),
    ("extra encoding key", _set(["encoding", "x"], 1), "is not the run's"),
    ("bool shape", _set(["tensors", FIRST, "shape"], [True, 256]), "bad shape"),
    ("giant shape", _set(["tensors", FIRST, "shape"], [16384, 16384]), r"\(16384, 16384\)"),
    ("wrong index", _set(["tensors", FIRST, "i"], 1), "is not the run's"),
    ("k where none", _set(["tensors", FIRST, "k"], 5), "is not the run's"),
    ("bad z", _set(["tensors", FIRST, "z"], "vv"), "bad compressed-parts list"),
    ("unreferenced part", _part("7.s", RawPart("U8", [4], b"abcd")), "unreferenced parts: 7.s"),
    ("path-like part key", _part("../0.v", RawPart("U8", [4], b"abcd")), "unreferenced parts"),
    ("missing part", _part("1.v", None), "missing parts: 1.v"),
    ("retyped part", _retype_first, r"stored as F32 \[\d+\], expected BF16 \[2048\]"),
    ("unknown metadata key", _set(["extra"], 1), "unknown metadata keys"),
]


@pytest.mark.parametrize(
    ("change", "reason"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_each_lie_in_a_header_is_caught_before_any_tensor_is_read(
    change: Callable[[RawDelta], None], reason: str
) -> None:
    blob = _edit(change)
    expected = precheck.ExpectedLayout(SHAPES, RUN)
    (size,) = struct.unpack("<Q", blob[:8])
    head = blob[: 8 + size]  # only the header is handed over: nothing past it could be read
    with pytest.raises(DeltaFormatError, match=reason):
        precheck.check_file_layout(head, expected, len(blob))


SPARSE = DeltaSpec(top_k=0.1, quantization=QuantizationSpec(bits=4, codebook="nf4"))
"""k 205 of 2048 per tensor: Elias-Fano (l 3, 77 + 58 bytes) is smaller than the bitmap (256)."""


def _sparse_file(first_pos: str, part: RawPart | None = None, z: str = "") -> bytes:
    """A legit SPARSE file, its first tensor's coding and positions part replaced."""
    raw = RawDelta.parse(codec.encode(values(SHAPES, 1, "randn"), SPARSE).blob)
    assert raw.tensor(FIRST)["pos"] == "e"
    raw.tensor(FIRST)["pos"] = first_pos
    raw.tensor(FIRST)["z"] = raw.tensor(FIRST).get("z", "").replace("e", "") + z
    if part is not None:
        del raw.parts[raw.key(FIRST, "e")]
        raw.parts[raw.key(FIRST, first_pos)] = part
    return raw.build()


SPARSE_CASES: list[tuple[str, bytes, str]] = [
    ("unknown coding", _sparse_file("q"), r"position coding 'q' is not one of m, e"),
    ("int32 gaps where a bitmap is smaller", _sparse_file("x", RawPart("I32", [205], bytes(820))),
     r"position coding 'x' is not one of m, e"),
    ("coding in a dense run", b"", "is not the run's"),
    ("truncated part", _sparse_file("e", RawPart("U8", [134], bytes(134))),
     r"lora_A.weight.e: stored as U8 \[134\], expected U8 \[135\]"),
    ("oversized part", _sparse_file("e", RawPart("U8", [136], bytes(136))),
     r"lora_A.weight.e: stored as U8 \[136\], expected U8 \[135\]"),
    ("frame no smaller than the part", _sparse_file("e", RawPart("U8", [135], bytes(135)), "e"),
     r"lora_A.weight.e: stored as U8 \[135\], expected a U8 zstd frame under 135 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("blob", "reason"), [c[1:] for c in SPARSE_CASES], ids=[c[0] for c in SPARSE_CASES]
)
def test_position_codings_are_checked_on_the_header(blob: bytes, reason: str) -> None:
    """A file may pick any coding the format allows for its k of n, never a larger one, and
    each coding's part must be exactly its size (Elias-Fano's fixed by n and k alone)."""
    spec = RUN if not blob else SPARSE
    if not blob:  # a dense run's file that claims positions
        blob = _edit(_set(["tensors", FIRST, "pos"], "e"))
    expected = precheck.ExpectedLayout(SHAPES, spec)
    (size,) = struct.unpack("<Q", blob[:8])
    with pytest.raises(DeltaFormatError, match=reason):
        precheck.check_file_layout(blob[: 8 + size], expected, len(blob))


def test_a_legit_sparse_file_may_use_either_coding() -> None:
    """Elias-Fano or the bitmap (what a client before Elias-Fano sends): both pass."""
    expected = precheck.ExpectedLayout(SHAPES, SPARSE)
    blob = codec.encode(values(SHAPES, 1, "randn"), SPARSE).blob
    assert precheck.check_file_layout(blob, expected, len(blob)).tensors[FIRST]["pos"] == "e"
    raw = RawDelta.parse(blob)
    for name in SHAPES:
        indices = torch.nonzero(decode(blob)[name].reshape(-1)).view(-1)
        del raw.parts[raw.key(name, "e")]
        mask = codec.pack_mask(indices, 2048)
        raw.parts[raw.key(name, "m")] = RawPart("U8", [256], mask.numpy().tobytes())
        raw.tensor(name).update(pos="m", z=raw.tensor(name).get("z", "").replace("e", ""))
    legacy = raw.build()
    assert len(legacy) <= expected.max_size()
    precheck.check_file_layout(legacy, expected, len(legacy))
    decoded, legacy_decoded = decode(blob), decode(legacy)
    assert all(torch.equal(decoded[name], legacy_decoded[name]) for name in SHAPES)


def test_duplicate_keys_and_overlapping_parts_are_refused() -> None:
    expected = precheck.ExpectedLayout(SHAPES, RUN)
    blob = legit().build()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    body_size = len(blob) - 8 - size
    # A key twice: Python and the Rust reader could disagree about which one counts.
    text = json.dumps(header, separators=(",", ":"))
    doubled = text[:-1] + ',"0.v":' + json.dumps(header["0.v"]) + "}"
    with pytest.raises(DeltaFormatError, match=r"duplicate key '0\.v'"):
        precheck.check_header(doubled.encode(), expected, body_size)
    # Two parts over the same bytes.
    first, second = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )[:2]
    header[second]["data_offsets"] = [
        header[first]["data_offsets"][0],
        header[first]["data_offsets"][0]
        + header[second]["data_offsets"][1]
        - header[second]["data_offsets"][0],
    ]
    with pytest.raises(DeltaFormatError, match="do not tile"):
        precheck.check_header(json.dumps(header).encode(), expected, body_size)


@pytest.mark.parametrize(
    ("header_bytes", "file_size", "reason"),
    [
        (b"\x01\x02", 100, "truncated: no header"),
        (struct.pack("<Q", 1 << 40), 1 << 41, r"header of 1099511627776 bytes, above the \d+"),
        (struct.pack("<Q", 512), 100, "header runs past the end of the file"),
    ],
)
def test_a_header_length_is_checked_before_the_header_is_read(
    header_bytes: bytes, file_size: int, reason: str
) -> None:
    with pytest.raises(DeltaFormatError, match=reason):
        precheck.header_size(header_bytes, precheck.ExpectedLayout(SHAPES, RUN), file_size)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # declares 1 GiB, needs a 2 MiB window: refused before a byte is produced
        (zstd_bomb(1 << 30), "zstd: .*(window|memory)"),
        # declares 1 GiB in a window the part allows: cut off after size + 1 bytes
        (zstd_bomb(1 << 30, window_log=12), "inflates past the 4096 bytes"),
        # one byte short, and trailing garbage after a good frame
        (zstd_bomb(4095, window_log=12), "holds 4095 bytes, expected 4096"),
        (zstd_bomb(4096, window_log=12) + b"junk", "zstd"),
    ],
    ids=["large-window", "small-window", "short", "trailing-garbage"],
)
def test_decompression_is_bounded_by_the_parts_size(frame: bytes, reason: str) -> None:
    with pytest.raises(DeltaFormatError, match=reason):
        decompress_bounded(frame, 4096, "t.v")
    assert decompress_bounded(zstd_bomb(4096, window_log=12), 4096, "t.v") == bytes(4096)


def test_a_legit_part_decompresses_within_its_window() -> None:
    """The window cap (next power of two of the part) never refuses what the encoder wrote."""
    import zstandard

    for size in (1, 100, 4096, 5000, 1 << 20, (1 << 20) + 3):
        raw = bytes(range(256)) * math.ceil(size / 256)
        frame = zstandard.ZstdCompressor(level=19).compress(raw[:size])
        assert decompress_bounded(frame, size, "t.v") == raw[:size]
