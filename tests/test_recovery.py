"""Recovery experiments: the fault matrix and the corruption table say what really happened."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from reprokit import TrainConfig
from reprokit.recovery import (
    DAMAGES,
    KillPoint,
    RecoveryError,
    corruption_table,
    fault_matrix,
    kill_plan,
    recovery_curves,
    recovery_verdict,
)

CONFIG = TrainConfig(model="mlp", steps=16, batch_size=128, threads=1, checkpoint_every=4)
# the example script as a user's command: one epoch of 45 steps, a checkpoint every 10
EXAMPLE = [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "train_digits_reprokit.py"),
           "--epochs", "1", "--workers", "0"]


def test_fault_matrix_resumes_identically_and_reports_thread_changes_honestly(tmp_path: Path) -> None:
    """Same threads: identical, R = 1; two threads: R computed from the metrics, bits reported as they are."""
    table, reference = fault_matrix(CONFIG, [KillPoint(6)], tmp_path, resume_threads=(None, 2), jobs=1)
    same, other = table.iloc[0], table.iloc[1]
    assert (same["resumed_from"], same["identical"], same["max_abs_diff"], same["R"]) == (4, True, 0.0, 1.0)
    assert other["threads_resume"] == 2
    assert other["R"] == pytest.approx(other["P_r"] / reference.final_metric)
    assert other["identical"] == (other["max_abs_diff"] == 0.0)
    verdict = recovery_verdict(table).set_index("threads_resume")
    assert verdict.loc[1, "verdict"] == "1/1 resumes bitwise identical"
    curves = recovery_curves(table, reference)
    assert set(curves["run"]) == {"reference", *(Path(d).name for d in table["run_dir"])}
    assert curves.groupby("run")["step"].max().eq(16).all()


def test_corruption_table_refuses_every_damage_and_runs_no_code(tmp_path: Path) -> None:
    """Each damage is reported bad, resume falls back one checkpoint, the malicious pickle never runs."""
    table = corruption_table(CONFIG, tmp_path)
    assert table["damage"].tolist() == list(DAMAGES)
    assert (table["verify"] == "bad").all()
    assert (table["resume_uses"] == "step-0000008 (skips 1)").all()
    assert not table["code_ran"].any()
    problems = dict(zip(table["damage"], table["problem"], strict=True))
    assert "different model architecture" in problems["other architecture"]
    assert "different config (lr: 0.1 -> 0.05)" in problems["other config"]


def test_kill_plan_validates_and_draws_reproducibly() -> None:
    """Random kill steps are drawn by seed, never repeat a chosen step; an empty plan is an error."""
    a = kill_plan(50, steps=[1], saves=[10], random_steps=5, seed=3, external=1)
    assert a == kill_plan(50, steps=[1], saves=[10], random_steps=5, seed=3, external=1)
    drawn = [k.step for k in a if k.phase == "step"][1:]
    assert len(set(drawn)) == 5 and 1 not in drawn
    assert [k.phase for k in a].count("external") == 1
    with pytest.raises(RecoveryError, match="no kill points"):
        kill_plan(50)
    with pytest.raises(RecoveryError, match="kill phase 'later' is unknown"):
        KillPoint(3, "later")


def test_fault_matrix_on_a_script_relaunches_bitwise(tmp_path: Path) -> None:
    """The example script killed before its first checkpoint, mid-save and from outside, then
    relaunched unchanged, finishes with the reference's final digest each time."""
    kills = [KillPoint(5), KillPoint(20, "save"), KillPoint(33, "external")]
    table, reference = fault_matrix(EXAMPLE, kills, tmp_path, jobs=2)
    assert table["kill"].tolist() == ["step 5", "save 20", "external 2"]
    assert table["resumed_from"].tolist()[:2] == [0, 10]  # the save of step 20 never committed
    assert table["kill_step"].iloc[2] >= 33 and table["resumed_from"].iloc[2] in (30, 40)
    assert table["identical"].all() and (table["max_abs_diff"] == 0).all() and (table["R"] == 1).all()
    assert (table["threads_start"] == 1).all() and reference.steps == 45
    assert recovery_verdict(table)["verdict"].tolist() == ["3/3 resumes bitwise identical"]
    curves = recovery_curves(table, reference)
    assert curves.groupby("run")["step"].max().eq(45).all()



def test_fault_matrix_on_a_function_relaunches_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A training function ('module:function') killed after step 6 and relaunched resumes from its
    checkpoint of step 4 and finishes with the reference's final digest."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "fixtures"))
    table, reference = fault_matrix("digits_function:main", [KillPoint(6)], tmp_path, jobs=1)
    row = table.iloc[0]
    assert (row["kill"], row["resumed_from"], row["identical"], row["max_abs_diff"], row["R"]) == (
        "step 6", 4, True, 0.0, 1.0)
    assert reference.steps == 10 and reference.metric_name == "train_accuracy"
