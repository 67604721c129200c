"""Training and evaluation data: jsonl records in three formats, tokenized with loss masks.

Formats (settings.DataSpec.format):
- text:   {"text": "..."}: every token is trained;
- alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}: only the output
          (and the end-of-sequence token) is trained, the prompt is masked with -100;
- chat:   {"messages": [{"role": "...", "content": "..."}, ...]} rendered with the tokenizer's
          chat template: only the assistant turns (up to and including their end-of-turn token)
          are trained.

Special tokens follow the tokenizer's own conventions rather than a rule of ours: text and alpaca
records start with the BOS token exactly when the tokenizer puts one before a text it encodes
(Llama and Mistral do; SmolLM2 and Qwen define none to add), and a chat record is what its
template renders, BOS included if the template writes one. Labels are the token ids themselves,
so an end-of-sequence token is trained even when the tokenizer pads with the same id: padding is
masked by position (training.collate), never by id.

A record longer than the sequence length is cut where it hurts least: the prompt loses tokens
from the left (its end, next to the answer, is what the answer depends on most), down to half
the window; then the answer loses tokens from the right. Every record is kept unless nothing in
it is trained, and the loader counts both cases (`LoadStats`) for the client's log and summary.

A bad record fails the whole load with an error that names the file and the line, because a
silently skipped record in a federated run is a client whose data nobody can inspect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedtune_trainer.storage import store
from fedtune_trainer.storage.locate import fetch
from fedtune_trainer.wire.contract import DATA_CREDENTIALS_PREFIX

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
        """Tokens the loss is taken on: labelled positions after the first (the first token of
        a sequence has nothing before it to be predicted from)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


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
    path = fetch(uri, data_settings())
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
    """The record as (text, trained) segments in order, end-of-sequence included (BOS is added
    at the token level, see `bos_ids`)."""
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


def bos_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] if the tokenizer starts every text it encodes with its BOS token, else [].

    Read from the tokenizer's behaviour, not from whether it names a BOS token: SmolLM2 names
    `<|im_start|>` as its BOS but never adds it (that token opens a chat turn), while Llama's
    tokenizers add theirs to every text.
    """
    bos = tok.bos_token_id
    if bos is None:
        return []
    ids = tok("x")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def chat_segments(record: dict[str, Any], tok: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Render with the chat template, one message at a time, to find the assistant spans.

    The rendering of messages[:i] plus the generation prompt must be a prefix of the rendering of
    messages[:i+1]; every sane template has this property and it is checked, not assumed. The
    assistant span is what that message adds after the generation prompt; whitespace the template
    puts after the span's last end-of-sequence token (SmolLM2's `<|im_end|>\n`) is glue the model
    never generates, because generation stops at that token, so it is not trained.
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

    eos = tok.eos_token
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        answer = full[len(prompt) :]
        cut = len(answer)
        if eos and eos in answer:
            end = answer.rindex(eos) + len(eos)
            if not answer[end:].strip():
                cut = end
        out += [(prompt[len(done) :], False), (answer[:cut], True), (answer[cut:], False)]
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        out.append((rest, False))
    return [(text, trained) for text, trained in out if text]


def fit(ids: list[int], labels: list[int], max_length: int, keep: int) -> tuple[int, int]:
    """Which tokens of an over-long record to keep: returns (prompt tokens dropped from the
    left, total kept), leaving the first `keep` tokens (BOS) in place.

    The prompt is everything before the first trained token. It keeps its right end, at least
    half the window (or all of it if shorter): an answer without the end of its question
    teaches the wrong mapping. The answer and whatever follows keep their start, which is at
    least the other half of the window, so a record never loses its whole answer.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    prompt = max(0, first - keep)
    rest = len(ids) - keep - prompt
    budget = max_length - keep
    keep_prompt = min(prompt, max(budget - rest, budget // 2))
    return prompt - keep_prompt, keep + keep_prompt + min(rest, budget - keep_prompt)


def tokenize(
    parts: list[tuple[str, bool]],
    tok: PreTrainedTokenizerBase,
    max_length: int,
    prefix: list[int] | None = None,
) -> tuple[Example, bool]:
    """Concatenate `prefix` (BOS, untrained) and the segments' tokens, mask the untrained ones,
    and cut to `max_length` (see `fit`); returns the example and whether it was cut.

    Each segment is tokenized on its own: at inference the prompt is encoded alone and the
    answer is generated after it, so the answer's tokens must not merge with the prompt's.
    """
    ids: list[int] = list(prefix or [])
    labels: list[int] = [IGNORE] * len(ids)
    for text, trained in parts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if len(ids) <= max_length:
        return Example(ids, labels), False
    keep = 1 if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else 0
    start, total = fit(ids, labels, max_length, keep)
    ids = ids[:keep] + ids[keep + start :][: total - keep]
    labels = labels[:keep] + labels[keep + start :][: total - keep]
    return Example(ids, labels), True


@dataclass
class LoadStats:
    """What happened to the records of a data set: read, cut to length, dropped (and where)."""

    records: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_at: list[str] = field(default_factory=list)
    """`<file> line <n>` of the first few dropped records, for the log."""

    def describe(self) -> str:
        text = f"{self.records} records, {self.truncated} truncated, {self.dropped} dropped"
        if self.dropped_at:
            more = ", ..." if self.dropped > len(self.dropped_at) else ""
            text += f" (nothing to train: {', '.join(self.dropped_at)}{more})"
        return text


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    stats: LoadStats


def load_dataset(
    uri: str,
    fmt: Format,
    tok: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
) -> Dataset:
    """Every usable example of a data URI, in file order, at most `max_samples`, with counts.

    A record with no trained token (an empty answer and a tokenizer without an end-of-sequence
    token) teaches nothing and is dropped, counted and located; a data set with none left is an
    error.
    """
    examples: list[Example] = []
    stats = LoadStats()
    prefix = bos_ids(tok) if fmt != "chat" else []
    for name, path in jsonl_files(uri):
        for lineno, record in read_jsonl(path, name):
            try:
                example, cut = tokenize(segments(record, fmt, tok), tok, max_length, prefix)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{name} line {lineno}: bad {fmt} record: {e}") from e
            stats.records += 1
            stats.truncated += cut
            if example.trained_tokens:
                examples.append(example)
            else:
                stats.dropped += 1
                if len(stats.dropped_at) < 5:
                    stats.dropped_at.append(f"{name} line {lineno}")
            if max_samples is not None and len(examples) >= max_samples:
                return Dataset(examples, stats)
    if not examples:
        raise DataError(f"{uri}: no usable {fmt} records ({stats.describe()})")
    return Dataset(examples, stats)


def load_examples(
    uri: str,
    fmt: Format,
    tok: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
) -> list[Example]:
    """The examples of `load_dataset`, without the counts."""
    return load_dataset(uri, fmt, tok, max_length, max_samples).examples
