"""Reading checkpoints: verified loads, safe unpickling, damage named, other configs and models refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from reprokit import TrainConfig, train
from reprokit.checkpoint import CheckpointError
from reprokit.checkpointreader import check_compatible, list_checkpoints, read_checkpoint, verify_run
from reprokit.cli import main
from reprokit.recovery import damage_checkpoint

CKPT = TrainConfig(model="mlp", steps=12, batch_size=128, threads=1, checkpoint_every=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train(CKPT, run_dir, progress=False)
    return run_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", r"tensors\.safetensors: truncated or extended"),
        ("flipped byte", r"tensors\.safetensors: content digest does not match"),
        ("missing file", r"meta\.json: missing"),
        ("malicious pickle", r"state\.pt: refused to load"),
    ],
)
def test_damaged_checkpoint_is_named_with_what_is_wrong(
    run: Path, tmp_path: Path, damage: str, message: str
) -> None:
    """Each kind of damage gives a CheckpointError naming the file and the problem."""
    copy = _copy(run, tmp_path)
    path = list_checkpoints(copy)[0]
    damage_checkpoint(path, damage)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_malicious_pickle_runs_no_code(run: Path, tmp_path: Path) -> None:
    """A state.pt whose unpickling would create a file is refused and the file never appears."""
    copy = _copy(run, tmp_path)
    path = list_checkpoints(copy)[0]
    damage_checkpoint(path, "malicious pickle")
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(path)
    assert not (path / "pwned").exists()
    table = verify_run(copy)
    assert table.set_index("checkpoint").loc[path.name, "status"] == "bad"
    assert not (path / "pwned").exists()


def test_uncommitted_directory_without_contents_is_refused(run: Path, tmp_path: Path) -> None:
    """A checkpoint directory lacking contents.json was never committed and does not load."""
    copy = _copy(run, tmp_path)
    path = list_checkpoints(copy)[0]
    (path / "contents.json").unlink()
    with pytest.raises(CheckpointError, match="never committed"):
        read_checkpoint(path)


def test_checkpoint_of_other_config_or_architecture_is_refused(run: Path, tmp_path: Path) -> None:
    """check_compatible names the differing config field, or the tensors whose shapes differ."""
    meta, state = read_checkpoint(list_checkpoints(run)[0])
    path = Path("ckpt")
    with pytest.raises(CheckpointError, match=r"different config \(lr: 0\.05 -> 0\.1\)"):
        check_compatible(meta, path, config=CKPT.replace(lr=0.1).to_dict(), model_state=state["model"])
    wider = {**state["model"], "1.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"different model architecture.*1\.weight \(checkpoint"):
        check_compatible(meta, path, config=CKPT.to_dict(), model_state=wider)
    # how a run is recorded (checkpoint cadence, workers) is not part of what it computes
    check_compatible(meta, path, config=CKPT.replace(checkpoint_every=2, num_workers=2).to_dict(),
                     model_state=state["model"], ignore=CKPT.recording_fields())


def test_verify_table_and_cli_report_each_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reprokit verify` lists every checkpoint, says which is bad and why, and exits 1 then."""
    assert main(["verify", str(run)]) == 0
    assert "2/2 checkpoints verify" in capsys.readouterr().out
    copy = _copy(run, tmp_path)
    damage_checkpoint(list_checkpoints(copy)[0], "flipped byte")
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "1/2 checkpoints verify" in out and "content digest does not match" in out
