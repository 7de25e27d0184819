"""reprokit.worldruns: a launch past its timeout is killed with everything it started (torchrun's
ranks are its children), and the error names the command and the limit. The launches themselves
are tested through the audit's world_size factor (tests/test_audit.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from reprokit.scriptruns import ScriptRunError
from reprokit.worldruns import _launch

# a parent that starts a child which outlives it unless its session is killed, then waits
_TREE = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
         "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(60)")


def test_a_launch_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    """Past the timeout the launch's whole session dies (the child it started included)."""
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(ScriptRunError, match=r"ran longer than 2 s and was stopped with every rank"):
        _launch([sys.executable, "-c", _TREE, str(pid_file)], dict(os.environ), tmp_path, 2.0)
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(100):  # the killed child is reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child} outlived the killed launch")
