"""The delta codec's settings: how a client encodes `delta = local - global` (GradualDiff).

Apart from settings.py, whose base model they use, because the codec (`fedtune_trainer.codec`)
and the benchmarks read them and nothing else of a run's settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune_trainer.wire.settings import Model

Codebook = Literal["uniform", "nf4", "fp4"]
"""The levels a quantized value may take, as multiples of its block's scale."""
CODEBOOK_BITS = 4
"""nf4 and fp4 are 16-level codebooks: they need 4-bit quantization."""


class QuantizationSpec(Model):
    """Blockwise quantization of the delta, one scale per block."""

    bits: Literal[0, 4, 8] = Field(0, description="0 turns quantization off.")
    block_size: int = Field(64, ge=8, le=65536, description="Values per block, one scale each.")
    codebook: Codebook = Field(
        "uniform",
        description="uniform: 2^(bits-1)-1 evenly spaced levels each side of zero. nf4 (QLoRA's "
        "NormalFloat: the 16 quantiles of N(0,1), scaled to [-1,1]) or fp4 (the e2m1 values): "
        "16 levels of the block's absmax, denser near zero; bits 4 only.",
    )
    stochastic_rounding: bool = Field(
        False,
        description="Round each value up or down at random, in proportion to its distance from "
        "the two nearest levels: unbiased (the expected decoded value is the value) at up to one "
        "step of error instead of half a step. Seeded from the run, round and client, so a rerun "
        "sends the same bytes. Uniform codebook only.",
    )

    @model_validator(mode="after")
    def _codebook_rules(self) -> QuantizationSpec:
        if self.codebook != "uniform" and self.bits != CODEBOOK_BITS:
            raise ValueError(f"codebook {self.codebook} needs bits {CODEBOOK_BITS}")
        if self.stochastic_rounding and (self.bits == 0 or self.codebook != "uniform"):
            raise ValueError("stochasticRounding needs bits 4 or 8 and the uniform codebook")
        return self


class DeltaSpec(Model):
    """The GradualDiff encoding of `delta = local - global`."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Cast before encoding.")
    top_k: float = Field(
        1.0, gt=0, le=1, description="Fraction of entries kept per tensor (1 keeps all)."
    )
    error_feedback: bool = Field(
        True,
        description="Carry what top-k and quantization dropped into the next round. The client "
        "keeps the residual between rounds, fp32 values in the adapter's shapes (where its "
        "FEDTUNE_STATE_DIR points, else in the run's storage). A cast to bf16/fp16 alone keeps "
        "none: it rounds each value by at most 2^-8 of itself, and its residual would outweigh "
        "the delta.",
    )
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    compression: Literal["zstd", "none"] = Field(
        "zstd", description="Lossless compression of the encoded file."
    )
    compression_level: int = Field(3, ge=1, le=22, description="zstd level: 1 fast, 22 small.")

    @property
    def feeds_back(self) -> bool:
        """Whether the client keeps an error-feedback residual. Only where top-k or quantization
        drop something: a dtype cast's rounding is unbiased and at most 2^-8 (bf16) of each
        value, while the residual is a dense fp32 copy of the adapter that the client writes
        and reads every round, 2.6x the bytes of the bf16 + zstd delta it would correct."""
        return self.error_feedback and (self.top_k < 1.0 or self.quantization.bits != 0)
