"""Small network helpers of the devcluster: free ports and readiness probes."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devcluster.pki import CertPair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing answers (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def https_ok(url: str, ca: Path, client_cert: CertPair | None = None) -> bool:
    """Whether a GET of `url` answers 200. With a client certificate the server is verified
    against `ca`; without one (a component's own self-signed health port) it is not."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert.cert), str(client_cert.key))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def node_ready(kubectl: Path, kubeconfig: Path, node: str) -> bool:
    """Whether the Node `node` reports Ready: how both kinds of kubelet are waited for."""
    result = subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "True"
