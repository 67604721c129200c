"""The tiny model and the demo data the project makes for itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune_trainer.fixtures.demo_data import TASKS, make_demo_data
from tests.trainer.support import Demo


def test_tiny_model_loads_with_the_auto_classes(demo: Demo) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo.model)
    tok = AutoTokenizer.from_pretrained(demo.model)
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 1_000_000
    names = {n for n, _ in model.named_modules()}
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(module) for n in names), module
    assert tok.pad_token == "<pad>"
    assert tok.eos_token == "</s>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == model.config.vocab_size <= 512
    ids = tok("What is the capital of France?")["input_ids"]
    assert ids[0] == tok.bos_token_id  # like Llama's tokenizers, every text starts with BOS
    assert tok.decode(ids[1:]) == "What is the capital of France?"
    assert len(ids) < 20  # BPE learned the data's words
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), model.config.vocab_size)


def test_tiny_model_is_seeded(demo: Demo, tmp_path: Path) -> None:
    from fedtune_trainer.fixtures.tiny import make_tiny_model

    data = sorted(demo.data.glob("*.jsonl"))
    make_tiny_model(tmp_path / "again", data)
    a = AutoModelForCausalLM.from_pretrained(demo.model).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def question(row: dict, fmt: str) -> str:
    if fmt == "chat":
        return row["messages"][0]["content"]
    if fmt == "alpaca":
        return row["instruction"]
    return row["text"].split("\n")[0].removeprefix("Question: ")


def kind_of(q: str) -> str:
    prefixes = {"What is the capital": "capitals", "What is": "arithmetic", "Reverse": "reverse",
                "Write": "uppercase", "How many": "count", "Sort": "sort"}  # fmt: skip
    return next(kind for prefix, kind in prefixes.items() if q.startswith(prefix))


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "text"])
def test_demo_data_is_non_iid(tmp_path: Path, fmt: str) -> None:
    layout = make_demo_data(tmp_path, clients=4, samples=30, eval_samples=40, fmt=fmt, seed=1)
    kinds = [c["task"] for c in layout["clients"].values()]
    assert kinds == list(TASKS)[:4]
    for name, info in layout["clients"].items():
        rows = [json.loads(line) for line in Path(info["file"]).read_text().splitlines()]
        assert len(rows) == 30, name
        assert {"chat": "messages", "alpaca": "instruction", "text": "text"}[fmt] in rows[0]
    evals = Path(layout["eval"]["file"]).read_text().splitlines()
    assert len(evals) == 40
    # The evaluation set mixes every client's kind of task, in equal parts.
    assert Counter(kind_of(question(json.loads(line), fmt)) for line in evals) == dict.fromkeys(
        kinds, 10
    )
    again = make_demo_data(tmp_path / "b", clients=4, samples=30, eval_samples=40, fmt=fmt, seed=1)
    assert Path(again["eval"]["file"]).read_text() == "\n".join(evals) + "\n"


def test_demo_answers_are_right() -> None:
    import random

    rng = random.Random(3)
    for _ in range(50):
        q, a = TASKS["arithmetic"](rng)
        x, op, y = q.removeprefix("What is ").removesuffix("?").split()
        assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
        q, a = TASKS["reverse"](rng)
        assert q.split("'")[1][::-1] == a
        q, a = TASKS["sort"](rng)
        nums = q.removeprefix("Sort these numbers: ").removesuffix(".").split()
        assert a.split() == sorted(nums)


@pytest.mark.parametrize(
    ("uri", "is_hub"),
    [("Qwen/Qwen2.5-0.5B", True), ("meta-llama/Llama-3.2-1B", True), ("s3://b/models/x", False)],
)
def test_hub_ids_pass_through_to_transformers(uri: str, is_hub: bool) -> None:
    from fedtune_trainer.learning.loading import HUB_ID

    assert bool(HUB_ID.match(uri)) is is_hub


def test_a_local_directory_wins_over_a_hub_id_of_the_same_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune_trainer.learning.loading import local_dir

    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert local_dir("org/model", "config.json", "model") == Path("org/model")
    assert local_dir("other/model", "config.json", "model") == "other/model"
