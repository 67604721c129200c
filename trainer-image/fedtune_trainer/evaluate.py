"""`fedtune-trainer evaluate`: the loss of global adapter r on held-out data, as a Job of its own.

Evaluation needs the base model's weights; aggregation does not. Keeping them in separate Jobs
lets the aggregator stay a small CPU pod whatever the model size, lets the evaluation have a GPU
of its own (spec.evaluation.resources), and lets it run beside the next round's clients instead
of holding up the round.

The result is the Job's summary (for the operator, which records it in status.history) and
rounds/<r>/evaluation.json (for the run report, re-rendered afterwards). A rerun overwrites both
with the same numbers: the global adapter it reads is committed and never changes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from fedtune_trainer import report
from fedtune_trainer.adapter import lora
from fedtune_trainer.adapter.lora import read_global
from fedtune_trainer.learning.data import load_examples
from fedtune_trainer.learning.loading import load_base, load_tokenizer
from fedtune_trainer.learning.runtime import pick_runtime
from fedtune_trainer.learning.training import mean_loss
from fedtune_trainer.storage import store as st
from fedtune_trainer.storage.locate import open_store
from fedtune_trainer.wire.layout import EVALUATION_FILE, round_prefix
from fedtune_trainer.wire.results import EvaluationSummary
from fedtune_trainer.wire.task import EvaluateTask

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evaluation_key(round_: int) -> str:
    return st.join(round_prefix(round_), EVALUATION_FILE)


def run(task: EvaluateTask, store: st.Store | None = None, log: Log = _stderr) -> EvaluationSummary:
    """Evaluate global `task.round` (base + adapter) on `task.evaluation.data_uri`."""
    if task.evaluation.data_uri is None:
        raise ValueError("evaluation.dataUri is not set: nothing to evaluate")
    store = store or open_store(task.storage)
    start = time.perf_counter()
    tensors, _ = read_global(store, task.round)
    runtime = pick_runtime("auto")
    tok = load_tokenizer(task.tokenizer or task.base_model)
    examples = load_examples(
        task.evaluation.data_uri,
        task.data.format,
        tok,
        task.max_seq_length,
        task.evaluation.max_samples,
    )
    model = lora.attach(load_base(task.base_model, runtime), task.adapter, tensors)
    loss = mean_loss(model, examples, runtime, tok.pad_token_id)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation loss of round {task.round} is {loss}")
    summary = EvaluationSummary(
        round=task.round,
        eval_loss=loss,
        examples=len(examples),
        tokens=sum(e.trained_tokens for e in examples),
        seconds=round(time.perf_counter() - start, 3),
    )
    store.put_bytes(evaluation_key(task.round), summary.model_dump_json(by_alias=True).encode())
    log(f"round {task.round}: eval loss {loss:.4f} over {summary.tokens} tokens")
    _write_report(task, store, log)
    return summary


def _write_report(task: EvaluateTask, store: st.Store, log: Log) -> None:
    """Re-render the report so it shows this loss; a failure is logged, never raised (the report
    is a view of storage, and the evaluation is already recorded)."""
    latest = report.latest_round(store)
    try:
        report.write(store, task.run, max(task.round, latest or 0))
    except Exception as e:
        log(f"warning: run report not written: {type(e).__name__}: {e}")
