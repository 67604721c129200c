"""One Python stack: uv.lock decides the test environment and both images. Fast checks of the
plumbing (no image is built here; tests/realnode builds and runs them)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from uv import find_uv_bin

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "operator": ROOT / "operator" / "Dockerfile",
    "trainer": ROOT / "trainer-image" / "Dockerfile",
}


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == package)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
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


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_layers_and_user(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    # The uv the images install with is the locked one.
    assert f"ARG UV_VERSION={locked_version('uv')}" in text
    assert "ARG BASE_IMAGE=" in text
    assert "FROM ${BASE_IMAGE}" in text
    # Dependencies before the source: a source change rebuilds one small layer.
    deps = text.index(f"COPY requirements/{image}.txt")
    source = text.index("COPY pyproject.toml")
    assert deps < source
    assert "--require-hashes" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)


def test_chart_and_crd_defaults_name_what_make_images_tags() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "fedtune-operator" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "fedtune-operator" / "values.yaml").read_text())
    script = (ROOT / "tools" / "build-images.sh").read_text()
    assert values["image"]["repository"] == "ghcr.io/fedtune/operator"
    assert values["image"]["tag"] == ""  # the appVersion, which build-images.sh reads
    assert "OPERATOR_IMAGE:-ghcr.io/fedtune/operator:$version" in script
    assert "TRAINER_IMAGE:-ghcr.io/fedtune/trainer:$version" in script
    crd = (ROOT / "crds" / "fedtune.dev_federatedfinetunes.yaml").read_text()
    assert f"default: ghcr.io/fedtune/trainer:{chart['appVersion']}" in crd
