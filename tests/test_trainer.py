"""Training: same recipe -> same bits, and the run directory says so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from reprokit import TrainConfig, model_digest, train
from reprokit.callbacks import Callback, TrainState
from reprokit.errors import ReprokitError
from reprokit.rundir import read_digests, read_json, read_metrics, read_model

TINY = TrainConfig(model="cnn", steps=12, batch_size=32, threads=1)


def test_same_seed_gives_identical_final_digest() -> None:
    """Two runs of one config end with the same final digest and the same per-step losses."""
    a, b = train(TINY, progress=False), train(TINY, progress=False)
    assert a.final_digest == b.final_digest
    assert a.losses[1:] == b.losses[1:]


def test_different_seeds_give_different_digests() -> None:
    """Changing only the seed changes the initial model and the final digest."""
    a = train(TINY, progress=False)
    b = train(TINY.replace(seed=1), progress=False)
    assert a.final_digest != b.final_digest
    assert a.tensor_digests[0][1] != b.tensor_digests[0][1]


def test_final_digest_is_the_model_digest_of_the_final_state() -> None:
    """final_digest equals model_digest computed directly over the returned final state."""
    result = train(TINY, progress=False)
    assert result.final_digest == model_digest(result.final_state)


def test_steps_count_optimizer_steps_and_epochs_cover_the_data() -> None:
    """steps=N gives N optimizer steps; epochs=E gives E passes of ceil(n/batch) steps each."""
    by_steps = train(TINY.replace(steps=7), progress=False)
    assert by_steps.steps == 7 and by_steps.metrics["step"].tolist() == list(range(8))
    by_epochs = train(TINY.replace(steps=None, epochs=2, batch_size=256), progress=False)
    n_train = 1797 - round(1797 * 0.2)
    assert by_epochs.steps == 2 * math.ceil(n_train / 256)
    assert by_epochs.metrics["epoch"].max() == 1


def test_run_directory_records_manifest_metrics_digests_and_result(tmp_path: Path) -> None:
    """The run directory holds what the result says: manifest, per-step rows, digests, model."""
    run_dir = tmp_path / "run"
    result = train(TINY, run_dir, progress=False)
    manifest = read_json(run_dir, "manifest.json")
    assert manifest["config"] == TINY.to_dict()
    assert manifest["seeding"]["threads"] == 1
    assert manifest["data"]["digest"] == result.data_digest
    saved = read_json(run_dir, "result.json")
    assert saved["final_digest"] == result.final_digest
    assert saved["final_metric"] == pytest.approx(result.final_metric)
    metrics = read_metrics(run_dir)
    assert metrics["step"].tolist() == list(range(TINY.steps + 1))
    assert metrics["loss"].iloc[1:].tolist() == pytest.approx(result.losses[1:])
    assert read_digests(run_dir) == result.tensor_digests
    assert model_digest(read_model(run_dir)) == result.final_digest


def test_run_directory_is_not_reused(tmp_path: Path) -> None:
    """Training into a directory that already holds a run is refused, naming the directory."""
    run_dir = tmp_path / "run"
    train(TINY.replace(steps=2), run_dir, progress=False)
    with pytest.raises(ReprokitError, match="already holds a run"):
        train(TINY.replace(steps=2), run_dir, progress=False)


def test_crash_keeps_every_row_written_and_no_result(tmp_path: Path) -> None:
    """A run that dies at step 5 leaves manifest and 5 step rows on disk, and no result.json."""

    class Boom(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 5:
                raise RuntimeError("simulated crash")

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TINY, run_dir, callbacks=(Boom(),), progress=False)
    assert json.loads((run_dir / "manifest.json").read_text())["config"]["steps"] == TINY.steps
    assert read_metrics(run_dir)["step"].max() == 5
    assert not (run_dir / "result.json").exists()


def test_digest_every_controls_the_recorded_steps() -> None:
    """digest_every=k records digests at steps 0, k, 2k, ...; 0 records none but the final digest."""
    every3 = train(TINY.replace(digest_every=3), progress=False)
    assert [s for s, _ in every3.tensor_digests] == [0, 3, 6, 9, 12]
    off = train(TINY.replace(digest_every=0), progress=False)
    assert off.tensor_digests == []
    assert off.final_digest == every3.final_digest


def test_num_workers_does_not_change_the_bits() -> None:
    """Worker processes load the same batches in the same order: the final digest is unchanged."""
    base = train(TINY, progress=False)
    assert train(TINY.replace(num_workers=2), progress=False).final_digest == base.final_digest


def test_regression_task_reports_r2_and_learns() -> None:
    """The synthetic regression set trains an MLP to R² well above 0 (it is a noisy linear map)."""
    config = TrainConfig(dataset="regression", model="mlp", optimizer="adam", lr=0.01, epochs=10)
    result = train(config, progress=False)
    assert result.metric_name == "val_r2"
    assert result.final_metric > 0.9


def test_digits_cnn_learns() -> None:
    """200 SGD steps of the cnn reach over 90% validation accuracy on real digits."""
    result = train(TrainConfig(model="cnn", steps=200, threads=1), progress=False)
    assert result.metric_name == "val_accuracy"
    assert result.final_metric > 0.9


def test_callbacks_see_every_step_in_order() -> None:
    """Callbacks get on_train_start once, on_step_end with steps 1..N, on_train_end once."""
    seen: list[object] = []

    class Spy(Callback):
        def on_train_start(self, state: TrainState) -> None:
            seen.append("start")

        def on_step_end(self, state: TrainState) -> None:
            seen.append(state.step)

        def on_train_end(self, state: TrainState) -> None:
            seen.append("end")

    train(TINY.replace(steps=4), callbacks=(Spy(),), progress=False)
    assert seen == ["start", 1, 2, 3, 4, "end"]


def test_metrics_frame_has_one_row_per_step() -> None:
    """RunResult.metrics is a DataFrame with step 0..N and the validation metric on the last row."""
    result = train(TINY.replace(steps=3), progress=False)
    frame = result.metrics
    assert isinstance(frame, pd.DataFrame)
    assert frame["step"].tolist() == [0, 1, 2, 3]
    assert frame["val_metric"].iloc[-1] == result.final_metric
    assert torch.get_num_threads() == 1


def test_ledger_row_follows_the_run(tmp_path: Path) -> None:
    """A finished run is `finished` with its digest; a run that raises is `crashed`."""
    from reprokit.ledger import runs

    result = train(TINY.replace(steps=3), tmp_path / "ok", progress=False)

    class Boom(Callback):
        def on_step_end(self, state: TrainState) -> None:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(TINY.replace(steps=3), tmp_path / "bad", callbacks=(Boom(),), progress=False)
    table = runs(tmp_path / "ledger.sqlite").set_index("run_dir")
    assert table.loc[str((tmp_path / "ok").resolve()), "final_digest"] == result.final_digest
    assert table.loc[str((tmp_path / "bad").resolve()), "status"] == "crashed"
