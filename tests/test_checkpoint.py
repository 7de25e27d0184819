"""Checkpoints: atomic commit, full state, the spare tensors file, pruning that keeps a valid one."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from reprokit import TrainConfig, train
from reprokit.checkpoint import (
    SPARE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointMeta,
    Snapshot,
    clean_temporaries,
    write_checkpoint,
)
from reprokit.checkpointer import Checkpointer, update_only
from reprokit.checkpointreader import latest_pointer, list_checkpoints, read_checkpoint
from reprokit.digests import model_digest
from reprokit.recovery import damage_checkpoint

CKPT = TrainConfig(model="mlp", steps=12, batch_size=128, threads=1, checkpoint_every=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train(CKPT, run_dir, progress=False)
    return run_dir


def _same(snap: Snapshot) -> Snapshot:
    return snap


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_checkpoints_hold_full_state_and_latest_points_to_newest(run: Path) -> None:
    """Checkpoints at steps 4 and 8 (none at the last step); latest names step 8; state is complete."""
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step-0000008", "step-0000004"]
    assert latest_pointer(run) == "step-0000008"
    meta, state = read_checkpoint(run / "checkpoints" / "step-0000008")
    assert (meta.step, meta.epoch, meta.batch) == (8, 0, 8)
    assert set(state) >= {"model", "tracked", "rng", "callbacks", "position"}
    assert set(state["tracked"]) == {"optimizer"}  # the mlp's constant schedule has no state
    assert set(state["rng"]) == {"python", "numpy", "torch_cpu", "torch_cuda", "generators"}
    assert state["position"]["loaders"]["0"]["batch"] == 8
    assert meta.run_files["metrics.csv"] > 0 and meta.config == CKPT.to_dict()


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    """keep_last=2 leaves exactly the two newest checkpoints, and a finished run no spare file."""
    train(CKPT.replace(checkpoint_every=2, keep_last=2), tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000010", "step-0000008"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest", "step-0000008", "step-0000010"]


def test_next_save_overwrites_the_pruned_tensors_file(run: Path, tmp_path: Path) -> None:
    """A pruned checkpoint's tensors file becomes the spare; the next save writes into it (same inode),
    cut to size when the new state is smaller, grown when larger, and every checkpoint verifies."""
    meta, state = read_checkpoint(list_checkpoints(run)[0])
    saver = Checkpointer(tmp_path, every=1, seconds=0, keep=1, background=False)
    spare = tmp_path / "checkpoints" / SPARE
    smaller = {**state, "tracked": {}}
    larger = {**state, "callbacks": {"big": torch.arange(400_000, dtype=torch.float64)}}
    for step, snap_state in enumerate([state, state, smaller, larger, state], start=1):
        inode = spare.stat().st_ino if spare.exists() else None
        snap = Snapshot(CheckpointMeta(**{**meta.to_dict(), "step": step}), snap_state)
        saver.save(functools.partial(_same, snap))
        saver.wait()  # the pruned directory is deleted in a thread, which keeps the spare
        [path] = list_checkpoints(tmp_path)
        tensors = path / TENSORS_FILE
        assert inode is None or tensors.stat().st_ino == inode
        assert spare.exists() == (step > 1)
        _, loaded = read_checkpoint(path)
        assert (loaded["tracked"] == {}) == (snap_state is smaller)
        if snap_state is larger:
            assert torch.equal(loaded["callbacks"]["big"], larger["callbacks"]["big"])
        assert json.loads((path / "contents.json").read_text())["files"][TENSORS_FILE]["bytes"] == (
            tensors.stat().st_size)
    saver.finish()
    assert not spare.exists()


def test_clean_temporaries_keeps_only_the_spare(tmp_path: Path) -> None:
    """Half-written directories and pointers of a killed writer go; the spare stays for the resumed run."""
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000004-12-34").mkdir(parents=True)
    (root / ".tmp-step-0000004-12-34" / TENSORS_FILE).write_bytes(b"half")
    (root / ".tmp-latest-12-34").write_text("step-0000004\n")
    (root / SPARE).write_bytes(b"old tensors")
    (root / "step-0000002").mkdir()
    clean_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [SPARE, "step-0000002"]


def test_prune_never_deletes_the_only_valid_checkpoint(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a new checkpoint fails to verify, the save fails and the older ones stay."""
    meta, state = read_checkpoint(list_checkpoints(run)[0])
    saver = Checkpointer(tmp_path, every=1, seconds=0, keep=1, background=False)
    saver.save(lambda: Snapshot(meta, state))
    first = list_checkpoints(tmp_path)
    assert [p.name for p in first] == ["step-0000008"]

    def broken(path: Path, **kwargs: object) -> None:
        raise CheckpointError(f"{path}: simulated bad disk")

    monkeypatch.setattr("reprokit.checkpoint.verify_contents", broken)
    later = CheckpointMeta(**{**meta.to_dict(), "step": 9})
    with pytest.raises(CheckpointError, match="simulated bad disk"):
        saver.save(lambda: Snapshot(later, state))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-0000008"]


def test_async_save_gives_the_same_bits_as_sync_save(run: Path, tmp_path: Path) -> None:
    """Background saving changes neither the final digest nor any checkpoint's content."""
    result = train(CKPT.replace(async_save=True), tmp_path / "async", progress=False)
    sync_final = json.loads((run / "result.json").read_text())["final_digest"]
    assert result.final_digest == sync_final
    for name in ("step-0000004", "step-0000008"):
        a, _ = read_checkpoint(run / "checkpoints" / name)
        b, _ = read_checkpoint(tmp_path / "async" / "checkpoints" / name)
        assert a.model_digest == b.model_digest
    assert result.checkpoints == (4, 8)


def test_rewriting_a_step_replaces_the_old_checkpoint(run: Path, tmp_path: Path) -> None:
    """Committing a step that already has a (say damaged) directory replaces it whole."""
    copy = _copy(run, tmp_path)
    path = list_checkpoints(copy)[0]
    meta, state = read_checkpoint(path)
    damage_checkpoint(path, "truncated")
    write_checkpoint(copy, Snapshot(meta, state))
    assert read_checkpoint(path)[0].model_digest == meta.model_digest
    assert not [p for p in (copy / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_async_save_copies_the_weights_before_the_optimizer_changes_them(run: Path, tmp_path: Path) -> None:
    """The optimizer step may change the weights once before_update returns; the checkpoint keeps the old."""
    meta, state = read_checkpoint(list_checkpoints(run)[0])
    model = torch.nn.Linear(1024, 1024)  # 12 MB with Adam: the copy takes a while
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 1024)).sum().backward()
    opt.step()
    state = {**state, "model": model.state_dict(), "optimizer": opt.state_dict()}
    saved = model_digest(model)
    saver = Checkpointer(tmp_path, every=1, seconds=0, keep=1, background=True)
    saver.save(lambda: Snapshot(meta, state, update_only=update_only(model, opt)))
    saver.before_update()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what optimizer.step() would do, possibly before the file is written
        for s in opt.state.values():
            s["exp_avg"].zero_()
    saver.wait()
    written, loaded = read_checkpoint(list_checkpoints(tmp_path)[0])
    assert written.model_digest == saved != model_digest(model)
    assert torch.count_nonzero(next(iter(loaded["optimizer"]["state"].values()))["exp_avg"]) > 0
    assert saver.blocked_seconds[0] > 0
