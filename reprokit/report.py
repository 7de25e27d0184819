"""Reports: execute every notebook with papermill under a named profile and render HTML + an index.

Profiles live in one YAML file (``notebooks/profiles.yaml``): ``{profile: {notebook: {param:
value}}}``. Each notebook's parameters cell holds its smoke values, so nbval (which runs the
notebooks as stored) and the smoke profile agree. Parameters are checked against the notebook's
own before anything runs: papermill only warns about an unknown one.

Two helpers are for the notebooks themselves: :func:`headline` publishes a notebook's key results
(the index reads them back from the executed notebook) and :func:`explorer` builds its
ipywidgets explorer. A rendered report has no kernel, so the report tells the kernel it runs
headless (``REPROKIT_HEADLESS=1``): the explorer then shows a note instead of building widgets
(executing widgets without a frontend can hang nbclient, jupyter/nbclient#312), and any other
widget output becomes the same note in the HTML. The static figures carry the content.
"""

from __future__ import annotations

import ast
import html
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from reprokit.display import HEADLESS_ENV, HEADLINE_MIME, WIDGET_NOTE, format_value
from reprokit.errors import ReportError
from reprokit.rundir import atomic_write_bytes

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PROFILES_FILE = "profiles.yaml"
DEFAULT_KERNEL = "reprokit"  # registered in the venv by `make`; naming it avoids NoSuchKernel
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CODE_MODES = ("shown", "hidden", "removed")
OMP_WAIT = "OMP_WAIT_POLICY"
INNER_JOBS = "jobs"  # a notebook parameter: how many processes the notebook itself trains in


@dataclass(frozen=True)
class NotebookRun:
    """How one notebook fared. ``error_cell`` is the failing cell's index in the source notebook
    (0-based), ``error_count`` its execution count, ``error_anchor`` its id in the HTML page."""

    notebook: str
    status: str  # "ok", "failed" (or "pending" in an index written while others still run)
    seconds: float
    html: Path
    error: str = ""
    error_cell: int | None = None
    error_count: int | None = None
    error_anchor: str = ""
    headline: dict[str, Any] = field(default_factory=dict)


# ---- profiles --------------------------------------------------------------------------------


def load_profile(profile: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, dict[str, Any]]:
    """The parameters of each notebook under ``profile``."""
    path = notebooks_dir / PROFILES_FILE
    try:
        profiles = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        why = " ".join(str(e).split())[:200]  # one line: YAML's message spans several
        raise ReportError(f"{path}: does not parse ({why}); fix the file") from None
    if not isinstance(profiles, dict):
        raise ReportError(f"{path}: holds a {type(profiles).__name__}, not a mapping of profile names to "
                          "notebook parameters; fix the file")
    if profile not in profiles:
        raise ReportError(f"profile {profile!r} is not in {path}; choose one of {sorted(map(str, profiles))}")
    notebooks = profiles[profile] or {}
    if not isinstance(notebooks, dict) or not all(isinstance(p, dict | None) for p in notebooks.values()):
        raise ReportError(f"{path}: profile {profile!r} is not a mapping of notebook names to parameter "
                          "mappings; fix the file")
    return {str(name): dict(params or {}) for name, params in notebooks.items()}


def check_parameters(notebook: Path, parameters: Mapping[str, Any]) -> None:
    """Refuse parameters the notebook does not declare, or whose type differs from its default's."""
    import papermill

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


# ---- running ---------------------------------------------------------------------------------


def run_report(
    profile: str = "smoke",
    out: str | Path = "reports",
    *,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    only: Sequence[str] = (),
    jobs: int = 1,
    code: str = "shown",
    cell_timeout: float | None = 1800.0,
    kernel: str | None = None,
    on_done: Callable[[NotebookRun], None] | None = None,
) -> pd.DataFrame:
    """Execute every notebook under ``profile`` into ``out`` (.ipynb and .html) plus index.html.

    A failing notebook does not stop the others; check the ``status`` column. The index is
    rewritten (atomically) as each notebook finishes, so an interrupted report still lists what ran.

    Args:
        profile: a profile in ``notebooks_dir/profiles.yaml``.
        out: the output directory.
        notebooks_dir: where the ``NN_name.ipynb`` notebooks are.
        only: run just these notebooks (name, file name or number prefix such as ``"03"``).
        jobs: notebooks to execute at once, each in its own process; a notebook's own ``jobs``
            parameter is then capped at its share of the cores (:func:`share_cores`).
        code: ``"shown"`` (a button hides it), ``"hidden"`` (the button shows it) or ``"removed"``.
        cell_timeout: seconds a cell may run before its notebook is failed (None: no limit); a
            hung notebook would otherwise hold the whole report.
        kernel: the Jupyter kernel (default ``$REPROKIT_KERNEL``, else ``reprokit``).
        on_done: called with each notebook's result as it finishes.
    """
    if code not in CODE_MODES:
        raise ReportError(f"code={code!r} is not one of {CODE_MODES}; pass e.g. code='shown'")
    if jobs < 1:
        raise ReportError(f"jobs={jobs} must be at least 1; pass e.g. --jobs 2")
    notebooks_dir, out = Path(notebooks_dir).resolve(), Path(out).resolve()
    kernel = kernel or os.environ.get("REPROKIT_KERNEL", DEFAULT_KERNEL)
    params = load_profile(profile, notebooks_dir)
    notebooks = _checked_notebooks(profile, params, notebooks_dir, only)
    out.mkdir(parents=True, exist_ok=True)
    runs = {nb.stem: NotebookRun(nb.stem, "pending", 0.0, out / f"{nb.stem}.html") for nb in notebooks}
    _write_index(out, profile, list(runs.values()))

    def finish(run: NotebookRun) -> None:
        runs[run.notebook] = run
        _write_index(out, profile, list(runs.values()))
        if on_done is not None:
            on_done(run)

    tasks = [(nb, out, share_cores(nb, params.get(nb.stem, {}), jobs), kernel, code, cell_timeout)
             for nb in notebooks]
    if jobs == 1 or len(tasks) == 1:
        for task in tasks:
            finish(_run_one(*task))
    else:
        _run_parallel(tasks, jobs, out, finish)
    frame = pd.DataFrame([run.__dict__ for run in runs.values()])
    return frame.astype({"error_cell": "Int64", "error_count": "Int64"})


def _checked_notebooks(
    profile: str, params: Mapping[str, Any], notebooks_dir: Path, only: Sequence[str]
) -> list[Path]:
    """The notebooks to run, after checking the profile names only notebooks that exist and
    every parameter against the notebook's own."""
    notebooks = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise ReportError(f"no notebooks (NN_name.ipynb) in {notebooks_dir}")
    unknown = sorted(set(params) - {nb.stem for nb in notebooks})
    if unknown:
        raise ReportError(f"profile {profile!r} names notebooks {unknown} that are not in {notebooks_dir}")
    notebooks = _select(notebooks, only)
    for nb in notebooks:
        check_parameters(nb, params.get(nb.stem, {}))
    return notebooks


def _run_parallel(
    tasks: Sequence[tuple[Any, ...]], jobs: int, out: Path, finish: Callable[[NotebookRun], None]
) -> None:
    # OpenMP threads spin while idle by default and take the core a neighbouring notebook
    # needs (measured: --jobs 2 took 154-180 s against 82 s for --jobs 1); PASSIVE lets them
    # sleep (67 s). It changes no result: only how idle threads wait. The kernels inherit it.
    previous = os.environ.get(OMP_WAIT)
    os.environ.setdefault(OMP_WAIT, "PASSIVE")
    # spawn: a fresh interpreter per worker, nothing inherited from a process that may hold threads
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(_run_one, *task): task[0] for task in tasks}
            for future in as_completed(futures):
                notebook = futures[future]
                try:
                    finish(future.result())
                except Exception as e:  # the worker process died: record it, keep the others
                    finish(NotebookRun(notebook.stem, "failed", 0.0, out / f"{notebook.stem}.html",
                                       error=f"worker died: {type(e).__name__}: {e}"))
    finally:
        _restore_env(OMP_WAIT, previous)


def share_cores(notebook: Path, parameters: Mapping[str, Any], jobs: int) -> dict[str, Any]:
    """``parameters``, with a notebook's own ``jobs`` parameter (the processes it trains in) capped
    at its share of the cores when ``jobs`` notebooks run at once: two notebooks that each train
    on every core would only fight over them (measured: --jobs 2 was 0.72x as fast without this)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    if jobs == 1 or INNER_JOBS not in declared:
        return dict(parameters)
    share = max(1, (os.cpu_count() or 1) // jobs)
    inner = parameters.get(INNER_JOBS, ast.literal_eval(declared[INNER_JOBS]["default"]))
    return {**parameters, INNER_JOBS: min(int(inner), share)}


def _select(notebooks: list[Path], only: Sequence[str]) -> list[Path]:
    if not only:
        return notebooks
    chosen = []
    for name in only:
        stem = name.removesuffix(".ipynb")
        match = [nb for nb in notebooks if nb.stem == stem] or [
            nb for nb in notebooks if nb.stem.startswith(f"{stem}_")]
        if len(match) != 1:
            raise ReportError(f"--notebook {name!r} names no single notebook; choose one of "
                              f"{[nb.stem for nb in notebooks]}")
        chosen.append(match[0])
    return sorted(set(chosen))


def _run_one(
    notebook: Path, out: Path, parameters: dict[str, Any], kernel: str, code: str, timeout: float | None
) -> NotebookRun:
    """Execute one notebook and render its page; never raises for a notebook's own failure."""
    import nbformat
    import papermill

    executed = out / notebook.name
    started = time.perf_counter()
    error = ""
    # the kernel inherits our environment: no progress widgets (empty boxes in the HTML), no explorer
    previous = {name: os.environ.get(name) for name in ("REPROKIT_PROGRESS", HEADLESS_ENV)}
    os.environ.update({"REPROKIT_PROGRESS": "0", HEADLESS_ENV: "1"})
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=parameters, kernel_name=kernel,
            cwd=str(notebook.parent), progress_bar=False, execution_timeout=timeout,
        )
    except Exception as e:  # a cell raised (PapermillExecutionError), timed out, the kernel died, ...
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        for name, value in previous.items():
            _restore_env(name, value)
    seconds = round(time.perf_counter() - started, 1)
    page = out / f"{notebook.stem}.html"
    if not executed.is_file():
        return NotebookRun(notebook.stem, "failed", seconds, page,
                           error=error or "papermill wrote no output notebook")
    nb = nbformat.read(executed, as_version=4)
    numbers = _headline_of(nb)
    failure = _failing_cell(nb, nbformat.read(notebook, as_version=4))
    _atomic_write(page, _render(nb, code))
    if failure is None:
        return NotebookRun(notebook.stem, "failed" if error else "ok", seconds, page, error,
                           headline=numbers)
    index, count, anchor, message = failure
    return NotebookRun(notebook.stem, "failed", seconds, page, message, index, count, anchor, numbers)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _headline_of(nb: Any) -> dict[str, Any]:
    numbers: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            published = output.get("data", {}).get(HEADLINE_MIME)
            if published:
                values = published.get("values", {})
                numbers.update((name, values[name]) for name in published.get("names", values))
    return numbers


def _failing_cell(nb: Any, source: Any) -> tuple[int | None, int | None, str, str] | None:
    """(index in the source notebook, execution count, HTML anchor, "Name: message") of the first
    cell with an error output, or None."""
    positions = {cell.get("id"): i for i, cell in enumerate(source.cells)}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                anchor = f"cell-id={cell.id}" if cell.get("id") else "papermill-error-cell"
                message = f"{output.get('ename', '')}: {output.get('evalue', '')}".splitlines()[0]
                return positions.get(cell.get("id")), cell.get("execution_count"), anchor, message
    return None


# ---- rendering -------------------------------------------------------------------------------

_CODE_TOGGLE = """<style>
#reprokit-code-toggle{position:fixed;top:8px;right:12px;z-index:1000;padding:4px 10px;font:13px sans-serif}
body.reprokit-hide-code .jp-CodeCell .jp-Cell-inputWrapper{display:none}
@media print{#reprokit-code-toggle{display:none}}
</style>
<button id="reprokit-code-toggle" type="button" onclick="var h=document.body.classList.toggle(
'reprokit-hide-code');this.textContent=h?'Show code':'Hide code'">Hide code</button>
"""


def _render(nb: Any, code: str) -> str:
    """The HTML page: figures embedded as data: images, widgets replaced by a note, code toggle."""
    from nbconvert import HTMLExporter

    _static_widgets(nb)
    body: str
    body, _ = HTMLExporter(exclude_input=code == "removed").from_notebook_node(nb)
    if code == "removed":
        return body
    toggle = _CODE_TOGGLE
    if code == "hidden":
        toggle = toggle.replace(">Hide code<", ">Show code<") + (
            "<script>document.body.classList.add('reprokit-hide-code')</script>\n")
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + "\n" + toggle, body, count=1)


def _static_widgets(nb: Any) -> None:
    """Replace widget views (empty without a kernel and the widget manager from a CDN) by a note."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if WIDGET_MIME in output.get("data", {}):
                output["data"] = {"text/html": WIDGET_NOTE, "text/plain": "(interactive explorer)"}


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _write_index(out: Path, profile: str, runs: list[NotebookRun]) -> None:
    done = [r for r in runs if r.status != "pending"]
    ok = sum(r.status == "ok" for r in runs)
    rows = "\n".join(_index_row(r) for r in runs)
    _atomic_write(out / "index.html", (
        "<!doctype html><meta charset='utf-8'><title>reprokit reports</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 12px;vertical-align:top;text-align:left}"
        ".ok{color:green}.failed{color:#b00;font-weight:bold}.pending{color:#888}"
        "dl{margin:0;display:grid;grid-template-columns:auto auto;gap:0 12px}dt{color:#555}dd{margin:0}"
        "</style>"
        f"<h1>reprokit reports ({html.escape(profile)} profile)</h1>"
        f"<p>{ok}/{len(runs)} notebooks ok, {len(done)}/{len(runs)} finished; "
        f"updated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
        "<table><tr><th>notebook</th><th>status</th><th>time</th><th>headline</th><th>error</th></tr>"
        f"{rows}</table>\n"
    ))


def _index_row(run: NotebookRun) -> str:
    page = html.escape(run.html.name)
    name = html.escape(run.notebook)
    link = name if run.status == "pending" else (
        f"<a href='{page}'>{name}</a> <small>(<a href='{name}.ipynb'>ipynb</a>)</small>")
    numbers = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(format_value(v))}</dd>"
                      for k, v in run.headline.items())
    error = html.escape(run.error)
    if run.error_anchor:
        where = f"cell {run.error_cell}" if run.error_cell is not None else "cell"
        where += f" (In [{run.error_count}])" if run.error_count is not None else ""
        error = f"<a href='{page}#{html.escape(run.error_anchor)}'>{where}</a>: {error}"
    seconds = "" if run.status == "pending" else f"{run.seconds:.1f} s"
    return (f"<tr><td>{link}</td><td class='{run.status}'>{run.status}</td><td>{seconds}</td>"
            f"<td><dl>{numbers}</dl></td><td>{error}</td></tr>")
