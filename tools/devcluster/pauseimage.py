"""The pod sandbox image of the real node: the pause binary (built from the pinned Kubernetes
module's `build/pause/linux/pause.c`) as an OCI image archive, FROM scratch, that containerd
imports; nothing is pulled for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

PAUSE_IMAGE = "localhost/fedtune/pause:1"


def pause_archive(
    pause_binary: Path, out: Path, *, name: str = PAUSE_IMAGE, user: str = "65535:65535"
) -> None:
    """An OCI image archive of the pause binary (FROM scratch) named `name` for containerd's
    import; `user` empty makes an image that runs as root (the enforcement tests use one)."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size = pause_binary.stat().st_size
        info.mode = 0o755
        with pause_binary.open("rb") as f:
            tar.addfile(info, f)
    layer = layer_buf.getvalue()

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_digest, _ = blob(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], **({"User": user} if user else {})},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest, _ = blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    manifest_digest, _ = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config)):
            add(f"blobs/sha256/{digest.split(':')[1]}", data)
        add(f"blobs/sha256/{manifest_digest.split(':')[1]}", manifest)
