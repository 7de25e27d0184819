"""Resume: a run SIGKILLed anywhere finishes with exactly the uninterrupted run's bits."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reprokit import TrainConfig, provenance, train, trainer
from reprokit.checkpoint import TMP_PREFIX
from reprokit.checkpointreader import list_checkpoints
from reprokit.cli import main
from reprokit.recovery import KillPoint, damage_checkpoint, kill_run
from reprokit.resumer import ResumeError, resume
from reprokit.rundir import read_json, read_metrics
from reprokit.trainer import RunResult

# digits: 1,438 training samples / 128 = 12 batches an epoch, so step 12 ends epoch 0 and 24 epoch 1.
# Adam and a cosine schedule, so optimizer moments and scheduler state must come back too.
CONFIG = TrainConfig(model="cnn", optimizer="adam", lr=0.003, lr_schedule="cosine", steps=30,
                     batch_size=128, threads=1, checkpoint_every=4)
WORKERS = CONFIG.replace(num_workers=2)
ASYNC = CONFIG.replace(async_save=True)
KILLS = {
    "first step": (CONFIG, KillPoint(1)),
    "mid-epoch": (CONFIG, KillPoint(7)),
    "epoch boundary": (CONFIG, KillPoint(12)),  # killed before the step-12 checkpoint lands
    "after epoch boundary": (CONFIG, KillPoint(14)),  # resumes from the epoch-end checkpoint
    "last step": (CONFIG, KillPoint(30)),
    "during save": (CONFIG, KillPoint(12, "save")),
    "workers mid-epoch": (WORKERS, KillPoint(7)),
    # keep_last=3: step 4's tensors file, pruned at step 16, is the spare the step-20 save overwrites
    "workers during save": (WORKERS, KillPoint(20, "save")),
    "async save": (ASYNC, KillPoint(17)),
    "from outside": (CONFIG, KillPoint(0, "external")),
}
RESUMED_FROM = {"first step": {0}, "mid-epoch": {4}, "epoch boundary": {8}, "after epoch boundary": {12},
                "last step": {28}, "during save": {8}, "workers mid-epoch": {4}, "workers during save": {16},
                # the kill may land before the background thread has committed step 16
                "async save": {12, 16}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return train(CONFIG, tmp_path_factory.mktemp("ref") / "run", progress=False)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kill point's run directory, killed by SIGKILL in a child process (two at a time)."""
    root = tmp_path_factory.mktemp("killed")
    dirs = {name: root / name.replace(" ", "-") for name in KILLS}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: kill_run(KILLS[n][0], dirs[n], KILLS[n][1], seed=3), KILLS))
    return dirs


def _fresh(killed: dict[str, Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name.replace(" ", "-")
    shutil.copytree(killed[name], target)
    return target


@pytest.mark.parametrize("name", list(KILLS))
def test_resume_after_kill_is_bitwise_identical(
    name: str, killed: dict[str, Path], reference: RunResult, tmp_path: Path
) -> None:
    """Killed at the point, resumed: final digest, last-step loss and metrics equal the reference."""
    run_dir = _fresh(killed, name, tmp_path)
    assert not (run_dir / "result.json").exists()
    result = resume(run_dir, progress=False)
    assert result.resume is not None
    if name in RESUMED_FROM:
        assert result.resume.from_step in RESUMED_FROM[name]
    assert result.final_digest == reference.final_digest
    assert result.final_metric == reference.final_metric
    metrics = read_metrics(run_dir)
    assert metrics["step"].tolist() == list(range(reference.steps + 1))  # no step lost or doubled
    assert metrics["loss"].tolist()[1:] == reference.losses[1:]
    assert result.tensor_digests == reference.tensor_digests
    assert read_json(run_dir, "manifest.json")["resumes"][0]["from_step"] == result.resume.from_step
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_resume_falls_back_past_a_damaged_checkpoint(
    killed: dict[str, Path], reference: RunResult, tmp_path: Path
) -> None:
    """With the newest checkpoint corrupted, resume says so, uses the one before, and still matches."""
    run_dir = _fresh(killed, "last step", tmp_path)
    newest = list_checkpoints(run_dir)[0]
    damage_checkpoint(newest, "flipped byte")
    result = resume(run_dir, progress=False)
    assert result.resume is not None
    assert result.resume.from_step == 24
    assert [s[0] for s in result.resume.skipped] == [newest.name]
    assert "content digest does not match" in result.resume.skipped[0][1]
    assert result.final_digest == reference.final_digest


def test_changed_config_is_refused_unless_forced_and_then_recorded(
    killed: dict[str, Path], reference: RunResult, tmp_path: Path
) -> None:
    """A thread-count change needs force; the forced resume is in the manifest and its bits differ."""
    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    with pytest.raises(ResumeError, match=r"threads: 1 -> 2.*force"):
        resume(run_dir, changes={"threads": 2}, progress=False)
    result = resume(run_dir, changes={"threads": 2}, force=True, progress=False)
    entry = read_json(run_dir, "manifest.json")["resumes"][0]
    assert entry["forced"] and entry["differences"] == ["threads: 1 -> 2"] and entry["threads"] == 2
    assert result.final_digest != reference.final_digest  # 2 threads sum in another order
    assert abs(result.final_metric - reference.final_metric) < 0.05


def test_changed_code_version_is_refused(
    killed: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written by other reprokit code is refused, naming the code version."""
    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    monkeypatch.setattr(provenance, "source_digest", lambda: "0" * 32)
    with pytest.raises(ResumeError, match="reprokit code version"):
        resume(run_dir, progress=False)


def test_recording_fields_may_change_freely(
    killed: dict[str, Path], reference: RunResult, tmp_path: Path
) -> None:
    """Changing the checkpoint cadence on resume needs no force and keeps the bits."""
    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    result = resume(run_dir, changes={"checkpoint_every": 5}, progress=False)
    assert result.final_digest == reference.final_digest
    assert result.checkpoints == (5, 10, 15, 20, 25)


def test_finished_run_is_not_resumed(reference: RunResult) -> None:
    """Resuming a run that has result.json is refused."""
    assert reference.run_dir is not None
    with pytest.raises(ResumeError, match="already finished"):
        resume(reference.run_dir, progress=False)


def test_cli_resume_prints_where_it_resumed(
    killed: dict[str, Path], reference: RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reprokit resume DIR` reports the checkpoint and the final digest; bad input exits 2."""
    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    assert main(["resume", str(run_dir), "--threads", "2"]) == 2
    assert "pass force=True (--force)" in capsys.readouterr().err
    assert main(["resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resumed from step-0000004 (step 4)" in out and reference.final_digest in out


def test_crash_flags_are_checked_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --crash-during-save step that is not a checkpoint step is refused before any training."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "mlp", "steps": 10, "checkpoint_every": 4}))
    argv = ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--crash-during-save", "5"]) == 2
    assert "not a checkpoint step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--crash-at-step", "11"]) == 2
    assert "outside the run's steps [1, 10]" in capsys.readouterr().err


def test_changed_dataset_digest_is_refused(
    killed: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the data no longer hashes to what the checkpoint recorded, resume refuses and shows both."""
    import dataclasses

    from reprokit.data import DatasetBundle

    real = trainer.load_data

    def other_data(config: TrainConfig) -> DatasetBundle:
        return dataclasses.replace(real(config), digest="f" * 32)

    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    monkeypatch.setattr(trainer, "load_data", other_data)
    with pytest.raises(ResumeError, match=r"data digest: [0-9a-f]{32} -> f{32}"):
        resume(run_dir, progress=False)


def test_checkpoint_seconds_saves_by_wall_clock(tmp_path: Path) -> None:
    """checkpoint_seconds alone triggers saves; a tiny interval saves after every step but the last."""
    result = train(TrainConfig(model="mlp", steps=5, threads=1, checkpoint_seconds=1e-9, keep_last=10),
                   tmp_path / "run", progress=False)
    assert result.checkpoints == (1, 2, 3, 4)
    assert len(list_checkpoints(tmp_path / "run")) == 4


def test_ledger_records_the_resumed_run_as_finished(
    killed: dict[str, Path], reference: RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The killed run's ledger says running; after resume the ledger next to it says finished."""
    from reprokit.ledger import runs

    assert runs(killed["mid-epoch"].parent / "ledger.sqlite", status="running")["id"].size == len(KILLS)
    run_dir = _fresh(killed, "mid-epoch", tmp_path)
    resume(run_dir, progress=False)
    row = runs(tmp_path / "ledger.sqlite").iloc[0]
    assert (row["status"], row["final_digest"]) == ("finished", reference.final_digest)
    assert row["id"] == read_json(run_dir, "manifest.json")["run_id"]
    assert main(["runs", "--ledger", str(tmp_path / "ledger.sqlite"), "--where", "status=finished"]) == 0
    assert reference.final_digest in capsys.readouterr().out
