"""Audit: it reports what the machine does, checked against digests computed directly."""

from __future__ import annotations

import functools
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from reprokit import (
    TrainConfig,
    audit_determinism,
    determinism_verdict,
    divergences,
    seed_variance,
    train,
    world_size_effect,
)
from reprokit.cli import main
from reprokit.errors import ConfigError
from reprokit.scriptruns import ScriptRunError

BASE = TrainConfig(model="cnn", steps=8, batch_size=32, threads=1)
# the example script as a user's command: one epoch of 45 steps, loaders in the main process
EXAMPLE = [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "train_digits_reprokit.py"),
           "--epochs", "1", "--workers", "0"]


def test_thread_factor_verdict_matches_direct_digests() -> None:
    """The audit's thread verdict equals what comparing 1- and 2-thread digests directly shows."""
    audit = audit_determinism(BASE, seeds=[0], repeats=1, vary={"threads": [1, 2]}, progress=False)
    direct_1 = train(BASE, progress=False).final_digest
    direct_2 = train(BASE.replace(threads=2), progress=False).final_digest
    row = audit[audit["threads"] == 2].iloc[0]
    assert row["final_digest"] == direct_2
    assert bool(row["identical"]) == (direct_1 == direct_2)
    verdict = determinism_verdict(audit).set_index("factor")
    assert verdict.loc["threads", "bitwise_identical"] == ("yes" if direct_1 == direct_2 else "no")
    if direct_1 != direct_2:
        assert row["max_abs_diff"] > 0 and row["diverged_step"] >= 1
        assert len(divergences(audit)) == 1


def test_repeats_and_workers_are_identical() -> None:
    """Repeats with the same settings and a different worker count match the reference bitwise."""
    audit = audit_determinism(BASE, seeds=[0, 1], repeats=2, vary={"num_workers": [0, 2]}, progress=False)
    assert len(audit) == 2 * 2 * 2
    assert audit["identical"].all()
    assert (audit["max_abs_diff"] == 0).all()
    assert audit["diverged_step"].isna().all()
    verdict = determinism_verdict(audit)
    assert verdict["bitwise_identical"].tolist() == ["yes", "yes"]
    assert divergences(audit).empty


def test_reference_digest_equals_a_plain_run() -> None:
    """Each seed's reference row carries the digest a plain train() of that seed gives."""
    audit = audit_determinism(BASE, seeds=[3, 4], repeats=1, progress=False)
    for seed in (3, 4):
        row = audit[audit["seed"] == seed].iloc[0]
        assert row["final_digest"] == train(BASE.replace(seed=seed), progress=False).final_digest


def test_planted_difference_is_found_at_step_zero() -> None:
    """Varying split-independent init (the lr does not touch step 0) diverges at step 1, not 0."""
    audit = audit_determinism(BASE, seeds=[0], repeats=1, vary={"lr": [0.05, 0.1]}, progress=False)
    changed = audit[audit["changed"] == "lr"].iloc[0]
    assert not changed["identical"]
    assert changed["diverged_step"] == 1  # same initial weights, different first update


def test_results_do_not_depend_on_worker_processes() -> None:
    """jobs=2 (spawned processes) gives the same digests, in the same order, as jobs=1."""
    kwargs = {"seeds": [0, 1], "repeats": 1, "vary": {"threads": [1, 2]}, "progress": False}
    serial = audit_determinism(BASE, jobs=1, **kwargs)
    parallel = audit_determinism(BASE, jobs=2, **kwargs)
    assert serial["final_digest"].tolist() == parallel["final_digest"].tolist()
    assert serial["identical"].tolist() == parallel["identical"].tolist()


def test_seed_variance_statistics() -> None:
    """seed_variance gives mean, std and a t-based 95% interval that contains the mean."""
    audit = audit_determinism(BASE, seeds=[0, 1, 2], repeats=1, progress=False)
    stats = seed_variance(audit).iloc[0]
    values = audit["final_metric"]
    assert stats["seeds"] == 3
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std(ddof=1))
    assert stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
    assert stats["min"] == values.min() and stats["max"] == values.max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seeds": []}, "seeds is empty"),
        ({"seeds": [1, 1]}, "duplicates"),
        ({"seeds": [0], "repeats": 0}, "repeats 0"),
        ({"seeds": [0], "vary": {"seed": [1, 2]}}, "cannot vary 'seed'"),
        ({"seeds": [0], "vary": {"colour": [1]}}, "cannot vary 'colour'"),
        ({"seeds": [0], "vary": {"threads": []}}, "non-empty list"),
        ({"seeds": [0], "vary": {"threads": [0]}}, "threads 0 must be >= 1"),
        ({"seeds": [0], "jobs": 0}, "jobs 0"),
    ],
)
def test_bad_audit_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Bad seeds, repeats, factors or jobs raise ConfigError naming the value."""
    with pytest.raises(ConfigError, match=message):
        audit_determinism(BASE, progress=False, **kwargs)


def test_vary_seeds_sweeps_factors_on_a_subset_only() -> None:
    """Seeds outside vary_seeds run the base settings only; a vary seed not among seeds is refused."""
    config = TrainConfig(steps=3, threads=1)
    audit = audit_determinism(config, [0, 1, 2], 1, {"num_workers": [0, 1]}, vary_seeds=[0], progress=False)
    assert audit.groupby("seed").size().to_dict() == {0: 2, 1: 1, 2: 1}
    with pytest.raises(ConfigError, match=r"vary_seeds \[5\] are not among seeds"):
        audit_determinism(config, [0, 1], 1, {"num_workers": [0, 1]}, vary_seeds=[5], progress=False)


def test_script_audit_finds_the_thread_factor_and_identical_repeats(tmp_path: Path) -> None:
    """On the example script, repeats are bitwise identical and 2 threads split from 1 at the first
    update; the table has a config audit's columns and each row is its run directory's result."""
    audit = audit_determinism(EXAMPLE, [0], 2, {"threads": [1, 2]}, jobs=2, work_dir=tmp_path, progress=False)
    config_audit = audit_determinism(BASE, [0], 1, {"threads": [1]}, progress=False)
    assert list(audit.columns) == list(config_audit.columns)
    verdict = determinism_verdict(audit).set_index("factor")
    assert verdict.loc["repeat (same settings)", "bitwise_identical"] == "yes"
    assert verdict.loc["threads", ["base", "value", "bitwise_identical"]].tolist() == ["1", "2", "no"]
    assert verdict.loc["threads", "first_diverged_step"] == 1
    assert len(divergences(audit)) == 2 and (divergences(audit)["max_abs_diff"] > 0).all()
    assert len(audit["losses"].iloc[0]) == 45 and audit["metric"].iloc[0] == "test_accuracy"
    for row in audit.itertuples():
        (run_dir,) = tmp_path.glob(f"audit-*/seed0-threads{row.threads}-r{row.repeat}")
        assert json.loads((run_dir / "result.json").read_text())["final_digest"] == row.final_digest
        assert json.loads((run_dir / "manifest.json").read_text())["seeding"]["threads"] == row.threads


def test_audit_cli_on_a_command_exits_zero_when_repeats_agree(capsys: pytest.CaptureFixture[str]) -> None:
    """`reprokit audit -- COMMAND` prints the table and the verdict, exit 0 as repeats are identical."""
    assert main(["audit", "--seeds", "3", "--repeats", "2", "--jobs", "2", "--", *EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "repeat (same settings)" in out and "every repeat is bitwise identical" in out


@pytest.mark.parametrize(
    ("target", "vary", "error", "message"),
    [
        ("python train.py", {}, ConfigError, "is a string; pass a list of arguments"),
        ([], {}, ConfigError, "must be a non-empty list of strings"),
        (EXAMPLE, {"lr": [0.1, 0.2]}, ConfigError, r"cannot vary 'lr' for a command; .*'num_workers'"),
        (EXAMPLE, {"threads": [0]}, ConfigError, "REPROKIT_THREADS=0 is below 1"),
        ([sys.executable, "-c", "import sys; sys.exit('planted failure')"], {}, ScriptRunError,
         r"exited with status 1; the end of its stderr:\n  planted failure"),
    ],
)
def test_bad_commands_are_refused_naming_the_problem(
    target: object, vary: dict[str, list[object]], error: type[Exception], message: str
) -> None:
    """A command given as a string, a factor a command cannot vary, a bad value or a failing command
    raise an error naming the command, the value or the exit status and stderr."""
    with pytest.raises(error, match=message):
        audit_determinism(target, [0], 1, vary, progress=False)  # type: ignore[arg-type]


FIXTURES = Path(__file__).resolve().parent / "fixtures"
# the fixture's training function, and the same module run as a script
FUNCTION = "digits_function:main"
FUNCTION_SCRIPT = [sys.executable, str(FIXTURES / "digits_function.py")]


@pytest.fixture
def fixtures_importable(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tests/fixtures on this process's sys.path (the child gets it from the module's location)."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    return importlib.import_module("digits_function")


def test_function_audit_equals_the_command_audit(fixtures_importable: ModuleType, tmp_path: Path) -> None:
    """A training function gives the table its module gives run as a script: the same columns and
    digests, and 2 threads split from 1 at the first update."""
    kwargs: dict[str, Any] = {"seeds": [0], "repeats": 1, "vary": {"threads": [1, 2]}, "progress": False}
    function = audit_determinism(fixtures_importable.main, work_dir=tmp_path / "function", **kwargs)
    command = audit_determinism(FUNCTION_SCRIPT, work_dir=tmp_path / "command", **kwargs)
    assert list(function.columns) == list(command.columns)
    results = ["seed", "repeat", "threads", "changed", "final_metric", "metric", "final_digest", "identical",
               "max_abs_diff", "diverged_step", "diverged_tensors", "losses"]
    assert function[results].equals(command[results])
    verdict = determinism_verdict(function).set_index("factor")
    assert verdict.loc["threads", ["base", "value", "bitwise_identical"]].tolist() == ["1", "2", "no"]
    assert verdict.loc["threads", "first_diverged_step"] == 1
    (run_dir,) = (tmp_path / "function").glob("audit-*/seed0-threads2-r0")
    assert json.loads((run_dir / "manifest.json").read_text())["seeding"]["threads"] == 2


def test_audit_cli_on_a_function(fixtures_importable: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """`reprokit audit --function MODULE:FUNCTION` exits 0 as its repeats are bitwise identical."""
    assert main(["audit", "--function", FUNCTION, "--repeats", "2", "--jobs", "2"]) == 0
    assert "every repeat is bitwise identical" in capsys.readouterr().out
    assert main(["audit", "--function", FUNCTION, "--", *FUNCTION_SCRIPT]) == 2
    assert "pass one of --config CFG, --function" in capsys.readouterr().err


def _main_function() -> None:
    """Stands for a function defined in a notebook or the running script."""


_main_function.__module__ = "__main__"


def _nested() -> Callable[[], None]:
    def inner() -> None:
        pass

    return inner


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_module_xyz:main", r"function 'no_such_module_xyz:main': cannot import module "
                                    r"'no_such_module_xyz'.*pass 'module:function' with a module importable"),
        ("digits_function:nope", r"'digits_function' has no attribute 'nope'; pass the name of a function"),
        ("digits_function:not_callable", r"'digits_function:not_callable' is 3, which is not callable"),
        (lambda: None, r"test_audit\.<lambda> is a lambda or nested in a function.*define it at module "
                       "level"),
        (_nested(), r"test_audit\._nested\.<locals>\.inner is a lambda or nested"),
        (_main_function, r"'_main_function' is defined in __main__ .*move it into a module"),
        (functools.partial(print), r"has no __module__ and __qualname__ to import it by"),
    ],
)
def test_bad_functions_are_refused_before_any_run(
    fixtures_importable: ModuleType, tmp_path: Path, function: object, message: str
) -> None:
    """An unknown module, a missing attribute, a value that is not callable, or a callable a fresh
    process cannot import is a ConfigError naming it and the fix, raised before any run starts."""
    with pytest.raises(ConfigError, match=message):
        audit_determinism(function, [0], 1, work_dir=tmp_path, progress=False)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


CANONICAL_SCRIPT = [sys.executable, str(FIXTURES / "canonical" / "canonical_digits.py"), "unused"]  # RUN_DIR
LAUNCH_TIMEOUT = 180.0  # seconds for one torchrun launch (~6 s at 2 ranks on an idle 2-core machine)


def test_world_size_keeps_a_canonical_scripts_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The canonical-mode script at world sizes 1 (one process) and 2 (torchrun): one final digest,
    and world_size_effect says so; the 2-rank run is a torchrun run (rank 1's directory, world size 2
    in the manifest)."""
    audit = audit_determinism(CANONICAL_SCRIPT, [0], 1, {"world_size": [1, 2]}, work_dir=tmp_path,
                              timeout=LAUNCH_TIMEOUT, progress=False)
    assert audit[["world_size", "changed"]].values.tolist() == [[1, "none"], [2, "world_size"]]
    assert audit["identical"].all() and audit["final_digest"].nunique() == 1
    effect = world_size_effect(audit)
    columns = ["world_sizes", "final_digests", "bitwise_identical"]
    assert effect[columns].values.tolist() == [["1, 2", 1, "yes"]]
    (run_dir,) = tmp_path.glob("audit-*/seed0-world_size2-r0")
    assert json.loads((run_dir / "manifest.json").read_text())["distributed"]["world_size"] == 2
    assert (run_dir / "ranks" / "rank-1" / "result.json").is_file()
    # `reprokit audit --vary world_size=1,2 -- CMD` prints world_size_effect under the verdict
    monkeypatch.setattr("reprokit.audit.audit_determinism", lambda *_, **__: audit)
    assert main(["audit", "--vary", "world_size=1,2", "--", *CANONICAL_SCRIPT]) == 0
    assert re.search(r"world_sizes\s+runs\s+final_digests\s+bitwise_identical\n.*1, 2\s+2\s+1\s+yes",
                     capsys.readouterr().out)


def test_world_size_changes_a_configs_bits_in_ddp_mode_only(tmp_path: Path) -> None:
    """A config audited over world sizes 1, 2 (``reprokit train --nproc 2``) and both reduction modes:
    canonical mode gives one digest at both sizes, ddp mode two; ddp drops the config's micro_batches."""
    config = BASE.replace(model="mlp", reduction="canonical", micro_batches=4)
    audit = audit_determinism(config, [0], 1, {"world_size": [1, 2], "reduction": ["canonical", "ddp"]},
                              work_dir=tmp_path, timeout=LAUNCH_TIMEOUT, progress=False)
    assert sorted(map(tuple, audit[["world_size", "reduction"]].values.tolist())) == [
        (1, "canonical"), (1, "ddp"), (2, "canonical"), (2, "ddp")]
    effect = world_size_effect(audit).set_index("reduction")
    assert effect.loc["canonical", "bitwise_identical"] == "yes"
    assert effect.loc["ddp", ["final_digests", "bitwise_identical"]].tolist() == [2, "no"]
    (ddp_run,) = tmp_path.glob("audit-*/seed0-world_size2-reductionddp-r0")
    manifest = json.loads((ddp_run / "manifest.json").read_text())
    assert (manifest["config"]["micro_batches"], manifest["distributed"]["world_size"]) == (None, 2)


@pytest.mark.parametrize(
    ("target", "vary", "message"),
    [
        (BASE, {"world_size": [0, 2]}, r"must list numbers of ranks, ints >= 1"),
        (BASE, {"world_size": [True]}, r"must list numbers of ranks"),
        (BASE, {"world_size": [1, 3]}, r"world_size 3: global batch 32 is not divisible by world size 3"),
        (BASE, {"reduction": ["ddp", "canonical"]}, r"reduction='canonical' needs micro_batches"),
        (BASE.replace(reduction="canonical", micro_batches=8), {"world_size": [1, 16]},
         r"vary world_size 16: reduction='canonical' with 8 micro-batches cannot run at world size 16"),
        (CANONICAL_SCRIPT, {"reduction": ["canonical", "all"]}, r"a reduction mode is 'ddp' or 'canonical'"),
        (CANONICAL_SCRIPT, {"micro_batches": [0]}, r"REPROKIT_MICRO_BATCHES=0 is below 1"),
        (CANONICAL_SCRIPT, {"lr": [0.1]}, r"cannot vary 'lr' for a command.*the audit's own \['world_size'"),
    ],
)
def test_bad_world_factors_are_refused_before_any_run(target: object, vary: dict[str, list[object]],
                                                      message: str) -> None:
    """A world size that is no number of ranks or does not split the batch (or the micro-batches), a
    canonical mode without micro-batches and a bad reduction value are refused before any run."""
    with pytest.raises(ConfigError, match=message):
        audit_determinism(target, [0], 1, vary, progress=False)  # type: ignore[arg-type]
