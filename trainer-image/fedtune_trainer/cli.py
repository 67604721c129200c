"""`fedtune-trainer`: the thin shell around the client, the aggregator and the dev tools.

Jobs: `client`, `aggregate`, `evaluate` and `cleanup`, and a remote client's `relay` (the run's
side), `watch` and `site-client` (the site's side, docs/sites.md), read their task from
FEDTUNE_TASK_FILE or FEDTUNE_TASK (task.py), print progress on stderr and, on exit, write to the
termination log (FEDTUNE_TERMINATION_LOG, else /dev/termination-log) either the JSON summary
(success, exit 0) or one line `error: <reason>` (failure: exit 2 for input no retry can fix, else
1), which Kubernetes copies into the pod status for the operator to read.

`report URI --out DIR` downloads a run's report (report.html and its plots) from the run's storage
root with the standard AWS_* credentials, or renders it from the stored round records when none is
committed: what a person runs on a laptop (`pip install 'fedtune[trainer]'`) or with this image.

`keygen --out FILE` makes a client's signing key (storage/signing.py): the private key into a
new file of mode 0600 for the client's own Secret, the public key on stdout for the run's spec.

`client --nproc-per-node N` (N > 1) trains one client on N processes, one per GPU, started by
torch's elastic agent (launch.py); the launcher writes the termination log for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from fedtune_trainer.wire.contract import (
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    SIGNING_KEY_SECRET_KEY,
    SUMMARY_MAX_BYTES,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
)
from fedtune_trainer.wire.results import AnySummary, dump_summary
from fedtune_trainer.wire.site import RelayTask, SiteClientTask, WatchTask
from fedtune_trainer.wire.task import (
    AggregateTask,
    AnyTask,
    CleanupTask,
    ClientTask,
    EvaluateTask,
    load_task,
)

JOBS: dict[str, type[AnyTask]] = {
    "client": ClientTask,
    "aggregate": AggregateTask,
    "evaluate": EvaluateTask,
    "cleanup": CleanupTask,
    "relay": RelayTask,
    "watch": WatchTask,
    "site-client": SiteClientTask,
}
"""Each Job command and the one task kind it runs."""


def exit_code(error: BaseException) -> int:
    from pydantic import ValidationError

    from fedtune_trainer.learning.data import DataError
    from fedtune_trainer.wire.errors import QuorumError, SettingError, SiteError

    if isinstance(error, SiteError):
        return EXIT_FAILED if error.retry else EXIT_INVALID_INPUT
    permanent = (DataError, ValidationError, json.JSONDecodeError, QuorumError, SettingError)
    return EXIT_INVALID_INPUT if isinstance(error, permanent) else EXIT_FAILED


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)


def write_termination(text: str) -> None:
    """Best effort: outside a pod there may be no writable termination log."""
    data = text.encode()[:SUMMARY_MAX_BYTES]
    try:
        termination_log_path().write_bytes(data)
    except OSError as e:
        print(f"warning: cannot write {termination_log_path()}: {e}", file=sys.stderr)


def failure_reason(error: BaseException) -> str:
    """`error: <type>: <first line>`, short enough for `kubectl get` and events; what a site
    did is said in the contract's words instead (`error: SiteSilent: ...`, `error: Refused:
    ...`)."""
    from fedtune_trainer.wire.errors import SiteError

    if isinstance(error, SiteError):
        return "error: " + error.reason.strip().splitlines()[0][:480]
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return "error: " + text[:480]


def cleanup(task: CleanupTask) -> str:
    """Delete every object under the run's storage root (storage.cleanupPolicy: Delete), once
    the root has proven to be this run's (marker.check_owned: a prefix, never a bucket root,
    whose marker holds the run's UID); otherwise a SettingError (exit 2) says why, and
    nothing is deleted."""
    from fedtune_trainer.storage.locate import open_store
    from fedtune_trainer.storage.marker import check_owned

    store = open_store(task.storage)
    check_owned(store, task.run_uid)
    deleted = store.delete_prefix("")
    print(f"deleted {deleted} objects under {store.uri}", file=sys.stderr)
    summary = {"kind": "cleanup", "run": task.run, "uri": store.uri, "deleted": deleted}
    return json.dumps(summary, separators=(",", ":"))


def report(uri: str, endpoint: str | None, region: str | None, out: Path) -> int:
    """`fedtune-trainer report`: the paths written on stdout, or one line saying what failed."""
    from fedtune_trainer import report as run_report
    from fedtune_trainer.storage.locate import open_store
    from fedtune_trainer.wire.settings import StorageLocation

    try:
        store = open_store(StorageLocation(uri=uri, endpoint=endpoint, region=region))
        paths = run_report.fetch(store, out)
    except Exception as e:  # storage, credentials, a damaged commit: a line, not a traceback
        print(
            f"fedtune-trainer report: {failure_reason(e).removeprefix('error: ')}", file=sys.stderr
        )
        return EXIT_FAILED
    for path in paths:
        print(path)
    return 0


def without_bitsandbytes(task: AnyTask) -> None:
    """Make bitsandbytes unimportable for a task whose base model is not 4-bit (nf4).

    peft and transformers import bitsandbytes whenever it is installed, and the trainer image
    installs it for QLoRA clients: that is seconds of every Job's start, and a warning about a
    missing `kernels` package that a person reading the log takes for an error. Only an nf4 base
    uses it. A None entry in sys.modules is Python's own way of saying "not importable", and both
    libraries then take it as not installed.
    """
    if isinstance(task, SiteClientTask):
        return  # its adapter is in the remote task, not read yet: a 4-bit site must find it
    adapter = getattr(task, "adapter", None)
    if adapter is None or adapter.base_quantization != "nf4":
        sys.modules.setdefault("bitsandbytes", None)


def keygen(out: Path) -> int:
    """`fedtune-trainer keygen`: the private key only into a new file of the user's alone."""
    from fedtune_trainer.storage import signing

    pem, public = signing.generate()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"fedtune-trainer keygen: {out} exists; not overwriting a key", file=sys.stderr)
        return EXIT_FAILED
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(public)
    print(
        f"private key in {out}; give it to the client alone, e.g.\n"
        f"  kubectl create secret generic <client>-signing "
        f"--from-file={SIGNING_KEY_SECRET_KEY}={out}",
        file=sys.stderr,
    )
    return 0


def run_job(kind: str) -> int:
    """Run one Job's task in this process. A worker of a multi-process client (launch.py)
    reports to its own file for the launcher, and only rank 0 has a summary to report."""
    from fedtune_trainer.launch import record_exit_code, worker_file

    worker = worker_file()
    if worker is not None:
        os.environ[TERMINATION_LOG_ENV] = str(worker)
    expected = JOBS[kind]
    try:
        task = load_task()
        if not isinstance(task, expected):
            raise ValueError(f"`{kind}` was given a {task.kind} task")
        without_bitsandbytes(task)
        if isinstance(task, CleanupTask):
            text = cleanup(task)
        else:
            summary = run_task(task)
            if summary is None:  # a worker other than rank 0: it uploaded nothing
                return 0
            text = dump_summary(summary)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        reason = failure_reason(e)
        print(reason, file=sys.stderr)
        if worker is not None:
            record_exit_code(worker, exit_code(e))
        write_termination(reason)
        return exit_code(e)
    write_termination(text)
    if worker is None:
        print(text)
    return 0


def run_task(task: AnyTask) -> AnySummary | None:
    """The program of `task`'s kind, imported only when its Job runs it (the relay and the
    watch never load torch)."""
    if isinstance(task, ClientTask):
        from fedtune_trainer.client import run

        return run(task)
    if isinstance(task, AggregateTask):
        from fedtune_trainer.aggregate import run as run_aggregate

        return run_aggregate(task)
    if isinstance(task, EvaluateTask):
        from fedtune_trainer.evaluate import run as run_evaluate

        return run_evaluate(task)
    if isinstance(task, RelayTask):
        from fedtune_trainer.relay import run as run_relay

        return run_relay(task)
    if isinstance(task, WatchTask):
        from fedtune_trainer.watch import run as run_watch

        return run_watch(task)
    if isinstance(task, SiteClientTask):
        from fedtune_trainer.site_client import run as run_site_client

        return run_site_client(task)
    raise TypeError(f"no program runs a {task.kind} task")


def run_launcher(kind: str, nproc: int, torchrun_args: list[str]) -> int:
    """Run `kind` in `nproc` worker processes and report for all of them (launch.launch)."""
    from fedtune_trainer.launch import launch

    try:
        code, text = launch(kind, nproc, torchrun_args)
    except Exception as e:  # the launcher itself failed: no worker report to pass on
        traceback.print_exc(file=sys.stderr)
        reason = failure_reason(e)
        print(reason, file=sys.stderr)
        write_termination(reason)
        return exit_code(e)
    if text:
        write_termination(text)
    if code == 0 and text:
        print(text)
    elif code:
        print(text, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtune-trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("client", help="train one client for one round and upload its delta")
    client.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes on this node, one per GPU (data parallel over the client's data)",
    )
    client.add_argument("--nnodes", type=int, help="nodes of a client spanning several")
    client.add_argument("--node-rank", type=int, help="this node's index (0 reports the summary)")
    client.add_argument("--rdzv-endpoint", help="host:port of node 0's rendezvous")
    sub.add_parser("aggregate", help="merge one round's deltas (round 0: the initial adapter)")
    sub.add_parser("evaluate", help="evaluate one round's global adapter on held-out data")
    sub.add_parser(
        "cleanup", help="delete everything under the run's storage root, if its marker is the run's"
    )
    sub.add_parser(
        "relay",
        help="a remote client's round, run side: publish its signed task, wait for its commit",
    )
    sub.add_parser(
        "watch", help="a site's wait for its next task: verified, checked against its policy"
    )
    sub.add_parser(
        "site-client", help="a site's client: the task its watch accepted, trained and signed"
    )
    rep = sub.add_parser(
        "report",
        help="download a run's report (report.html and plots) from its storage root",
        description="Reads with the standard AWS_* credentials; renders the report from the "
        "run's round records when none is committed. The root is the run's spec.storage.uri: "
        "kubectl get fft RUN -o jsonpath='{.spec.storage.uri}'",
    )
    rep.add_argument("uri", help="the run's storage root (s3://bucket/prefix or a path)")
    rep.add_argument("--endpoint", help="S3 endpoint (spec.storage.endpoint)")
    rep.add_argument("--region", help="S3 region (spec.storage.region)")
    rep.add_argument("--out", type=Path, default=Path("report"), help="default: ./report")
    key = sub.add_parser(
        "keygen",
        help="make a client's signing key: the private key into a file, the public key printed",
        description="Writes a new Ed25519 private key (PEM, mode 0600) for a client's own Secret "
        "and prints its public key for the run's spec.clients[].signing.publicKey.",
    )
    key.add_argument(
        "--out", type=Path, default=Path(SIGNING_KEY_SECRET_KEY), help="default: ./signing.key"
    )
    tiny = sub.add_parser("make-tiny-model", help="write a tiny Llama model and tokenizer")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--data", type=Path, nargs="+", required=True, help="jsonl files")
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    demo = sub.add_parser("make-demo-data", help="write a non-IID instruction data set")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--clients", type=int, default=3)
    demo.add_argument("--samples", type=int, default=200, help="records per client")
    demo.add_argument("--eval-samples", type=int, default=60)
    demo.add_argument("--format", choices=["chat", "alpaca", "text"], default="chat")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "client":
        spread = [
            f"--{name.replace('_', '-')}={value}"
            for name in ("nnodes", "node_rank", "rdzv_endpoint")
            if (value := getattr(args, name)) is not None
        ]
        if args.nproc_per_node > 1 or spread:
            return run_launcher("client", args.nproc_per_node, spread)
    if args.command in JOBS:
        from fedtune_trainer.launch import end_worker, worker_file

        code = run_job(args.command)
        if worker_file() is not None:
            end_worker(code)
        return code
    if args.command == "report":
        return report(args.uri, args.endpoint, args.region, args.out)
    if args.command == "keygen":
        return keygen(args.out)
    if args.command == "make-tiny-model":
        from fedtune_trainer.fixtures.tiny import TinyConfig, make_tiny_model

        config = TinyConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size,
            num_hidden_layers=args.layers,
            seed=args.seed,
        )
        info = make_tiny_model(args.out, args.data, config)
    else:
        from fedtune_trainer.fixtures.demo_data import make_demo_data

        info = make_demo_data(
            args.out, args.clients, args.samples, args.eval_samples, args.format, args.seed
        )
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
