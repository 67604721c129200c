"""`devcluster`: start, stop and inspect the local control plane.

devcluster up        build what is missing, start everything, write .devcluster/kubeconfig
                     (--node real: kubelet, containerd and a registry instead of the process
                     kubelet, in namespaces of its own; images from `make images`)
                     (--storage-of DIR: no S3 server of its own, the one of the devcluster
                     running in DIR instead, with its root account: several control planes
                     side by side on one storage, e.g.
                     devcluster --dir .devcluster/site-a up --storage-of .devcluster)
devcluster down      stop every component and every pod process
devcluster status    one line per component (and where the S3 server is, when it is another's)
devcluster env       shell exports (KUBECONFIG, AWS_* for the S3 server)
devcluster logs [C]  the last lines of a component's log, or of every pod log
devcluster bucket N  create an S3 bucket
devcluster registry  the real node's registry (HOST:PORT on 127.0.0.1), when one is running
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from devcluster.cluster import NODE_KINDS, REPO_ROOT, Cluster
from devcluster.processes import StartupError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=REPO_ROOT / ".devcluster",
        help="state directory (default: .devcluster in the repository)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--pod-env", action="append", default=[], metavar="NAME=VALUE")
    up.add_argument("--node", choices=NODE_KINDS, default="process")
    up.add_argument(
        "--storage-of",
        type=Path,
        metavar="DIR",
        help="use the S3 server of the devcluster whose state directory is DIR (process node)",
    )
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("env")
    logs = sub.add_parser("logs")
    logs.add_argument("component", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=40)
    sub.add_parser("registry")
    bucket = sub.add_parser("bucket")
    bucket.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "up":
        storage = None
        if args.storage_of is not None:
            owner = Cluster(args.storage_of)
            if owner.dir == args.dir.resolve() or not owner.is_running():
                print(f"devcluster: no other devcluster is running in {owner.dir}", file=sys.stderr)
                return 1
            storage = owner.s3_account()
        running = Cluster(args.dir)
        wanted = storage.endpoint if storage else ""
        if running.is_running() and (
            running.node != args.node or running.state().shared_s3_endpoint != wanted
        ):
            running.down(quiet=True)
        cluster = Cluster(args.dir, node=args.node)
    else:
        cluster = Cluster(args.dir)

    if args.command == "up":
        try:
            pod_env = dict(kv.split("=", 1) for kv in args.pod_env)
            state = cluster.up(pod_env=pod_env, storage=storage)
        except (StartupError, subprocess.CalledProcessError, OSError, ValueError) as e:
            print(f"devcluster: {e}", file=sys.stderr)
            cluster.down(quiet=True)
            return 1
        kubectl = Path(state.bin_dir) / "kubectl"
        shared = " (another devcluster's)" if state.shared_s3_endpoint else ""
        print(f"devcluster is up: API {state.api_url}, S3 {state.s3_endpoint}{shared}")
        if state.registry_port:
            print(
                f"  real node; registry 127.0.0.1:{state.registry_port} "
                f"(tools/build-images.sh --push 127.0.0.1:{state.registry_port})"
            )
        print(f"  kubectl --kubeconfig {cluster.kubeconfig} get nodes")
        print(f"  (a matching kubectl: {kubectl}; shell setup: eval $(make cluster-env))")
        return 0
    if args.command == "down":
        cluster.down()
        return 0
    if args.command == "status":
        for c in cluster.components:
            print(f"{c:25} {'running' if cluster.processes.alive(c) else 'stopped'}")
        if cluster.shares_storage():
            print(f"{'s3':25} another's, at {cluster.state().s3_endpoint}")
        return 0 if cluster.is_running() else 1
    if args.command == "env":
        if not cluster.state_file.exists():
            print("devcluster: not up (run `make cluster-up`)", file=sys.stderr)
            return 1
        env = cluster.env()
        env["PATH"] = f"{env['DEVCLUSTER_BIN']}:$PATH"
        for k, v in env.items():
            value = v if k == "PATH" else shlex.quote(v)
            print(f"export {k}={value}")
        return 0
    if args.command == "logs":
        components = [args.component] if args.component else [*cluster.components, "pods"]
        for c in components:
            if c == "pods":
                for f in sorted((cluster.log_dir / "pods").glob("*.log")):
                    print(f"==> pod {f.stem} <==")
                    print("\n".join(f.read_text(errors="replace").splitlines()[-args.lines :]))
            else:
                print(f"==> {c} <==")
                print(cluster.log_tail(c, args.lines))
        return 0
    if args.command == "registry":
        if not (
            cluster.state_file.exists()
            and cluster.state().registry_port
            and cluster.processes.alive("registry")
        ):
            return 1
        print(f"127.0.0.1:{cluster.state().registry_port}")
        return 0
    if args.command == "bucket":
        print(cluster.s3_account().bucket(args.name))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
