"""The trainer on a real pretrained model (SmolLM2-135M-Instruct: Llama architecture, a 49k BPE
vocabulary, a chat template, pad = eos, a BOS token it never adds): what the tiny random model
cannot show.

Sizes are kept small (a few short records, a few steps): a step of this model on two shared CPU
cores takes seconds, and these tests check correctness, not learning curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedtune_trainer import aggregate, client
from fedtune_trainer.adapter import lora
from fedtune_trainer.learning.batches import collate
from fedtune_trainer.learning.data import IGNORE, bos_ids, load_dataset
from fedtune_trainer.learning.loss import token_loss_sum
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.layout import FINAL_PREFIX
from fedtune_trainer.wire.settings import AdapterSpec, StorageLocation, TrainingSpec
from fedtune_trainer.wire.task import AggregateTask, ClientTask

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

CHATS = [
    [
        {"role": "user", "content": "What does the Python module `bisect` do?"},
        {
            "role": "assistant",
            "content": "It keeps a list sorted: bisect finds where a new item goes, insort puts "
            "it there, without sorting the list again after each insertion.",
        },
    ],
    [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is `shlex` for?"},
        {"role": "assistant", "content": "Splitting shell-like command lines into words."},
        {"role": "user", "content": "And `textwrap`?"},
        {"role": "assistant", "content": "Wrapping and filling paragraphs of plain text."},
    ],
    [
        {"role": "user", "content": "Which module reads and writes tar archives?"},
        {"role": "assistant", "content": "The `tarfile` module, with gzip, bz2 and lzma support."},
    ],
    [
        {"role": "user", "content": "How do I copy a whole directory tree in Python?"},
        {"role": "assistant", "content": "Use shutil.copytree(source, destination)."},
    ],
]


def trained_text(tok: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


@pytest.fixture(scope="module")
def tok(real_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(real_model)


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return path


def test_smollm2_chat_masks_special_tokens_and_padding(
    tok: PreTrainedTokenizerBase, chats: Path
) -> None:
    assert tok.pad_token_id == tok.eos_token_id  # <|im_end|> both
    assert tok.bos_token == "<|im_start|>"
    assert bos_ids(tok) == []  # it names a BOS token but never adds it: neither do we
    data = load_dataset(str(chats), "chat", tok, 512)
    assert (data.stats.records, data.stats.truncated, data.stats.dropped) == (4, 0, 0)
    second = data.examples[1]
    assert tok.decode(second.input_ids) == tok.apply_chat_template(CHATS[1], tokenize=False)
    trained = trained_text(tok, second.input_ids, second.labels)
    assert trained == (
        "Splitting shell-like command lines into words.<|im_end|>"
        "Wrapping and filling paragraphs of plain text.<|im_end|>"
    )
    batch = collate(data.examples, tok.pad_token_id, torch.device("cpu"))
    eos_targets = int((batch["labels"] == tok.eos_token_id).sum())
    assert eos_targets == 5  # one per assistant turn, although every pad is an eos id too
    assert int((batch["input_ids"] == tok.eos_token_id).sum()) > 2 * eos_targets


def test_truncation_keeps_the_answer_of_a_real_record(
    tok: PreTrainedTokenizerBase, chats: Path
) -> None:
    data = load_dataset(str(chats), "chat", tok, 48)
    assert data.stats.truncated == 4  # SmolLM2's default system prompt alone is ~20 tokens
    first = data.examples[0]
    trained = trained_text(tok, first.input_ids, first.labels)
    assert trained.startswith("It keeps a list sorted")
    assert "assistant\n" in tok.decode(first.input_ids)  # the end of the prompt survives


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_initial_adapter_is_peft_init_of_the_real_model(
    real_model: Path, targets: list[str]
) -> None:
    spec = AdapterSpec(r=8, target_modules=targets)
    mine = lora.initial_adapter(real_model, spec, seed=3)
    base = AutoModelForCausalLM.from_pretrained(real_model)
    torch.manual_seed(3)
    reference = lora.adapter_tensors(lora.attach(base, spec))
    assert sorted(mine) == sorted(reference)
    per_layer = 7 if targets == ["all-linear"] else 2
    assert len(mine) == 2 * per_layer * base.config.num_hidden_layers
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_chunked_loss_equals_the_full_logits_loss_on_the_real_model(
    real_model: Path, tok: PreTrainedTokenizerBase, chats: Path
) -> None:
    data = load_dataset(str(chats), "chat", tok, 64)
    model = lora.attach(
        AutoModelForCausalLM.from_pretrained(real_model),
        AdapterSpec(r=4, dropout=0.0, target_modules=["all-linear"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    batch = collate(data.examples[:2], tok.pad_token_id, torch.device("cpu"))
    results = []
    for chunked in (True, False):
        model.zero_grad(set_to_none=True)
        loss, n = token_loss_sum(model, batch, chunked)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()) / n, grads))
    (mine, mine_grads), (ref, ref_grads) = results
    assert mine == pytest.approx(ref, rel=1e-5)
    # Per tensor as a whole, and not to float32's last bits: the head's products run over other
    # shapes (labelled rows only, in chunks), so the logits differ in their last bits, and where
    # the pretrained model is confident the gradient 1 - p is a difference of nearly equal
    # numbers (measured: 2e-5 to 1.5e-4 relative, the same in every layer, i.e. from the head).
    errors = {
        name: float((mine_grads[name] - g).norm() / g.norm())
        for name, g in ref_grads.items()
        if g.norm() > 0
    }
    assert len(errors) == len(ref_grads)
    assert max(errors.values()) < 1e-3


def test_a_round_on_the_real_model_gives_an_adapter_peft_loads_generates_with_and_merges(
    real_model: Path, tok: PreTrainedTokenizerBase, chats: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    store = st.FileStore(tmp_path / "store")
    adapter = AdapterSpec(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"])
    common = {
        "run": "real", "base_model": str(real_model), "adapter": adapter,
        "storage": StorageLocation(uri=store.uri),
    }  # fmt: skip
    quiet = lambda _: None  # noqa: E731
    aggregate.run(AggregateTask(round=0, rounds=1, **common), store, quiet)
    lines: list[str] = []
    training = TrainingSpec(
        local_steps=2, batch_size=4, learning_rate=1e-3, max_seq_length=64, packing=True,
        gradient_checkpointing=True, seed=1,
    )  # fmt: skip
    task = ClientTask(
        round=1, client="client-0", data_uri=str(chats), data={"format": "chat"},
        training=training, delta=DeltaSpec(dtype="fp32"), **common,
    )  # fmt: skip
    summary = client.run(task, store, lines.append)
    assert summary is not None
    assert summary.truncated_records == load_dataset(str(chats), "chat", tok, 64).stats.truncated
    assert summary.truncated_records > 0
    assert summary.train_loss is not None
    assert 0 < summary.train_loss < 10  # a pretrained model, not a random one (~10.8)
    assert any(line.startswith("step 2/2 loss ") for line in lines)
    # The aggregator accepts only deltas in the run's encoding: it is told the same codec.
    delta = DeltaSpec(dtype="fp32")
    aggregate.run(
        AggregateTask(round=1, rounds=1, clients=["client-0"], delta=delta, **common), store, quiet
    )

    st.fetch_committed(store, FINAL_PREFIX, tmp_path / "final")
    config = json.loads((tmp_path / "final" / lora.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == "all-linear"
    base = AutoModelForCausalLM.from_pretrained(real_model)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is `tarfile` for?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        plain_logits = base(**prompt).logits
    model = PeftModel.from_pretrained(base, tmp_path / "final")
    model.eval()
    with torch.no_grad():
        adapted_logits = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8 or (
        int(generated[0, -1]) == tok.eos_token_id
    )
    assert float((adapted_logits - plain_logits).abs().max()) > 1e-4  # the adapter does something
    merged = model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**prompt).logits
        merged_generated = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    # Merging reorders fp32 sums through 30 layers: logits of size ~20 move by ~1e-4 (CI saw
    # 1.3e-4). The bound is 1e-3 absolute, and the merge must move logits far less than the
    # adapter does, so a merge that dropped the adapter could not pass.
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-3)
    merge_error = float((merged_logits - adapted_logits).abs().max())
    assert merge_error < float((adapted_logits - plain_logits).abs().max()) / 10
    assert torch.equal(merged_generated, generated)
