"""Distributed checkpoints (reprokit.distcheckpoint): committed atomically, verified before DCP reads them."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from reprokit import distcheckpoint
from reprokit.checkpoint import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "distckpt"
REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipe"


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny model and its Adam after one step: a distinct state per seed."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root: Path, step: int, keep_last: int | None = None) -> str:
    """Save the state of seed ``step`` at ``step``; returns its digest."""
    state = distcheckpoint.model_state(*_trained(step))
    distcheckpoint.save(root, step, state, world_size=1, recipe_digest=RECIPE, keep_last=keep_last)
    return distcheckpoint.loaded_digest(state)


def _load(root: Path) -> tuple[int, str]:
    """Load the latest verified checkpoint into a fresh model and Adam; returns (step, their digest)."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    state = distcheckpoint.model_state(model, optimizer)
    step, _ = distcheckpoint.load_latest(root, state, recipe_digest=RECIPE)
    distcheckpoint.load_model_state(model, optimizer, state)
    return step, distcheckpoint.loaded_digest(distcheckpoint.model_state(model, optimizer))


def _folder(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _remove(path: Path) -> None:
    path.unlink()


class _Touch:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_two_saves_commit_two_folders(tmp_path: Path) -> None:
    """Two saves leave two folders, each with DCP's files and contents.json, and `latest` on the second."""
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    assert (tmp_path / "latest").read_text().strip() == "step-0000002"
    for step in (1, 2):
        names = {p.name for p in _folder(tmp_path, step).iterdir()}
        assert names == {".metadata", "__0_0.distcp", "contents.json"}
        assert distcheckpoint.verify(_folder(tmp_path, step)).step == step
    assert _load(tmp_path) == (2, second)


@pytest.mark.parametrize(("name", "damage", "problem"), [
    ("__0_0.distcp", _flip, "differs"),
    ("__0_0.distcp", _truncate, "truncated"),
    (".metadata", _remove, "missing"),
    (".metadata", _flip, "differs"),
])
def test_damaged_file_is_named_and_load_falls_back(
    tmp_path: Path, name: str, damage: Callable[[Path], None], problem: str
) -> None:
    """A flipped, truncated or missing file fails verify naming it; load_latest warns and loads step 1."""
    first = _save(tmp_path, 1)
    _save(tmp_path, 2)
    damage(_folder(tmp_path, 2) / name)
    with pytest.raises(CheckpointError, match=rf"step-0000002/{name}: .*{problem}"):
        distcheckpoint.verify(_folder(tmp_path, 2))
    with pytest.warns(UserWarning, match=rf"step-0000002/{name}.*falling back"):
        assert _load(tmp_path) == (1, first)


def test_tampered_pickle_is_never_unpickled(tmp_path: Path) -> None:
    """A .metadata replaced by a hostile pickle is refused by its digest before anything unpickles it."""
    first = _save(tmp_path, 1)
    _save(tmp_path, 2)
    marker = tmp_path / "unpickled"
    (_folder(tmp_path, 2) / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.warns(UserWarning, match=r"step-0000002/\.metadata: \d+ bytes"):
        assert _load(tmp_path) == (1, first)
    assert not marker.exists()


def _reseal(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit contents.json and recompute its own digest, as a careful forger would."""
    path = folder / "contents.json"
    body = json.loads(path.read_text())
    del body["contents_digest"]
    edit(body)
    body["contents_digest"] = xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("hostile", ["../x", "/etc/passwd", "sub/file"])
def test_contents_naming_a_path_outside_is_refused(tmp_path: Path, hostile: str) -> None:
    """contents.json may name only plain files inside its folder ('../x', absolute, nested are refused)."""
    _save(tmp_path, 1)
    _reseal(_folder(tmp_path, 1), lambda body: body["files"].update({hostile: {"bytes": 0, "xxh3_128": ""}}))
    with pytest.raises(CheckpointError, match="not a plain file name inside"):
        distcheckpoint.verify(_folder(tmp_path, 1))


def test_edited_contents_and_symlinks_and_extra_files_are_refused(tmp_path: Path) -> None:
    """An edited contents.json, a shard swapped for a symlink and an unlisted file each fail verify."""
    _save(tmp_path, 1)
    folder = _folder(tmp_path, 1)
    contents = (folder / "contents.json").read_text()
    (folder / "contents.json").write_text(contents.replace('"step": 1', '"step": 9'))
    with pytest.raises(CheckpointError, match=r"contents\.json: its contents_digest does not match"):
        distcheckpoint.verify(folder)
    (folder / "contents.json").write_text(contents)
    shard = folder / "__0_0.distcp"
    outside = tmp_path / "outside.distcp"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: cannot be opened as a plain file"):
        distcheckpoint.verify(folder)
    shard.unlink()
    outside.rename(shard)
    distcheckpoint.verify(folder)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not listed in contents\.json"):
        distcheckpoint.verify(folder)


def test_no_verified_checkpoint_raises(tmp_path: Path) -> None:
    """Nothing committed, or every folder damaged, raises CheckpointError instead of loading anything."""
    with pytest.raises(CheckpointError, match="latest: missing"):
        _load(tmp_path)
    _save(tmp_path, 1)
    _flip(_folder(tmp_path, 1) / "__0_0.distcp")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no committed checkpoint verifies"):
        _load(tmp_path)


def test_keep_last_keeps_k_folders_and_latest(tmp_path: Path) -> None:
    """keep_last=2 after 4 saves leaves steps 3 and 4, and latest on step 4."""
    for step in range(1, 5):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000004"


def test_committed_step_is_never_overwritten(tmp_path: Path) -> None:
    """Saving a step that is committed and sound is refused; a damaged one is re-saved with a warning."""
    _save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="step 1 is committed and never overwritten"):
        _save(tmp_path, 1)
    _truncate(_folder(tmp_path, 1) / "__0_0.distcp")
    with pytest.warns(UserWarning, match="truncated.*re-saving step 1"):
        digest = _save(tmp_path, 1)
    assert _load(tmp_path) == (1, digest)


@pytest.mark.parametrize("point", distcheckpoint.CRASH_POINTS)
def test_crash_during_save_leaves_latest_on_previous_step(tmp_path: Path, point: str) -> None:
    """A SIGKILL after dcp.save (or after contents.json) leaves latest on step 1; step 2 saves again."""
    first = _save(tmp_path, 1)
    env = {**os.environ, distcheckpoint.CRASH_ENV: point}
    done = subprocess.run([sys.executable, str(FIXTURES / "save_step.py"), str(tmp_path), "2"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (_folder(tmp_path, 2) / ".metadata").exists()  # DCP had finished: only the commit was lost
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert _load(tmp_path) == (1, first)
    second = _save(tmp_path, 2)
    assert _load(tmp_path) == (2, second)


def test_async_save_commits_on_result(tmp_path: Path) -> None:
    """An async save moves latest only when result() commits it; the loaded state is the saved one."""
    _save(tmp_path, 1)
    state = distcheckpoint.model_state(*_trained(2))
    pending = distcheckpoint.save(tmp_path, 2, state, world_size=1, recipe_digest=RECIPE, keep_last=None,
                                  async_save=True)
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert pending.result() == _folder(tmp_path, 2)
    assert _load(tmp_path) == (2, distcheckpoint.loaded_digest(state))


def test_adam_round_trip_restores_every_bit(tmp_path: Path) -> None:
    """Model + Adam saved and loaded into fresh objects: the digest of the loaded state equals the saved."""
    model, optimizer = _trained(7)
    saved = distcheckpoint.loaded_digest(distcheckpoint.model_state(model, optimizer))
    distcheckpoint.save(tmp_path, 7, distcheckpoint.model_state(model, optimizer), world_size=1,
                        recipe_digest=RECIPE, keep_last=1)
    step, loaded = _load(tmp_path)
    assert (step, loaded) == (7, saved)
    assert saved != distcheckpoint.loaded_digest(distcheckpoint.model_state(*_trained(8)))


def test_foreign_recipe_is_refused(tmp_path: Path) -> None:
    """A checkpoint saved by another recipe is not loaded, and the error names both digests."""
    _save(tmp_path, 1)
    state = distcheckpoint.model_state(*_trained(0))
    with pytest.raises(CheckpointError, match="saved by recipe recipe, this run's is other"):
        distcheckpoint.load_latest(tmp_path, state, recipe_digest="other")


def test_checkpoints_reshard_between_one_and_two_ranks(tmp_path: Path) -> None:
    """Under torchrun at 2 ranks a 1-process checkpoint loads on both ranks, and a DDP model + Adam saved
    there loads at 1 rank, each with the saved digest; a re-save of a committed step is refused on both."""
    one, root = tmp_path / "one", tmp_path / "two"
    root.mkdir()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    state = distcheckpoint.model_state(model, optimizer)
    distcheckpoint.save(one, 5, state, world_size=1, recipe_digest=RECIPE, keep_last=None)
    saved_at_one = distcheckpoint.loaded_digest(state)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(FIXTURES / "ddp_save.py"), str(root),
           str(one)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{output}")
    assert proc.returncode == 0, output
    assert [(root / f"loaded-{r}.digest").read_text() for r in (0, 1)] == [saved_at_one] * 2
    assert all("committed and never overwritten" in (root / f"refused-{r}").read_text() for r in (0, 1))
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000003"]  # keep_last=1
    contents = distcheckpoint.verify(_folder(root, 3))
    assert contents.world_size == 2
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(contents.files)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    state = distcheckpoint.model_state(model, optimizer)
    assert distcheckpoint.load_latest(root, state, recipe_digest=RECIPE).step == 3  # resharded 2 -> 1
    distcheckpoint.load_model_state(model, optimizer, state)
    loaded = distcheckpoint.loaded_digest(distcheckpoint.model_state(model, optimizer))
    assert loaded == (root / "saved.digest").read_text()
