"""The real node's local OCI registry (the distribution module), which `tools/build-images.sh
--push` fills and containerd pulls from.

Its storage is the shared cache's (content-addressed, so an image pushed once is not pushed
again), and its port is derived from the cache's path, so that podman's record of the layers it
holds stays valid from one start, and one clone, to the next.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

from devcluster import net
from devcluster.state import cache_root

ENV = {"OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"}
"""No tracing: nothing in the node may reach out."""


def registry_port() -> int:
    """The registry's port: the same from one start to the next, in any clone that shares the
    cache, when it is free. podman remembers which layers a registry holds by its address, and the
    registry's storage is the cache's: at the same address a push skips the layers already there,
    where a new address (one per clone, CI's fresh clone each time) compresses and sends the
    trainer image's 6.5 GB again."""
    key = str(cache_root() / "registry").encode()
    port = 20000 + int(hashlib.sha256(key).hexdigest(), 16) % 10000
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return net.free_port()
    return port


def write_config(path: Path, port: int) -> None:
    path.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(cache_root() / "registry")},
                    "delete": {"enabled": True},
                },
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )


def argv(bin_dir: Path, config: Path) -> list[str]:
    return [str(bin_dir / "registry"), "serve", str(config)]


def ready(port: int) -> bool:
    return net.http_status(f"http://127.0.0.1:{port}/v2/") == 200
