"""Clients on several GPUs: the container command for N processes, and the launcher behind it.

`contract.client_command(n)` is what the operator puts in a client Job whose container gets n
GPUs (`contract.processes_for(resources)`). With n > 1 it is
`fedtune-trainer client --nproc-per-node n`, which starts n worker processes with torch's
elastic agent: the launcher `torchrun` itself runs (`torch.distributed.run`, same arguments,
same rendezvous, same environment for the workers),
called from here instead of from a `torchrun ...` command line for one reason, the Job
contract: torchrun exits 1 whatever went wrong and leaves the termination log to whichever
worker wrote it last, while the operator needs exit code 2 for input no retry can fix
(podFailurePolicy stops the Job on it) and one line saying what failed first. So each worker
writes its outcome to a file of its own, and the launcher reports rank 0's summary, or the
failure that came first, with that worker's exit code.

The top of this module is torch-free (the operator imports it); the launcher imports torch's
elastic agent only when it runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from fedtune_trainer.wire.contract import client_command

WORKER_DIR_ENV = "FEDTUNE_WORKER_DIR"
"""Set by the launcher for its workers: each writes `rank-<RANK>` there instead of the
termination log, and prints no summary (the launcher does, once)."""


def multi_node_client_command(
    processes: int, nodes: int, rendezvous: str, node_rank: str = "$(JOB_COMPLETION_INDEX)"
) -> list[str]:
    """The command of each pod of a client spanning `nodes` nodes (the design in the trainer's
    README: an Indexed Job whose pod i is node i, `rendezvous` = `<pod 0's DNS name>:<port>`).
    The default node rank is the Indexed Job's completion index, which Kubernetes expands from
    the pod's environment."""
    if nodes < 2:
        raise ValueError("a client on one node needs client_command, not this")
    return [
        *client_command(processes),
        *([] if processes > 1 else ["--nproc-per-node", "1"]),
        "--nnodes", str(nodes), "--node-rank", node_rank, "--rdzv-endpoint", rendezvous,
    ]  # fmt: skip


def worker_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where this worker reports its outcome, when it is one of a launcher's workers."""
    env = os.environ if environ is None else environ
    where = env.get(WORKER_DIR_ENV)
    if not where:
        return None
    return Path(where) / f"rank-{env.get('RANK', '0')}"


def end_worker(code: int) -> NoReturn:
    """How a worker exits once its report is written (or, for ranks other than 0, once its
    training is done): its output flushed, then `os._exit`, skipping the interpreter's teardown.

    Why: the worker's work is over by then (its upload committed, its report file closed), and
    what a normal exit adds is torch's C++ teardown, which on gloo can abort even after
    destroy_process_group (`terminate called without an active exception`, SIGABRT, with no
    Python frame left: a thread of the distributed runtime still joinable when the process ends).
    The agent reports that abort as a failed client. Measured with the 2-process SCAFFOLD
    client of tests/trainer/test_parallel.py, run back to back: 1 failed run in 30 before this
    (the barrier in World.stop already in place), 0 in 100 after."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def record_exit_code(report: Path, code: int) -> None:
    """A failing worker's exit code, written before its report: the agent stops the other
    workers as soon as one exits, so a worker that reported first may still be killed by a
    signal while it exits, and its own code (2 for input no retry fixes) would be lost."""
    report.with_name(report.name + ".exit").write_text(str(code))


def recorded_exit_code(report: Path) -> int | None:
    try:
        return int(report.with_name(report.name + ".exit").read_text())
    except (OSError, ValueError):
        return None


def launch(command: str, nproc: int, torchrun_args: Sequence[str] = ()) -> tuple[int, str]:
    """Run `fedtune-trainer <command>` in `nproc` processes under torch's elastic agent and
    return (exit code, termination text): rank 0's summary when every process succeeded;
    otherwise the earliest failure's one-line reason and that process's exit code.

    `torchrun_args` are extra torchrun options for a client spanning nodes (`--nnodes`,
    `--node-rank`, `--rdzv-endpoint`: torchrun's static rendezvous at node 0, which pins global
    rank 0, the one that uploads and reports, to node 0); without them the rendezvous is local
    (`--standalone`). A node without rank 0 reports nothing when all went well.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    with tempfile.TemporaryDirectory(prefix="fedtune-workers-") as tmp:
        local = [] if torchrun_args else ["--standalone"]
        options = [*local, *torchrun_args, "--nproc-per-node", str(nproc), "--max-restarts", "0"]
        args = get_args_parser().parse_args([*options, "--module", "fedtune_trainer", command])
        previous = os.environ.get(WORKER_DIR_ENV)
        os.environ[WORKER_DIR_ENV] = tmp
        try:
            run(args)  # torchrun's main, minus its error-file handling (see the module doc)
        except ChildFailedError as e:
            return first_failure(Path(tmp), {rank: f.exitcode for rank, f in e.failures.items()})
        finally:
            if previous is None:
                os.environ.pop(WORKER_DIR_ENV, None)
            else:
                os.environ[WORKER_DIR_ENV] = previous
        main = Path(tmp, "rank-0")
        # No rank-0 report on this node: another node holds rank 0 (a client spanning nodes).
        return 0, main.read_text() if main.exists() else ""


def first_failure(reports: Path, exit_codes: Mapping[int, int]) -> tuple[int, str]:
    """The first failure among the workers' reports, with the exit code its worker chose (even
    if the agent then killed it), or a generic line for a worker that died without a report
    (killed by a signal, out of memory)."""
    written = []
    for rank, code in exit_codes.items():
        path = reports / f"rank-{rank}"
        if path.exists() and path.read_text().startswith("error:"):
            chosen = recorded_exit_code(path) or code
            written.append((path.stat().st_mtime_ns, rank, chosen, path.read_text()))
    if written:
        _, rank, code, text = min(written)
        return (code if code > 0 else 1), text
    rank, code = min(exit_codes.items())
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    print(f"worker {rank} died with {how} and no report", file=sys.stderr)
    return 1, f"error: WorkerFailed: process {rank} died with {how}; see the pod log"
