"""`fedtune`: the operator's entry point.

    fedtune operator [--namespace NS ...] [--liveness-port P] [--metrics-port P]

Without --namespace the operator watches the whole cluster (it then needs a ClusterRole); with one
or more it watches only those namespaces (Roles in each are enough).

A run's report is read from its storage, which the operator never touches: that is
`fedtune-trainer report`, where the storage libraries are (the trainer image, or
`pip install 'fedtune[trainer]'`).
"""

from __future__ import annotations

import argparse
import logging
import sys


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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
