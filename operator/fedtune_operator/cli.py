"""`fedtune`: the operator's entry point.

    fedtune operator [--mode run|site] [--namespace NS ...] [--liveness-port P] [--metrics-port P]
    fedtune storage-policy -f RUN.yaml [--flavor aws|minio|versitygw] [--account SECRET=NAME]

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

    # Registers the kopf handlers of the mode: runs, or a site's part in another's run.
    if args.mode == "site":
        from fedtune_operator import site_handlers  # noqa: F401
    else:
        from fedtune_operator import handlers  # noqa: F401

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


def _storage_policy(args: argparse.Namespace) -> int:
    import json

    import yaml

    from fedtune_operator import storage_policy
    from fedtune_operator.validation import SpecError, parse_spec

    try:
        with open(args.filename) as f:
            document = yaml.safe_load(f)
        spec = parse_spec((document or {}).get("spec") or {})
    except (OSError, yaml.YAMLError, SpecError) as e:
        print(f"fedtune storage-policy: {e}", file=sys.stderr)
        return 2
    accounts = dict(a.split("=", 1) for a in args.account if "=" in a)
    print(json.dumps(storage_policy.policies(spec, args.flavor, accounts), indent=2))
    for warning in storage_policy.uncovered(spec):
        print(f"warning: {warning}", file=sys.stderr)
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
    op.add_argument(
        "--mode",
        choices=["run", "site"],
        default="run",
        help="run: reconcile FederatedFineTunes; site: reconcile FederatedSites, this cluster's "
        "part in runs elsewhere (docs/sites.md)",
    )
    op.add_argument("--verbose", "-v", action="store_true")
    op.set_defaults(func=_operator)
    pol = sub.add_parser(
        "storage-policy",
        help="print the storage policies that give each identity of a run exactly its access",
        description="Reads a FederatedFineTune manifest and prints, as JSON, the least-privilege "
        "policy of each storage identity it names (storage_policy.py says who needs what).",
    )
    pol.add_argument("-f", "--filename", required=True, help="the run's manifest (YAML)")
    pol.add_argument("--flavor", choices=["aws", "minio", "versitygw"], default="aws")
    pol.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="SECRET=NAME",
        help="versitygw: the account behind a Secret (default: the Secret's name)",
    )
    pol.set_defaults(func=_storage_policy)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
