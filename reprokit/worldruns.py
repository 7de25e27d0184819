"""Runs at a world size: a user's command under ``torchrun --standalone --nproc-per-node N``, or the
built-in trainer as ``reprokit train --nproc N``, read back like any command's run.

The harnesses (the audit's ``world_size`` factor) launch them; one process (N = 1) is the command as
it is (:func:`reprokit.scriptruns.run_command`), as ``--nproc 1`` trains in its own process. A launch
runs in its own session: past the timeout the whole session, torchrun and every rank, is killed, so
no rank is left waiting in a collective until the process-group timeout.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from reprokit.config import TrainConfig
from reprokit.overrides import VARIABLES
from reprokit.scriptruns import (
    DEFAULT_TIMEOUT,
    ScriptRun,
    ScriptRunError,
    failure,
    read_script_run,
    run_command,
)

__all__ = ["launch_command", "launch_training"]

# torchrun's variables of a process that is itself a rank: a launched torchrun must not inherit them
_DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def launch_command(command: Sequence[str], env: Mapping[str, str], world_size: int, *,
                   timeout: float = DEFAULT_TIMEOUT) -> ScriptRun:
    """Run ``command`` (its run directory in ``env``'s ``REPROKIT_RUN_DIR``) at ``world_size`` ranks:
    as it is in one process, else under torchrun (``--no-python``: the command's own interpreter and
    arguments, a script, ``-m`` or ``-c`` alike; ``--standalone``: a free port, never a fixed one)."""
    if world_size == 1:
        return run_command(command, env, timeout=timeout)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(world_size), "--no-python"]
    environ = {k: v for k, v in env.items() if k not in _DIST_VARIABLES}
    return _launch([*torchrun, *command], environ, Path(env["REPROKIT_RUN_DIR"]), timeout)


def launch_training(config: TrainConfig, run_dir: Path, world_size: int, *,
                    timeout: float = DEFAULT_TIMEOUT) -> ScriptRun:
    """``reprokit train --config RUN_DIR.json --run-dir RUN_DIR --nproc N`` to the end (the config
    written beside the run directory), read back from the run directory."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.with_name(f"{run_dir.name}.json")
    config_file.write_text(json.dumps(config.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k not in _DIST_VARIABLES}
    return _launch([sys.executable, "-m", "reprokit", "train", "--config", str(config_file), "--run-dir",
                    str(run_dir), "--nproc", str(world_size)], {**env, "REPROKIT_PROGRESS": "0"}, run_dir,
                   timeout)


def _launch(command: list[str], env: Mapping[str, str], run_dir: Path, timeout: float) -> ScriptRun:
    environ = {"OMP_NUM_THREADS": "1", **env}  # what torchrun sets anyway, without its warning
    proc = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ScriptRunError(f"`{shlex.join(command)}` (run dir {run_dir}) ran longer than {timeout:g} s and "
                             "was stopped with every rank; pass a larger timeout, or a shorter run") from None
    if proc.returncode != 0:
        raise ScriptRunError(failure(command, proc.returncode, stderr, run_dir))
    return read_script_run(run_dir)
