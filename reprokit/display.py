"""What a notebook shows beyond DataFrames and Figures: headline numbers for the report index, and
ipywidgets explorers that degrade to a note where no frontend can drive them.

``headline(**numbers)`` publishes a notebook's key results: ``reprokit report`` reads them from the
executed notebook into its index. ``explorer(frame, by, plot)`` is a picker over a column that
redraws a figure; its cell is tagged ``nbval-skip``. Under ``reprokit report`` the kernels run with
``REPROKIT_HEADLESS=1`` and explorers return a note instead of widgets: papermill can hang on a
widget cell (jupyter/nbclient#312), and a report has no kernel to drive one anyway.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable
from typing import Any

import pandas as pd

from reprokit.errors import ReportError

HEADLINE_MIME = "application/vnd.reprokit.headline+json"
HEADLESS_ENV = "REPROKIT_HEADLESS"  # set by run_report for the kernels it starts
WIDGET_NOTE = (
    "<p><em>Interactive explorer (ipywidgets): open the notebook in JupyterLab to use it. A report has "
    "no kernel, so it shows only the static figures.</em></p>"
)


def headless() -> bool:
    """True under ``reprokit report``: build no widgets, show :data:`WIDGET_NOTE` instead."""
    return os.environ.get(HEADLESS_ENV) == "1"


def headline(**numbers: Any) -> None:
    """Publish a notebook's key results; ``reprokit report`` shows them in its index.

    Displays a small table (text/html and text/plain) plus ``{"names": [...], "values": {...}}`` as
    ``application/vnd.reprokit.headline+json``, which the report reads from the executed notebook
    (``names`` keeps the call's order: Jupyter sorts JSON keys). Values are kept if they are
    str, int, float or bool (numpy scalars are converted), else their text. Several calls add up;
    a later value replaces an earlier one of the same name.

    Example: ``headline(verdict="6/6 resumes bitwise identical", R_median=1.0)``.
    """
    from IPython.display import display

    if not numbers:
        raise ReportError("headline() got no values; pass name=value pairs, e.g. headline(R_median=1.0)")
    values = {name: _plain(value) for name, value in numbers.items()}
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(format_value(v))}</td></tr>"
        for k, v in values.items()
    )
    display({
        HEADLINE_MIME: {"names": list(values), "values": values},
        "text/html": f"<table class='reprokit-headline'><caption>headline</caption>{rows}</table>",
        "text/plain": "\n".join(f"{k}: {format_value(v)}" for k, v in values.items()),
    }, raw=True)


def explorer(
    frame: pd.DataFrame, by: str, plot: Callable[[pd.DataFrame], Any], *, multiple: bool = False
) -> Any:
    """An ipywidgets explorer: pick values of column ``by``; shows ``plot(rows with those values)``.

    For JupyterLab; tag its cell ``nbval-skip``. Under ``reprokit report`` (``REPROKIT_HEADLESS=1``)
    it builds no widget and shows a note instead.
    """
    from IPython.display import HTML, display

    if headless():
        return HTML(WIDGET_NOTE)
    import ipywidgets as widgets  # type: ignore[import-untyped]  # no stubs; only needed here

    if by not in frame.columns:
        raise ReportError(f"explorer: no column {by!r}; choose one of {list(frame.columns)}")
    values = list(dict.fromkeys(frame[by]))
    if not values:
        raise ReportError(f"explorer: the frame has no rows to pick {by!r} from; pass a non-empty frame")
    if multiple:
        picker = widgets.SelectMultiple(options=values, value=values[:3], description=by)
    else:
        picker = widgets.Dropdown(options=values, description=by)
    out = widgets.Output()

    def redraw(_: object = None) -> None:
        chosen = list(picker.value) if multiple else [picker.value]
        out.clear_output(wait=True)
        with out:
            display(plot(frame[frame[by].isin(chosen)]))

    picker.observe(redraw, names="value")
    redraw()
    return widgets.VBox([picker, out])


def _plain(value: Any) -> Any:
    """A JSON value for ``value``: numpy scalars become Python ones, non-finite floats and anything
    else their text."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def format_value(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.4g}"
    return f"{text}.0" if text.lstrip("-").isdigit() else text  # 1.0 stays a float to the reader
