"""A FAKE `fedtune-trainer`, used only by the `operator` benchmark to measure orchestration cost.

It trains nothing, reads and writes no storage: it parses the task the operator gave the Job
(FEDTUNE_TASK, validated by the real `fedtune_trainer.wire.task` models), writes a valid
`ClientSummary` or `AggregateSummary` to the termination log, and exits 0 at once. With it on the
pods' PATH in place of the real trainer, what remains of a round's wall time is the operator's,
the Job controller's and the (process) kubelet's. Never installed, never on a user's PATH: the
benchmark writes a `fedtune-trainer` wrapper that runs this module into a scratch directory and
puts only that directory first on the devcluster pods' PATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedtune_trainer.wire.contract import TERMINATION_LOG, TERMINATION_LOG_ENV
from fedtune_trainer.wire.layout import FINAL_PREFIX, global_prefix
from fedtune_trainer.wire.results import AggregateSummary, ClientSummary, RoundRecord, dump_summary
from fedtune_trainer.wire.task import AggregateTask, ClientTask, load_task

FAKE_SHA256 = "0" * 64


def summary_for(task: ClientTask | AggregateTask) -> ClientSummary | AggregateSummary:
    """A summary the operator accepts: every selected client 'accepted', nothing sent."""
    root = task.storage.uri.rstrip("/")
    if isinstance(task, ClientTask):
        return ClientSummary(
            round=task.round,
            client=task.client,
            samples=1,
            steps=0,
            # A number, not None: ClientSummary.wire() drops None and parse_summary then
            # reports trainLoss as missing.
            train_loss=0.0,
            bytes_sent=0,
            raw_bytes=0,
            full_model_bytes=0,
            sha256=FAKE_SHA256,
            seconds=0.0,
        )
    last = task.round == task.rounds
    accepted = len(task.clients) if task.round > 0 else 0
    record = RoundRecord(
        run=task.run, round=task.round, algorithm=task.aggregation.algorithm, accepted=accepted
    )
    return AggregateSummary(
        record=record,
        global_uri=f"{root}/{global_prefix(task.round)}",
        final_uri=f"{root}/{FINAL_PREFIX}" if last else None,
    )


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else ""
    task = load_task()
    expected = {"client": ClientTask, "aggregate": AggregateTask}.get(kind)
    if expected is None or not isinstance(task, expected):
        print(
            f"fake fedtune-trainer: cannot fake {kind!r} with a {task.kind} task", file=sys.stderr
        )
        return 1
    text = dump_summary(summary_for(task))
    Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
