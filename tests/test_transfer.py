"""reprokit.transfer: the fine-tune vs from-scratch study of notebook 04."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest

from reprokit import TrainConfig, train
from reprokit.data import load_dataset
from reprokit.errors import ConfigError
from reprokit.models import build_model, head_name
from reprokit.transfer import (
    SCRATCH,
    plot_pretrain,
    plot_transfer_curves,
    plot_transfer_summary,
    trainable_parameters,
    transfer_curves,
    transfer_study,
    transfer_summary,
)

DOWN = TrainConfig(model="mlp", dataset="digits_5_9", steps=6, batch_size=16, threads=1, train_limit=64,
                   eval_every=3)


def test_summary_gain_is_paired_by_seed() -> None:
    """Gain over scratch is the mean of per-seed differences; wins are counted per seed."""
    study = pd.DataFrame({
        "strategy": [SCRATCH, "full", SCRATCH, "full"], "seed": [0, 0, 1, 1],
        "final_metric": [0.5, 0.8, 0.7, 0.6], "trainable_first": [10, 10, 10, 10],
        "trainable_last": [10, 10, 10, 10],
    })
    summary = transfer_summary(study).set_index("strategy")
    assert summary.loc["full", "mean"] == pytest.approx(0.7)
    assert summary.loc["full", "gain_vs_scratch"] == pytest.approx(((0.8 - 0.5) + (0.6 - 0.7)) / 2)
    assert summary.loc["full", "beats_scratch"] == "1/2"
    assert summary.loc[SCRATCH, "std"] == pytest.approx(math.sqrt(0.02))


def test_study_runs_every_strategy_and_seed_with_the_right_trainable_counts(tmp_path: Path) -> None:
    """Scratch + 3 strategies x 2 seeds = 8 runs; feature extraction trains the head only, two-stage
    the head first and everything last, full and scratch everything; the curves stack every run."""
    parent = tmp_path / "parent"
    train(TrainConfig(model="mlp", dataset="digits_0_4", steps=6, batch_size=16, threads=1), parent,
          progress=False)
    study = transfer_study(parent, DOWN, ["feature_extraction", "full", "two_stage"], [0, 1],
                           tmp_path / "ft", progress=False)
    assert len(study) == 8
    assert set(study["strategy"]) == {SCRATCH, "feature_extraction", "full", "two_stage"}
    rows = study[study["seed"] == 0].set_index("strategy")
    total = int(rows.loc[SCRATCH, "parameters"])
    head = int(rows.loc["feature_extraction", "trainable_first"])
    assert 0 < head < total
    assert rows.loc["feature_extraction", "trainable_last"] == head
    two_stage = rows.loc["two_stage"]
    assert (two_stage["trainable_first"], two_stage["trainable_last"]) == (head, total)
    assert rows.loc["full", "trainable_first"] == total == rows.loc[SCRATCH, "trainable_first"]
    curves = transfer_curves(study)
    assert len(curves) == 8 * (DOWN.steps + 1)  # step 0 and every step of every run
    figures = [plot_transfer_summary(study), plot_transfer_curves(curves),
               plot_pretrain(curves[curves["strategy"] == SCRATCH])]
    assert all(isinstance(f, matplotlib.figure.Figure) and f.axes for f in figures)


def test_head_count_matches_a_hand_count() -> None:
    """The mlp's head is its last Linear: (hidden + 1) * classes parameters."""
    config = DOWN.replace(init_from="unused", finetune="feature_extraction")
    first, last, total = trainable_parameters(config, DOWN.steps)
    model = build_model("mlp", load_dataset("digits_5_9").input_shape, 5)
    head = dict(model.named_modules())[head_name(model)]
    assert first == last == sum(p.numel() for p in head.parameters())
    assert total == sum(p.numel() for p in model.parameters())


def test_unknown_strategy_and_empty_seeds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose one or more of"):
        transfer_study(tmp_path, DOWN, ["linear_probe"], [0], tmp_path)
    with pytest.raises(ConfigError, match="seeds is empty"):
        transfer_study(tmp_path, DOWN, ["full"], [], tmp_path)
