"""Script runs: the environment a command gets, and the errors of one that does not behave."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from reprokit.entrypoint import EntryPoint, EntryPointError
from reprokit.errors import ConfigError
from reprokit.relaunch import run_recorded, trusting, untrusted_reasons
from reprokit.scriptruns import (
    ScriptRunError,
    command_env,
    function_command,
    kill_command,
    read_script_run,
    resolve_command,
    run_command,
    steps_done,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_command_env_sets_the_contract_and_drops_inherited_kill_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child gets the run dir, seed and factors as REPROKIT_* values, and none of the parent's."""
    monkeypatch.setenv("REPROKIT_CRASH_AT_STEP", "3")
    monkeypatch.setenv("REPROKIT_LEDGER", str(tmp_path / "ledger.sqlite"))  # not part of the contract
    env = command_env(tmp_path / "run", seed=7, factors={"threads": 2, "deterministic": False})
    assert "REPROKIT_CRASH_AT_STEP" not in env
    assert env["REPROKIT_LEDGER"] == str(tmp_path / "ledger.sqlite")
    assert (env["REPROKIT_RUN_DIR"], env["REPROKIT_SEED"]) == (str((tmp_path / "run").resolve()), "7")
    assert [env[f"REPROKIT_{k}"] for k in ("THREADS", "DETERMINISTIC", "PROGRESS")] == ["2", "0", "0"]
    with pytest.raises(ConfigError, match="REPROKIT_NUM_WORKERS=-1 is below 0"):
        command_env(tmp_path / "run", factors={"num_workers": -1})


def test_a_command_that_is_not_killed_is_reported_with_its_status(tmp_path: Path) -> None:
    """A command that should die of SIGKILL but exits is an error naming its status and stderr."""
    command = [sys.executable, "-c", "import sys; print('no kill point here', file=sys.stderr)"]
    with pytest.raises(ScriptRunError, match=r"killed at its kill point, but .* exited with status 0; "
                                             r"the end of its stderr:\n  no kill point here"):
        kill_command(command, command_env(tmp_path / "run"), timeout=60)


def test_unfinished_run_and_steps_on_disk(tmp_path: Path) -> None:
    """steps_done counts step rows only; an unfinished run directory is not a finished script run."""
    run = tmp_path / "run"
    run.mkdir()
    assert steps_done(run) == 0
    (run / "metrics.csv").write_text("step,epoch,loss,kind\n0,0,,init\n1,0,2.3,step\n2,0,2.2,step\n"
                                     "2,0,,log\n")
    assert steps_done(run) == 2
    with pytest.raises(ScriptRunError, match=r"has no result\.json: the command did not finish"):
        read_script_run(run)


def test_function_command_imports_the_function_by_name_in_a_fresh_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A function and its 'module:function' name give one `python -c` command, which puts the
    module's directory on the child's sys.path and calls the function with no arguments."""
    fixtures = Path(__file__).resolve().parent / "fixtures"
    monkeypatch.syspath_prepend(str(fixtures))
    module = importlib.import_module("digits_function")
    command = function_command(module.main)
    assert command == function_command("digits_function:main") == resolve_command(module.main)
    assert command[:2] == [sys.executable, "-c"]
    assert f"sys.path.insert(0, {str(fixtures)!r})" in command[2] and command[2].endswith("target()\n")
    assert resolve_command(["python", "train.py"]) == ["python", "train.py"]


def test_a_callable_whose_name_imports_another_object_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A callable whose __module__ and __qualname__ name another object (a copy, a rebinding) would
    run other code in the child: refused, naming it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "fixtures"))

    def impostor() -> None:
        pass

    impostor.__module__, impostor.__qualname__ = "digits_function", "main"
    with pytest.raises(ConfigError, match=r"'digits_function:main' imports as another object than the one "
                                          "passed; pass the module-level function itself"):
        function_command(impostor)


def test_a_python_c_run_records_its_program_and_runs_again(tmp_path: Path) -> None:
    """`python -c CODE` records the program (digest = its bytes'), so `command()` starts it again;
    a REPL-like entry (no script, no code) still says why it cannot."""
    code = ("import json, sys\nfrom reprokit.entrypoint import entry_point\n"
            "print(json.dumps(entry_point().to_dict()))\n")
    out = subprocess.run([sys.executable, "-c", code, "--epochs", "2"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    entry = EntryPoint(**json.loads(out))
    assert entry.code == code and entry.script is None and entry.argv == ["-c", "--epochs", "2"]
    assert entry.script_digest == xxhash.xxh3_128_hexdigest(code.encode())
    assert entry.command() == [sys.executable, "-c", code, "--epochs", "2"]
    again = subprocess.run(entry.command(), capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert json.loads(again)["code"] == code
    with pytest.raises(EntryPointError, match="not started from a script"):
        dataclasses.replace(entry, code=None).command()


def test_a_killed_function_run_resumes_from_its_recorded_command(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A function run (`python -c` importing it) killed at step 6 is finished by `reprokit resume`'s
    re-execution of the recorded command, with the uninterrupted run's final digest."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("REPROKIT_LEDGER", str(tmp_path / "ledger.sqlite"))
    command = function_command("digits_function:main")
    reference = run_command(command, command_env(tmp_path / "reference"))
    killed = tmp_path / "killed"
    kill_command(command, command_env(killed, extra={"REPROKIT_CRASH_AT_STEP": "6"}))
    assert steps_done(killed) == 5
    with pytest.raises(EntryPointError, match=r"(?s)not running .* runs a .python -c. program the run"):
        run_recorded(killed, killed, echo=False)
    with trusting():
        assert run_recorded(killed, killed, echo=False) == 0
    resumed = read_script_run(killed)
    assert resumed.final_digest == reference.final_digest
    assert json.loads((killed / "result.json").read_text())["resumed_from_step"] == 4


def test_recorded_code_outside_the_project_needs_a_yes(tmp_path: Path) -> None:
    """A script in the project, and this interpreter, run without asking; a script elsewhere, a
    foreign interpreter or a `-c` program are each named as a reason."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "src").mkdir()
    entry = EntryPoint(sys.executable, ["train.py"], str(project), str(project / "src" / "train.py"), "d")
    assert untrusted_reasons(entry, project) == []
    elsewhere = dataclasses.replace(entry, script=str(tmp_path / "evil.py"))
    assert untrusted_reasons(elsewhere, project) == [f"its script {tmp_path / 'evil.py'} lies outside this "
                                                     f"project ({project})"]
    foreign = dataclasses.replace(entry, interpreter="/opt/other/python")
    assert "its interpreter /opt/other/python is not this one" in untrusted_reasons(foreign, project)[0]
    code = dataclasses.replace(entry, script=None, code="print(1)")
    assert untrusted_reasons(code, project) == ["it runs a `python -c` program the run directory recorded"]
