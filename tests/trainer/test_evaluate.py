"""The evaluation Job: the loss of a committed global adapter on held-out data, recorded beside the
round's record and shown by the report."""

from __future__ import annotations

import pytest

from fedtune_trainer import aggregate, evaluate, report
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.results import EvaluationSummary
from fedtune_trainer.wire.settings import AdapterSpec, EvaluationSpec, StorageLocation
from fedtune_trainer.wire.task import AggregateTask, EvaluateTask
from tests.trainer.support import Demo

ADAPTER = AdapterSpec(r=4, alpha=8, dropout=0.0)


def quiet(_: str) -> None:
    pass


def tasks(demo: Demo, store: st.Store, data_uri: str | None) -> tuple[AggregateTask, EvaluateTask]:
    common = {
        "run": "unit",
        "round": 0,
        "base_model": str(demo.model),
        "adapter": ADAPTER,
        "storage": StorageLocation(uri=store.uri),
    }
    init = AggregateTask(**common, rounds=1)  # type: ignore[arg-type]
    ev = EvaluateTask(
        **common,  # type: ignore[arg-type]
        data={"format": "chat"},  # type: ignore[arg-type]
        evaluation=EvaluationSpec(data_uri=data_uri, max_samples=12),
    )
    return init, ev


def test_evaluation_records_the_loss_beside_the_round(demo: Demo, file_store: st.FileStore) -> None:
    init, ev = tasks(demo, file_store, str(demo.eval_data))
    aggregate.run(init, file_store, quiet)
    summary = evaluate.run(ev, file_store, quiet)
    assert summary.round == 0
    assert summary.examples == 12
    assert summary.tokens > 0
    assert 0 < summary.eval_loss < 20
    stored = EvaluationSummary.model_validate_json(file_store.get_bytes(evaluate.evaluation_key(0)))
    assert stored == summary
    (record,) = report.read_records(file_store)
    assert record.eval_loss == summary.eval_loss  # the report shows it ...
    html = st.read_committed(file_store, "report")[1][report.HTML_FILE].decode()
    assert f"{summary.eval_loss:.4f}" in html  # ... and was re-rendered with it
    again = evaluate.run(ev, file_store, quiet)
    assert again.eval_loss == summary.eval_loss  # a rerun reads the same committed adapter


def test_evaluation_without_data_is_refused(demo: Demo, file_store: st.FileStore) -> None:
    init, ev = tasks(demo, file_store, None)
    aggregate.run(init, file_store, quiet)
    with pytest.raises(ValueError, match=r"evaluation.dataUri is not set"):
        evaluate.run(ev, file_store, quiet)


def test_evaluation_of_an_uncommitted_round_fails(demo: Demo, file_store: st.FileStore) -> None:
    _, ev = tasks(demo, file_store, str(demo.eval_data))
    with pytest.raises(st.ObjectNotFound):
        evaluate.run(ev, file_store, quiet)
