"""Real text for fine-tuning runs, built from sources already on this machine, split non-IID.

The tests, the e2e run, the demo and the benchmarks need text a pretrained model can learn from,
with no model hub or data set download: generated templates teach a real model nothing it can show.
Every source here ships with the interpreter or with the locked Python packages, so the corpus is
pinned by the Python version and the lock, not by whatever system packages a machine has:

- `langref`:  the Python language reference, as `pydoc_data.topics` ships it (pinned by Python);
- `stdlib`:   docstrings of the standard library's public modules, classes and functions, read
              with `ast` from the source files, never imported (pinned by Python);
- `packages`: the long descriptions (READMEs) in the installed distributions' METADATA
              (pinned by the lock; fedtune's own is left out since it changes with the project);
- `licenses`: license texts, Python's LICENSE.txt and the distributions' license files
              (pinned by Python and the lock).

Each client gets a different source: the non-IID split federated learning is about (language,
API reference, prose, legalese). The eval set holds out whole documents of every source the
clients use, so no evaluation text shares a document with training text.

Documents are split into paragraphs, and a paragraph already seen (earlier in the same or in an
earlier source) is dropped, so license boilerplate copied into fifty packages counts once and
sources stay disjoint. Paragraphs are packed into chunks of about `chunk_chars` characters (English
prose is about 4 characters per token with a BPE tokenizer); identical chunks are dropped.

Records are the trainer's formats: `text` ({"text": title + chunk}) or `chat` (a user question
derived from the document's own title, such as the language reference's section heading or a
function's name and arguments, and the chunk as the assistant's answer). Everything is
deterministic for a given seed, and cheap: a few seconds, most of it parsing the standard library.

    python -m devcluster.corpus OUT --clients 4 --format chat
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib.metadata
import json
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Format = Literal["text", "chat"]
FORMATS: tuple[Format, ...] = ("text", "chat")

CHUNK_CHARS = 1000
"""About 250 tokens of prose: one record fits a 256-512 token sequence with its prompt."""
MIN_CHARS = 200
"""Shorter documents and remnants teach little and would make most records padding."""
MAX_CHUNKS_PER_DOCUMENT = 16
"""A document's first chunks only: three packages' changelogs would otherwise be a third of the
`packages` source, and a sample of a few hundred records should see many documents."""
DEDUP_MIN_CHARS = 64
"""Short paragraphs ("Parameters", "Example::") repeat legitimately; only longer ones dedup."""
OWN_DISTRIBUTION = "fedtune"


@dataclass(frozen=True)
class Document:
    """One unit of a source: a reference section, a docstring, a README, a license file."""

    title: str
    question: str
    """The user's question for the chat format, derived from the document's own structure."""
    text: str


@dataclass(frozen=True)
class Chunk:
    source: str
    title: str
    question: str
    text: str

    def record(self, fmt: Format) -> dict[str, Any]:
        if fmt == "text":
            return {"text": f"{self.title}\n\n{self.text}"}
        return {
            "messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.text},
            ]
        }


# -- sources ----------------------------------------------------------------------------------


def langref() -> Iterator[Document]:
    """Sections of the Python language reference, each titled by its own heading."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        heading, _, rest = text.partition("\n")
        heading = heading.strip() or key
        if rest.lstrip().startswith("*"):  # the reST underline of the heading
            rest = rest.lstrip().partition("\n")[2]
        question = f'What does the Python language reference say about "{heading}"?'
        yield Document(title=heading, question=question, text=rest.strip())


STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}
"""Tests, tools and data rather than API documentation (pydoc_data is the `langref` source)."""


def stdlib_files() -> list[tuple[str, Path]]:
    """(module name, path) of every public standard-library module, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or parts[0] in STDLIB_SKIP or parts[0].startswith(("config-", "site-")):
            continue
        if any(p.startswith("_") or not p.isidentifier() for p in parts):
            continue
        out.append((".".join(parts), path))
    return sorted(out)


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The argument names of a def, as a reader of the docs sees them: `dumps(obj, *, indent)`."""
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args) if x.arg not in ("self", "cls")]
    if a.vararg:
        names.append(f"*{a.vararg.arg}")
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append(f"**{a.kwarg.arg}")
    return f"{node.name}({', '.join(names)})"


def stdlib() -> Iterator[Document]:
    """Docstrings of modules, public classes and public functions and methods."""
    for module, path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc:
            yield Document(module, f"What is the Python module `{module}` for?", doc)
        yield from _definitions(module, tree.body, prefix=module)


def _definitions(module: str, body: list[ast.stmt], prefix: str) -> Iterator[Document]:
    for node in body:
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            name = f"{prefix}.{node.name}"
            if doc:
                yield Document(name, f"What is the class `{name}` in Python's `{module}`?", doc)
            yield from _definitions(module, node.body, prefix=name)
        elif doc:
            name = f"{prefix}.{signature(node)}"
            yield Document(name, f"What does `{name}` do?", doc)


MARKUP_LINE = re.compile(
    r"""^\s*(
        (\|[^|\s][^|]*\|\s*)+                    # reST substitution references only (badges)
      | \.\.\s+(\|[^|]+\|\s+)?(image|figure)::.* # reST image directives
      | :(target|alt|width|height|align|scale):.*  # and their options
      | (\[!\[|!\[).*                            # markdown badges and images
      | </?(img|a|p|div|br|h\d|picture|source|table|tr|td|details|summary)\b[^>]*>?.*  # HTML
    )\s*$""",
    re.VERBOSE | re.IGNORECASE,
)


def strip_markup(text: str) -> str:
    """README text without the lines that are only badges, images or HTML layout."""
    return "\n".join(line for line in text.splitlines() if not MARKUP_LINE.match(line))


def _distributions() -> list[importlib.metadata.Distribution]:
    """Installed distributions, one per name, sorted; the project itself left out."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key and key != OWN_DISTRIBUTION and key not in seen:
            seen[key] = dist
    return [seen[k] for k in sorted(seen)]


def packages() -> Iterator[Document]:
    """The long description of every installed distribution."""
    for dist in _distributions():
        meta = dist.metadata
        body = meta.get_payload() or meta.get("Description") or ""
        if not isinstance(body, str) or not body.strip():
            continue
        name = meta["Name"]
        title = f"{name} {dist.version}"
        yield Document(title, f"Describe the Python package {name}.", strip_markup(body))


LICENSE_NAME = re.compile(r"^(licen[sc]e|copying|notice|copyright)", re.IGNORECASE)


def licenses() -> Iterator[Document]:
    """Python's own license, then every license file in the distributions' metadata."""
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_license.is_file():
        title = f"Python {sys.version_info.major}.{sys.version_info.minor} license"
        yield Document(title, "What are the license terms of Python?", python_license.read_text())
    for dist in _distributions():
        name = dist.metadata["Name"]
        for file in sorted(dist.files or [], key=str):
            in_metadata = any(part.endswith((".dist-info", ".egg-info")) for part in file.parts)
            if not in_metadata or not LICENSE_NAME.match(file.name):
                continue
            try:
                text = Path(str(dist.locate_file(file))).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            title = f"{name} {dist.version}: {file.name}"
            yield Document(title, f"What does the file {file.name} of {name} say?", text)


SOURCES: dict[str, tuple[str, Callable[[], Iterator[Document]]]] = {
    "langref": ("the Python language reference (pydoc_data.topics)", langref),
    "stdlib": ("docstrings of the standard library", stdlib),
    "packages": ("long descriptions of the installed packages", packages),
    "licenses": ("license texts of Python and the installed packages", licenses),
}
"""In the order clients get them: client-0 the language reference, client-1 the docstrings, ..."""


@functools.cache
def documents(source: str) -> tuple[Document, ...]:
    """A source's documents, read once per process (the standard library takes seconds to
    parse, and the sources do not change while a process runs)."""
    return tuple(SOURCES[source][1]())


# -- chunking ---------------------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, trailing spaces removed, indentation (code) kept."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    blocks = "\n".join(lines).split("\n\n")
    return [b.strip("\n") for b in blocks if b.strip()]


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph over `limit` as pieces of whole lines (words for a single long line)."""
    pieces: list[str] = []
    current = ""
    for line in paragraph.split("\n"):
        while len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:].lstrip()
        if current and len(current) + 1 + len(line) > limit:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        pieces.append(current)
    return pieces


def pack(blocks: list[str], chunk_chars: int, min_chars: int) -> list[str]:
    """Consecutive paragraphs packed into chunks of at most `chunk_chars`; a short remnant joins
    the chunk before it (so a chunk may reach chunk_chars + min_chars)."""
    chunks: list[str] = []
    current = ""
    for block in blocks:
        for piece in _split_long(block, chunk_chars) if len(block) > chunk_chars else [block]:
            if current and len(current) + 2 + len(piece) > chunk_chars:
                chunks.append(current)
                current = piece
            else:
                current = f"{current}\n\n{piece}" if current else piece
    if current:
        if chunks and len(current) < min_chars:
            chunks[-1] = f"{chunks[-1]}\n\n{current}"
        else:
            chunks.append(current)
    return [c for c in chunks if len(c) >= min_chars]


def chunk_documents(
    sources: list[str],
    chunk_chars: int = CHUNK_CHARS,
    min_chars: int = MIN_CHARS,
    max_chunks: int = MAX_CHUNKS_PER_DOCUMENT,
) -> dict[str, list[list[Chunk]]]:
    """Per source (in the given order), its documents as lists of at most `max_chunks` chunks,
    deduplicated against everything before them: paragraphs of DEDUP_MIN_CHARS characters or
    more, then whole chunks."""
    seen_paragraphs: set[str] = set()
    seen_chunks: set[str] = set()
    out: dict[str, list[list[Chunk]]] = {}
    for source in sources:
        docs: list[list[Chunk]] = []
        for doc in documents(source):
            kept = []
            for block in paragraphs(doc.text):
                key = _normal(block)
                if len(key) >= DEDUP_MIN_CHARS:
                    if key in seen_paragraphs:
                        continue
                    seen_paragraphs.add(key)
                kept.append(block)
            texts: list[str] = []
            for text in pack(kept, chunk_chars, min_chars):
                key = _normal(text)
                if len(texts) < max_chunks and key not in seen_chunks:
                    seen_chunks.add(key)
                    texts.append(text)
            n = len(texts)
            chunks = [
                Chunk(
                    source=source,
                    title=doc.title if n == 1 else f"{doc.title} (part {i} of {n})",
                    question=doc.question if n == 1 else f"{doc.question} (part {i} of {n})",
                    text=text,
                )
                for i, text in enumerate(texts, start=1)
            ]
            if chunks:
                docs.append(chunks)
        out[source] = docs
    return out


# -- the corpus -------------------------------------------------------------------------------


def split_source(
    docs: list[list[Chunk]], eval_records: int, rng: random.Random
) -> tuple[list[list[Chunk]], list[Chunk]]:
    """(training documents, eval chunks) of one source: whole documents, picked at random, are
    held out until they hold `eval_records` chunks; the eval set takes the first of those, and
    training keeps every other document."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    held: list[Chunk] = []
    cut = 0
    while cut < len(order) and len(held) < eval_records:
        held += docs[order[cut]]
        cut += 1
    train = [docs[i] for i in sorted(order[cut:])]
    if not train:
        raise ValueError("a source has too few documents to hold out an eval set and train")
    return train, held[:eval_records]


def write_jsonl(path: Path, chunks: list[Chunk], fmt: Format) -> dict[str, Any]:
    """Write the records; their count, characters and a digest (to tell two corpora apart)."""
    lines = [json.dumps(c.record(fmt), ensure_ascii=False) + "\n" for c in chunks]
    data = "".join(lines).encode()
    path.write_bytes(data)
    return {
        "file": str(path),
        "records": len(lines),
        "characters": sum(len(c.text) for c in chunks),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def build_corpus(
    out_dir: Path,
    clients: int = 4,
    fmt: Format = "chat",
    *,
    records: int | None = None,
    eval_records: int = 64,
    chunk_chars: int = CHUNK_CHARS,
    min_chars: int = MIN_CHARS,
    max_chunks: int = MAX_CHUNKS_PER_DOCUMENT,
    seed: int = 0,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Write client-<i>.jsonl (source i, at most `records` records, all by default) and
    eval.jsonl (`eval_records` records, split evenly among the clients' sources, from documents
    no client trains on) under `out_dir`, and corpus.json describing them; return that layout.

    `sources` picks and orders the sources (default: the first `clients` of SOURCES). A source's
    records do not depend on which other sources follow it, so adding a client leaves the first
    clients' data as it was.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    names = list(sources) if sources is not None else list(SOURCES)[:clients]
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {list(SOURCES)}")
    if clients < 1 or len(names) != clients or len(set(names)) != len(names):
        raise ValueError(
            f"{clients} clients need {clients} distinct sources; there are {len(SOURCES)}: "
            f"{list(SOURCES)}"
        )
    if eval_records < clients or (records is not None and records < 1):
        raise ValueError("need at least one record per client and one eval record per source")
    if min_chars > chunk_chars:
        raise ValueError("min_chars must not exceed chunk_chars")
    documents = chunk_documents(names, chunk_chars, min_chars, max_chunks)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout: dict[str, Any] = {
        "format": fmt,
        "seed": seed,
        "chunk_chars": chunk_chars,
        "max_chunks_per_document": max_chunks,
        "python": sys.version.split()[0],
        "clients": {},
    }
    if {"packages", "licenses"} & set(names):
        # What those sources were read from: the same versions give the same bytes.
        layout["distributions"] = {d.metadata["Name"]: d.version for d in _distributions()}
    held: list[list[Chunk]] = []
    per_source = [eval_records // clients + (i < eval_records % clients) for i in range(clients)]
    for i, source in enumerate(names):
        train_docs, evals = split_source(
            documents[source], per_source[i], random.Random(f"{seed}/{source}/eval")
        )
        train = [c for doc in train_docs for c in doc]
        random.Random(f"{seed}/{source}/train").shuffle(train)
        train = train[:records] if records is not None else train
        info = write_jsonl(out_dir / f"client-{i}.jsonl", train, fmt)
        info |= {"source": source, "description": SOURCES[source][0]}
        info["documents"] = len(train_docs)
        layout["clients"][f"client-{i}"] = info
        held.append(evals)
    # Interleave the sources, so a truncated eval file still mixes them.
    mixed = [c for group in _interleave(held) for c in group]
    layout["eval"] = write_jsonl(out_dir / "eval.jsonl", mixed, fmt) | {"sources": names}
    (out_dir / "corpus.json").write_text(json.dumps(layout, indent=2) + "\n")
    return layout


def _interleave(groups: list[list[Chunk]]) -> Iterator[list[Chunk]]:
    for i in range(max(map(len, groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster.corpus",
        description="Write a non-IID corpus of real text: client-<i>.jsonl (one source each), "
        "eval.jsonl and corpus.json under OUT.",
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--clients", type=int, default=4, help=f"at most {len(SOURCES)}")
    parser.add_argument("--format", choices=FORMATS, default="chat")
    parser.add_argument("--records", type=int, default=None, help="per client (default: all)")
    parser.add_argument("--eval-records", type=int, default=64)
    parser.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS)
    parser.add_argument("--max-chunks", type=int, default=MAX_CHUNKS_PER_DOCUMENT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=None)
    args = parser.parse_args(argv)
    layout = build_corpus(
        args.out,
        clients=len(args.sources) if args.sources else args.clients,
        fmt=args.format,
        records=args.records,
        eval_records=args.eval_records,
        chunk_chars=args.chunk_chars,
        max_chunks=args.max_chunks,
        seed=args.seed,
        sources=args.sources,
    )
    print(json.dumps(layout, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
