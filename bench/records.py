"""The benchmark records: the JSON of each run that docs/benchmarks.md cites, committed in
bench/records/, and the docs' tables rendered from them.

`make bench` writes its results to bench/results/ (scratch, ignored by git). A run worth citing
is kept: `python -m bench.records keep NAME` copies its JSON (and plots) into bench/records/ and
re-renders every generated block of docs/benchmarks.md. A block is

    <!-- record NAME TABLE -->
    ...rendered from bench/records/NAME.json...
    <!-- end record -->

and tests/bench/test_records.py holds each block equal to what its record renders, so no table in
the docs can drift from the run it came from. `python -m bench.records compare NAME` checks that
a new run reproduces the record's reproducible columns (sizes and seeded losses; not timings).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.common import BENCHMARKS as MODULES
from bench.common import REPO_ROOT, RESULTS_DIR
from bench.tables import LEFT_ALIGNED, markdown

RECORDS_DIR = REPO_ROOT / "bench" / "records"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(
    r"(?P<open><!-- record (?P<name>[a-z]+) (?P<table>[a-z0-9-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- end record -->)",
    re.DOTALL,
)
Document = dict[str, Any]
RELATIVE_TOLERANCE = 1e-4
"""How far a reproducible float may move between runs (summation order across CPUs)."""


def load(name: str, where: Path = RECORDS_DIR) -> Document:
    path = where / f"{name}.json"
    doc: Document = json.loads(path.read_text())
    if doc.get("benchmark") != name:
        raise ValueError(f"{path}: the record of {doc.get('benchmark')!r}, not {name!r}")
    return doc


def provenance(doc: Document) -> str:
    """Where a record's numbers come from, in one line the docs show above its tables."""
    m = doc["machine"]
    load_1m = (m.get("load_average") or [None])[0]
    return (
        f"*Record `bench/records/{doc['benchmark']}.json`: git {m.get('git_commit')}, "
        f"{doc['created'][:10]}, {doc['seconds']:,.0f} s on {m['cpu']} ({m['cpu_cores']} cores, "
        f"{m['ram_gib']} GiB, device {m['device']}, torch {m['torch']}, "
        f"OMP_NUM_THREADS {m.get('omp_num_threads')}), load {load_1m} at the start.*"
    )


def tables(doc: Document) -> dict[str, str]:
    """Every table a record renders: `provenance`, `results` (its rows) and whatever its
    benchmark module adds through `record_tables(doc)`."""
    out = {
        "provenance": provenance(doc),
        "results": markdown(doc["columns"], doc["rows"], doc.get("formats", {})),
    }
    extra: Callable[[Document], dict[str, str]] | None = getattr(
        importlib.import_module(MODULES[doc["benchmark"]]), "record_tables", None
    )
    if extra is not None:
        out |= extra(doc)
    return out


def render_docs(text: str, records: Mapping[str, Document]) -> str:
    """`text` with every record block re-rendered; a block naming a missing record or table is
    an error, not a silently stale table."""

    def body(match: re.Match[str]) -> str:
        name, table = match["name"], match["table"]
        if name not in records:
            raise KeyError(f"docs cite the record {name!r}, which bench/records/ lacks")
        rendered = tables(records[name])
        if table not in rendered:
            raise KeyError(f"the record {name!r} has no table {table!r}: {sorted(rendered)}")
        return match["open"] + rendered[table] + "\n" + match["close"]

    return BLOCK.sub(body, text)


def cited(text: str) -> set[str]:
    return {m["name"] for m in BLOCK.finditer(text)}


def all_records(where: Path = RECORDS_DIR) -> dict[str, Document]:
    return {p.stem: load(p.stem, where) for p in sorted(where.glob("*.json"))}


def keep(name: str, source: Path = RESULTS_DIR) -> Path:
    """Make the run in `source` the record the docs cite: its JSON and its plots."""
    doc = load(name, source)
    if doc["settings"].get("smoke"):
        raise ValueError(f"{source / name}.json is a --smoke run: it measures nothing")
    RECORDS_DIR.mkdir(parents=True, exist_ok=True)
    for plot in doc.get("plots", []):
        top = Path(plot).parts[0]
        src, dst = source / top, RECORDS_DIR / top
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    target = RECORDS_DIR / f"{name}.json"
    shutil.copyfile(source / f"{name}.json", target)
    DOCS.write_text(render_docs(DOCS.read_text(), all_records()))
    return target


def row_key(doc: Document, row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(c) for c in doc["columns"] if c in LEFT_ALIGNED or c == "clients")


def differences(record: Document, run: Document) -> list[str]:
    """What a new run changed in the record's reproducible columns (the module's
    `REPRODUCIBLE`): sizes and seeded losses, never timings."""
    columns = getattr(importlib.import_module(MODULES[record["benchmark"]]), "REPRODUCIBLE", ())
    rows = {row_key(run, r): r for r in run["rows"]}
    out = []
    for want in record["rows"]:
        key = row_key(record, want)
        got = rows.get(key)
        if got is None:
            out.append(f"{key}: not in the new run")
            continue
        for c in columns:
            a, b = want.get(c), got.get(c)
            same = (
                math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE)
                if isinstance(a, float) and isinstance(b, float)
                else a == b
            )
            if not same:
                out.append(f"{key} {c}: record {a}, this run {b}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.records", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("docs", help="re-render docs/benchmarks.md's record blocks")
    sub.add_parser("check", help="fail if docs/benchmarks.md differs from the records")
    for cmd, what in (("keep", "make a run the record"), ("compare", "a run against the record")):
        p = sub.add_parser(cmd, help=what)
        p.add_argument("name", choices=list(MODULES))
        p.add_argument("--from", dest="source", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.command == "keep":
        print(f"kept {keep(args.name, args.source)}; docs/benchmarks.md re-rendered")
        return 0
    if args.command == "compare":
        diffs = differences(load(args.name), load(args.name, args.source))
        for line in diffs:
            print(line)
        print(
            f"{args.name}: "
            + ("reproduces the record" if not diffs else f"{len(diffs)} differences")
        )
        return 1 if diffs else 0
    text = DOCS.read_text()
    rendered = render_docs(text, all_records())
    if args.command == "docs":
        DOCS.write_text(rendered)
        return 0
    if rendered != text:
        print("docs/benchmarks.md differs from bench/records/: run python -m bench.records docs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
