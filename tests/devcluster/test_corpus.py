"""The real-text corpus: one source per client, deterministic, deduplicated, eval held out, and
every record one the trainer's data loader takes with the real tokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path
from typing import Any

import pytest

from devcluster import corpus
from devcluster.corpus import Chunk

ALL = list(corpus.SOURCES)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default corpus, built twice with the same seed and once with another."""
    root = tmp_path_factory.mktemp("corpus")
    return {
        "a": corpus.build_corpus(root / "a", clients=4),
        "b": corpus.build_corpus(root / "b", clients=4),
        "seed1": corpus.build_corpus(root / "seed1", clients=4, seed=1),
    }


@pytest.fixture(scope="module")
def owner() -> dict[str, str]:
    """Which source each chunk text comes from, over every source."""
    docs = corpus.chunk_documents(ALL)
    return {c.text: source for source, ds in docs.items() for d in ds for c in d}


def assistant_texts(path: str | Path) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line)["messages"][1]["content"] for line in lines]


def test_each_client_holds_only_its_own_source(
    built: dict[str, Any], owner: dict[str, str]
) -> None:
    layout = built["a"]
    assert [c["source"] for c in layout["clients"].values()] == ALL
    for info in layout["clients"].values():
        texts = assistant_texts(info["file"])
        assert len(texts) == info["records"] > 100
        assert {owner[t] for t in texts} == {info["source"]}


def test_no_text_appears_twice_across_clients_and_eval(built: dict[str, Any]) -> None:
    layout = built["a"]
    files = [c["file"] for c in layout["clients"].values()] + [layout["eval"]["file"]]
    texts = [corpus._normal(t) for f in files for t in assistant_texts(f)]
    assert len(texts) == len(set(texts))


def test_eval_mixes_every_source_from_held_out_documents(
    built: dict[str, Any], owner: dict[str, str]
) -> None:
    layout = built["a"]
    evals = assistant_texts(layout["eval"]["file"])
    assert len(evals) == layout["eval"]["records"] == 64
    counts = {s: sum(owner[t] == s for t in evals) for s in ALL}
    assert counts == dict.fromkeys(ALL, 16)
    # Interleaved: the first records already cover every source.
    assert {owner[t] for t in evals[:4]} == set(ALL)
    train = {t for c in layout["clients"].values() for t in assistant_texts(c["file"])}
    assert not train & set(evals)


def test_same_seed_same_bytes_other_seed_other_split(built: dict[str, Any]) -> None:
    a, b, other = built["a"], built["b"], built["seed1"]
    for name in a["clients"]:
        assert (
            Path(a["clients"][name]["file"]).read_bytes()
            == Path(b["clients"][name]["file"]).read_bytes()
        )
        assert a["clients"][name]["sha256"] != other["clients"][name]["sha256"]
    assert a["eval"]["sha256"] == b["eval"]["sha256"] != other["eval"]["sha256"]
    written = json.loads((Path(a["eval"]["file"]).parent / "corpus.json").read_text())
    assert written == a


def test_adding_a_client_leaves_the_others_data_alone(tmp_path: Path) -> None:
    two = corpus.build_corpus(tmp_path / "two", clients=2, records=50, eval_records=8)
    three = corpus.build_corpus(tmp_path / "three", clients=3, records=50, eval_records=8)
    for name in two["clients"]:
        assert two["clients"][name]["sha256"] == three["clients"][name]["sha256"]


@pytest.mark.parametrize("fmt", corpus.FORMATS)
def test_records_load_with_the_real_tokenizer(real_model: Path, tmp_path: Path, fmt: str) -> None:
    """Every record is one the trainer trains on: none rejected, none dropped as empty."""
    from transformers import AutoTokenizer

    from fedtune_trainer.learning.data import load_examples

    tok = AutoTokenizer.from_pretrained(real_model)
    layout = corpus.build_corpus(tmp_path, clients=4, fmt=fmt, records=40, eval_records=16)
    for info in [*layout["clients"].values(), layout["eval"]]:
        examples = load_examples(info["file"], fmt, tok, 1024)
        assert len(examples) == info["records"]
        assert all(e.trained_tokens > 20 for e in examples)
        if fmt == "chat":  # the question is prompt, not trained
            assert all(e.trained_tokens < len(e.input_ids) for e in examples)


@pytest.mark.parametrize("fmt", corpus.FORMATS)
def test_record_shapes(tmp_path: Path, fmt: str) -> None:
    layout = corpus.build_corpus(tmp_path, clients=1, fmt=fmt, records=5, eval_records=2)
    first = Path(layout["clients"]["client-0"]["file"]).read_text().splitlines()[0]
    record = json.loads(first)
    if fmt == "text":
        assert set(record) == {"text"}
        title, _, body = record["text"].partition("\n\n")
        assert title
        assert len(body) >= corpus.MIN_CHARS
    else:
        user, assistant = record["messages"]
        assert user["role"] == "user"
        assert user["content"].startswith("What does the Python language reference say about")
        assert assistant["role"] == "assistant"
        assert len(assistant["content"]) >= corpus.MIN_CHARS


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"clients": len(ALL) + 1}, "distinct sources"),
        ({"clients": 0}, "distinct sources"),
        ({"clients": 2, "sources": ["langref", "langref"]}, "distinct sources"),
        ({"clients": 1, "sources": ["wikipedia"]}, "unknown sources"),
        ({"clients": 2, "fmt": "alpaca"}, "format must be one of"),
        ({"clients": 4, "eval_records": 3}, "one eval record per source"),
        ({"clients": 1, "records": 0}, "at least one record"),
        ({"clients": 1, "chunk_chars": 100}, "min_chars"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        corpus.build_corpus(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_sources_pick_and_order_the_clients(tmp_path: Path) -> None:
    layout = corpus.build_corpus(
        tmp_path, clients=2, sources=["licenses", "langref"], records=3, eval_records=2
    )
    assert [c["source"] for c in layout["clients"].values()] == ["licenses", "langref"]
    assert [c["records"] for c in layout["clients"].values()] == [3, 3]
    # The licenses depend on the installed distributions: their versions are recorded.
    assert layout["distributions"]["torch"] == importlib.metadata.version("torch")
    only_python = corpus.build_corpus(tmp_path / "py", clients=1, records=3, eval_records=2)
    assert "distributions" not in only_python


def test_cli_writes_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--clients", "2", "--format", "text", "--records", "7"]
    assert corpus.main([*argv, "--eval-records", "4", "--chunk-chars", "600"]) == 0
    layout = json.loads(capsys.readouterr().out)
    assert (layout["format"], layout["chunk_chars"]) == ("text", 600)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "client-0.jsonl",
        "client-1.jsonl",
        "corpus.json",
        "eval.jsonl",
    ]
    lines = (tmp_path / "client-0.jsonl").read_text().splitlines()
    lengths = [len(json.loads(line)["text"]) for line in lines]
    assert len(lengths) == 7
    assert max(lengths) < 600 + corpus.MIN_CHARS + 200  # chunk, remnant and title


# -- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "chunk_chars", "min_chars", "expected"),
    [
        (["a" * 30, "b" * 30, "c" * 30], 70, 10, ["a" * 30 + "\n\n" + "b" * 30, "c" * 30]),
        (["a" * 30, "b" * 5], 32, 10, ["a" * 30 + "\n\n" + "b" * 5]),  # remnant joins
        (["a" * 5], 100, 10, []),  # too short alone
        (["x" * 25 + "\n" + "y" * 25], 30, 10, ["x" * 25, "y" * 25]),  # long paragraph: lines
        (["w " * 19 + "w"], 16, 4, ["w w w w w w w w", "w w w w w w w w", "w w w w"]),  # words
    ],
)
def test_pack(blocks: list[str], chunk_chars: int, min_chars: int, expected: list[str]) -> None:
    assert corpus.pack(blocks, chunk_chars, min_chars) == expected


@pytest.mark.parametrize(
    ("line", "dropped"),
    [
        ("|Py-Versions| |Versions| |Build-Status|", True),
        (".. |Logo| image:: https://example.org/logo.png", True),
        ("   :target: https://example.org", True),
        ("[![PyPI](https://img.shields.io/pypi/v/x.svg)](https://pypi.org/x)", True),
        ('<p align="center">', True),
        ("</div>", True),
        ("Instantly make your loops show a smart progress meter.", False),
        ("Use ``a | b`` to combine them.", False),
        ("<https://example.org> is the home page.", False),
    ],
)
def test_strip_markup(line: str, dropped: bool) -> None:
    assert (corpus.strip_markup(f"keep\n{line}\nkeep") == "keep\nkeep") is dropped


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f(a, b=1): pass", "f(a, b)"),
        ("def f(self, x, *args, y, **kw): pass", "f(x, *args, y, **kw)"),
        ("def f(a, /, b, *, c): pass", "f(a, b, *, c)"),
        ("async def g(cls): pass", "g()"),
    ],
)
def test_signature(source: str, expected: str) -> None:
    import ast

    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    assert corpus.signature(node) == expected


def test_dedup_keeps_the_first_copy_of_a_paragraph(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = "The same long paragraph of license boilerplate, copied into many packages. " * 2
    docs = {
        "one": [corpus.Document("A", "qa", f"{shared}\n\n{'own text of A ' * 20}")],
        "two": [
            corpus.Document("B", "qb", f"{'own text of B ' * 20}\n\n{shared}"),
            corpus.Document("C", "qc", shared),
        ],
    }
    monkeypatch.setattr(corpus, "SOURCES", {k: (k, lambda v=v: iter(v)) for k, v in docs.items()})
    out = corpus.chunk_documents(["one", "two"], chunk_chars=1000, min_chars=50)
    texts = {s: [c.text for d in ds for c in d] for s, ds in out.items()}
    assert texts["one"] == [f"{shared.strip()}\n\n{('own text of A ' * 20).strip()}"]
    assert texts["two"] == [("own text of B " * 20).strip()]  # C was only the shared paragraph


def test_split_source_holds_out_whole_documents() -> None:
    docs = [
        [Chunk("s", f"d{d} part {i}", "q", f"doc {d} chunk {i}") for i in range(1 + d % 3)]
        for d in range(20)
    ]
    train, held = corpus.split_source(docs, 5, random.Random(0))
    held_docs = {c.title.split()[0] for c in held}
    train_docs = {c.title.split()[0] for d in train for c in d}
    assert len(held) == 5
    assert not held_docs & train_docs
    assert len(train) + len(held_docs) == 20
    with pytest.raises(ValueError, match="too few documents"):
        corpus.split_source(docs[:1], 5, random.Random(0))
