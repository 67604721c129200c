"""The delta codec: round trips, exactness, stated error bounds, error feedback, bad input."""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as stg

from fedtune_trainer.codec import encoding as codec
from fedtune_trainer.codec.container import (
    CAST,
    CODEBOOKS,
    FORMAT,
    FP4,
    NF4,
    DeltaFormatError,
    ef_sizes,
    kept_count,
    position_bytes,
    qmax,
)
from fedtune_trainer.codec.decoding import (
    decode,
    dequantize,
    elias_fano_indices,
    layout_from_metadata,
    read_layout,
    unpack_mask,
)
from fedtune_trainer.wire.delta_settings import DeltaSpec, QuantizationSpec
from tests.trainer.hostile_support import (
    HighBitsEdit,
    RawDelta,
    RawPart,
    edit_elias_fano,
    ef_extra_index,
    ef_no_indices,
    ef_padding_bit,
    ef_past_the_tensor,
    ef_repeated_index,
)

FAST = settings(max_examples=60, deadline=None)

INPUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@stg.composite
def deltas(draw: stg.DrawFn) -> dict[str, torch.Tensor]:
    """1-4 tensors of random shapes, magnitudes and dtypes (values made from a drawn seed)."""
    seed = draw(stg.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(draw(stg.integers(1, 4))):
        shape = draw(stg.lists(stg.integers(1, 40), min_size=1, max_size=3))
        scale = 10.0 ** draw(stg.integers(-6, 2))
        dtype = draw(stg.sampled_from(INPUT_DTYPES))
        out[f"layers.{i}.lora_{'AB'[i % 2]}.weight"] = (
            torch.randn(shape, generator=gen) * scale
        ).to(dtype)
    return out


def spec(**kw: object) -> DeltaSpec:
    quantization = QuantizationSpec(
        bits=kw.pop("bits", 0),
        block_size=kw.pop("block", 64),
        codebook=kw.pop("codebook", "uniform"),
        stochastic_rounding=kw.pop("stochastic_rounding", False),
    )
    return DeltaSpec(quantization=quantization, **kw)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: the absmax of the quantization block it falls in (the test's own account)."""
    flat = x.reshape(-1).double().abs()
    n = flat.numel()
    padded = torch.zeros(math.ceil(n / block) * block, dtype=torch.float64)
    padded[:n] = flat
    return padded.view(-1, block).amax(dim=1).repeat_interleave(block)[:n]


def assert_decode_is_sent(enc: codec.Encoded) -> dict[str, torch.Tensor]:
    out = decode(enc.blob)
    assert out.keys() == enc.sent.keys()
    for name in out:
        assert torch.equal(out[name], enc.sent[name]), name
    return out


# ------------------------------------------------------------------------------------------
# Exactness and bounds
# ------------------------------------------------------------------------------------------


@FAST
@given(d=deltas(), compression=stg.sampled_from(["zstd", "none"]))
def test_lossless_round_trip_is_bit_exact(d: dict[str, torch.Tensor], compression: str) -> None:
    enc = codec.encode(d, spec(dtype="fp32", top_k=1.0, compression=compression))
    out = assert_decode_is_sent(enc)
    for name, x in d.items():
        assert out[name].dtype == torch.float32
        assert out[name].shape == x.shape
        assert torch.equal(out[name], x.float()), name
    assert enc.residual is None
    assert enc.raw_bytes == sum(4 * x.numel() for x in d.values())


@FAST
@given(d=deltas())
def test_bf16_error_is_within_half_an_ulp(d: dict[str, torch.Tensor]) -> None:
    out = assert_decode_is_sent(codec.encode(d, spec(dtype="bf16", error_feedback=False)))
    for name, x in d.items():
        x = x.double()
        assert bool(((out[name].double() - x).abs() <= 2**-8 * x.abs() + 2**-133).all()), name


@FAST
@given(d=deltas())
def test_fp16_error_is_within_half_an_ulp(d: dict[str, torch.Tensor]) -> None:
    out = assert_decode_is_sent(codec.encode(d, spec(dtype="fp16", error_feedback=False)))
    for name, x in d.items():
        x = x.double()
        assert bool(((out[name].double() - x).abs() <= 2**-11 * x.abs() + 2**-25).all()), name


@FAST
@given(
    d=deltas(),
    bits=stg.sampled_from([8, 4]),
    block=stg.sampled_from([8, 16, 64, 100]),
    dtype=stg.sampled_from(["fp32", "bf16"]),
)
def test_quantization_error_is_within_half_a_step(
    d: dict[str, torch.Tensor], bits: int, block: int, dtype: str
) -> None:
    enc = codec.encode(d, spec(dtype=dtype, bits=bits, block=block, error_feedback=False))
    out = assert_decode_is_sent(enc)
    qmax = 2 ** (bits - 1) - 1
    cast = 2**-8 if dtype == "bf16" else 0.0
    for name, x in d.items():
        x = x.double().reshape(-1)
        step = block_absmax(x, block) * (1 + cast) / qmax
        # fp32 arithmetic (scale, division, product) adds a few ulps of |x| on top.
        bound = step / 2 + (cast + 2**-20) * x.abs() + 1e-30
        err = (out[name].double().reshape(-1) - x).abs()
        assert bool((err <= bound).all()), (name, float((err - bound).max()))


def test_nf4_is_qloras_table_of_normal_quantiles() -> None:
    """NF4 as QLoRA derives it: 8 positive and 7 negative quantiles of N(0, 1) between offset
    0.9677 and 1/2, and zero, divided by the largest (bitsandbytes' create_normal_map)."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    table = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    table /= table.max()
    assert torch.allclose(table, torch.tensor(NF4, dtype=torch.float64), atol=1e-6)


def test_fp4_is_e2m1_by_its_bits() -> None:
    """Code = sign bit, 2 exponent bits, 1 mantissa bit (bias 1, subnormal at exponent 0)."""
    for code in range(16):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2 ** (exponent - 1)
        assert FP4[code] * 6 == (-1) ** sign * magnitude


CODEBOOK_HALF_GAP = {"nf4": 0.1519, "fp4": 1 / 6}
"""The stated bound of each codebook: half its widest gap, as a fraction of the block's absmax
(nf4: between -1 and -0.696; fp4: between 4 and 6, of 6)."""


@pytest.mark.parametrize("codebook", list(CODEBOOKS))
def test_codebook_half_gap_is_the_stated_bound(codebook: str) -> None:
    values = sorted(CODEBOOKS[codebook])
    widest = max(b - a for a, b in itertools.pairwise(values))
    assert widest / 2 == pytest.approx(CODEBOOK_HALF_GAP[codebook], abs=1e-4)


@FAST
@given(
    d=deltas(),
    codebook=stg.sampled_from(list(CODEBOOKS)),
    block=stg.sampled_from([8, 64, 100]),
    dtype=stg.sampled_from(["fp32", "bf16"]),
)
def test_codebook_quantization_sends_the_nearest_level(
    d: dict[str, torch.Tensor], codebook: str, block: int, dtype: str
) -> None:
    """Each value (after the cast) decodes to the codebook level, times its block's absmax,
    nearest to it; so its error is at most half the widest gap times the absmax, on top of the
    cast's."""
    s = spec(dtype=dtype, bits=4, block=block, codebook=codebook, error_feedback=False)
    enc = codec.encode(d, s)
    out = assert_decode_is_sent(enc)
    assert read_layout(enc.blob).encoding["codebook"] == codebook
    levels = torch.tensor(CODEBOOKS[codebook], dtype=torch.float64)
    cast = 2**-8 if dtype == "bf16" else 0.0
    for name, x in d.items():
        quantized = x.float().to(CAST[dtype]).double().reshape(-1)  # what the quantizer is given
        absmax = block_absmax(quantized, block)
        got = out[name].double().reshape(-1)
        nearest = (quantized[:, None] - absmax[:, None] * levels).abs().min(dim=1).values
        fp32 = 2**-20 * absmax + 1e-30  # fp32 arithmetic: x / absmax, then level * absmax
        err = (got - quantized).abs()
        assert bool((err <= nearest + fp32).all()), (name, float((err - nearest - fp32).max()))
        x = x.double().reshape(-1)
        bound = CODEBOOK_HALF_GAP[codebook] * absmax + cast * x.abs() + fp32
        excess = float(((got - x).abs() - bound).max())
        assert excess <= 0, (name, excess)


@FAST
@given(d=deltas(), bits=stg.sampled_from([8, 4]), block=stg.sampled_from([8, 64, 100]))
def test_stochastic_rounding_error_is_within_one_step(
    d: dict[str, torch.Tensor], bits: int, block: int
) -> None:
    s = spec(dtype="fp32", bits=bits, block=block, stochastic_rounding=True, error_feedback=False)
    out = assert_decode_is_sent(codec.encode(d, s, seed=5))
    for name, x in d.items():
        x = x.double().reshape(-1)
        step = block_absmax(x, block) / qmax(bits)
        err = (out[name].double().reshape(-1) - x).abs()
        assert bool((err <= step + 2**-20 * x.abs() + 1e-30).all()), name


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(fraction: float, bits: int) -> None:
    """Values `fraction` of a step above a level: stochastic rounding's mean error is zero
    (within 4 sigma of 20,000 draws, 0.015 steps), round-to-nearest's is min(f, 1 - f) >= 0.1
    steps, so a biased rounding fails."""
    top = float(qmax(bits))  # the block's absmax: the step is exactly 1
    blocks = torch.full((20_000 // 63, 64), 2 + fraction)
    blocks[:, 0] = top
    x = {"w": blocks.reshape(-1)}
    values = blocks[:, 1:]
    mean_error = {}
    for rounding in (True, False):
        s = spec(dtype="fp32", bits=bits, block=64, stochastic_rounding=rounding)
        sent = codec.encode(x, s, seed=1234).sent["w"].view_as(blocks)[:, 1:]
        mean_error[rounding] = float((sent - values).mean())
    assert abs(mean_error[True]) < 0.015
    assert abs(mean_error[False]) >= 0.099


def test_stochastic_rounding_is_reproducible_from_its_seed() -> None:
    d = {"a": torch.randn(40, 30), "b": torch.randn(30, 40)}
    s = spec(bits=8, stochastic_rounding=True)
    blobs = [codec.encode(d, s, seed=seed).blob for seed in (7, 7, 8)]
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]
    # Each tensor draws from its own stream: the same bytes whatever else the delta holds.
    alone = decode(codec.encode({"a": d["a"]}, s, seed=7).blob)["a"]
    assert torch.equal(alone, decode(blobs[0])["a"])


@FAST
@given(d=deltas(), top_k=stg.floats(0.01, 0.99), bits=stg.sampled_from([0, 8]))
def test_top_k_keeps_the_largest_entries(
    d: dict[str, torch.Tensor], top_k: float, bits: int
) -> None:
    enc = codec.encode(d, spec(dtype="fp32", top_k=top_k, bits=bits, error_feedback=False))
    out = assert_decode_is_sent(enc)
    layout = read_layout(enc.blob)
    for name, x in d.items():
        x = x.double().reshape(-1)
        n = x.numel()
        k = min(n, max(1, math.ceil(top_k * n)))
        assert layout.tensors[name]["k"] == k
        kth = x.abs().sort(descending=True).values[k - 1]
        got = out[name].double().reshape(-1)
        step = float(x.abs().max()) / 127 / 2 if bits else 0.0
        # Each coordinate was either sent (exact, or within the quantization bound) or dropped,
        # and a dropped one is never larger than the k-th largest magnitude.
        sent_ok = (got - x).abs() <= step + 2**-20 * x.abs()
        dropped_ok = (got == 0) & (x.abs() <= kth)
        assert bool((sent_ok | dropped_ok).all()), name
        assert int((got != 0).sum()) <= k
        if not bits:
            kept = got != 0
            if kept.any() and (~kept).any():
                assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


@pytest.mark.parametrize(
    ("n", "top_k", "coding", "part_bytes"),
    [
        (4096, 0.10, "e", 154 + 116),  # k 410, l 3: vs a 512-byte bitmap
        (4096, 0.30, "m", 512),  # Elias-Fano would take 564
        (4096, 0.02, "e", 52 + 27),  # vs 328 bytes of int32 gaps
        (8, 0.5, "m", 1),
        (64, 0.5, "m", 8),
        (100_000, 0.001, "e", 113 + 37),  # vs 400
        (1 << 20, 0.0001, "e", 171 + 30),  # k 105, l 13: vs 420
    ],
)
def test_positions_use_the_smallest_coding(
    n: int, top_k: float, coding: str, part_bytes: int
) -> None:
    x = {"t": torch.randn(n, generator=torch.Generator().manual_seed(n))}
    enc = codec.encode(x, spec(dtype="fp32", top_k=top_k, compression="none", error_feedback=False))
    assert read_layout(enc.blob).tensors["t"]["pos"] == coding
    assert position_bytes(coding, n, kept_count(n, top_k)) == part_bytes
    stored = safetensors.torch.load(enc.blob)[f"0.{coding}"]
    assert stored.numel() * stored.element_size() == part_bytes
    out = assert_decode_is_sent(enc)
    kept = out["t"] != 0
    assert torch.equal(out["t"][kept], x["t"][kept])


def test_the_smallest_stored_coding_wins_after_zstd() -> None:
    """Kept entries in one run: the bitmap compresses to almost nothing, Elias-Fano does not."""
    x = torch.zeros(4096)
    x[1000:1410] = torch.arange(1, 411, dtype=torch.float32)
    enc = codec.encode({"t": x}, spec(dtype="fp32", top_k=0.1, error_feedback=False))
    assert read_layout(enc.blob).tensors["t"] == {"i": 0, "shape": [4096], "k": 410, "pos": "m",
                                                  "z": "mv"}  # fmt: skip
    assert torch.equal(decode(enc.blob)["t"], x)


@FAST
@given(n=stg.integers(1, 3000), data=stg.data())
def test_elias_fano_round_trip(n: int, data: stg.DataObject) -> None:
    idx = sorted(data.draw(stg.sets(stg.integers(0, n - 1), min_size=1, max_size=n)))
    t = torch.tensor(idx, dtype=torch.int64)
    packed = codec.elias_fano(t, n)
    assert packed.dtype == torch.uint8
    assert packed.numel() == sum(ef_sizes(n, len(idx)))
    assert elias_fano_indices(packed, n, len(idx)).tolist() == idx


EF_N, EF_K = 4096, 82
"""The Elias-Fano tensor of these tests: top-k 2% of 4096, l 5: 52 + 27 bytes."""


def _ef_file(edit: Callable[[bytes], bytes]) -> bytes:
    """A legitimate Elias-Fano file with its part replaced by `edit(part)`, stored raw (the file
    says so: compression none)."""
    x = {"t": torch.randn(EF_N, generator=torch.Generator().manual_seed(3))}
    raw = RawDelta.parse(codec.encode(x, spec(dtype="fp32", top_k=0.02, compression="none")).blob)
    edited = edit(raw.parts["0.e"].data)
    raw.parts["0.e"] = RawPart("U8", [len(edited)], edited)
    return raw.build()


def _high_bits(edit: HighBitsEdit) -> Callable[[bytes], bytes]:
    return lambda data: edit_elias_fano(data, EF_N, EF_K, edit)


EF_CASES = [
    ("truncated", lambda p: p[:-1], r"t.e: stored as torch.uint8 \[78\], expected torch.uint8"),
    ("oversized", lambda p: p + p[:1], r"t.e: stored as torch.uint8 \[80\], expected"),
    ("extra index", _high_bits(ef_extra_index), "holds 83 indices"),
    ("no indices", _high_bits(ef_no_indices), "holds 0 indices"),
    ("padding bit", _high_bits(ef_padding_bit), r"padding bits 1\) where 82"),
    ("past the tensor", _high_bits(ef_past_the_tensor), "sparse positions do not match"),
    ("repeated index", _high_bits(ef_repeated_index), "not strictly increasing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in EF_CASES], ids=[c[0] for c in EF_CASES]
)
def test_malformed_elias_fano_parts_are_refused(
    edit: Callable[[bytes], bytes], message: str
) -> None:
    assert len(decode(_ef_file(lambda p: p))) == 1  # the file unedited is fine
    with pytest.raises(DeltaFormatError, match=message):
        decode(_ef_file(edit))


@FAST
@given(n=stg.integers(1, 300), data=stg.data())
def test_bitmap_round_trip(n: int, data: stg.DataObject) -> None:
    idx = sorted(data.draw(stg.sets(stg.integers(0, n - 1), min_size=0, max_size=n)))
    t = torch.tensor(idx, dtype=torch.int64)
    assert unpack_mask(codec.pack_mask(t, n), n).tolist() == idx


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_codes_fit_their_width(bits: int) -> None:
    x = torch.linspace(-3, 3, 257)
    codes, scales = codec.quantize(x, bits, 64)
    assert scales.dtype == torch.float32
    assert scales.numel() == math.ceil(257 / 64)
    if bits == 4:
        assert codes.dtype == torch.uint8
        assert codes.numel() == math.ceil(257 / 2)
        nibbles = torch.cat([codes & 0xF, codes >> 4])
        assert int(nibbles.min()) >= 1
        assert int(nibbles.max()) <= 15
    else:
        assert codes.dtype == torch.int8
        assert int(codes.abs().max()) == 127
    back = dequantize(codes, scales, bits, 64, 257)
    assert float((back - x).abs().max()) <= 3 / qmax(bits) / 2 + 1e-6


def test_zero_blocks_decode_to_zero() -> None:
    x = {"t": torch.zeros(3, 50)}
    out = decode(codec.encode(x, spec(dtype="fp32", bits=4, block=16)).blob)
    assert torch.equal(out["t"], x["t"])


# ------------------------------------------------------------------------------------------
# Error feedback
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings_",
    [
        {"dtype": "fp32", "top_k": 0.05},
        {"dtype": "bf16", "top_k": 0.1, "bits": 8},
        {"dtype": "bf16", "top_k": 0.02, "bits": 4, "block": 32},
        # Quantization alone (top-k 1): the residual is the rounding error, carried over.
        {"dtype": "bf16", "bits": 8},
        {"dtype": "bf16", "bits": 4},
        {"dtype": "bf16", "bits": 4, "codebook": "nf4"},
        {"dtype": "bf16", "bits": 4, "codebook": "fp4"},
        {"dtype": "bf16", "bits": 4, "stochastic_rounding": True},
    ],
    ids=str,
)
def test_error_feedback_makes_the_sum_sent_approach_the_sum_of_deltas(settings_: dict) -> None:
    """The gap between what was sent and what was learned stays bounded (it is the residual), so
    relative to the growing sum it shrinks like 1/rounds; without feedback it shrinks no faster
    than 1/sqrt(rounds) (independent errors), or not at all (top-k's, always the same entries).
    """
    direction = torch.randn(40, 50, generator=torch.Generator().manual_seed(7))

    def relative_gaps(feedback: bool, checkpoints: tuple[int, ...]) -> list[float]:
        residual = None
        sent_sum = torch.zeros(40, 50, dtype=torch.float64)
        true_sum = torch.zeros(40, 50, dtype=torch.float64)
        g = torch.Generator().manual_seed(11)
        gaps = []
        for t in range(1, max(checkpoints) + 1):
            d = {"w": direction + 0.3 * torch.randn(40, 50, generator=g)}
            enc = codec.encode(d, spec(error_feedback=feedback, **settings_), residual)
            residual = enc.residual
            sent_sum += enc.sent["w"].double()
            true_sum += d["w"].double()
            if feedback:
                # Nothing is lost, only delayed: sent + residual == everything so far.
                assert torch.allclose(sent_sum + residual["w"].double(), true_sum, atol=1e-3)
            if t in checkpoints:
                gaps.append(float((sent_sum - true_sum).norm() / true_sum.norm()))
        return gaps

    early, late = relative_gaps(True, (40, 160))
    assert late < early / 2.5
    _, late_without = relative_gaps(False, (40, 160))
    assert late < late_without / 4


def test_feedback_adds_the_residual_before_compressing() -> None:
    d = {"w": torch.zeros(10)}
    residual = {"w": torch.arange(10, dtype=torch.float32)}
    enc = codec.encode(d, spec(dtype="fp32", top_k=0.2), residual)
    assert enc.sent["w"].tolist() == [0] * 8 + [8.0, 9.0]
    assert enc.residual is not None
    assert enc.residual["w"].tolist() == [float(i) for i in range(8)] + [0.0, 0.0]


@pytest.mark.parametrize(
    ("settings_", "keeps_residual"),
    [
        ({"top_k": 0.1, "error_feedback": False}, False),
        ({"dtype": "fp32"}, False),
        # A cast alone: its rounding is at most 2^-8 of each value, its residual a dense fp32
        # copy of the adapter, more bytes than the delta it would correct.
        ({"dtype": "bf16"}, False),
        ({"dtype": "fp16"}, False),
        ({"dtype": "bf16", "top_k": 0.1}, True),
        ({"dtype": "fp32", "bits": 8}, True),
        ({"dtype": "bf16", "bits": 4, "codebook": "nf4"}, True),
    ],
    ids=str,
)
def test_a_residual_is_kept_only_where_top_k_or_quantization_drop_something(
    settings_: dict, keeps_residual: bool
) -> None:
    d = {"w": torch.randn(100)}
    s = spec(**{"error_feedback": True, **settings_})
    assert s.feeds_back is keeps_residual
    assert (codec.encode(d, s).residual is not None) is keeps_residual


# ------------------------------------------------------------------------------------------
# Container and sizes
# ------------------------------------------------------------------------------------------


def test_container_is_safetensors_with_the_encoding_in_its_metadata(tmp_path: object) -> None:
    d = {"a": torch.randn(64, 8), "b": torch.randn(8, 64)}
    s = spec(dtype="bf16", top_k=0.1, bits=8, compression="zstd")
    blob = codec.encode(d, s).blob
    path = tmp_path / "delta.safetensors"  # type: ignore[operator]
    path.write_bytes(blob)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["fedtune"])["format"] == FORMAT
        layout = layout_from_metadata(meta)
    assert layout.encoding == {
        "dtype": "bf16", "top_k": 0.1, "bits": 8, "block_size": 64, "compression": "zstd",
        "error_feedback": True,
    }  # fmt: skip
    assert layout.shapes == {"a": (64, 8), "b": (8, 64)}


def test_compression_shrinks_the_payload() -> None:
    d = {f"l{i}": torch.randn(256, 16) for i in range(4)}
    sizes = {
        label: codec.encode(d, s).encoded_bytes
        for label, s in {
            "fp32": spec(dtype="fp32", compression="none"),
            "bf16": spec(dtype="bf16", compression="none"),
            "q8": spec(dtype="fp32", bits=8, compression="none"),
            "q4": spec(dtype="fp32", bits=4, compression="none"),
            "top10+q8+zstd": spec(dtype="bf16", top_k=0.1, bits=8, compression="zstd"),
        }.items()
    }
    raw = 4 * 4 * 256 * 16
    assert sizes["fp32"] > raw
    assert sizes["bf16"] < 0.55 * raw
    assert sizes["q8"] < 0.3 * raw
    assert sizes["q4"] < 0.17 * raw
    assert sizes["top10+q8+zstd"] < 0.08 * raw  # 2.5% values + 3.1% bitmap + header


@pytest.mark.parametrize("s", [spec(), spec(dtype="fp32"), spec(top_k=0.1, bits=4)], ids=str)
def test_encoding_is_deterministic(s: DeltaSpec) -> None:
    """Same delta, same bytes: a rerun of a round must commit the same checksum."""
    d = {
        f"layer.{i}": torch.randn(32, 8, generator=torch.Generator().manual_seed(i))
        for i in range(5)
    }
    blobs = {codec.encode(d, s).blob for _ in range(8)}
    assert len(blobs) == 1


def test_zstd_never_inflates_a_part() -> None:
    d = {"t": torch.randn(3)}
    raw = codec.encode(d, spec(dtype="fp32", compression="none")).encoded_bytes
    assert codec.encode(d, spec(dtype="fp32", compression="zstd")).encoded_bytes <= raw


def _header_blob(metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save({"x": torch.zeros(2)}, metadata=metadata)


GOOD = codec.encode({"w": torch.randn(20, 20)}, spec(dtype="fp32", top_k=0.2, bits=8)).blob


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "truncated"),
        (b"\x00" * 4, "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "truncated or corrupt"),
        (struct.pack("<Q", 2) + b"{]", "corrupt header"),
        (_header_blob({}), "not a fedtune.delta/v1"),
        (_header_blob({"fedtune": "{"}), "bad metadata"),
        (_header_blob({"fedtune": '{"format": "other/v9"}'}), "format 'other/v9'"),
        (_header_blob({"fedtune": json.dumps({"format": FORMAT, "encoding": {"bits": 3},
                                              "tensors": {}})}), "bad encoding"),
        (GOOD[: len(GOOD) - 7], "corrupt safetensors"),
        (_header_blob({"fedtune": json.dumps({
            "format": FORMAT, "encoding": {"bits": 8, "block_size": 64, "dtype": "fp32"},
            "tensors": {"w": {"i": 0, "shape": [4]}}})}),
         "missing part"),
        (safetensors.torch.save({"0.v": torch.zeros(3)}, metadata={"fedtune": json.dumps({
            "format": FORMAT, "encoding": {"bits": 0, "block_size": 64, "dtype": "fp32"},
            "tensors": {"w": {"i": 0, "shape": [4]}}})}),
         r"w.v: stored as torch.float32 \[3\], expected torch.float32 \[4\]"),
        (safetensors.torch.save({"0.v": torch.zeros(9, dtype=torch.uint8)}, metadata={
            "fedtune": json.dumps({
            "format": FORMAT, "encoding": {"bits": 0, "block_size": 64, "dtype": "fp32"},
            "tensors": {"w": {"i": 0, "shape": [4], "z": "v"}}})}),
         "w.v: zstd"),
    ],
)  # fmt: skip
def test_malformed_files_raise_a_format_error(blob: bytes, message: str) -> None:
    with pytest.raises(DeltaFormatError, match=message):
        decode(blob)


def test_compute_delta_is_local_minus_global_for_named_tensors() -> None:
    local = {"a": torch.ones(2, 2), "b": torch.full((3,), 5.0), "frozen": torch.zeros(1)}
    glob = {"a": torch.zeros(2, 2), "b": torch.full((3,), 2.0), "frozen": torch.ones(1)}
    d = codec.compute_delta(local, glob, ["a", "b"])
    assert d.keys() == {"a", "b"}
    assert torch.equal(d["b"], torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="shape"):
        codec.compute_delta({"a": torch.ones(3)}, {"a": torch.ones(2)}, ["a"])
