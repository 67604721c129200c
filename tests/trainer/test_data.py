"""Data loading: the three formats, special tokens, loss masks, truncation and what it drops, and
errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedtune_trainer.learning.batches import collate
from fedtune_trainer.learning.data import (
    IGNORE,
    DataError,
    bos_ids,
    data_settings,
    fit,
    load_dataset,
    load_examples,
)
from tests.trainer.support import Demo


@pytest.fixture(scope="module")
def tok(demo: Demo) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo.model)


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def decode_trained(tok: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_text_trains_every_token_after_bos(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"text": "the capital of Peru is Lima"}])
    (ex,) = load_examples(str(path), "text", tok, 512)
    assert ex.input_ids[0] == tok.bos_token_id  # the tiny tokenizer starts texts with BOS
    assert ex.labels == [IGNORE, *ex.input_ids[1:]]
    assert tok.decode(ex.input_ids) == "<s>the capital of Peru is Lima" + tok.eos_token
    assert ex.trained_tokens == len(ex.input_ids) - 1


@pytest.mark.parametrize(
    ("record", "prompt_part"),
    [
        ({"instruction": "Reverse 'abc'.", "output": "cba"}, "### Instruction:\nReverse 'abc'."),
        (
            {"instruction": "Add them.", "input": "2 and 3", "output": "5"},
            "### Input:\n2 and 3",
        ),
    ],
)
def test_alpaca_trains_only_the_output(
    tok: PreTrainedTokenizerBase, tmp_path: Path, record: dict, prompt_part: str
) -> None:
    (ex,) = load_examples(str(write(tmp_path / "a.jsonl", [record])), "alpaca", tok, 512)
    assert prompt_part in tok.decode(ex.input_ids)
    assert ex.input_ids[0] == tok.bos_token_id
    assert decode_trained(tok, ex.input_ids, ex.labels) == record["output"] + tok.eos_token
    assert ex.labels[0] == IGNORE


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]


def test_chat_trains_only_the_assistant_turns(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    (ex,) = load_examples(str(write(tmp_path / "c.jsonl", [{"messages": CHAT}])), "chat", tok, 512)
    # Exactly the template's rendering, its BOS included, and no second BOS of ours.
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert ex.input_ids.count(tok.bos_token_id) == 1
    trained = decode_trained(tok, ex.input_ids, ex.labels)
    # Each answer up to and including its end-of-turn token; the newline the template puts
    # after it is never generated, so it is not trained.
    assert trained == f"4{tok.eos_token}6{tok.eos_token}"
    assert "What is" not in trained
    assert "<|assistant|>" not in trained


def without_bos(tok: PreTrainedTokenizerBase, tmp_path: Path) -> PreTrainedTokenizerBase:
    """The tiny tokenizer as SmolLM2's behaves: it names a BOS token but never adds it."""
    model = Path(tok.name_or_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((model / name).read_text())
        if name == "tokenizer.json":
            data["post_processor"] = None
        (tmp_path / name).write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(tmp_path)


def test_bos_follows_the_tokenizers_own_convention(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    plain = without_bos(tok, tmp_path)
    assert plain.bos_token_id == tok.bos_token_id  # defined, but not added to texts
    assert bos_ids(tok) == [tok.bos_token_id]
    assert bos_ids(plain) == []
    path = write(tmp_path / "t.jsonl", [{"text": "hello"}])
    (ex,) = load_examples(str(path), "text", plain, 64)
    assert ex.input_ids[0] != plain.bos_token_id
    assert plain.decode(ex.input_ids) == "hello</s>"


def test_pad_equal_to_eos_still_trains_eos(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """As with SmolLM2 (pad = eos = <|im_end|>): padding is masked by position, never by id."""
    path = write(tmp_path / "a.jsonl", [{"text": "a b c d e f"}, {"text": "a"}])
    long, short = load_examples(str(path), "text", tok, 64)
    batch = collate([long, short], tok.eos_token_id, torch.device("cpu"))
    labels, mask = batch["labels"], batch["attention_mask"]
    eos = tok.eos_token_id
    for row, e in enumerate((long, short)):
        n = len(e.input_ids)
        assert labels[row, n - 1] == eos  # the real eos is a target
        assert (labels[row, n:] == IGNORE).all()
        assert (mask[row, n:] == 0).all()
    assert int((batch["input_ids"] == eos).sum()) > int((labels == eos).sum())  # pads are eos ids


@pytest.mark.parametrize(
    ("bos", "prompt", "answer", "max_length", "kept_prompt", "kept_answer"),
    [
        (1, 10, 5, 64, 10, 5),  # fits: untouched
        (1, 100, 10, 64, 53, 10),  # the prompt loses its start, the answer is whole
        (1, 100, 100, 64, 31, 32),  # both long: the prompt keeps half, the answer the rest
        (0, 100, 100, 64, 32, 32),
        (1, 5, 100, 64, 5, 58),  # a short prompt is kept whole, the answer loses its end
        (1, 0, 100, 64, 0, 63),  # text: no prompt
        (0, 40, 3, 8, 5, 3),
    ],
)
def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_answer(
    bos: int, prompt: int, answer: int, max_length: int, kept_prompt: int, kept_answer: int
) -> None:
    ids = list(range(bos + prompt + answer))
    labels = [IGNORE] * (bos + prompt) + ids[bos + prompt :]
    if bos + prompt + answer <= max_length:
        assert (kept_prompt, kept_answer) == (prompt, answer)
        return
    start, total = fit(ids, labels, max_length, bos)
    assert total == max_length
    kept = ids[:bos] + ids[bos + start :][: total - bos]
    assert kept[bos : bos + kept_prompt] == list(range(bos + prompt - kept_prompt, bos + prompt))
    assert kept[bos + kept_prompt :] == list(range(bos + prompt, bos + prompt + kept_answer))


def test_long_records_are_cut_counted_and_keep_their_answer(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    long_prompt = {"instruction": "z " * 300 + "Say yes.", "output": "yes"}
    long_answer = {"instruction": "Say y.", "output": "y " * 200}
    path = write(
        tmp_path / "a.jsonl", [long_prompt, long_answer, {"instruction": "q", "output": "a"}]
    )
    data = load_dataset(str(path), "alpaca", tok, 40)
    assert (data.stats.records, data.stats.truncated, data.stats.dropped) == (3, 2, 0)
    first, second, third = data.examples
    assert all(len(e.input_ids) <= 40 for e in data.examples)
    assert first.input_ids[0] == second.input_ids[0] == tok.bos_token_id
    # The whole answer and the end of the question survive; the start of the question does not.
    assert decode_trained(tok, first.input_ids, first.labels) == "yes" + tok.eos_token
    assert "Say yes.\n\n### Response:\n" in tok.decode(first.input_ids)
    assert "### Instruction" not in tok.decode(first.input_ids)
    # A long answer keeps its start (no eos: the model must not learn to stop there).
    assert second.trained_tokens >= 20
    assert tok.decode(second.input_ids).startswith("<s>### Instruction:\nSay y.")
    assert second.input_ids[-1] != tok.eos_token_id
    assert len(third.input_ids) < 40
    assert len(load_examples(str(path), "alpaca", tok, 40, max_samples=2)) == 2


def test_records_with_nothing_to_train_are_dropped_and_counted(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    no_eos = AutoTokenizer.from_pretrained(tok.name_or_path)
    no_eos.eos_token = None
    path = write(
        tmp_path / "a.jsonl",
        [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}] * 2,
    )
    data = load_dataset(str(path), "alpaca", no_eos, 64)
    assert len(data.examples) == 2
    assert (data.stats.records, data.stats.dropped) == (4, 2)
    assert data.stats.dropped_at == [f"{path} line 2", f"{path} line 4"]
    assert "4 records, 0 truncated, 2 dropped" in data.stats.describe()
    only_empty = write(tmp_path / "b.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.raises(
        DataError, match=r"no usable alpaca records \(1 records, 0 truncated, 1 dropped"
    ):
        load_examples(str(only_empty), "alpaca", no_eos, 64)


def test_a_directory_reads_every_jsonl_in_order(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "b.jsonl", [{"text": "second"}])
    write(tmp_path / "d" / "a.jsonl", [{"text": "first"}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    examples = load_examples((tmp_path / "d").as_uri(), "text", tok, 64)
    assert [tok.decode(e.input_ids) for e in examples] == ["<s>first</s>", "<s>second</s>"]


@pytest.mark.parametrize(
    ("fmt", "lines", "bad_line", "message"),
    [
        ("text", ['{"text": "ok"}', "{oops"], 2, "invalid JSON"),
        ("text", ['{"text": "ok"}', "", '["a list"]'], 3, "expected a JSON object"),
        ("text", ['{"txt": "typo"}'], 1, "field 'text' must be a string"),
        ("alpaca", ['{"instruction": "i", "output": 3}'], 1, "field 'output' must be a string"),
        ("alpaca", ['{"output": "o"}'], 1, "field 'instruction'"),
        ("chat", ['{"messages": []}'], 1, "non-empty list"),
        ("chat", ['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant message"),
        ("chat", ['{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'], 1,
         "string 'content'"),
    ],
)  # fmt: skip
def test_bad_records_name_file_and_line(
    tok: PreTrainedTokenizerBase,
    tmp_path: Path,
    fmt: str,
    lines: list[str],
    bad_line: int,
    message: str,
) -> None:
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as info:
        load_examples(str(path), fmt, tok, 64)  # type: ignore[arg-type]
    assert f"{path} line {bad_line}:" in str(info.value)


def test_missing_data_names_the_uri(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"), "text", tok, 64)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (None, None)),
        (
            {"FEDTUNE_DATA_AWS_ACCESS_KEY_ID": "id", "FEDTUNE_DATA_AWS_SECRET_ACCESS_KEY": "s"},
            ("id", "s"),
        ),
        ({"AWS_ACCESS_KEY_ID": "storage-id"}, (None, None)),
    ],
)
def test_data_is_read_with_the_clients_own_credentials_when_given(
    env: dict[str, str], expected: tuple[str | None, str | None]
) -> None:
    settings = data_settings(env)
    assert (settings.access_key_id, settings.secret_access_key) == expected
    assert "secret_access_key" not in repr(settings)  # never in a log line
