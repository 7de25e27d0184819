"""The divergence finder: identical runs say so; a planted divergence is named by step and tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.figure
import pytest
import torch

from reprokit import TrainConfig, train
from reprokit.callbacks import Callback, TrainState
from reprokit.compare import GAP_COLUMNS, compare_runs
from reprokit.rundir import RunDirError
from reprokit.trace import Tracer
from reprokit.trace_plots import plot_divergence

TINY = TrainConfig(model="cnn", dataset="digits", steps=12, batch_size=32, threads=1)
PLANT_STEP, PLANT_TENSOR, PLANT_AMOUNT = 7, "2.weight", 1e-3


class Plant(Callback):
    """Adds ``amount`` in place to one tensor right after optimizer step ``step``, before the loop
    records that step's digests (an optimizer step hook), so θ_step differs in that tensor only."""

    def __init__(self, tensor: str, step: int, amount: float) -> None:
        self.tensor, self.step, self.amount = tensor, step, amount
        self._state: TrainState | None = None

    def on_train_start(self, state: TrainState) -> None:
        self._state = state
        self._handle = state.optimizer.register_step_post_hook(self._perturb)

    def on_train_end(self, state: TrainState) -> None:
        self._handle.remove()

    def _perturb(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        assert self._state is not None
        if self._state.step + 1 == self.step:  # state.step counts the step after the optimizer's
            with torch.no_grad():
                dict(self._state.model.named_parameters())[self.tensor].add_(self.amount)


def _pair(tmp_path: Path, config: TrainConfig, *, plant: bool, traced: bool = False) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    train(config, a, callbacks=(Tracer(a),) if traced else (), progress=False)
    extra: tuple[Callback, ...] = (Plant(PLANT_TENSOR, PLANT_STEP, PLANT_AMOUNT),) if plant else ()
    train(config, b, callbacks=extra + ((Tracer(b),) if traced else ()), progress=False)
    return a, b


def test_identical_runs_are_identical(tmp_path: Path) -> None:
    """Two runs of one config: identical, no divergence, zero gaps, no config difference."""
    comparison = compare_runs(*_pair(tmp_path, TINY, plant=False))
    assert comparison.identical
    assert comparison.first_step is None and comparison.tensors == ()
    assert comparison.final_max_abs_diff == 0.0
    assert comparison.final_metric_delta == 0.0
    assert (comparison.gap["differing_tensors"] == 0).all()
    assert (comparison.gap["loss_diff"].dropna() == 0).all()
    assert not comparison.manifest_differences["key"].str.startswith("config.").any()
    assert "identical: yes" in comparison.describe()


def test_planted_divergence_is_named_by_step_and_tensor(tmp_path: Path) -> None:
    """Perturbing 2.weight by 1e-3 at step 7 in run b: first step 7, that tensor alone, max |Δθ|
    1e-3 there (from the shared step-7 checkpoint), and every tensor differs by the end."""
    config = TINY.replace(checkpoint_every=PLANT_STEP)
    comparison = compare_runs(*_pair(tmp_path, config, plant=True))
    assert not comparison.identical
    assert comparison.first_step == PLANT_STEP
    assert comparison.tensors == (PLANT_TENSOR,)
    assert comparison.max_abs_diff == pytest.approx(PLANT_AMOUNT, rel=1e-3)
    assert comparison.final_max_abs_diff > 0
    gap = comparison.gap.set_index("step")
    assert (gap.loc[: PLANT_STEP - 1, "differing_tensors"] == 0).all()
    assert gap.loc[PLANT_STEP, "differing_tensors"] == 1
    assert gap.loc[TINY.steps, "differing_tensors"] == 8
    assert (gap.loc[1:PLANT_STEP, "loss_diff"] == 0).all()  # step 7's loss was computed before the plant
    assert gap.loc[TINY.steps, "loss_diff"] > 0
    assert gap.loc[TINY.steps, "max_abs_diff"] == comparison.final_max_abs_diff
    assert f"first divergence: step {PLANT_STEP}, 1 tensor(s): {PLANT_TENSOR}" in comparison.describe()


def test_traced_runs_show_the_norm_gap_from_the_planted_step(tmp_path: Path) -> None:
    """With both runs traced, the tensor-norm gap is 0 before step 7 and positive from step 7 on."""
    comparison = compare_runs(*_pair(tmp_path, TINY, plant=True, traced=True))
    gap = comparison.gap.set_index("step")
    assert (gap.loc[1: PLANT_STEP - 1, "param_norm_gap"] == 0).all()
    assert (gap.loc[PLANT_STEP:, "param_norm_gap"] > 0).all()
    assert math.isnan(gap.loc[0, "param_norm_gap"])  # step 0 is not traced
    assert tuple(comparison.gap.columns) == GAP_COLUMNS


def test_different_seeds_split_at_step_zero_and_the_manifest_says_why(tmp_path: Path) -> None:
    """Seeds 0 and 1 differ in every tensor at step 0, and the manifests list config.seed 0 -> 1."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(TINY, a, progress=False)
    train(TINY.replace(seed=1), b, progress=False)
    comparison = compare_runs(a, b)
    assert comparison.first_step == 0 and len(comparison.tensors) == 8
    seed = comparison.manifest_differences.set_index("key").loc["config.seed"]
    assert (seed["a"], seed["b"]) == (0, 1)
    assert "config.seed: 0 -> 1" in comparison.describe()


def test_unfinished_run_is_compared_up_to_where_it_stopped(tmp_path: Path) -> None:
    """A run that crashed at step 5 is not identical to its finished twin, and no step differs."""

    class Boom(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 5:
                raise RuntimeError("simulated crash")

    a, b = tmp_path / "a", tmp_path / "b"
    train(TINY, a, progress=False)
    with pytest.raises(RuntimeError):
        train(TINY, b, callbacks=(Boom(),), progress=False)
    comparison = compare_runs(a, b)
    assert not comparison.identical and comparison.first_step is None
    assert comparison.gap["step"].tolist() == list(range(6))
    assert math.isnan(comparison.final_max_abs_diff) and math.isnan(comparison.final_metric_b)


def test_missing_run_directory_is_an_error(tmp_path: Path) -> None:
    """Comparing with a directory that holds no run names the missing manifest."""
    train(TINY.replace(steps=2), tmp_path / "a", progress=False)
    with pytest.raises(RunDirError, match=r"manifest\.json' is missing"):
        compare_runs(tmp_path / "a", tmp_path / "nothing")


def test_divergence_figure_is_built(tmp_path: Path) -> None:
    """plot_divergence returns a Figure for a planted divergence and for identical runs."""
    planted = compare_runs(*_pair(tmp_path / "p", TINY, plant=True, traced=True))
    same = compare_runs(*_pair(tmp_path / "s", TINY, plant=False))
    for comparison in (planted, same):
        fig = plot_divergence(comparison)
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
    assert "step 7" in planted.describe()
