"""Parameter trajectories: change rates, importance and the traceability score."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest
import torch
from torch import nn

from reprokit import TrainConfig, train
from reprokit.callbacks import Callback, TrainState
from reprokit.data import load_dataset
from reprokit.digests import tensor_digest
from reprokit.resumer import resume
from reprokit.rundir import read_digests
from reprokit.trace import (
    IMPORTANCE,
    MODEL,
    TRACE_COLUMNS,
    TraceError,
    Tracer,
    importance,
    read_importance,
    read_trace,
    traceability_score,
)
from reprokit.trace_plots import plot_change_heatmap, plot_importance, plot_traceability, plot_update_ratios

TINY = TrainConfig(model="cnn", dataset="digits", steps=12, batch_size=32, threads=1)


def _drive(model: nn.Module, tracer: Tracer, steps: int,
           x: torch.Tensor | None = None) -> list[dict[str, tuple[float, float, float]]]:
    """Train ``model`` by hand towards y = (3, 6) with SGD, calling the tracer's hooks as ``train``
    does; returns per step {name: (value before, value after, gradient)} of every scalar parameter."""
    x = torch.tensor([[1.0], [2.0]]) if x is None else x
    y = torch.tensor([[3.0], [6.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(TINY, model, optimizer, load_dataset("digits"), total_steps=steps)
    tracer.on_train_start(state)
    seen = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = {n: p.item() for n, p in model.named_parameters() if p.numel() == 1}
        optimizer.step()
        state.step += 1
        seen.append({n: (before[n], p.item(), p.grad.item() if p.grad is not None else 0.0)
                     for n, p in model.named_parameters() if p.numel() == 1})
        tracer.on_step_end(state)
    tracer.on_train_end(state)
    return seen


def _linear(weight: float, bias: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def test_change_rate_matches_hand_computation_on_two_parameters() -> None:
    """On nn.Linear(1, 1) every traced number equals |θ_t − θ_{t−1}| / |θ_{t−1}| etc. by hand."""
    tracer = Tracer()
    seen = _drive(_linear(0.5, -0.25), tracer, steps=3)
    frame = tracer.frame()
    assert frame["step"].tolist() == [1, 1, 2, 2, 3, 3]
    for row in frame.itertuples():
        before, after, grad = seen[row.step - 1][row.tensor]
        assert row.change_rate == pytest.approx(abs(after - before) / abs(before), rel=1e-6)
        assert row.update_ratio == pytest.approx(abs(after - before) / abs(before), rel=1e-6)
        assert row.grad_norm == pytest.approx(abs(grad), rel=1e-6)
        assert row.saliency == pytest.approx(abs(grad * before), rel=1e-6)
        assert row.delta_l1 == pytest.approx(abs(after - before), rel=1e-6)
        assert row.param_norm == pytest.approx(abs(after), rel=1e-6)


def test_zero_tensor_rates_are_zero_if_still_and_inf_if_moved() -> None:
    """A zero bias that moves gets change rate inf (change term 1); a zero tensor that stays gets 0."""

    class WithIdle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = _linear(0.5, 0.0)
            self.idle = nn.Parameter(torch.zeros(3))  # never used: no gradient, never moves

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.linear(x)
            return out

    tracer = Tracer()
    _drive(WithIdle(), tracer, steps=1)
    rows = tracer.frame().set_index("tensor")
    assert math.isinf(rows.loc["linear.bias", "change_rate"])
    assert math.isinf(rows.loc["linear.bias", "update_ratio"])
    assert rows.loc["idle", ["change_rate", "update_ratio", "grad_norm", "saliency"]].tolist() == [0, 0, 0, 0]
    score = traceability_score(tracer.frame(), importance(tracer.frame()), alpha=1.0)
    assert score.set_index("tensor").loc["linear.bias", "change"] == 1.0


def test_mixed_dtypes_and_channels_last_trace_like_plain_tensors() -> None:
    """Digests stay tensor_digest's for a float64 tensor beside float32 ones and for a channels_last
    conv, and the channels_last conv traces the numbers of its contiguous twin (to rounding)."""

    class Mixed(nn.Module):
        def __init__(self, channels_last: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(2, 3, 3)
            if channels_last:
                self.conv = self.conv.to(memory_format=torch.channels_last)
            self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.conv(x.reshape(-1, 2, 3, 3)).sum() * self.scale
            return out.float().reshape(1, 1).expand(x.shape[0], 1)

    frames = []
    for channels_last in (False, True):
        model, tracer = Mixed(channels_last), Tracer()
        _drive(model, tracer, steps=2, x=torch.arange(36.0).reshape(2, 18) / 36)
        final = tracer.frame()[tracer.frame()["step"] == 2]
        assert final["digest"].tolist() == [tensor_digest(n, p) for n, p in model.named_parameters()]
        frames.append(tracer.frame())
    assert not Mixed(True).conv.weight.is_contiguous()
    # channels_last convolves in another order, so the weights agree to rounding, not in their bits
    numbers = [f.drop(columns="digest") for f in frames]
    pd.testing.assert_frame_equal(numbers[0], numbers[1], check_exact=False, rtol=1e-4)


def test_every_k_traces_steps_k_2k_with_one_step_changes() -> None:
    """every=5 traces steps 5 and 10 of 12, and their rows equal those of every-step tracing."""
    each, fifth = Tracer(), Tracer(every=5)
    train(TINY, callbacks=(each, fifth), progress=False)
    assert sorted(set(fifth.frame()["step"])) == [5, 10]
    assert sorted(set(each.frame()["step"])) == list(range(1, 13))
    same_steps = each.frame()[each.frame()["step"].isin([5, 10])].reset_index(drop=True)
    pd.testing.assert_frame_equal(fifth.frame(), same_steps)


def test_every_must_be_a_positive_int() -> None:
    """every=0 is refused with a message naming the value and the fix."""
    with pytest.raises(TraceError, match="every 0 must be an int >= 1"):
        Tracer(every=0)


def test_run_directory_trace_equals_memory_and_importance_is_written(tmp_path: Path) -> None:
    """trace.csv reads back exactly as the tracer's frame, and importance.csv matches importance()."""
    run_dir = tmp_path / "run"
    tracer = Tracer(run_dir)
    train(TINY, run_dir, callbacks=(tracer,), progress=False)
    trace = read_trace(run_dir)
    assert tuple(trace.columns) == TRACE_COLUMNS
    pd.testing.assert_frame_equal(trace, tracer.frame())
    by_step = dict(read_digests(run_dir))  # the loop's own digests: same tensors, same steps
    assert all(by_step[row.step][row.tensor] == row.digest for row in trace.itertuples())
    assert (run_dir / IMPORTANCE).is_file()
    pd.testing.assert_frame_equal(read_importance(run_dir), importance(trace))


def test_importance_sums_to_one_per_method() -> None:
    """SNIP, Fisher and uniform importance are non-negative and each sums to 1 over the model."""
    tracer = Tracer()
    result = train(TINY, callbacks=(tracer,), progress=False)
    table = importance(tracer.frame())
    assert table["tensor"].tolist() == list(result.final_state)
    for method in ("snip", "fisher", "uniform"):
        assert (table[method] >= 0).all()
        assert table[method].sum() == pytest.approx(1.0)
    counts = table["numel"] / table["numel"].sum()
    assert table["uniform"].tolist() == pytest.approx(counts.tolist())
    assert (table["snip"] - table["uniform"]).abs().max() > 0.01  # SNIP is not the parameter count


def test_importance_of_an_empty_trace_is_an_error() -> None:
    """A trace with no rows (every > steps) has no importance; the error says how to get one."""
    tracer = Tracer(every=100)
    train(TINY, callbacks=(tracer,), progress=False)
    with pytest.raises(TraceError, match="no rows"):
        importance(tracer.frame())


@pytest.mark.parametrize("alpha", [1.5, -0.1, float("nan")])
def test_alpha_outside_unit_interval_is_refused(alpha: float) -> None:
    """α outside [0, 1] (or NaN) raises a TraceError naming α and the allowed range."""
    tracer = Tracer()
    train(TINY.replace(steps=2), callbacks=(tracer,), progress=False)
    with pytest.raises(TraceError, match=r"alpha .* is outside \[0, 1\]"):
        traceability_score(tracer.frame(), importance(tracer.frame()), alpha=[0.5, alpha])


def test_score_and_its_terms_stay_in_unit_interval() -> None:
    """Per tensor and per model, change, explainability and score lie in [0, 1] for every α;
    α=1 gives the change term, α=0 the explainability term."""
    tracer = Tracer()
    train(TINY, callbacks=(tracer,), progress=False)
    trace = tracer.frame()
    for method in ("snip", "fisher", "uniform"):
        score = traceability_score(trace, importance(trace), [0.0, 0.3, 1.0], method=method)
        assert len(score) == 3 * (len(trace) + TINY.steps)
        assert score[["change", "explainability", "score"]].stack().between(0, 1).all()
        one, zero = score[score["alpha"] == 1.0], score[score["alpha"] == 0.0]
        assert (one["score"] == one["change"]).all()
        assert (zero["score"] == zero["explainability"]).all()
    model = score[score["tensor"] == MODEL]
    assert model["step"].tolist() == list(range(1, TINY.steps + 1)) * 3


def test_resumed_run_has_the_uninterrupted_trace(tmp_path: Path) -> None:
    """A run that dies after its step-5 checkpoint and is resumed with a Tracer writes the same
    trace.csv as an uninterrupted run: rows the dead process wrote after step 5 are cut off."""

    class Boom(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 8:
                raise RuntimeError("simulated crash")

    config = TINY.replace(checkpoint_every=5)
    whole = tmp_path / "whole"
    train(config, whole, callbacks=(Tracer(whole),), progress=False)
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run_dir, callbacks=(Tracer(run_dir), Boom()), progress=False)
    assert read_trace(run_dir)["step"].max() == 8
    resume(run_dir, callbacks=(Tracer(run_dir),), progress=False)
    pd.testing.assert_frame_equal(read_trace(run_dir), read_trace(whole))


def test_config_trace_every_traces_and_survives_a_crash_and_resume(tmp_path: Path) -> None:
    """``trace_every`` in the config adds a Tracer by itself; a run that crashes (with another
    callback before it) and is resumed from its config alone has the uninterrupted run's trace."""

    class Boom(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 8:
                raise RuntimeError("simulated crash")

    config = TINY.replace(trace_every=3, checkpoint_every=5)
    whole = tmp_path / "whole"
    train(config, whole, progress=False)
    assert sorted(set(read_trace(whole)["step"])) == [3, 6, 9, 12]
    assert (whole / IMPORTANCE).is_file()
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run_dir, callbacks=(Boom(),), progress=False)
    resume(run_dir, changes={"digest_every": 1}, progress=False)
    pd.testing.assert_frame_equal(read_trace(run_dir), read_trace(whole))
    pd.testing.assert_frame_equal(read_importance(run_dir), read_importance(whole))


def test_trace_figures_are_built(tmp_path: Path) -> None:
    """Each trace figure comes back as a Figure with drawn axes."""
    run_dir = tmp_path / "run"
    train(TINY, run_dir, callbacks=(Tracer(run_dir),), progress=False)
    trace, table = read_trace(run_dir), read_importance(run_dir)
    figures = [plot_change_heatmap(trace), plot_update_ratios(trace), plot_importance(table),
               plot_traceability(traceability_score(trace, table, [0.2, 0.5, 0.8]))]
    for fig in figures:
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes


def test_trace_is_the_same_whether_the_loop_took_digests_or_not() -> None:
    """With per-step digests the tracer reuses the loop's; without, it hashes itself: same frame."""
    reused, own = Tracer(), Tracer()
    train(TINY, callbacks=(reused,), progress=False)
    train(TINY.replace(digest_every=0), callbacks=(own,), progress=False)
    pd.testing.assert_frame_equal(reused.frame(), own.frame())


def test_trace_explorer_redraws_for_the_picked_tensor_and_is_a_note_when_headless(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Picking a tensor, α or step range redraws the figure for exactly those rows; under
    ``reprokit report`` (headless) the explorer is a note, not widgets."""
    from reprokit.display import HEADLESS_ENV
    from reprokit.trace_plots import trace_explorer

    tracer = Tracer()
    train(TINY, callbacks=(tracer,), progress=False)
    trace = tracer.frame()
    monkeypatch.delenv(HEADLESS_ENV, raising=False)
    shown: list[matplotlib.figure.Figure] = []
    monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: shown.append(obj))
    box = trace_explorer(trace, importance(trace))
    pick, alpha, span = box.children[0].children
    assert pick.options[0] == MODEL and "0.weight" in pick.options
    pick.value, alpha.value, span.value = "0.weight", 1.0, (3, 5)
    ax = shown[-1].axes[0]
    assert ax.get_title() == "0.weight: α = 1, snip"
    steps = {float(x) for line in ax.get_lines() for x in line.get_xdata()}
    assert steps == {3.0, 4.0, 5.0}
    change = dict(zip(*ax.get_lines()[0].get_data(), strict=True))
    expected = traceability_score(trace, importance(trace), 1.0).set_index(["tensor", "step"])
    assert change[4.0] == pytest.approx(expected.loc[("0.weight", 4), "change"])
    monkeypatch.setenv(HEADLESS_ENV, "1")
    assert "Interactive explorer" in trace_explorer(trace, importance(trace)).data
