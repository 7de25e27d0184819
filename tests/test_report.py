"""Report runner: every notebook runs, failures are reported not fatal, bad parameters refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reprokit.errors import ReportError
from reprokit.report import check_parameters, load_profile, run_report

FIXTURES = Path(__file__).parent / "fixtures"
NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "nb"
    folder.mkdir()
    for name in ("01_ok.ipynb", "02_raises.ipynb", "profiles.yaml"):
        shutil.copy(FIXTURES / name, folder / name)
    return folder


def test_failing_notebook_does_not_stop_the_others(notebooks: Path, tmp_path: Path) -> None:
    """A notebook that raises is marked failed with its error; the other still renders HTML."""
    runs = run_report("smoke", tmp_path / "out", notebooks_dir=notebooks).set_index("notebook")
    assert runs.loc["01_ok", "status"] == "ok"
    assert runs.loc["02_raises", "status"] == "failed"
    assert "ValueError: planted failure" in runs.loc["02_raises", "error"]
    page = (tmp_path / "out" / "01_ok.html").read_text()
    assert "42 x" in page
    index = (tmp_path / "out" / "index.html").read_text()
    assert "01_ok" in index and "02_raises" in index and "planted failure" in index


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
