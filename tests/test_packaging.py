"""Packaging: pyproject and environment.yml agree; the package imports light; notebooks are thin."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import papermill
import yaml

import reprokit
from reprokit import TrainConfig

ROOT = Path(__file__).parent.parent
# study settings, not run config
AUDIT_PARAMETERS = {"factor_seeds", "seeds", "repeats", "vary", "jobs", "profile", "command",
                    "world_sizes", "world_steps"}  # the world-size section: vary world_size, steps a run
# seconds of imports each; `import reprokit` and `reprokit --help` must not pay for them
HEAVY = ("torch", "matplotlib", "scipy", "pandas")


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


def _loaded_after(script: str) -> list[str]:
    """The heavy packages a fresh interpreter has loaded after running ``script``."""
    check = f"{script}\nimport sys\nprint(*[m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split()  # the last line: the script's own output comes first


def test_import_reprokit_loads_no_heavy_package() -> None:
    """`import reprokit` loads none of torch, matplotlib, scipy or pandas."""
    assert _loaded_after("import reprokit") == []


def test_cli_help_exits_0_without_torch() -> None:
    """`python -m reprokit --help` exits 0, and printing the help loads no torch or pandas."""
    done = subprocess.run([sys.executable, "-m", "reprokit", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage: reprokit"), done.stderr
    script = ("from reprokit.cli import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert _loaded_after(script) == []


def test_public_surface_is_exported() -> None:
    """Every name in reprokit.__all__ resolves via getattr."""
    missing = []
    for name in reprokit.__all__:
        try:
            getattr(reprokit, name)
        except AttributeError:
            missing.append(name)
    assert missing == []


def test_no_export_shadows_a_submodule() -> None:
    """No name in reprokit.__all__ is also the name of a reprokit submodule."""
    submodules = {m.name for m in pkgutil.iter_modules(reprokit.__path__)}
    assert submodules and set(reprokit.__all__) & submodules == set()


def test_type_checking_imports_mirror_the_lazy_exports() -> None:
    """The TYPE_CHECKING imports in reprokit/__init__.py name exactly the lazy exports' modules."""
    tree = ast.parse((ROOT / "reprokit" / "__init__.py").read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert imported == {name: f"reprokit.{module}" for name, module in reprokit._EXPORTS.items()}


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
