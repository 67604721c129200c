"""The benchmark records: docs/benchmarks.md's tables are what bench/records/ renders, and a rerun
is checked against its record on the columns that must reproduce."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bench import records
from bench.tables import cell


@pytest.mark.parametrize(
    ("value", "spec", "shown"),
    [
        (1234567.4, "int", "1,234,567"),
        (27.4, "ratio", "27.4x"),
        (9632.2, "ratio", "9,632x"),
        (2.84561, "float:4", "2.8456"),
        (0.853, "percent:0", "85%"),
        (0.0123, "signed-percent:1", "+1.2%"),
        (-0.004, "signed-percent:2", "-0.40%"),
        (2.5e-05, "sci:1", "2.5e-05"),
        (None, "int", ""),
        (1.23456, None, "1.235"),
        ("fp32", None, "fp32"),
    ],
)
def test_a_cell_is_shown_as_its_format_says(value: Any, spec: str | None, shown: str) -> None:
    assert cell(value, spec) == shown


def test_an_unknown_format_is_an_error_not_a_blank() -> None:
    with pytest.raises(ValueError, match="unknown table format"):
        cell(1.0, "bytes")


def record(eval_loss: float = 2.8456, seconds: float = 12.0) -> dict[str, Any]:
    return {
        "benchmark": "parity",
        "created": "2026-12-07T05:00:00+00:00",
        "seconds": 1486.2,
        "machine": {
            "cpu": "AMD EPYC",
            "cpu_cores": 2,
            "ram_gib": 23.5,
            "device": "cpu",
            "torch": "2.15.0",
            "omp_num_threads": "2",
            "git_commit": "abc1234",
            "load_average": [0.5, 0.4, 0.3],
        },
        "settings": {"smoke": False, "eval_loss_per_round": {"fedavg": [3.2247, 3.1207]}},
        "columns": ["config", "eval_loss", "optimizer_steps"],
        "formats": {"eval_loss": "float:4"},
        "rows": [{"config": "centralized", "eval_loss": eval_loss, "optimizer_steps": 60}],
        "plots": [],
        "seconds_per_row": seconds,
    }


DOC = """# Benchmarks
Text the generator never touches.
<!-- record parity provenance -->
stale
<!-- end record -->
<!-- record parity results -->
| old | table |
<!-- end record -->
"""


def test_each_block_of_the_docs_is_rendered_from_its_record_and_the_rest_is_kept() -> None:
    out = records.render_docs(DOC, {"parity": record()})
    assert "Text the generator never touches.\n" in out
    assert "| config | eval_loss | optimizer_steps |\n|:---|---:|---:|\n" in out
    assert "| centralized | 2.8456 | 60 |\n<!-- end record -->" in out
    assert "git abc1234, 2026-12-07, 1,486 s on AMD EPYC" in out
    assert "stale" not in out
    assert "| old | table |" not in out
    assert records.render_docs(out, {"parity": record()}) == out  # a fixed point
    # What the benchmark adds to its record's tables (bench/parity.py record_tables).
    assert records.tables(record())["loss-per-round"].endswith("| fedavg | 3.2247 | 3.1207 |")


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (DOC.replace("record parity results", "record client results"), "lacks"),
        (DOC.replace("parity results", "parity per-round"), "no table"),
    ],
)
def test_a_block_naming_a_missing_record_or_table_is_an_error(docs: str, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        records.render_docs(docs, {"parity": record()})


def test_a_rerun_reproduces_the_record_when_only_timings_moved() -> None:
    assert records.differences(record(), record(seconds=99.0)) == []
    assert records.differences(record(), record(eval_loss=2.8456 * (1 + 1e-6))) == []


def test_a_rerun_with_another_loss_or_without_a_row_does_not_reproduce_the_record() -> None:
    assert records.differences(record(), record(eval_loss=2.9)) == [
        "('centralized',) eval_loss: record 2.8456, this run 2.9"
    ]
    lost = copy.deepcopy(record())
    lost["rows"] = []
    assert records.differences(record(), lost) == ["('centralized',): not in the new run"]


def test_the_docs_tables_are_what_the_committed_records_render() -> None:
    text = records.DOCS.read_text()
    assert records.render_docs(text, records.all_records()) == text, (
        "docs/benchmarks.md differs from bench/records/: run python -m bench.records docs"
    )


def test_every_committed_record_is_cited_by_the_docs_and_is_a_full_size_run() -> None:
    kept = records.all_records()
    assert set(kept) == records.cited(records.DOCS.read_text())
    for name, doc in kept.items():
        assert doc["settings"]["smoke"] is False, name
        assert doc["machine"]["git_commit"], name
        for plot in doc["plots"]:
            assert (records.RECORDS_DIR / plot).exists(), f"{name}: plot {plot} not kept"
