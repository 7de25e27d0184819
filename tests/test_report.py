"""Report runner: every notebook runs, failures are reported not fatal, bad parameters refused."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from reprokit.cli import main
from reprokit.display import HEADLESS_ENV, HEADLINE_MIME, explorer
from reprokit.errors import ReportError
from reprokit.report import WIDGET_MIME, check_parameters, load_profile, run_report, share_cores

FIXTURES = Path(__file__).parent / "fixtures"
NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
FIXTURE_FILES = ("01_ok.ipynb", "02_raises.ipynb", "profiles.yaml")


def _copy_fixtures(folder: Path) -> Path:
    folder.mkdir()
    for name in FIXTURE_FILES:
        shutil.copy(FIXTURES / name, folder / name)
    return folder


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    return _copy_fixtures(tmp_path / "nb")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The fixture notebooks' smoke report, run once for the tests that read it."""
    root = tmp_path_factory.mktemp("report")
    runs = run_report("smoke", root / "out", notebooks_dir=_copy_fixtures(root / "nb"))
    return runs.set_index("notebook"), root / "out"


def test_failing_notebook_does_not_stop_the_others(smoke: tuple[pd.DataFrame, Path]) -> None:
    """A notebook that raises is marked failed with its error; the other still renders HTML."""
    runs, out = smoke
    assert runs.loc["01_ok", "status"] == "ok"
    assert runs.loc["02_raises", "status"] == "failed"
    assert runs.loc["02_raises", "error"] == "ValueError: planted failure"
    assert "42 x" in (out / "01_ok.html").read_text()
    assert (out / "01_ok.ipynb").is_file() and (out / "02_raises.html").is_file()


def test_index_lists_every_notebook_and_points_at_the_failing_cell(smoke: tuple[pd.DataFrame, Path]) -> None:
    """index.html links each page; a failure names its cell, execution count and exception, and
    links to that cell's anchor, which exists in the page."""
    runs, out = smoke
    index = (out / "index.html").read_text()
    assert "href='01_ok.html'" in index and "href='02_raises.html'" in index
    assert (runs.loc["02_raises", "error_cell"], runs.loc["02_raises", "error_count"]) == (2, 3)
    anchor = runs.loc["02_raises", "error_anchor"]
    assert f"<a href='02_raises.html#{anchor}'>cell 2 (In [3])</a>: ValueError: planted failure" in index
    assert f'id="{anchor}"' in (out / "02_raises.html").read_text()
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left behind


def test_headline_numbers_reach_the_index(smoke: tuple[pd.DataFrame, Path]) -> None:
    """headline(...) values are read back from the executed notebook into the run and the index."""
    runs, out = smoke
    assert runs.loc["01_ok", "headline"] == {"answer": 42, "ratio": 0.5, "verdict": "42 x"}
    index = (out / "index.html").read_text()
    assert "<dt>answer</dt><dd>42</dd><dt>ratio</dt><dd>0.5</dd><dt>verdict</dt><dd>42 x</dd>" in index
    nb = nbformat.read(out / "01_ok.ipynb", as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", []) if HEADLINE_MIME in o.get("data", {})]
    assert "text/plain" in outputs[0]["data"] and "text/html" in outputs[0]["data"]  # readable too


def test_html_embeds_figures_and_no_bare_widget(smoke: tuple[pd.DataFrame, Path]) -> None:
    """Figures are data:image/png images; the explorer widget becomes a note, not an empty box; the
    code toggle is there."""
    _, out = smoke
    page = (out / "01_ok.html").read_text()
    assert re.search(r'<img[^>]+src="data:image/png;base64,', page)
    assert WIDGET_MIME not in page and "@jupyter-widgets/html-manager" not in page
    assert page.count("Interactive explorer (ipywidgets)") == 2  # explorer() and a bare slider
    assert 'id="reprokit-code-toggle"' in page


def test_cli_exits_non_zero_and_jobs_2_gives_the_same_statuses(
    notebooks: Path, tmp_path: Path, smoke: tuple[pd.DataFrame, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`reprokit report --jobs 2` prints a line per notebook, reaches the statuses and errors of the
    sequential run, writes both pages and the index, and exits 1 because one notebook failed."""
    out = tmp_path / "out"
    code = main(["report", "--notebooks-dir", str(notebooks), "--out", str(out), "--jobs", "2"])
    printed = capsys.readouterr().out
    assert code == 1
    lines = re.findall(r"^(ok|failed) +[\d.]+ s  (\S+)(?:  \((.*)\))?$", printed, re.M)
    runs, _ = smoke
    sequential = {name: (row.status, f"{row.error} at cell {row.error_cell}" if row.error else "")
                  for name, row in runs.iterrows()}
    assert {name: (status, error) for status, name, error in lines} == sequential
    assert "1/2 notebooks ok" in printed
    index = (out / "index.html").read_text()
    assert "href='01_ok.html'" in index and "planted failure" in index
    assert "data:image/png;base64," in (out / "01_ok.html").read_text()


def test_explorer_redraws_the_picked_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The explorer plots the rows of the picked value and redraws when the pick changes; headless
    it builds no widget."""
    monkeypatch.delenv(HEADLESS_ENV, raising=False)
    frame = pd.DataFrame({"kill": ["a", "a", "b"], "loss": [1.0, 2.0, 3.0]})
    seen: list[list[float]] = []
    box = explorer(frame, "kill", lambda part: seen.append(list(part["loss"])))
    picker = box.children[0]
    picker.value = "b"
    assert seen == [[1.0, 2.0], [3.0]]
    with pytest.raises(ReportError, match=r"no column 'seed'; choose one of \['kill', 'loss'\]"):
        explorer(frame, "seed", print)
    monkeypatch.setenv(HEADLESS_ENV, "1")
    assert "Interactive explorer" in explorer(frame, "kill", print).data


def test_code_removed_and_notebook_subset(notebooks: Path, tmp_path: Path) -> None:
    """only= runs just the named notebook; code="removed" renders it without any input."""
    runs = run_report("smoke", tmp_path / "out", notebooks_dir=notebooks, only=["02"], code="removed")
    assert list(runs["notebook"]) == ["02_raises"]
    page = (tmp_path / "out" / "02_raises.html").read_text()
    assert "planted failure" in page and "raise ValueError" not in page
    assert "reprokit-code-toggle" not in page
    assert not (tmp_path / "out" / "01_ok.html").exists()


def test_profile_parameters_are_injected(notebooks: Path, tmp_path: Path) -> None:
    """The profile's values replace the parameters cell's: answer=1 prints 2, fail=False passes."""
    runs = run_report("passing", tmp_path / "out", notebooks_dir=notebooks)
    assert (runs["status"] == "ok").all()
    assert "2 x" in (tmp_path / "out" / "01_ok.html").read_text()


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("unknown_param", r"unknown parameter\(s\) \['colour'\]; its parameters cell declares"),
        ("wrong_type", r"parameter 'answer' = 'forty' is a str .* pass a value of type int"),
        ("unknown_notebook", r"names notebooks \['99_missing'\]"),
        ("nope", r"profile 'nope' is not in .*choose one of"),
    ],
)
def test_bad_profiles_are_refused_before_running(
    notebooks: Path, tmp_path: Path, profile: str, message: str
) -> None:
    """Unknown parameters, ill-typed values, unknown notebooks and profiles fail up front."""
    with pytest.raises(ReportError, match=message):
        run_report(profile, tmp_path / "out", notebooks_dir=notebooks)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_shipped_profiles_match_the_notebooks() -> None:
    """Every profile in notebooks/profiles.yaml names real notebooks and declared parameters."""
    for profile in ("smoke", "full"):
        for name, params in load_profile(profile, NOTEBOOKS).items():
            check_parameters(NOTEBOOKS / f"{name}.ipynb", params)


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_sees_every_parameter_the_cell_assigns(notebook: Path) -> None:
    """papermill parses every assignment in the parameters cell (it silently drops lines it cannot)."""
    import ast

    import nbformat
    import papermill

    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert set(papermill.inspect_notebook(str(notebook))) == assigned


def test_notebooks_run_side_by_side_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --jobs 2 on 2 cores a notebook that trains in its own processes gets jobs=1; alone, or
    on 8 cores, it keeps what it asked for; a notebook without a jobs parameter is left alone."""
    notebook = Path(__file__).parent.parent / "notebooks" / "01_seed_determinism.ipynb"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert share_cores(notebook, {"jobs": 2, "steps": 5}, 2) == {"jobs": 1, "steps": 5}
    assert share_cores(notebook, {}, 2) == {"jobs": 1}
    assert share_cores(notebook, {"jobs": 2}, 1) == {"jobs": 2}
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert share_cores(notebook, {"jobs": 2}, 2) == {"jobs": 2}
    assert share_cores(FIXTURES / "01_ok.ipynb", {}, 2) == {}
