"""Packaging: pyproject and environment.yml agree; notebooks are parameterized and thin."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import papermill
import yaml

import reprokit
from reprokit import TrainConfig

ROOT = Path(__file__).parent.parent
# study settings, not run config
AUDIT_PARAMETERS = {"factor_seeds", "seeds", "repeats", "vary", "jobs", "profile"}


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_and_pyproject_name_the_same_packages() -> None:
    """environment.yml's pip section lists exactly pyproject's runtime and dev dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {*project["dependencies"], *project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip if not r.startswith("-e")}
    assert {_name(r) for r in listed} == {_name(r) for r in wanted}
    pins = {r for r in wanted if "==" in r}
    assert pins <= listed  # torch and torchvision pinned identically in both


def test_public_surface_is_exported() -> None:
    """Everything in reprokit.__all__ exists."""
    missing = [name for name in reprokit.__all__ if not hasattr(reprokit, name)]
    assert missing == []


def test_notebooks_are_parameterized_and_thin() -> None:
    """Each notebook has a tagged parameters cell and no def/class in any code cell."""
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert notebooks
    for nb in notebooks:
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        assert any("parameters" in c["metadata"].get("tags", []) for c in cells), nb.name
        for cell in cells:
            assert not re.search(r"^\s*(def|class)\s", "".join(cell["source"]), re.M), nb.name
            assert not cell.get("outputs"), f"{nb.name} is committed with outputs"


def test_notebook_01_parameters_mirror_the_config() -> None:
    """Notebook 01's parameters are TrainConfig fields or the audit's study settings."""
    declared = set(papermill.inspect_notebook(str(ROOT / "notebooks" / "01_seed_determinism.ipynb")))
    config_fields = {f.name for f in fields(TrainConfig)}
    assert declared - config_fields <= AUDIT_PARAMETERS
    assert {"model", "dataset", "steps", "threads"} <= declared
