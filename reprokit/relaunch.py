"""Run a script run's recorded command again: to finish it (``reprokit resume``) or to reproduce it
into a new directory (``reprokit reproduce``).

The command is the one the manifest recorded (interpreter, script or ``-m`` module, argv, cwd),
started without a shell, with ``REPROKIT_RUN_DIR`` naming the run directory, so the script's
``reprokit.Run`` continues it (relaunch = resume) or starts the reproduction there. Resume refuses
when the script's bytes changed since the run started, unless forced.

A run directory can come from someone else, and its manifest names the code to run. So a recorded
command runs without asking only when its script lies in the current project (the git checkout
holding the working directory, else the working directory) and its interpreter is this one or one
in the project; otherwise (a script elsewhere, a ``python -c`` program, a foreign interpreter) it is
shown and needs a yes: typed at a terminal, ``--yes`` on the command line, or :func:`trusting`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from reprokit.entrypoint import EntryPoint, EntryPointError, file_bytes_digest
from reprokit.rundir import MANIFEST, read_json


def is_script_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run of a user's script (``reprokit.Run``), not the built-in trainer."""
    return read_json(run_dir, MANIFEST).get("kind") == "script"


def recorded_entry(run_dir: str | Path) -> EntryPoint:
    """The entry point the run's manifest recorded."""
    entry = read_json(run_dir, MANIFEST).get("entry")
    if not isinstance(entry, dict):
        raise EntryPointError(f"{str(Path(run_dir) / MANIFEST)!r} records no entry point; it was not "
                              "written by reprokit.Run")
    if not isinstance(entry.get("code"), str | None):
        raise EntryPointError(f"{str(Path(run_dir) / MANIFEST)!r}: its entry point's code is "
                              f"{type(entry['code']).__name__}, not a program text")
    try:
        return EntryPoint(interpreter=str(entry["interpreter"]), argv=[str(a) for a in entry["argv"]],
                          cwd=str(entry["cwd"]), script=entry.get("script"),
                          script_digest=entry.get("script_digest"), module=entry.get("module"),
                          code=entry.get("code"))
    except (KeyError, TypeError) as e:
        raise EntryPointError(f"{str(Path(run_dir) / MANIFEST)!r}: its entry point lacks {e}") from e


def script_changes(entry: EntryPoint) -> list[str]:
    """Why the recorded script would not run the same code now (empty: it would)."""
    if entry.script is None:
        return []
    path = Path(entry.script)
    if not path.is_file():
        return [f"the script {entry.script!r} is gone"]
    now = file_bytes_digest(path)
    return [] if now == entry.script_digest else [
        f"entry.script_digest: {entry.script_digest} -> {now} ({entry.script} was edited)"]


_TRUSTED: list[bool] = []  # inside trusting()


@contextlib.contextmanager
def trusting() -> Iterator[None]:
    """Run recorded commands without asking inside this block (what the CLI's ``--yes`` does)."""
    _TRUSTED.append(True)
    try:
        yield
    finally:
        _TRUSTED.pop()


def project_root(cwd: Path | None = None) -> Path:
    """The current project: the git checkout holding ``cwd`` (default: the working directory), else it."""
    here = (cwd or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / ".git").exists()), here)


def untrusted_reasons(entry: EntryPoint, project: Path | None = None) -> list[str]:
    """Why running ``entry``'s command needs a yes (empty: its code lies in the current project)."""
    root = project or project_root()
    reasons = []
    interpreter = Path(entry.interpreter).resolve()
    if interpreter != Path(sys.executable).resolve() and not interpreter.is_relative_to(root):
        reasons.append(f"its interpreter {entry.interpreter} is not this one ({sys.executable}) and lies "
                       f"outside this project ({root})")
    if entry.code is not None:
        reasons.append("it runs a `python -c` program the run directory recorded")
    elif entry.module is not None and not Path(entry.cwd).resolve().is_relative_to(root):
        reasons.append(f"it runs module {entry.module!r} from {entry.cwd}, outside this project ({root})")
    elif entry.script is not None and not Path(entry.script).resolve().is_relative_to(root):
        reasons.append(f"its script {entry.script} lies outside this project ({root})")
    return reasons


def _consent(entry: EntryPoint, command: list[str]) -> None:
    reasons = untrusted_reasons(entry)
    if not reasons or _TRUSTED:
        return
    shown = f"`{shlex.join(command)}` in {entry.cwd}"
    if sys.stdin.isatty() and sys.stderr.isatty():
        print(f"reprokit: the run directory asks to run {shown}: {'; '.join(reasons)}", file=sys.stderr)
        if input("run it? [y/N] ").strip().lower() in ("y", "yes"):
            return
    raise EntryPointError(f"not running {shown}, which the run directory names: {'; '.join(reasons)}; "
                          "check it, then pass --yes (in Python: `with reprokit.relaunch.trusting():`)")


def run_recorded(run_dir: str | Path, target: str | Path, *, force: bool = False,
                 env: dict[str, str] | None = None, echo: bool = True) -> int:
    """Start the command recorded in ``run_dir``'s manifest with ``REPROKIT_RUN_DIR=target``;
    return its exit status. Refuses (:class:`EntryPointError`) a changed script unless ``force``,
    and code outside the current project unless the user says yes (see the module docstring)."""
    entry = recorded_entry(run_dir)
    changes = script_changes(entry)
    if changes and not force:
        raise EntryPointError(f"{'; '.join(changes)}; running it would not reproduce the run's code: "
                              "restore the script, or pass --force (recorded in the manifest)")
    command = entry.command()
    _consent(entry, command)
    if not Path(entry.cwd).is_dir():
        raise EntryPointError(f"the run's working directory {entry.cwd!r} is gone; recreate it or run "
                              f"the command yourself: {' '.join(command)}")
    recorded = _recorded_overrides(run_dir)
    child_env = {**os.environ, **recorded, **(env or {}), "REPROKIT_RUN_DIR": str(Path(target).resolve())}
    if force:
        child_env["REPROKIT_FORCE"] = "1"
    if echo:
        print(f"running in {entry.cwd}: {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=entry.cwd, env=child_env, check=False).returncode


# REPROKIT_* values the first process ran with that a re-execution must have too (not the kill
# points, which fire in a run's first process only, nor the run directory, progress or force)
_REAPPLIED = ("seed", "seed_init", "seed_data_order", "seed_augmentation", "seed_dropout", "threads",
              "deterministic", "num_workers", "digest_every", "trace_every",
              "checkpoint_every", "flip_bit", "reduction", "micro_batches")


def _recorded_overrides(run_dir: str | Path) -> dict[str, str]:
    recorded = read_json(run_dir, MANIFEST).get("overrides") or {}
    env = {}
    for key in _REAPPLIED:
        value = recorded.get(key) if isinstance(recorded, dict) else None
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, list):  # flip_bit: (tensor, element, bit)
            value = ":".join(str(v) for v in value)
        if value is not None:
            env[f"REPROKIT_{key.upper()}"] = str(value)
    return env
