"""Runs of a user's command: one subprocess per run, driven through the environment contract and
read back from the run directory it leaves.

The harnesses (the audit, the fault matrix) start a user's training script as it is, with
``REPROKIT_RUN_DIR``, the seed and the varied factors set through the variables of
:mod:`reprokit.overrides`, and read the finished run (result.json, digests.csv, model.pt,
metrics.csv) into a :class:`ScriptRun`, which has the fields they read from a built-in run's
:class:`~reprokit.trainer.RunResult`. A user's training function runs the same way, as the command
:func:`function_command` builds for it.
"""

from __future__ import annotations

import csv
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from reprokit.errors import ConfigError, ReprokitError
from reprokit.overrides import VARIABLES, read_overrides
from reprokit.rundir import MANIFEST, METRICS, RESULT, read_digests, read_json, read_metrics, read_model

# the factors a harness can vary on a command, and the variable each is passed in
FACTOR_VARIABLES = {"threads": "REPROKIT_THREADS", "deterministic": "REPROKIT_DETERMINISTIC",
                    "num_workers": "REPROKIT_NUM_WORKERS", "seed.init": "REPROKIT_SEED_INIT",
                    "seed.data_order": "REPROKIT_SEED_DATA_ORDER",
                    "seed.augmentation": "REPROKIT_SEED_AUGMENTATION",
                    "seed.dropout": "REPROKIT_SEED_DROPOUT"}  # a factor -> the variable that sets it
DEFAULT_TIMEOUT = 600.0  # seconds a run may take before it is stopped and reported
_TAIL = 12  # lines of a failed command's stderr put in the error
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # "module:function"


class ScriptRunError(ReprokitError):
    """A user's command failed, ran too long, or left no finished run."""


@dataclass(frozen=True)
class ScriptRun:
    """A finished run of a user's command, read from its run directory."""

    run_dir: Path
    final_digest: str
    final_metric: float
    metric_name: str | None
    steps: int
    seconds: float  # as result.json says: from ``Run(...)`` to ``finish()``, start-up excluded
    threads: int | None  # the intra-op threads the run pinned (manifest seeding)

    @cached_property
    def losses(self) -> list[float]:
        """The loss per step, step 0 (the initial model, no loss) first: as ``RunResult.losses``."""
        frame = read_metrics(self.run_dir)
        if "kind" in frame:
            frame = frame[frame["kind"].isin(["init", "step"]) | frame["kind"].isna()]
        return [float(x) for x in frame.sort_values("step", kind="stable")["loss"]]

    @cached_property
    def tensor_digests(self) -> list[tuple[int, dict[str, str]]]:
        return read_digests(self.run_dir)

    @cached_property
    def final_state(self) -> dict[str, torch.Tensor]:
        return read_model(self.run_dir)


def read_script_run(run_dir: str | Path) -> ScriptRun:
    """The finished run in ``run_dir`` (:class:`ScriptRunError` if it did not finish)."""
    path = Path(run_dir)
    if not (path / RESULT).is_file():
        raise ScriptRunError(f"{str(path)!r} has no {RESULT}: the command did not finish a reprokit.Run "
                             "there; does the script construct reprokit.Run and call run.finish()?")
    result = read_json(path, RESULT)
    seeding = read_json(path, MANIFEST).get("seeding") or {}
    return ScriptRun(path, str(result["final_digest"]), float(result["final_metric"]),
                     result.get("metric_name"), int(result["steps"]), float(result.get("seconds", 0.0)),
                     seeding.get("threads"))


def resolve_command(target: Sequence[str] | str | Callable[[], object]) -> list[str]:
    """The command that runs ``target``: a command as it is, a function (``"module:function"`` or
    an importable callable) as :func:`function_command` starts it."""
    if callable(target) or (isinstance(target, str) and _FUNCTION.fullmatch(target)):
        return function_command(target)
    return check_command(target)


def check_command(command: Any) -> list[str]:
    """``command`` as a list of strings, or :class:`ConfigError` saying how to pass it."""
    if isinstance(command, str):
        raise ConfigError(f"command {command!r} is a string; pass a list of arguments, e.g. "
                          f"shlex.split({command!r}), or a function as 'module:function'")
    if not isinstance(command, Sequence) or not command or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"command {command!r} must be a non-empty list of strings, e.g. "
                          "[sys.executable, 'train.py', '--epochs', '1']")
    return list(command)


def function_command(function: str | Callable[[], object]) -> list[str]:
    """``[sys.executable, "-c", CODE]``: a fresh interpreter that imports ``function`` and calls it
    with no arguments, so a training function runs under the environment contract as a script does.

    ``function`` is ``"module:qualname"`` or a callable whose ``__module__`` and ``__qualname__``
    import it. It is imported here, so an unknown module, a missing attribute or a value that is
    not callable is a :class:`ConfigError` before any run starts. The directory it was imported
    from goes first on the child's ``sys.path`` (as a script's directory does) unless already there.
    """
    spec = _function_spec(function)
    module_name, _, qualname = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"function {spec!r}: cannot import module {module_name!r} ({e}); pass "
                          "'module:function' with a module importable from this process's sys.path") from e
    value: Any = module
    for part in qualname.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"function {spec!r}: {module_name!r} has no attribute {qualname!r}; "
                              f"pass the name of a function defined in {module_name!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"function {spec!r} is {value!r}, which is not callable; pass a function "
                          "that takes no arguments and trains with reprokit.Run")
    if callable(function) and value is not function and value != function:  # a classmethod binds anew
        raise ConfigError(f"function {spec!r} imports as another object than the one passed; pass "
                          "the module-level function itself, or 'module:function'")
    root = _import_root(module)
    code = ("import importlib, sys\n"
            + (f"if {root!r} not in sys.path: sys.path.insert(0, {root!r})\n" if root else "")
            + f"target = importlib.import_module({module_name!r})\n"
            + f"for name in {qualname!r}.split('.'): target = getattr(target, name)\n"
            + "target()\n")
    return [sys.executable, "-c", code]


def _function_spec(function: str | Callable[[], object]) -> str:
    """``"module:qualname"`` of a function given either way; a callable the child could not
    import by name is a :class:`ConfigError` naming it and the fix."""
    if isinstance(function, str):
        if not _FUNCTION.fullmatch(function):
            raise ConfigError(f"function {function!r} is not 'module:function'; pass e.g. "
                              "'mypkg.train:main'")
        return function
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ConfigError(f"function {function!r} has no __module__ and __qualname__ to import it by; "
                          "pass a module-level function, or 'module:function'")
    if "<" in qualname:  # <lambda>, or <locals> of a nested function
        raise ConfigError(f"function {module}.{qualname} is a lambda or nested in a function, which a "
                          "fresh process cannot import; define it at module level and pass it, or "
                          "'module:function'")
    if module == "__main__":
        raise ConfigError(f"function {qualname!r} is defined in __main__ (a notebook or the running "
                          "script), which a fresh process cannot import; move it into a module and pass "
                          "it, or 'module:function'")
    return f"{module}:{qualname}"


def _import_root(module: Any) -> str | None:
    """The ``sys.path`` directory ``module`` was imported from (None: not from a file)."""
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = Path(path).resolve().parent
    levels = module.__name__.count(".") + (Path(path).name == "__init__.py")
    for _ in range(levels):
        root = root.parent
    return str(root)


def factor_variable(name: str) -> str:
    """The ``REPROKIT_*`` variable that sets factor ``name`` in a command."""
    if name not in FACTOR_VARIABLES:
        raise ConfigError(f"cannot vary {name!r} for a command; a command varies only "
                          f"{list(FACTOR_VARIABLES)} (through {', '.join(FACTOR_VARIABLES.values())})")
    return FACTOR_VARIABLES[name]


def command_env(run_dir: str | Path, *, seed: int | None = None, factors: Mapping[str, Any] | None = None,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ``REPROKIT_*`` contract variables, plus the run
    directory, seed, factors and ``extra``; a value the contract refuses is a :class:`ConfigError`."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update({"REPROKIT_RUN_DIR": str(Path(run_dir).resolve()), "REPROKIT_PROGRESS": "0"})
    if seed is not None:
        env["REPROKIT_SEED"] = str(seed)
    for name, value in (factors or {}).items():
        env[factor_variable(name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    env.update(extra or {})
    read_overrides(env)  # refuses a bad value now, naming the variable, not in every child
    return env


def run_command(command: Sequence[str], env: Mapping[str, str], *,
                timeout: float = DEFAULT_TIMEOUT) -> ScriptRun:
    """Run ``command`` to the end with ``env`` and read the run it finished."""
    run_dir = env["REPROKIT_RUN_DIR"]
    try:
        proc = subprocess.run(list(command), env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ScriptRunError(f"`{shlex.join(command)}` (run dir {run_dir}) ran longer than {timeout:g} s and "
                             "was stopped; pass a larger timeout, or a shorter run") from None
    if proc.returncode != 0:
        raise ScriptRunError(failure(command, proc.returncode, proc.stderr, run_dir))
    return read_script_run(run_dir)


def failure(command: Sequence[str], status: int, stderr: str, run_dir: str | Path) -> str:
    """The error of a command that exited with ``status``: the command, the status, stderr's tail."""
    how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
    tail = stderr.strip().splitlines()[-_TAIL:] or ["(nothing on stderr)"]
    return (f"`{shlex.join(command)}` (run dir {run_dir}) {how}; the end of its stderr:\n  "
            + "\n  ".join(tail))


def steps_done(run_dir: str | Path) -> int:
    """How many optimizer-step rows of ``run_dir``'s metrics.csv have reached the disk so far."""
    try:
        with open(Path(run_dir) / METRICS, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        return 0
    if not rows or "kind" not in rows[0]:
        return 0
    kind = rows[0].index("kind")
    return sum(1 for r in rows[1:] if len(r) > kind and r[kind] == "step")


def kill_command(command: Sequence[str], env: Mapping[str, str], *, after_step: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``command`` until it dies of SIGKILL: by its own kill point (``env`` sets
    ``REPROKIT_CRASH_*``), or with ``after_step`` from outside, as soon as metrics.csv holds that
    many steps. Anything else (it finishes, fails, outlives ``timeout``) is a :class:`ScriptRunError`."""
    run_dir = env["REPROKIT_RUN_DIR"]
    deadline = time.monotonic() + timeout
    # stderr to a file, not a pipe: a pipe nobody reads while we poll would stall a chatty child
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.DEVNULL, stderr=err)
        try:
            if after_step is not None:
                while (proc.poll() is None and steps_done(run_dir) < after_step
                       and time.monotonic() < deadline):
                    time.sleep(0.005)
                if proc.poll() is None and time.monotonic() < deadline:
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ScriptRunError(f"`{shlex.join(command)}` (run dir {run_dir}) ran longer than {timeout:g} "
                                 "s without being killed; pass a larger timeout, or a kill point it "
                                 "reaches") from None
        err.seek(0)
        stderr = err.read()
    if proc.returncode != -signal.SIGKILL:
        where = f"after step {after_step}" if after_step is not None else "at its kill point"
        raise ScriptRunError(f"the run was to be killed {where}, but " + failure(command, proc.returncode,
                                                                                  stderr, run_dir))
