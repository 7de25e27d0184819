"""Plots: one line per seed, one box per factor setting."""

from __future__ import annotations

from reprokit import TrainConfig, audit_determinism, plot_loss_curves, plot_metric_distribution


def test_figures_show_every_seed_and_setting() -> None:
    """The loss figure has a line per seed; the distribution figure a tick per factor setting."""
    audit = audit_determinism(
        TrainConfig(steps=5, threads=1), seeds=[0, 1, 2], repeats=1,
        vary={"num_workers": [0, 1]}, progress=False,
    )
    loss_ax = plot_loss_curves(audit).axes[0]
    assert len(loss_ax.get_lines()) == 3
    assert all(len(line.get_xdata()) == 5 for line in loss_ax.get_lines())
    dist_ax = plot_metric_distribution(audit).axes[0]
    assert [t.get_text() for t in dist_ax.get_xticklabels()] == ["reference", "num_workers"]
