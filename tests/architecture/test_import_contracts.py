"""The import-linter contracts in pyproject.toml hold, and each one fails when it is broken.

`make lint` runs the same contracts; this test also proves they can fail. It copies the three
packages into a temporary directory, adds one import that breaks each contract (and a module the
exhaustive layering does not place), runs lint-imports on the copy once, and checks that every
contract reports the import meant for it. A contract whose violation goes unreported would pass
`make lint` forever, whatever the code did.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from devcluster.cluster import REPO_ROOT

PACKAGES = {
    "operator": "fedtune_operator",
    "trainer-image": "fedtune_trainer",
    "tools": "devcluster",
}
"""Where each root package lives, relative to the repository (pyproject's packages.find)."""

LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"
"""lint-imports run by this interpreter (the console script lives in the dependency venv)."""


@dataclass(frozen=True)
class Violation:
    """One import that breaks one contract, and the line the contract must report for it."""

    contract: str
    module: str
    """A file under a root package's directory, relative to the repository."""
    line: str
    reported: str


VIOLATIONS = (
    Violation(
        "pure-core",
        "operator/fedtune_operator/rounds.py",
        "import kopf",
        "fedtune_operator.rounds -> kopf",
    ),
    Violation(
        "operator-no-ml",
        "operator/fedtune_operator/cli.py",
        "from fedtune_trainer.adapter import lora",
        "fedtune_operator.cli -> fedtune_trainer.adapter.lora",
    ),
    Violation(
        "operator-wire-only",
        "operator/fedtune_operator/kube.py",
        "from fedtune_trainer.storage import store",
        "fedtune_operator.kube -> fedtune_trainer.storage.store",
    ),
    Violation(
        "job-contract",
        "trainer-image/fedtune_trainer/wire/results.py",
        "import numpy",
        "fedtune_trainer.wire.results -> numpy",
    ),
    Violation(
        "codec-pure",
        "trainer-image/fedtune_trainer/codec/container.py",
        "from fedtune_trainer.storage import store",
        "fedtune_trainer.codec.container -> fedtune_trainer.storage.store",
    ),
    Violation(
        "trainer-layers",
        "trainer-image/fedtune_trainer/storage/cache.py",
        "from fedtune_trainer import aggregate",
        "fedtune_trainer.storage.cache -> fedtune_trainer.aggregate",
    ),
    Violation(
        "trainer-layers",
        "trainer-image/fedtune_trainer/client.py",
        "from fedtune_trainer import evaluate",
        "fedtune_trainer.client -> fedtune_trainer.evaluate",
    ),
    Violation(
        "trainer-standalone",
        "trainer-image/fedtune_trainer/report.py",
        "from fedtune_operator import api",
        "fedtune_trainer.report -> fedtune_operator.api",
    ),
    Violation(
        "devcluster-standalone",
        "tools/devcluster/s3.py",
        "import fedtune_operator.crd",
        "devcluster.s3 -> fedtune_operator.crd",
    ),
    Violation(
        "operator-layers",
        "operator/fedtune_operator/status_updates.py",
        "from fedtune_operator import rounds",
        "fedtune_operator.status_updates -> fedtune_operator.rounds",
    ),
)
UNPLACED_MODULES = {
    "operator-layers": "operator/fedtune_operator/unplaced.py",
    "trainer-layers": "trainer-image/fedtune_trainer/unplaced.py",
}
"""A new module in no layer, per layered package: the exhaustive layers contract must name it."""


def contracts() -> dict[str, str]:
    """Contract id -> name, as pyproject.toml declares them."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the packages under `root`, with the contracts of root/pyproject.toml."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(root / d) for d in PACKAGES),
        "COLUMNS": "400",  # one line per contract in the summary
    }
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def broken_sections(report: str, names: dict[str, str]) -> dict[str, str]:
    """The text import-linter prints under each broken contract's heading, by contract id."""
    _, _, details = report.partition("Broken contracts")
    ids = {name: id_ for id_, name in names.items()}
    sections: dict[str, str] = {}
    current = None
    for line in details.splitlines():
        if line.strip() in ids:
            current = ids[line.strip()]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


@pytest.fixture(scope="module")
def broken_report(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """lint-imports over a copy of the packages with every violation above applied at once."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    for directory, package in PACKAGES.items():
        shutil.copytree(
            REPO_ROOT / directory / package,
            root / directory / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    for v in VIOLATIONS:
        with (root / v.module).open("a") as f:
            f.write(f"\n{v.line}  # a violation added by {__name__}\n")
    for module in UNPLACED_MODULES.values():
        (root / module).write_text('"""Placed in no layer."""\n')
    return lint_imports(root)


def test_the_repository_keeps_every_contract() -> None:
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in result.stdout


def test_every_contract_has_a_violation_here() -> None:
    assert {v.contract for v in VIOLATIONS} == set(contracts())


@pytest.mark.parametrize(
    "violation", VIOLATIONS, ids=[f"{v.contract}:{Path(v.module).stem}" for v in VIOLATIONS]
)
def test_each_contract_reports_the_import_that_breaks_it(
    broken_report: subprocess.CompletedProcess[str], violation: Violation
) -> None:
    assert broken_report.returncode != 0, broken_report.stdout + broken_report.stderr
    sections = broken_sections(broken_report.stdout, contracts())
    assert violation.contract in sections, broken_report.stdout + broken_report.stderr
    reported = re.findall(r"^-?\s+(\S+ -> \S+) \(l\.", sections[violation.contract], re.M)
    assert violation.reported in reported, sections[violation.contract]


@pytest.mark.parametrize(("contract", "module"), sorted(UNPLACED_MODULES.items()))
def test_a_module_outside_every_layer_breaks_the_layering(
    broken_report: subprocess.CompletedProcess[str], contract: str, module: str
) -> None:
    section = broken_sections(broken_report.stdout, contracts())[contract]
    dotted = module.split("/", 1)[1].removesuffix(".py").replace("/", ".")
    assert dotted in section, section


def test_the_operator_is_kept_off_every_trainer_package_but_the_wire() -> None:
    """operator-wire-only lists the trainer's children one by one (import-linter has no "all but
    one"): the list must name every child there is, so a new package cannot slip past it."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "operator-wire-only"]
    trainer = REPO_ROOT / "trainer-image" / "fedtune_trainer"
    children = {
        p.stem if p.is_file() else p.name
        for p in trainer.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.stem != "__init__"
    }
    expected = {f"fedtune_trainer.{c}" for c in children - {"wire", "__main__"}}
    assert set(contract["forbidden_modules"]) == expected
