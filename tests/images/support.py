"""Helpers of the image tests: the locked versions, and the images as `make images` builds them
(tools/build-images.sh run once, and podman pointed at the storage that script uses, to read
what it built)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.cluster import REPO_ROOT
from devcluster.realnode import cache_root

BUILD_IMAGES = REPO_ROOT / "tools" / "build-images.sh"
IMAGES = {"operator": "operator/Dockerfile", "trainer": "trainer-image/Dockerfile"}
"""Each image by the Dockerfile build-images.sh builds it from."""


def locked_version(package: str) -> str:
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == package)


@dataclass(frozen=True)
class Podman:
    """podman with build-images.sh's settings and storage (under the cache, not /etc)."""

    conf_dir: Path

    def __call__(self, *args: str, timeout: float = 300) -> str:
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.conf_dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.conf_dir / "storage.conf"),
        }
        argv = ["podman", "--cgroup-manager", "cgroupfs", "--runtime", "runc", *args]
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def inspect(self, image: str) -> dict[str, Any]:
        (found,) = json.loads(self("image", "inspect", image))
        return found


@dataclass(frozen=True)
class BuiltImages:
    podman: Podman
    tags: dict[str, str]
    """"operator" and "trainer" -> the tag build-images.sh gave it."""
    seconds: float


def build_images() -> BuiltImages:
    """Run build-images.sh (a warm cache rebuilds nothing) and read from its log which tag it
    built from which Dockerfile."""
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_IMAGES)], capture_output=True, text=True, timeout=3600, check=False
    )
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise AssertionError(f"build-images.sh failed ({result.returncode}):\n{result.stderr}")
    built = dict(re.findall(r"^\[build-images\] (\S+): building from (\S+)$", result.stderr, re.M))
    by_dockerfile = {dockerfile: tag for tag, dockerfile in built.items()}
    tags = {name: by_dockerfile[dockerfile] for name, dockerfile in IMAGES.items()}
    return BuiltImages(Podman(cache_root() / "containers"), tags, seconds)
