"""reprokit.reproduction: rerun a finished run from its manifest and judge the rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reprokit import TrainConfig, train
from reprokit.cli import main
from reprokit.reproduction import ReproduceError, reproduce
from reprokit.rundir import MANIFEST, WEIGHTS

CONFIG = TrainConfig(model="cnn", dataset="digits", steps=15, batch_size=32, threads=1)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("orig") / "run"
    train(CONFIG, run_dir, progress=False)
    return run_dir


def test_unchanged_environment_reproduces_bitwise(original: Path, tmp_path: Path) -> None:
    """The same manifest on the same machine gives the same bits; nothing but volatile entries differs."""
    rep = reproduce(original, tmp_path / "again", progress=False)
    assert rep.verdict == "bitwise" and rep.identical
    assert rep.metric_delta == 0.0
    assert rep.differences.empty, rep.differences
    row = rep.table().iloc[0]
    assert row["verdict"] == "bitwise" and row["first_divergence"] is None


def test_other_thread_count_is_named_among_the_differences(original: Path, tmp_path: Path) -> None:
    """Reproduced with 2 threads: not bitwise, first divergence at step 1, and the thread count
    shows up among the differences with both values."""
    rep = reproduce(original, tmp_path / "two", changes={"threads": 2}, tolerance=0.05, progress=False)
    assert not rep.identical
    assert rep.verdict in ("within tolerance", "failed")
    assert rep.comparison.first_step == 1
    diffs = rep.differences.set_index("key")
    assert diffs.loc["config.threads", "original"] == 1 and diffs.loc["config.threads", "reproduced"] == 2
    assert "environment.threads" in diffs.index
    assert rep.verdict == ("within tolerance" if abs(rep.metric_delta) <= 0.05 else "failed")


def test_changed_data_is_refused_before_training(original: Path, tmp_path: Path) -> None:
    """A manifest whose data digest no longer matches the data is refused with both digests, and
    nothing is written."""
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in original.iterdir():
        if f.is_file():
            (tampered / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((tampered / MANIFEST).read_text())
    manifest["data"]["digest"] = "0" * 32
    (tampered / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ReproduceError, match=r"hashes to [0-9a-f]{32} here but the run recorded 0{32}"):
        reproduce(tampered, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_unfinished_run_and_bad_tolerance_are_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(ReproduceError, match="only a finished run"):
        reproduce(tmp_path / "run")
    with pytest.raises(ReproduceError, match="tolerance -1"):
        reproduce(tmp_path / "run", tolerance=-1)


def test_fine_tuned_child_recreates_a_damaged_parent(tmp_path: Path) -> None:
    """A child whose parent weights were damaged after the fact is reproduced by re-creating the
    parent from its manifest first; both come back bitwise."""
    parent = tmp_path / "parent"
    train(TrainConfig(model="mlp", dataset="digits_0_4", steps=10, threads=1), parent, progress=False)
    child = tmp_path / "child"
    train(TrainConfig(model="mlp", dataset="digits_5_9", steps=10, threads=1, init_from=str(parent),
                      finetune="full"), child, progress=False)
    weights = parent / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    rep = reproduce(child, tmp_path / "child-again", progress=False)
    assert rep.parent is not None and rep.parent.verdict == "bitwise"
    assert rep.verdict == "bitwise", rep.describe()


def test_cli_reproduce_prints_the_verdict(
    original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reproduce", str(original), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "verdict:    bitwise" in out
