"""The run report: the aggregator renders report/ after every round from the committed metrics,
and `fedtune-trainer report` fetches it (or renders it) from a run's storage root."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from fedtune_trainer import aggregate, report
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.layout import REPORT_PREFIX, round_prefix
from fedtune_trainer.wire.results import RoundRecord
from tests.trainer.aggregation_support import put_delta, random_tensors, task, write_global

ROUNDS = 3
CLIENTS = ["alice", "bob", "carol"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet(_: str) -> None:
    pass


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (header row included)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: bytes) -> Tables:
    tables = Tables()
    tables.feed(page.decode())
    return tables


def table_with(tables: Tables, first_header: str) -> list[list[str]]:
    return next(t for t in tables.tables if t and t[0] and t[0][0] == first_header)


def run_rounds(store: st.Store, rounds: int = ROUNDS) -> list:
    """Rounds 1..rounds of synthetic deltas through aggregate.run (report included); carol's
    delta of round 2 has the wrong shapes, so it is rejected and shows up in the report."""
    write_global(store, 0, random_tensors(0))
    summaries = []
    for r in range(1, rounds + 1):
        for i, client in enumerate(CLIENTS):
            delta = random_tensors(10 * r + i, 0.01)
            if client == "carol" and r == 2:
                delta = {k: torch.zeros(3, 3) for k in delta}
            put_delta(store, r, client, delta, samples=10 + i, train_loss=2.0 - 0.1 * r - 0.01 * i)
        summaries.append(
            aggregate.run(task(store, r, CLIENTS, rounds=rounds, min_clients=2), store, quiet)
        )
    return summaries


def record_of(store: st.Store, r: int) -> RoundRecord:
    return RoundRecord.model_validate_json(store.get_bytes(f"{round_prefix(r)}/metrics.json"))


def test_the_aggregator_writes_the_report_after_every_round(file_store: st.FileStore) -> None:
    summaries = run_rounds(file_store)
    expected_uri = file_store.url(f"{REPORT_PREFIX}/{report.HTML_FILE}")
    assert [s.report_uri for s in summaries] == [expected_uri] * ROUNDS

    manifest, files = st.read_committed(file_store, REPORT_PREFIX)
    assert set(files) == {report.HTML_FILE, *report.PLOTS}
    assert manifest["round"] == ROUNDS
    for name in report.PLOTS:
        assert files[name].startswith(PNG_MAGIC), name
    page = parse(files[report.HTML_FILE])
    assert sorted(page.images) == sorted(report.PLOTS)  # every plot, by its relative name

    rows = table_with(page, "round")
    assert rows[0][:9] == [
        "round",
        "train loss",
        "eval loss",
        "clients",
        "rejected",
        "bytes per client",
        "dense fp32 per client",
        "compression",
        "bytes received",
    ]
    assert [row[0] for row in rows[1:]] == [str(r) for r in range(1, ROUNDS + 1)]
    for row in rows[1:]:
        m = record_of(file_store, int(row[0]))
        n = len(m.contributions)
        assert m.train_loss is not None
        assert row[1] == f"{m.train_loss:.4f}"
        assert row[2] == ""  # no evaluation data in these tasks
        assert row[3] == str(n) == str(m.accepted)
        assert row[4] == str(len(m.rejections)) == str(m.rejected)
        assert row[5] == f"{round(m.bytes_received / n):,}"
        assert row[6] == f"{round(m.raw_bytes / n):,}"
        assert row[7] == f"{m.raw_bytes / m.bytes_received:.1f}x"
        assert row[8] == f"{m.bytes_received:,}"
        # and the metrics are what the clients sent (not re-derived from the report itself)
        assert m.bytes_received == sum(c.encoded_bytes for c in m.contributions)
    assert rows[2][3:5] == ["2", "1"]  # round 2: carol rejected

    reasons = next(t for t in page.tables if t[0] == ["round", "client", "reason"])
    assert reasons[1][:2] == ["2", "carol"]
    assert "shape" in reasons[1][2]
    last = next(t for t in page.tables if t[0][0] == "client")
    assert [row[0] for row in last[1:]] == CLIENTS
    raw = record_of(file_store, ROUNDS).contributions
    assert [row[4] for row in last[1:]] == [f"{c.encoded_bytes:,}" for c in raw]
    assert [row[2] for row in last[1:]] == [f"{c.weight:.4g}" for c in raw]


def test_a_rerun_renders_the_report_again_from_storage(file_store: st.FileStore) -> None:
    run_rounds(file_store)
    keys = file_store.list(REPORT_PREFIX + "/")
    # Rerun of the last round: the same keys overwritten, the content what storage now says.
    aggregate.run(
        task(file_store, ROUNDS, CLIENTS, rounds=ROUNDS, min_clients=2), file_store, quiet
    )
    assert file_store.list(REPORT_PREFIX + "/") == keys
    _, after = st.read_committed(file_store, REPORT_PREFIX)
    assert after == report.render(file_store, "t", ROUNDS)  # deterministic, bytes included
    # A report of round 2 leaves out round 3, even though its metrics are in storage.
    files = report.render(file_store, "t", through_round=2)
    rounds = table_with(parse(files[report.HTML_FILE]), "round")
    assert [row[0] for row in rounds[1:]] == ["1", "2"]


def test_an_empty_run_renders_without_rounds(file_store: st.FileStore) -> None:
    files = report.render(file_store, "empty")
    assert set(files) == {report.HTML_FILE, *report.PLOTS}
    assert b"No round has been aggregated yet" in files[report.HTML_FILE]
    assert all(files[p].startswith(PNG_MAGIC) for p in report.PLOTS)


def test_a_failing_report_does_not_fail_the_round(
    file_store: st.FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> str:
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(report, "write", broken)
    write_global(file_store, 0, random_tensors(0))
    put_delta(file_store, 1, "alice", random_tensors(1, 0.01))
    lines: list[str] = []
    summary = aggregate.run(task(file_store, 1, ["alice"]), file_store, lines.append)
    assert summary.report_uri is None
    assert st.read_manifest(file_store, "rounds/000001/global") is not None
    assert any("report not written: RuntimeError: no fonts today" in ln for ln in lines)


# ---------------------------------------------------------------------------------------------
# fedtune-trainer report
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def s3_run(s3) -> st.Store:
    """A run root in a fresh bucket of the real S3 server."""
    bucket = s3.bucket(f"report-{uuid.uuid4().hex[:10]}")  # s3://<name>
    settings = st.S3Settings(
        endpoint=s3.endpoint, access_key_id=s3.access_key, secret_access_key=s3.secret_key
    )
    return open_store(f"{bucket}/runs/r1", settings)


def report_command(s3, *args: str) -> subprocess.CompletedProcess[str]:
    """`fedtune-trainer report ...` as a user runs it: AWS_* credentials in the environment,
    the endpoint as a flag (the run's spec.storage.endpoint)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    trainer = str(Path(sys.executable).parent / "fedtune-trainer")
    return subprocess.run(
        [trainer, "report", *args, "--endpoint", s3.endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.integration
def test_report_fetch_downloads_the_committed_report_or_renders_it(
    s3_run: st.Store, tmp_path: Path
) -> None:
    summaries = run_rounds(s3_run, rounds=2)
    assert summaries[-1].report_uri == s3_run.url("report/report.html")
    _, committed = st.read_committed(s3_run, REPORT_PREFIX)

    paths = report.fetch(s3_run, tmp_path / "got", quiet)
    assert sorted(p.name for p in paths) == sorted(committed)
    assert {p.name: p.read_bytes() for p in paths} == committed

    # No committed report (an older run, a report that failed): rendered here, the same files.
    s3_run.delete_prefix(REPORT_PREFIX + "/")
    lines: list[str] = []
    paths = report.fetch(s3_run, tmp_path / "made", lines.append)
    assert {p.name: p.read_bytes() for p in paths} == committed
    assert any("no committed report; rendering one" in line for line in lines)


@pytest.mark.integration
def test_report_command_as_a_user_runs_it(s3_run: st.Store, s3, tmp_path: Path) -> None:
    run_rounds(s3_run, rounds=1)
    _, committed = st.read_committed(s3_run, REPORT_PREFIX)
    out = tmp_path / "out"
    done = report_command(s3, s3_run.uri, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(Path(p).name for p in done.stdout.split()) == sorted(committed)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == committed

    missing = report_command(s3, "s3://no-such-bucket/runs/r1", "--out", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("fedtune-trainer report: ")
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "none").exists()
