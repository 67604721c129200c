"""One Python stack: uv.lock decides the test environment and both images. Fast checks of the
plumbing, without building an image (tests/images/test_images.py builds them and reads what they
install; tests/realnode runs them)."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version

import pytest
from uv import find_uv_bin

from devcluster.cluster import REPO_ROOT as ROOT
from tests.images.support import IMAGES, locked_version


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_requirements_are_the_locks_export(image: str) -> None:
    """requirements/<image>.txt is what `make lock` exports from uv.lock, hashes included."""
    exported = subprocess.run(
        [
            find_uv_bin(),
            "export",
            "--project",
            str(ROOT),
            "--locked",
            "--offline",
            "--no-emit-project",
            "--no-header",
            "--format",
            "requirements-txt",
            "--quiet",
            "--extra",
            image,
            "--group",
            "build",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "requirements" / f"{image}.txt").read_text()
    assert committed == exported, f"requirements/{image}.txt is stale: run `make lock`"
    assert "--hash=sha256:" in committed


def test_images_install_the_torch_and_kopf_the_tests_run() -> None:
    """The test environment holds the locked versions, and so do the images' requirements."""
    trainer = (ROOT / "requirements" / "trainer.txt").read_text()
    operator = (ROOT / "requirements" / "operator.txt").read_text()
    for name, text in (
        ("torch", trainer),
        ("transformers", trainer),
        ("peft", trainer),
        ("kopf", operator),
        ("kubernetes", operator),
    ):
        installed = version(name)
        assert installed == locked_version(name), name
        assert re.search(rf"^{name}=={re.escape(installed)} ", text, re.M), name
    assert "torch==" not in operator


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_a_plain_docker_build_installs_with_the_locked_uv(image: str) -> None:
    """`make images` passes the locked uv (tests/images/test_images.py reads it from the built
    images' history); the default of the build argument is what `docker build` without it uses,
    and must not drift from the lock."""
    text = (ROOT / IMAGES[image]).read_text()
    assert re.findall(r"^ARG UV_VERSION=(\S+)$", text, re.M) == [locked_version("uv")]
