"""`fedtune-trainer make-tiny-model`: a Llama-style model small enough to train on a CPU in tests.

No model hub is reachable from the tests or the devcluster, so the project makes its own: a
byte-level BPE tokenizer trained on the given jsonl files (with pad/bos/eos, role tokens and a chat
template; like Llama's, it starts every text and every conversation with BOS) and a randomly
initialised, seeded LlamaForCausalLM of a few hundred thousand parameters whose module names
(q_proj, v_proj, ...) are those real checkpoints use, so default LoRA target modules apply. The
output is a plain Hugging Face directory: AutoTokenizer and AutoModelForCausalLM load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import ALPACA_PROMPT_WITH_INPUT, read_jsonl

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Every turn closes with the eos token, so a model trained on assistant turns learns to stop; the
conversation opens with the BOS token, as Llama 3's template does."""


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0


def strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (the tokenizer learns from all of them)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def corpus(files: list[Path]) -> Iterator[str]:
    # The fixed text of the formats, so that prompts tokenize compactly too.
    yield ALPACA_PROMPT_WITH_INPUT.format(instruction="", input="") * 4
    yield "user assistant system\n" * 4
    for path in files:
        for _, record in read_jsonl(path):
            yield from strings(record)


def make_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(files), trainer=trainer)
    # Like Llama's tokenizers, every encoded text starts with BOS (data.bos_ids follows this).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def make_tiny_model(
    out: Path, data: list[Path], config: TinyConfig = TinyConfig()
) -> dict[str, Any]:
    """Write tokenizer and model to `out`; returns a short description."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .runtime import quiet_hf

    quiet_hf()
    tok = make_tokenizer(data, config.vocab_size)
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {
        "path": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    (out / "fedtune-tiny.json").write_text(json.dumps(info, indent=1))
    return info
