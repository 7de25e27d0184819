"""Figures for parameter trajectories and divergences: DataFrames in, matplotlib Figures out.

Made with pyplot and closed at once, as in ``reprokit.plots``, so a notebook shows each figure
only where it is returned.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from reprokit.compare import Comparison
from reprokit.display import WIDGET_NOTE, headless
from reprokit.trace import CHANGE_SCALE, IMPORTANCE_METHODS, MODEL, traceability_score

UPDATE_RATIO_RULE = 1e-3  # CS231n: updates ~1e-3 of the weights' scale are healthy


def plot_change_heatmap(trace: pd.DataFrame) -> Figure:
    """Change rate |Δθ|₁/|θ|₁ of every tensor (rows, in model order) at every traced step
    (columns), log colour scale; red marks an infinite rate (a zero tensor that moved)."""
    order = list(dict.fromkeys(trace["tensor"]))
    grid = trace.pivot(index="tensor", columns="step", values="change_rate").loc[order]
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values) & (values > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (1e-6, 1.0)
    fig, ax = plt.subplots(figsize=(9.0, 0.3 * len(order) + 2.0), layout="constrained")
    plt.close(fig)
    cmap = plt.get_cmap("viridis").with_extremes(over="red", under="black", bad="0.85")
    image = ax.imshow(np.where(values == 0, low / 10, values), aspect="auto", interpolation="nearest",
                      cmap=cmap, norm=LogNorm(vmin=low, vmax=high))
    steps = grid.columns.to_list()
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_yticks(range(len(order)), order, fontsize="small")
    ax.set(xlabel="optimizer step", title="Change rate per tensor |θ_t − θ_{t−1}|₁ / |θ_{t−1}|₁")
    fig.colorbar(image, ax=ax, label="change rate (black: 0, red: inf)")
    return fig


def plot_update_ratios(trace: pd.DataFrame) -> Figure:
    """Update-to-parameter ratio ‖Δθ‖₂/‖θ‖₂ per tensor over the steps, with CS231n's ~1e-3 line."""
    fig, ax = plt.subplots(figsize=(8.0, 4.0), layout="constrained")
    plt.close(fig)
    for i, (name, group) in enumerate(trace.groupby("tensor", sort=False)):
        ratio = group["update_ratio"].replace(np.inf, np.nan)
        ax.plot(group["step"], ratio, lw=1, color=f"C{i % 10}", label=str(name))
    ax.axhline(UPDATE_RATIO_RULE, color="0.3", ls="--", lw=1, label="~1e-3 rule of thumb")
    ax.set(xlabel="optimizer step", ylabel="‖Δθ‖₂ / ‖θ‖₂", yscale="log", title="Update ratio per tensor")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(alpha=0.3)
    return fig


def plot_importance(importance: pd.DataFrame) -> Figure:
    """Each tensor's share of the model's importance: SNIP, empirical Fisher and the essay's
    uniform (which is just each tensor's share of the parameter count)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(importance) + 2.0), 4.0), layout="constrained")
    plt.close(fig)
    x = np.arange(len(importance))
    width = 0.8 / len(IMPORTANCE_METHODS)
    for i, method in enumerate(IMPORTANCE_METHODS):
        ax.bar(x + (i - 1) * width, importance[method], width, label=method, color=f"C{i}")
    ax.set_xticks(x, importance["tensor"], rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="share of importance (sums to 1)", title="Importance per tensor")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_traceability(score: pd.DataFrame) -> Figure:
    """The whole-model traceability score over the steps, one line per α (left), and its two
    terms, which do not depend on α (right)."""
    model = score[score["tensor"] == MODEL]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.0), layout="constrained")
    plt.close(fig)
    for i, (alpha, group) in enumerate(model.groupby("alpha")):
        left.plot(group["step"], group["score"], color=f"C{i % 10}", label=f"α = {alpha:g}")
    left.set(xlabel="optimizer step", ylabel="score", ylim=(0, 1),
             title="Traceability α·change + (1−α)·explainability")
    left.legend(fontsize="small")
    terms = model[model["alpha"] == model["alpha"].iloc[0]] if len(model) else model
    right.plot(terms["step"], terms["change"], color="C0", label=f"change: r / (r + {CHANGE_SCALE:g})")
    right.plot(terms["step"], terms["explainability"], color="C1", label="explainability: overlap")
    right.set(xlabel="optimizer step", ylim=(0, 1), title="The two terms")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def plot_divergence(comparison: Comparison) -> Figure:
    """How the gap between two runs grows: loss difference, tensor-norm gap (traced runs) and
    exact max |Δθ| (shared checkpoints, final models) on a log scale, differing tensors on the right."""
    gap = comparison.gap
    fig, ax = plt.subplots(figsize=(8.0, 4.0), layout="constrained")
    plt.close(fig)
    ax.plot(gap["step"], gap["loss_diff"].where(gap["loss_diff"] > 0), color="C0", label="|loss_a − loss_b|")
    if gap["param_norm_gap"].notna().any():
        ax.plot(gap["step"], gap["param_norm_gap"].where(gap["param_norm_gap"] > 0), color="C1",
                label="max | ‖θ_a‖₂ − ‖θ_b‖₂ | (traced)")
    exact = gap[gap["max_abs_diff"] > 0]
    ax.scatter(exact["step"], exact["max_abs_diff"], color="C3", zorder=3, label="max |θ_a − θ_b| (exact)")
    if comparison.first_step is not None:
        ax.axvline(comparison.first_step, color="0.3", ls=":", lw=1,
                   label=f"first divergence: step {comparison.first_step}")
    ax.set(xlabel="optimizer step", ylabel="gap", title=_divergence_title(comparison))
    if (gap[["loss_diff", "param_norm_gap", "max_abs_diff"]] > 0).any().any():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    counts = gap.dropna(subset=["differing_tensors"])
    twin = ax.twinx()
    twin.step(counts["step"], counts["differing_tensors"].astype(float), where="post", color="0.5", lw=1)
    twin.set_ylabel("tensors that differ", color="0.5")
    ax.legend(fontsize="small", loc="upper left")
    return fig


def _divergence_title(comparison: Comparison) -> str:
    if comparison.identical:
        return "Identical runs: every digest matches"
    if comparison.first_step is None:
        return "Runs differ; no shared digest step pins down where"
    size = "" if math.isnan(comparison.max_abs_diff) else f", max |Δθ| {comparison.max_abs_diff:.2g}"
    return f"Runs split at step {comparison.first_step} in {len(comparison.tensors)} tensor(s){size}"


def trace_explorer(trace: pd.DataFrame, importance: pd.DataFrame, *, method: str = "snip") -> Any:
    """An ipywidgets explorer for JupyterLab: pick a tensor (or the whole model), α and a step
    range; shows that tensor's change, explainability and score. Tag its cell ``nbval-skip``; under
    ``reprokit report`` it shows a note instead (see ``reprokit.display``)."""
    from IPython.display import HTML, display

    if headless():
        return HTML(WIDGET_NOTE)
    import ipywidgets as widgets  # type: ignore[import-untyped]  # no stubs; only needed here

    first, last = int(trace["step"].min()), int(trace["step"].max())
    pick = widgets.Dropdown(options=[MODEL, *dict.fromkeys(trace["tensor"])], description="tensor")
    alpha = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="α")
    span = widgets.IntRangeSlider(value=(first, last), min=first, max=last, description="steps")
    out = widgets.Output()

    def redraw(_: object = None) -> None:
        score = traceability_score(trace, importance, alpha.value, method=method)
        rows = score[(score["tensor"] == pick.value) & score["step"].between(*span.value)]
        fig, ax = plt.subplots(figsize=(8.0, 3.5), layout="constrained")
        plt.close(fig)
        for column in ("change", "explainability", "score"):
            ax.plot(rows["step"], rows[column], label=column)
        ax.set(xlabel="optimizer step", ylim=(0, 1), title=f"{pick.value}: α = {alpha.value:g}, {method}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        out.clear_output(wait=True)
        with out:
            display(fig)

    for widget in (pick, alpha, span):
        widget.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([pick, alpha, span]), out])
