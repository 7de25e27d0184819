"""The built-in trainer in both reduction modes: TrainConfig's reduction and micro_batches, and
``reprokit train --nproc N`` (the CLI becomes torchrun; ``reprokit resume`` of such a run relaunches
it at its recorded world size).

Three torchrun launches, each bounded by a deadline that kills torchrun and every rank it started.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from launching import launch

from reprokit import TrainConfig, train
from reprokit.cli import main
from reprokit.errors import ConfigError

DEADLINE = 180.0  # seconds for one launch (~7 s at 2 ranks on an idle 2-core machine)
TINY = TrainConfig(model="mlp", steps=8, batch_size=32, threads=1, checkpoint_every=4)
CANONICAL = TINY.replace(reduction="canonical", micro_batches=4)


def _launch(*args: str) -> tuple[int, str]:
    """``python -m reprokit ARGS`` in a new session: exit status, output."""
    return launch([sys.executable, "-m", "reprokit", *args], deadline=DEADLINE)


def _config_file(tmp_path: Path, config: TrainConfig) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def _result(run_dir: Path) -> dict[str, object]:
    return dict(json.loads((run_dir / "result.json").read_text()))


@pytest.mark.parametrize(("changes", "match"), [
    ({"reduction": "allreduce"}, r"reduction 'allreduce' is not one of \['ddp', 'canonical'\]"),
    ({"micro_batches": 4}, r"micro_batches=4 applies to reduction='canonical' only"),
    ({"reduction": "canonical"}, r"reduction='canonical' needs micro_batches.*not None"),
    ({"reduction": "canonical", "micro_batches": 0}, r"needs micro_batches.*not 0"),
    ({"reduction": "canonical", "micro_batches": 5}, r"batch_size 32 is not divisible by micro_batches 5"),
])
def test_reduction_fields_are_validated_naming_the_value_and_the_fix(changes: dict[str, object],
                                                                     match: str) -> None:
    """A reduction TrainConfig cannot run is refused when the config is built, naming the value."""
    with pytest.raises(ConfigError, match=match):
        TINY.replace(**changes)


def test_reduction_fields_enter_the_recipe_not_the_recording() -> None:
    """reduction and micro_batches change bits, so a resume may not change them freely."""
    assert {"reduction", "micro_batches"}.isdisjoint(TrainConfig.recording_fields())


def test_canonical_mode_in_one_process_repeats_bitwise_and_differs_from_ddp_mode() -> None:
    """Two canonical runs of one config end with one final digest; the ddp run of the same
    config (the whole batch's mean loss in one backward) ends with another."""
    a, b = train(CANONICAL, progress=False), train(CANONICAL, progress=False)
    assert a.final_digest == b.final_digest and a.tensor_digests == b.tensor_digests
    assert train(TINY, progress=False).final_digest != a.final_digest


def test_canonical_epochs_drop_the_incomplete_last_batch() -> None:
    """In canonical mode an epoch is floor(n/batch) steps at every world size (run.loader drops an
    incomplete batch, which micro-batches cannot split)."""
    result = train(CANONICAL.replace(steps=None, epochs=1, batch_size=256), progress=False)
    n_train = 1797 - round(1797 * 0.2)
    assert result.steps == n_train // 256 < math.ceil(n_train / 256)


def test_nproc_must_be_a_positive_int(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc 0 exits 2 with a one-line reason; nothing is written."""
    args = ["train", "--config", _config_file(tmp_path, TINY), "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--nproc", "0"]) == 2
    assert "--nproc 0 is not a number of processes; pass an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_nproc_without_torchrun_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc 2 with no torchrun next to the interpreter exits 2 naming the missing path."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    args = ["train", "--config", _config_file(tmp_path, TINY), "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--nproc", "2"]) == 2
    assert f"{tmp_path / 'bin' / 'torchrun'} does not exist" in capsys.readouterr().err


def test_nproc_under_torchrun_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A rank of torchrun that passes --nproc again does not launch torchrun inside torchrun."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--config", _config_file(tmp_path, TINY), "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--nproc", "2"]) == 2
    assert "runs under torchrun already (WORLD_SIZE=2); drop --nproc" in capsys.readouterr().err


@pytest.mark.parametrize(("config", "match"), [
    (TINY.replace(batch_size=33), r"--nproc 2: batch_size is the global batch.*33 is not divisible by world "
                                  r"size 2"),
    (TINY.replace(batch_size=36, reduction="canonical", micro_batches=6),
     r"6 micro-batches cannot run at world size 2.*valid world sizes: \[1, 3, 6\]"),
])
def test_nproc_that_cannot_split_the_batch_is_refused_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: TrainConfig, match: str
) -> None:
    """A world size the batch or the micro-batches do not fit exits 2 in this process, once, with
    nothing written (the ranks would each refuse it after writing a manifest)."""
    args = ["train", "--config", _config_file(tmp_path, config), "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--nproc", "2"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_train_nproc_2_in_canonical_mode_gives_the_one_process_bits(tmp_path: Path) -> None:
    """`reprokit train --nproc 2` with reduction canonical ends, on both ranks, with the final digest
    of reprokit.train of the same config in this process; the manifest records the world size."""
    run_dir = tmp_path / "run"
    status, output = _launch("train", "--config", _config_file(tmp_path, CANONICAL), "--run-dir",
                             str(run_dir), "--nproc", "2")
    assert status == 0, output
    one_process = train(CANONICAL, progress=False).final_digest
    assert output.count("final digest") == 1 and f"final digest {one_process}" in output  # rank 0 only
    for rank_dir in (run_dir, run_dir / "ranks" / "rank-1"):
        assert _result(rank_dir)["final_digest"] == one_process, rank_dir
    assert _result(run_dir)["replica_mismatch"] == []
    entry = json.loads((run_dir / "manifest.json").read_text())["distributed"]
    assert (entry["reduction"], entry["micro_batches"], entry["world_size"]) == ("canonical", 4, 2)


def test_a_killed_ddp_run_of_nproc_2_resumes_under_torchrun_at_its_world_size(tmp_path: Path) -> None:
    """`reprokit train --nproc 2` in ddp mode killed after step 6, then `reprokit resume RUN_DIR`
    (no --nproc): the resume runs at the recorded 2 ranks from the step-4 checkpoint, and the run
    finishes with both ranks' digests equal at every step (replica_mismatch empty)."""
    run_dir = tmp_path / "run"
    status, output = _launch("train", "--config", _config_file(tmp_path, TINY), "--run-dir", str(run_dir),
                             "--nproc", "2", "--crash-at-step", "6")
    assert status != 0 and not (run_dir / "result.json").exists(), output
    status, output = _launch("resume", str(run_dir))
    assert status == 0, output
    assert "resumed from step-0000004 (step 4)" in output
    final = _result(run_dir)["final_digest"]
    assert _result(run_dir / "ranks" / "rank-1")["final_digest"] == final
    assert _result(run_dir)["replica_mismatch"] == []
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["reduction"] == "ddp"
    assert manifest["distributed"]["ddp"]["model"]["bucket_bytes_cap"] == 25 * 2**20  # the trainer's DDP
    assert manifest["resumes"][-1]["from_step"] == 4
