"""The nondeterminism-sources study: its metrics on hand-built predictions, and a tiny real study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reprokit import TrainConfig
from reprokit.errors import ConfigError
from reprokit.plots import plot_study
from reprokit.study import (
    NO_EFFECT,
    disagreement,
    ensemble_accuracy,
    member_accuracy,
    plan,
    study_conclusion,
    study_sources,
    study_verdict,
    summarize_study,
)


def _one_hot(classes: list[list[int]], n: int = 3) -> np.ndarray:
    return np.eye(n)[np.array(classes)]  # models x samples x classes


def test_disagreement_of_identical_predictions_is_zero() -> None:
    """Models that predict the same classes disagree on no sample."""
    assert disagreement(_one_hot([[0, 1, 2, 1]] * 3)) == 0.0


def test_disagreement_of_known_predictions() -> None:
    """Three models, four samples: pairs differ on 1, 2 and 1 samples -> (1/4 + 2/4 + 1/4) / 3."""
    probs = _one_hot([[0, 1, 2, 1], [0, 1, 2, 0], [0, 1, 1, 1]])
    assert disagreement(probs) == pytest.approx((0.25 + 0.5 + 0.25) / 3)


def test_ensemble_averages_softmax_not_votes() -> None:
    """The ensemble takes the class of the mean softmax: two unsure members are outvoted by one sure one."""
    labels = np.array([0, 1])
    probs = np.array([
        [[0.4, 0.6, 0.0], [0.0, 1.0, 0.0]],
        [[0.4, 0.6, 0.0], [0.0, 1.0, 0.0]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ])
    assert member_accuracy(probs, labels) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert ensemble_accuracy(probs, labels) == 1.0  # sample 0: mean (0.6, 0.4, 0)


def test_disagreement_needs_two_models() -> None:
    """One model has no pair to disagree with: an error naming the count."""
    with pytest.raises(ConfigError, match="at least 2 models, got 1"):
        disagreement(_one_hot([[0, 1]]))


def test_plan_varies_one_source_and_all_of_them() -> None:
    """Varying data_order changes only that seed; `all` changes every seed and the thread count."""
    order = plan("data_order", 3, base_seed=5)
    assert [v.seeds for v in order][2] == {"init": 5, "data_order": 7, "augmentation": 5, "dropout": 5}
    assert {v.threads for v in order} == {1}
    together = plan("all", 2)[1]
    assert set(together.seeds.values()) == {1} and together.threads == 2
    assert [v.flip for v in plan("flip_bit", 2)] == [0, 1]
    with pytest.raises(ConfigError, match="'weather' is not one of"):
        plan("weather", 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """2 sources x 2 runs of the cnn, 20 steps each."""
    return study_sources(TrainConfig(steps=20, digest_every=0), runs=2, sources=["dropout", "flip_bit"],
                         work_dir=tmp_path_factory.mktemp("study"), progress=False)


def test_flipped_bit_runs_differ_and_dropout_has_no_effect_on_the_cnn(tiny: pd.DataFrame) -> None:
    """One flipped bit gives another model; the cnn has no dropout, so its seed changes nothing
    and the summary says so instead of reporting zero diversity."""
    summary = summarize_study(tiny).set_index("source")
    assert summary.loc["flip_bit", "distinct"] == 2
    assert summary.loc["flip_bit", "effect"] == "every run differs"
    assert summary.loc["dropout", "effect"] == NO_EFFECT.format(n=2)
    assert summary.loc["dropout", "disagreement"] == 0.0


def test_verdict_and_conclusion_name_the_source_without_effect(tiny: pd.DataFrame, tmp_path: Path) -> None:
    """Against `all`, a source with no effect is called so in the verdict and the conclusion."""
    together = study_sources(TrainConfig(steps=20, digest_every=0), runs=2, sources=["all"],
                             work_dir=tmp_path, progress=False)
    summary = summarize_study(pd.concat([tiny, together]))
    verdict = study_verdict(summary).set_index("source")
    assert verdict.loc["dropout", "verdict"] == "no effect"
    conclusion = study_conclusion(verdict.reset_index())
    assert "No effect at all (every run bitwise identical): dropout" in conclusion
    assert len(plot_study(summary).axes) == 3


def test_a_used_work_directory_not_made_by_a_study_is_refused(tmp_path: Path) -> None:
    """The study clears only directories it made itself."""
    (tmp_path / "cnn").mkdir()
    with pytest.raises(ConfigError, match="was not made by a study"):
        study_sources(TrainConfig(steps=1), runs=2, sources=["init"], work_dir=tmp_path, progress=False)
