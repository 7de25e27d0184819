"""Reports: execute every notebook with papermill under a named profile and render HTML.

Profiles live in one YAML file (``notebooks/profiles.yaml``): ``{profile: {notebook: {param:
value}}}``. Each notebook's parameters cell holds its smoke values, so nbval (which runs the
notebooks as stored) and the smoke profile agree. Parameters are checked against the notebook's
own before anything runs: papermill only warns about an unknown one.
"""

from __future__ import annotations

import ast
import html
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import papermill
import yaml
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError

from reprokit.errors import ReportError

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PROFILES_FILE = "profiles.yaml"
DEFAULT_KERNEL = "reprokit"  # registered in the venv by `make`; naming it avoids NoSuchKernel


@dataclass(frozen=True)
class NotebookRun:
    """How one notebook fared."""

    notebook: str
    status: str  # "ok" or "failed"
    seconds: float
    html: Path
    error: str = ""


def load_profile(profile: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, dict[str, Any]]:
    """The parameters of each notebook under ``profile``."""
    path = notebooks_dir / PROFILES_FILE
    profiles = yaml.safe_load(path.read_text()) if path.is_file() else {}
    if profile not in profiles:
        raise ReportError(f"profile {profile!r} is not in {path}; choose one of {sorted(profiles)}")
    return {name: dict(params or {}) for name, params in (profiles[profile] or {}).items()}


def check_parameters(notebook: Path, parameters: Mapping[str, Any]) -> None:
    """Refuse parameters the notebook does not declare, or whose type differs from its default's."""
    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ReportError(
            f"{notebook.name}: unknown parameter(s) {unknown}; its parameters cell declares "
            f"{sorted(declared)}"
        )
    for name, value in parameters.items():
        try:
            default = ast.literal_eval(declared[name]["default"])
        except (ValueError, SyntaxError):
            continue  # a default that is an expression: nothing to compare the type with
        if default is None or isinstance(value, type(default)):
            continue
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            continue
        raise ReportError(
            f"{notebook.name}: parameter {name!r} = {value!r} is a {type(value).__name__} but the "
            f"notebook's default {default!r} is a {type(default).__name__}; pass a value of type "
            f"{type(default).__name__}"
        )


def run_report(
    profile: str = "smoke",
    out: str | Path = "reports",
    *,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    kernel: str | None = None,
) -> pd.DataFrame:
    """Execute every notebook under ``profile`` into ``out`` (.ipynb and .html) plus index.html.

    A failing notebook does not stop the others; check the ``status`` column.
    """
    notebooks_dir, out = Path(notebooks_dir).resolve(), Path(out).resolve()
    kernel = kernel or os.environ.get("REPROKIT_KERNEL", DEFAULT_KERNEL)
    params = load_profile(profile, notebooks_dir)
    notebooks = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise ReportError(f"no notebooks (NN_name.ipynb) in {notebooks_dir}")
    unknown = sorted(set(params) - {nb.stem for nb in notebooks})
    if unknown:
        raise ReportError(f"profile {profile!r} names notebooks {unknown} that are not in {notebooks_dir}")
    for nb in notebooks:
        check_parameters(nb, params.get(nb.stem, {}))
    out.mkdir(parents=True, exist_ok=True)
    runs = [_run_one(nb, out, params.get(nb.stem, {}), kernel) for nb in notebooks]
    _write_index(out, profile, runs)
    return pd.DataFrame([r.__dict__ for r in runs])


def _run_one(notebook: Path, out: Path, parameters: dict[str, Any], kernel: str) -> NotebookRun:
    executed = out / notebook.name
    started = time.perf_counter()
    error = ""
    previous = os.environ.get("REPROKIT_PROGRESS")
    os.environ["REPROKIT_PROGRESS"] = "0"  # progress widgets would be empty boxes in the HTML
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=parameters, kernel_name=kernel,
            cwd=str(notebook.parent), progress_bar=False,
        )
    except PapermillExecutionError as e:
        error = f"cell {e.exec_count}: {e.ename}: {e.evalue}"
    finally:
        _restore_env("REPROKIT_PROGRESS", previous)
    seconds = time.perf_counter() - started
    page = out / f"{notebook.stem}.html"
    if executed.is_file():
        body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
        page.write_text(body)
    else:
        error = error or "papermill wrote no output notebook"
    return NotebookRun(notebook.stem, "failed" if error else "ok", round(seconds, 1), page, error)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _write_index(out: Path, profile: str, runs: list[NotebookRun]) -> None:
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(r.html.name)}'>{html.escape(r.notebook)}</a></td>"
        f"<td class='{r.status}'>{r.status}</td><td>{r.seconds:.1f} s</td>"
        f"<td>{html.escape(r.error)}</td></tr>"
        for r in runs
    )
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>reprokit reports</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 12px}.ok{color:green}"
        ".failed{color:#b00;font-weight:bold}</style>"
        f"<h1>reprokit reports ({html.escape(profile)} profile)</h1>"
        f"<table><tr><th>notebook</th><th>status</th><th>time</th><th>error</th></tr>{rows}</table>\n"
    )
