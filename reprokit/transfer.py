"""The transfer study of notebook 04: does starting from a pretrained parent help, and how much
does each fine-tuning strategy get out of it?

    transfer_study(parent, downstream, strategies, seeds, work)   one run per (strategy, seed),
                                                                   plus training from scratch
    transfer_summary(study)                                        mean ± std per strategy, gain
    transfer_curves(study)                                         metrics.csv of every run, long form

Every run has the same downstream config and budget (steps, batch size, lr) and differs only in
where its weights start and which of them train, so "fine-tuned vs from scratch" is a fair
comparison. Seeds vary the head's initialisation and the batch order, not the parent.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from reprokit.config import TrainConfig
from reprokit.data import load_dataset
from reprokit.errors import ConfigError
from reprokit.finetuning import set_trainable, unfreeze_step
from reprokit.models import STRATEGIES, build_model, count_parameters
from reprokit.rundir import read_metrics
from reprokit.trainer import show_progress, train

SCRATCH = "scratch"  # the baseline: the same downstream run from a freshly seeded model


def transfer_study(
    parent: str | Path,
    downstream: TrainConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    work: str | Path,
    *,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Fine-tune ``parent`` on ``downstream`` with each strategy and seed, and train from scratch.

    Returns:
        One row per run: strategy, seed, final_metric, trainable parameters at the first and the
        last step, total parameters, final_digest and run_dir (``work/<strategy>-seed<seed>``).
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"strategies {list(strategies)!r}: choose one or more of {list(STRATEGIES)}")
    if not seeds:
        raise ConfigError("seeds is empty; pass e.g. seeds=[0, 1, 2]")
    base = downstream.replace(init_from=None, finetune="full", unfreeze_at=None)
    plan = [(strategy, seed) for seed in seeds for strategy in (SCRATCH, *strategies)]
    rows = []
    for strategy, seed in tqdm(plan, desc="transfer runs", disable=not show_progress(progress)):
        config = base.replace(seed=seed)
        if strategy != SCRATCH:
            config = config.replace(init_from=str(Path(parent).resolve()), finetune=strategy,
                                    unfreeze_at=downstream.unfreeze_at if strategy == "two_stage" else None)
        run_dir = Path(work) / f"{strategy}-seed{seed}"
        result = train(config, run_dir, progress=False)
        first, last, total = trainable_parameters(config, result.steps)
        rows.append({"strategy": strategy, "seed": seed, "final_metric": result.final_metric,
                     "trainable_first": first, "trainable_last": last, "parameters": total,
                     "final_digest": result.final_digest, "run_dir": str(run_dir)})
    return pd.DataFrame(rows)


def trainable_parameters(config: TrainConfig, total_steps: int) -> tuple[int, int, int]:
    """Parameters that take gradients at the first and at the last step, and all parameters."""
    data = load_dataset(config.dataset, split_seed=config.split_seed, val_fraction=config.val_fraction)
    model = build_model(config.model, data.input_shape, data.num_outputs)
    counts = []
    for step in (0, total_steps - 1):
        if config.init_from is not None:
            unfreeze_step(config, total_steps)  # the same checks the run made
            set_trainable(model, config, step, total_steps)
        counts.append(count_parameters(model, trainable_only=True))
    return counts[0], counts[1], count_parameters(model)


def transfer_summary(study: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: final metric mean, std, min, max over seeds; the mean gain over training from
    scratch with the same seed, and on how many seeds the strategy beat scratch."""
    scratch = study[study["strategy"] == SCRATCH].set_index("seed")["final_metric"]
    rows = []
    for strategy, group in study.groupby("strategy", sort=False):
        values = group["final_metric"].tolist()
        gains = [m - scratch[s] for s, m in zip(group["seed"], values, strict=True) if s in scratch.index]
        rows.append({
            "strategy": strategy, "seeds": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "min": min(values), "max": max(values),
            "gain_vs_scratch": statistics.fmean(gains) if gains else float("nan"),
            "beats_scratch": f"{sum(g > 0 for g in gains)}/{len(gains)}" if strategy != SCRATCH else "",
            "trainable_first": int(group["trainable_first"].iloc[0]),
            "trainable_last": int(group["trainable_last"].iloc[0]),
        })
    return pd.DataFrame(rows)


def transfer_curves(study: pd.DataFrame) -> pd.DataFrame:
    """Every run's metrics.csv, stacked, with its strategy and seed."""
    frames = [read_metrics(str(row.run_dir)).assign(strategy=str(row.strategy), seed=int(str(row.seed)))
              for row in study.itertuples()]
    return pd.concat(frames, ignore_index=True)


def plot_pretrain(metrics: pd.DataFrame, title: str = "Pretraining") -> Figure:
    """Training loss (left axis, log) and validation metric at the evaluated steps (right axis)."""
    fig, ax = plt.subplots(figsize=(8.0, 3.8), layout="constrained")
    plt.close(fig)
    steps = metrics[metrics["step"] > 0]
    ax.plot(steps["step"], steps["loss"], color="C0", lw=1, label="training loss")
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=title)
    ax.grid(alpha=0.3)
    evaluated = metrics.dropna(subset=["val_metric"])
    twin = ax.twinx()
    twin.plot(evaluated["step"], evaluated["val_metric"], "o-", color="C1", ms=3, label="validation")
    twin.set(ylabel="validation metric", ylim=(0, 1.02))
    fig.legend(loc="outside upper right", fontsize="small", ncols=2)
    return fig


def plot_transfer_curves(curves: pd.DataFrame) -> Figure:
    """Per strategy: training loss (left) and validation metric (right) over the steps, the mean
    over seeds as a line and the range over seeds shaded."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.0), layout="constrained")
    plt.close(fig)
    for i, (strategy, group) in enumerate(curves.groupby("strategy", sort=False)):
        for ax, column in ((left, "loss"), (right, "val_metric")):
            stats = group.dropna(subset=[column]).groupby("step")[column].agg(["mean", "min", "max"])
            style = {"color": "0.3", "ls": "--"} if strategy == SCRATCH else {"color": f"C{i}"}
            ax.plot(stats.index, stats["mean"], lw=1.5, label=str(strategy), **style)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15, color=style["color"])
    left.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Fine-tune: training loss")
    right.set(xlabel="optimizer step", ylabel="validation metric", ylim=(0, 1.02),
              title="Fine-tune: validation (mean, range over seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_transfer_summary(study: pd.DataFrame) -> Figure:
    """Final metric per strategy: mean ± std as a bar, each seed as a dot."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0), layout="constrained")
    plt.close(fig)
    summary = transfer_summary(study)
    x = range(len(summary))
    colors = ["0.6" if s == SCRATCH else f"C{i}" for i, s in enumerate(summary["strategy"])]
    ax.bar(x, summary["mean"], yerr=summary["std"].fillna(0), color=colors, alpha=0.6, capsize=4)
    for i, strategy in enumerate(summary["strategy"]):
        values = study.loc[study["strategy"] == strategy, "final_metric"]
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.set_xticks(list(x), summary["strategy"])
    ax.set(ylabel="final validation metric", ylim=(0, 1.02),
           title="Fine-tuned vs from scratch, same budget (bar: mean ± std; dots: seeds)")
    ax.grid(alpha=0.3, axis="y")
    return fig
