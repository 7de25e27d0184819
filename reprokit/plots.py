"""Plots: DataFrames in, matplotlib Figures out.

Each figure is made with pyplot (so Jupyter's inline backend knows how to show it) and closed at
once (so pyplot keeps no global reference and a notebook shows it only where it is returned).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from reprokit.audit import NONE


def plot_loss_curves(audit: pd.DataFrame) -> Figure:
    """Training loss per step of each seed's reference run (log scale), one line per seed."""
    fig, ax = _figure(7.0)
    reference = audit[(audit["changed"] == NONE) & (audit["repeat"] == 0)]
    for _, row in reference.iterrows():
        ax.plot(range(1, len(row["losses"]) + 1), row["losses"], lw=1, label=f"seed {row['seed']}")
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log",
           title="Training loss across seeds (reference settings)")
    if len(reference) <= 12:
        ax.legend(fontsize="small", ncols=2)
    ax.grid(alpha=0.3)
    return fig


def plot_metric_distribution(audit: pd.DataFrame) -> Figure:
    """Final validation metric over seeds, one column of dots (and a box) per factor setting.

    Dots are coloured by seed, in the same colours as :func:`plot_loss_curves`.
    """
    first = audit[audit["repeat"] == 0]
    settings = list(dict.fromkeys(first["changed"]))  # planned order: reference first
    fig, ax = _figure(min(12.0, 1.2 * len(settings) + 3))
    groups = [first[first["changed"] == s] for s in settings]
    labels = ["reference" if s == NONE else s.replace(",", "\n+ ") for s in settings]
    ax.boxplot([g["final_metric"].to_numpy() for g in groups], tick_labels=labels, widths=0.5,
               showfliers=False)
    seeds = list(dict.fromkeys(first["seed"]))
    for i, group in enumerate(groups, start=1):
        colors = [f"C{seeds.index(s) % 10}" for s in group["seed"]]
        ax.scatter([i] * len(group), group["final_metric"], c=colors, s=16, alpha=0.8, zorder=3)
    metric = str(first["metric"].iloc[0]) if len(first) else "metric"
    ax.set(ylabel=metric, xlabel="factors changed from the reference settings",
           title=f"Final {metric} over {len(seeds)} seeds")
    ax.tick_params(axis="x", labelsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_recovery_curves(curves: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Loss of the reference run (thick) and of each resumed run (thin), one panel per resume
    thread count; a dotted line marks each kill step and a dot the step each resume started from."""
    settings = sorted(table["threads_resume"].unique())
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.0), sharey=True,
                             layout="constrained", squeeze=False)
    plt.close(fig)
    ref = curves[curves["run"] == "reference"]
    for ax, threads in zip(axes[0], settings, strict=True):
        ax.plot(ref["step"], ref["loss"], color="0.3", lw=4, alpha=0.35, label="uninterrupted")
        rows = table[table["threads_resume"] == threads]
        for i, row in enumerate(rows.itertuples()):
            run = curves[curves["run"] == Path(str(row.run_dir)).name]
            color = f"C{i % 10}"
            ax.plot(run["step"], run["loss"], color=color, lw=1, label=f"killed at {row.kill}")
            ax.axvline(int(row.kill_step), color=color, ls=":", lw=1)
            start = run[run["step"] == row.resumed_from]["loss"]
            if len(start):
                ax.scatter([row.resumed_from], start, color=color, s=18, zorder=3)
        identical = int(rows["identical"].sum())
        ax.set(xlabel="optimizer step", yscale="log",
               title=f"resumed with {threads} thread(s): {identical}/{len(rows)} bitwise identical")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].legend(fontsize="small", ncols=2)
    return fig


def plot_recovery_ratio(table: pd.DataFrame) -> Figure:
    """R = P_r / P_t per kill point (left) and resume latency (right), one marker per thread count."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.0), layout="constrained")
    plt.close(fig)
    kills = list(dict.fromkeys(table["kill"]))
    for j, (threads, group) in enumerate(table.groupby("threads_resume")):
        x = [kills.index(k) + 0.15 * j for k in group["kill"]]
        left.scatter(x, group["R"], color=f"C{j}", label=f"resumed with {threads} thread(s)", zorder=3)
        right.scatter(x, group["resume_latency_s"] * 1000, color=f"C{j}", zorder=3)
    for ax in (left, right):
        ax.set_xticks(range(len(kills)), kills, rotation=30, ha="right", fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    left.axhline(1.0, color="0.3", lw=1, ls="--")
    left.set(ylabel="R = P_r / P_t", title="Recoverability ratio (1 = same final metric)")
    left.legend(fontsize="small")
    right.set(ylabel="ms", ylim=(0, None), title="Resume latency (verify, load, restore)")
    return fig


def _figure(width: float, height: float = 4.0) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    plt.close(fig)
    return fig, ax


def plot_study(summary: pd.DataFrame) -> Figure:
    """The nondeterminism-sources study (:func:`reprokit.study.summarize_study`): one row of panels
    per model (their scales differ), per source the mean pairwise disagreement, the std of the
    accuracy and the ensemble's gain over the mean member; a source with no effect is labelled
    so, not drawn as a zero bar."""
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = plt.subplots(len(models), 3, figsize=(14.0, 0.5 + 3.0 * len(models)), layout="constrained",
                             sharey=True, squeeze=False)
    plt.close(fig)
    panels = (("disagreement", "mean pairwise disagreement"), ("accuracy_std", "std of the accuracy"),
              ("ensemble_gain", "ensemble accuracy - mean member's"))
    for j, (model, row_axes) in enumerate(zip(models, axes, strict=True)):
        rows = summary[summary["model"] == model].reset_index(drop=True)
        for ax, (column, title) in zip(row_axes, panels, strict=True):
            ax.barh(rows.index, rows[column], color=f"C{j}")
            for y in rows.index[rows["distinct"] == 1]:
                ax.text(0, y, " no effect", va="center", fontsize="small", color="0.3")
            ax.set_title(f"{model}: {title}", fontsize="medium")
            ax.grid(alpha=0.3, axis="x")
        row_axes[0].set_yticks(rows.index, rows["source"])
    axes[0][0].invert_yaxis()
    return fig
