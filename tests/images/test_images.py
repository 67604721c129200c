"""The operator and trainer images as `make images` builds them (tools/build-images.sh: podman on
a Debian base it makes with mmdebstrap), read back from podman's storage: who they run as, what
they install, how their layers split, and that the chart and the CRD name them by default. What
they do on a node (runAsNonRoot enforced, a read-only root filesystem, a whole run) is
tests/realnode's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from devcluster.cluster import REPO_ROOT
from tests.chart.support import render
from tests.images.support import IMAGES, BuiltImages, build_images, locked_version

# Root, podman and minutes on a cold cache: not `make test-unit`'s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

DEPENDENCY = {"operator": "kopf", "trainer": "torch"}
"""A package only the locked requirements install, to find the image's dependency layer by."""
OUR_PACKAGE = {"operator": "fedtune_operator", "trainer": "fedtune_trainer"}
SOURCE_LAYERS_MAX_BYTES = 20_000_000
"""fedtune's own layers are a few MB; the dependencies hundreds (operator) to thousands (trainer)
of MB."""
INSTALLED = (
    "import importlib.metadata as m, json; from packaging.markers import default_environment; "
    "print(json.dumps({'environment': default_environment(), "
    "'installed': {d.metadata['Name']: d.version for d in m.distributions()}}))"
)
"""What the image's interpreter installed, and the environment its requirements' markers see."""


@pytest.fixture(scope="session")
def built() -> BuiltImages:
    return build_images()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(image: str, environment: dict[str, str]) -> dict[str, str]:
    """requirements/<image>.txt's pins whose markers hold in `environment` (tests/images/
    test_lock.py holds the file equal to uv.lock's export)."""
    text = (REPO_ROOT / "requirements" / f"{image}.txt").read_text()
    pins = {}
    for line in re.findall(r"^([A-Za-z0-9].*?) \\$", text, re.M):
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            (spec,) = requirement.specifier
            pins[canonical(requirement.name)] = spec.version
    return pins


def layers(built: BuiltImages, image: str) -> list[Path]:
    """The image's layers as overlay directories, top first."""
    data = built.podman.inspect(built.tags[image])["GraphDriver"]["Data"]
    return [Path(data["UpperDir"]), *(Path(p) for p in data["LowerDir"].split(":"))]


def holds(layer: Path, package: str) -> bool:
    return any(layer.glob(f"opt/fedtune/lib/python3*/site-packages/{package}/__init__.py"))


def size(layer: Path) -> int:
    return sum(p.lstat().st_size for p in layer.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_image_runs_as_a_numeric_non_root_user(built: BuiltImages, image: str) -> None:
    """Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd."""
    assert built.podman.inspect(built.tags[image])["Config"]["User"] == "10001:10001"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_image_installs_exactly_the_locked_requirements(built: BuiltImages, image: str) -> None:
    out = built.podman("run", "--rm", "--entrypoint", "python", built.tags[image], "-c", INSTALLED)
    image_env = json.loads(out)
    installed = {canonical(n): v for n, v in image_env["installed"].items()}
    locked = pinned(image, image_env["environment"])
    assert {n: installed.get(n) for n in locked} == locked
    # Beside them only fedtune itself and the pip that the venv module puts in every venv.
    assert set(installed) - set(locked) == {"fedtune", "pip"}
    if image == "operator":
        assert "torch" not in installed


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_fedtune_sits_in_small_layers_above_the_dependencies(
    built: BuiltImages, image: str
) -> None:
    """A change to fedtune's source rebuilds and pushes only the layers above the dependencies':
    fedtune is installed above them, and none of its files (the installed packages or the
    source they were built from) is in them or below."""
    stack = layers(built, image)
    (deps,) = [i for i, layer in enumerate(stack) if holds(layer, DEPENDENCY[image])]
    ours = [i for i, layer in enumerate(stack) if holds(layer, OUR_PACKAGE[image])]
    assert ours
    assert max(ours) < deps  # top first: above the dependency layer
    for layer in stack[deps:]:
        assert not any(layer.rglob("fedtune_*/__init__.py")), layer
    above = sum(size(layer) for layer in stack[:deps])
    assert above < SOURCE_LAYERS_MAX_BYTES, above


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_dependencies_were_installed_by_the_locked_uv_checking_hashes(
    built: BuiltImages, image: str
) -> None:
    """The build step of the dependency layer, as the image records it."""
    found = built.podman.inspect(built.tags[image])
    stack = layers(built, image)
    (deps,) = [i for i, layer in enumerate(stack) if holds(layer, DEPENDENCY[image])]
    steps = [h["created_by"] for h in found["History"] if not h.get("empty_layer")]
    assert len(steps) == len(stack)
    step = steps[len(stack) - 1 - deps]  # the history runs bottom first
    assert f"UV_VERSION={locked_version('uv')} " in step
    assert "--require-hashes" in step


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_image_is_built_on_the_base_make_images_makes(built: BuiltImages, image: str) -> None:
    """No base image is pulled from a registry: the bottom layer is the mmdebstrap base's."""
    bases = [
        i
        for i in json.loads(built.podman("images", "--format", "json"))
        if any(n.startswith("localhost/fedtune/base:") for n in i.get("Names") or [])
    ]
    assert bases
    base_layers = {built.podman.inspect(b["Id"])["RootFS"]["Layers"][0] for b in bases}
    assert built.podman.inspect(built.tags[image])["RootFS"]["Layers"][0] in base_layers


def test_the_chart_and_the_crd_default_to_the_images_make_images_builds(
    built: BuiltImages, binaries: Path
) -> None:
    rendered = render(binaries / "helm", include_crds=True)
    crd = rendered.get("CustomResourceDefinition", "federatedfinetunes.fedtune.dev")
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert rendered.container["image"] == built.tags["operator"]
    assert spec["template"]["properties"]["image"]["default"] == built.tags["trainer"]
    # Both tagged with the chart's appVersion.
    app_version = rendered.deployment["metadata"]["labels"]["app.kubernetes.io/version"]
    assert {t.rsplit(":", 1)[1] for t in built.tags.values()} == {app_version}
