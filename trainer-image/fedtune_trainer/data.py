"""Training and evaluation data: jsonl records in three formats, tokenized with loss masks.

Formats (task.DataSpec.format):
- text:   {"text": "..."}: every token is trained;
- alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}: only the output
          (and the end-of-sequence token) is trained, the prompt is masked with -100;
- chat:   {"messages": [{"role": "...", "content": "..."}, ...]} rendered with the tokenizer's
          chat template: only the assistant turns are trained.

A bad record fails the whole load with an error that names the file and the line, because a
silently skipped record in a federated run is a client whose data nobody can inspect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import store
from .contract import DATA_CREDENTIALS_PREFIX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
Format = Literal["text", "alpaca", "chat"]

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """A record that cannot be used, located by file and line."""


@dataclass(frozen=True)
class Example:
    """One tokenized record: ids and labels of the same length, IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def data_settings(environ: Mapping[str, str] | None = None) -> store.S3Settings:
    """S3 settings for reading data: the data credentials when the Job has them, else the
    storage credentials (boto3's standard chain)."""
    env = os.environ if environ is None else environ
    key_id = env.get(f"{DATA_CREDENTIALS_PREFIX}AWS_ACCESS_KEY_ID")
    secret = env.get(f"{DATA_CREDENTIALS_PREFIX}AWS_SECRET_ACCESS_KEY")
    return store.S3Settings(access_key_id=key_id or None, secret_access_key=secret or None)


def jsonl_files(uri: str) -> list[tuple[str, Path]]:
    """(name, local path) of the jsonl files a data URI names: one file, or every *.jsonl under
    a directory/prefix. The name is the URI a person recognises, not the download cache path."""
    path = store.fetch(uri, data_settings())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{uri}: no .jsonl files")
        base = uri.rstrip("/")
        return [(f"{base}/{p.relative_to(path)}", p) for p in files]
    return [(uri, path)]


def read_jsonl(path: Path, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; DataError on anything but a JSON object,
    naming the file as `name` (default: its path) and the line."""
    shown = name or str(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{shown} line {lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise DataError(f"{shown} line {lineno}: expected a JSON object")
            yield lineno, record


def _string(record: dict[str, Any], key: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string")
    return value


def segments(
    record: dict[str, Any], fmt: Format, tok: PreTrainedTokenizerBase
) -> list[tuple[str, bool]]:
    """The record as (text, trained) segments in order, end-of-sequence included."""
    eos = tok.eos_token or ""
    if fmt == "text":
        return [(_string(record, "text") + eos, True)]
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        inp = _string(record, "input", optional=True)
        output = _string(record, "output")
        template = ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT
        return [(template.format(instruction=instruction, input=inp), False), (output + eos, True)]
    return chat_segments(record, tok)


def chat_segments(record: dict[str, Any], tok: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Render with the chat template, one message at a time, to find the assistant spans.

    The rendering of messages[:i] plus the generation prompt must be a prefix of the rendering of
    messages[:i+1]; every sane template has this property and it is checked, not assumed.
    """
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("every message needs a string 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError("every message needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to train on")
    if tok.chat_template is None:
        raise ValueError("the tokenizer has no chat template")

    def render(msgs: list[dict[str, str]], prompt: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        out.append((rest, False))
    return [(text, trained) for text, trained in out if text]


def tokenize(
    parts: list[tuple[str, bool]], tok: PreTrainedTokenizerBase, max_length: int
) -> Example:
    """Concatenate the segments' tokens, mask the untrained ones, truncate on the right."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in parts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Example(ids[:max_length], labels[:max_length])


def load_examples(
    uri: str,
    fmt: Format,
    tok: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
) -> list[Example]:
    """Every usable example of a data URI, in file order, at most `max_samples`.

    Records left with no trained token after truncation teach nothing and are dropped; a data set
    with none left is an error.
    """
    examples: list[Example] = []
    for name, path in jsonl_files(uri):
        for lineno, record in read_jsonl(path, name):
            try:
                example = tokenize(segments(record, fmt, tok), tok, max_length)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{name} line {lineno}: bad {fmt} record: {e}") from e
            if example.trained_tokens:
                examples.append(example)
            if max_samples is not None and len(examples) >= max_samples:
                return examples
    if not examples:
        raise DataError(f"{uri}: no usable {fmt} records")
    return examples
