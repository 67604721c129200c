"""`fedtune`: the operator's entry point.

    fedtune operator [--namespace NS ...] [--liveness-port P] [--metrics-port P]
    fedtune report RUN [-n NS] [--out DIR]

Without --namespace the operator watches the whole cluster (it then needs a ClusterRole); with one
or more it watches only those namespaces (Roles in each are enough).

`report` fetches a run's report (report.html and its plots) into DIR: it reads the run from the
current kubeconfig context, then downloads status.reportUri's directory from the run's storage
with the standard AWS_* credentials, or renders the report from the run's stored round metrics
when the run has no report yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from fedtune_operator import handlers  # noqa: F401  (registers the kopf handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
        logging.getLogger("fedtune.operator").info("metrics on :%s/metrics", args.metrics_port)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        standalone=True,  # one replica with strategy Recreate: no peering needed
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=liveness,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# fedtune report
# ---------------------------------------------------------------------------------------------


class ReportError(Exception):
    """A `fedtune report` failure with a message for the user (no traceback)."""


def read_run(
    name: str, namespace: str | None = None, kubeconfig: str | None = None
) -> dict[str, Any]:
    """The FederatedFineTune `name` from the current kubeconfig context; the namespace is
    `namespace`, else the context's, else `default` (as kubectl does)."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    from fedtune_operator.api import GROUP, PLURAL, VERSION

    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        api = config.new_client_from_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as e:
        raise ReportError(f"cannot load the kubeconfig: {e}") from e
    ns = namespace or ((active or {}).get("context") or {}).get("namespace") or "default"
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
    except ApiException as e:
        if e.status == 404:
            raise ReportError(f"no FederatedFineTune {name!r} in namespace {ns!r}") from e
        raise ReportError(f"reading {ns}/{name}: {e.status} {e.reason}") from e


def fetch_report(run: dict[str, Any], out: Path) -> list[Path]:
    """Download the run's committed report/ into `out` (verified against its manifest); when the
    run names no report (or it is being rewritten), render one from the stored round metrics."""
    try:
        from fedtune_trainer import report
        from fedtune_trainer import store as st
        from fedtune_trainer.task import StorageLocation
    except ImportError as e:  # pragma: no cover - the distribution ships both packages
        raise ReportError(f"fedtune_trainer is not installed: {e}") from e

    name = run["metadata"]["name"]
    storage = (run.get("spec") or {}).get("storage") or {}
    report_uri = (run.get("status") or {}).get("reportUri")
    if not storage.get("uri"):
        raise ReportError(f"{name}: spec.storage.uri is not set")

    def location(uri: str) -> StorageLocation:
        return StorageLocation(
            uri=uri,
            endpoint=storage.get("endpoint"),
            region=storage.get("region"),
            force_path_style=storage.get("forcePathStyle", True),
        )

    try:
        if report_uri:
            where = report_uri.rsplit("/", 1)[0]
            try:
                manifest = st.fetch_committed(st.open_store(location(where)), "", out)
                return [out / n for n in sorted(manifest["files"])]
            except st.ObjectNotFound:
                print(f"{report_uri}: no committed report; rendering one", file=sys.stderr)
        files = report.render(st.open_store(location(storage["uri"])), name)
        return report.save(files, out)
    except ModuleNotFoundError as e:
        what = {"boto3": "boto3 (s3:// storage)", "matplotlib": "matplotlib (rendering)"}
        needed = what.get(e.name or "", e.name)
        raise ReportError(
            f"fedtune report needs {needed}: pip install 'fedtune[trainer]' or {e.name}"
        ) from e
    except (ValueError, st.IntegrityError) as e:
        raise ReportError(str(e)) from e
    except Exception as e:
        # botocore's errors (credentials, endpoint, access denied), without importing botocore
        # here: it is absent where only file:// storage is used.
        if type(e).__module__.startswith("botocore"):
            raise ReportError(f"reading {storage['uri']}: {e}") from e
        raise


def _report(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.run}-report")
    try:
        paths = fetch_report(read_run(args.run, args.namespace), out)
    except ReportError as e:
        print(f"fedtune report: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser("operator", help="run the operator")
    op.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    op.add_argument(
        "--liveness-port",
        type=int,
        default=8081,
        help="serve kopf's liveness probe on :PORT/healthz (0: off)",
    )
    op.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="serve Prometheus metrics on :PORT/metrics (0: off)",
    )
    op.add_argument("--verbose", "-v", action="store_true")
    op.set_defaults(func=_operator)
    rep = sub.add_parser(
        "report",
        help="download a run's report (report.html and plots) from its storage",
        description="Reads the run from the current kubeconfig context and downloads its "
        "report with the standard AWS_* credentials (or renders it from the run's metrics).",
    )
    rep.add_argument("run", help="name of the FederatedFineTune")
    rep.add_argument("--namespace", "-n", help="default: the context's namespace, else default")
    rep.add_argument("--out", help="directory to write into (default: ./<run>-report)")
    rep.set_defaults(func=_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
