"""Plots: DataFrames in, matplotlib Figures out.

Each figure is made with pyplot (so Jupyter's inline backend knows how to show it) and closed at
once (so pyplot keeps no global reference and a notebook shows it only where it is returned).
"""

from __future__ import annotations

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


def _figure(width: float, height: float = 4.0) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    plt.close(fig)
    return fig, ax
