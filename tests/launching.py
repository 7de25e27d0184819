"""Launching a test's subprocess that may start torchrun and its ranks: a clean environment, a new
session, and a deadline that kills the whole process group (torchrun and every rank) when it passes.

Imported by the multi-process tests (pytest puts tests/ on ``sys.path``: the directory has no
``__init__.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(nproc: int, *, restarts: int | None = None) -> list[str]:
    """``torchrun --standalone`` with ``nproc`` ranks (a free port each time: never a fixed one)."""
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node",
               str(nproc)]
    return command if restarts is None else [*command, "--max-restarts", str(restarts)]


def launch(command: Sequence[str], *, deadline: float,
           env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``command`` from the repository root, without the caller's torchrun or ``REPROKIT_*``
    variables and with ``env`` added: its exit status and output (stderr within). Past
    ``deadline`` seconds the process group is killed and the test fails with the output so far."""
    environ = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("REPROKIT_")}
    proc = subprocess.Popen(list(command), cwd=REPO, text=True,
                            env={**environ, "REPROKIT_PROGRESS": "0", **(env or {})},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        output, _ = proc.communicate()
        pytest.fail(f"the launch did not finish in {deadline} s:\n{output}")
    return proc.returncode, output
