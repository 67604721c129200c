"""Data loading: the three formats, loss masks, truncation, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedtune_trainer.data import IGNORE, DataError, data_settings, load_examples
from tests.trainer.support import Demo


@pytest.fixture(scope="module")
def tok(demo: Demo) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo.model)


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def decode_trained(tok: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_text_trains_every_token(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"text": "the capital of Peru is Lima"}])
    (ex,) = load_examples(str(path), "text", tok, 512)
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "the capital of Peru is Lima" + tok.eos_token


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
    assert decode_trained(tok, ex.input_ids, ex.labels) == record["output"] + tok.eos_token
    assert ex.labels[0] == IGNORE


def test_chat_trains_only_the_assistant_turns(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    (ex,) = load_examples(
        str(write(tmp_path / "c.jsonl", [{"messages": messages}])), "chat", tok, 512
    )
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    trained = decode_trained(tok, ex.input_ids, ex.labels)
    assert trained == f"4{tok.eos_token}\n6{tok.eos_token}\n"
    assert "What is" not in trained
    assert "<|assistant|>" not in trained


def test_truncation_and_max_samples(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    long = {"instruction": "Say y.", "output": "y " * 200}
    path = write(tmp_path / "a.jsonl", [long] * 5)
    examples = load_examples(str(path), "alpaca", tok, 40, max_samples=3)
    assert len(examples) == 3
    assert all(len(e.input_ids) == 40 == len(e.labels) for e in examples)
    assert all(e.trained_tokens > 0 for e in examples)


def test_records_with_nothing_left_to_train_are_dropped(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "a.jsonl",
        [{"instruction": "z" * 300, "output": "kept?"}, {"instruction": "q", "output": "a"}],
    )
    assert len(load_examples(str(path), "alpaca", tok, 24)) == 1
    only_prompt = write(tmp_path / "b.jsonl", [{"instruction": "z" * 300, "output": "kept?"}])
    with pytest.raises(DataError, match="no usable alpaca records"):
        load_examples(str(only_prompt), "alpaca", tok, 24)


def test_a_directory_reads_every_jsonl_in_order(
    tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "b.jsonl", [{"text": "second"}])
    write(tmp_path / "d" / "a.jsonl", [{"text": "first"}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    examples = load_examples((tmp_path / "d").as_uri(), "text", tok, 64)
    assert [tok.decode(e.input_ids) for e in examples] == ["first</s>", "second</s>"]


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
