"""One writer per run directory: a second writer is refused by name, a killed one leaves no lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reprokit.errors import RunDirError, RunLockedError
from reprokit.runlock import LOCK_FILE, RunLock, holder

# a child that takes the lock, says so, and holds it until its stdin closes (or it is killed);
# with "wait" it first waits for a "go" line, so that two children try at the same moment
_CHILD = """
import sys
from reprokit.errors import RunLockedError
from reprokit.runlock import RunLock
if sys.argv[2] == "wait":
    print("ready", flush=True)
    sys.stdin.readline()
try:
    lock = RunLock(sys.argv[1]).acquire()
except RunLockedError as e:
    print("lost", e, flush=True)
    sys.exit(3)
print("won", flush=True)
sys.stdin.read()
"""


def _child(run_dir: Path, mode: str = "now") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _holding_child(run_dir: Path) -> subprocess.Popen[str]:
    child = _child(run_dir)
    assert child.stdout is not None and child.stdout.readline().strip() == "won"
    return child


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """While a child holds the lock, the parent's acquire raises naming the child's pid and host."""
    child = _holding_child(tmp_path / "run")
    try:
        pattern = f"in use by pid {child.pid} on host {socket.gethostname()} since .*; wait for it"
        with pytest.raises(RunLockedError, match=pattern):
            RunLock(tmp_path / "run").acquire()
        assert (holder(tmp_path / "run") or {}).get("pid") == child.pid
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    """After SIGKILL of the holder the lock is free at once, and readers see no holder."""
    child = _holding_child(tmp_path / "run")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert holder(tmp_path / "run") is None  # the record is still there; its pid is dead
    with RunLock(tmp_path / "run") as lock:
        assert holder(tmp_path / "run") == holder(lock.run_dir)
        assert (holder(tmp_path / "run") or {}).get("pid") == os.getpid()
    assert holder(tmp_path / "run") is None  # released: the record is cleared


def test_two_concurrent_writers_exactly_one_wins(tmp_path: Path) -> None:
    """Two processes acquiring at the same moment: one holds the lock, the other is refused by name."""
    children = [_child(tmp_path / "run", "wait") for _ in range(2)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        said = [child.stdout.readline() for child in children if child.stdout is not None]
        assert sorted(line.split()[0] for line in said) == ["lost", "won"]
        winner = children[[line.split()[0] for line in said].index("won")]
        assert f"in use by pid {winner.pid} on host" in next(line for line in said if line.startswith("lost"))
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_same_process_second_lock_is_refused_until_the_first_goes(tmp_path: Path) -> None:
    """A second open RunLock of the same directory in one process is refused; once the first is
    released, or dropped unreleased (a notebook's re-run cell), the second acquires."""
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} .*release the earlier Run"):
        RunLock(tmp_path / "alias").acquire()
    first.release()
    second = RunLock(tmp_path / "alias").acquire()
    cycle: list[object] = [second]
    cycle.append(cycle)  # only the cycle collector frees it
    del second, cycle
    RunLock(tmp_path / "run").acquire().release()


def test_acquire_is_reentrant_and_release_idempotent(tmp_path: Path) -> None:
    """Acquiring one RunLock twice needs two releases; extra releases do nothing."""
    lock = RunLock(tmp_path)
    with lock, lock:
        pass
    lock.acquire()
    lock.acquire()
    lock.release()
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()
    lock.release()
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_a_forked_child_shares_the_lock_and_cannot_drop_it(tmp_path: Path) -> None:
    """A forked child (a DataLoader worker) releasing its copy leaves the parent's lock held."""
    lock = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # the child: release and leave without running the parent's cleanup
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    other = _child(tmp_path)
    try:
        assert other.stdout is not None and other.stdout.readline().startswith("lost")
    finally:
        other.kill()
        other.wait()
    lock.release()


def test_the_record_names_this_process(tmp_path: Path) -> None:
    """The lock file records pid, host, an ISO start time and the command line."""
    with RunLock(tmp_path / "new" / "run"):
        record = holder(tmp_path / "new" / "run")
        assert record is not None
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        assert record["argv"] == sys.argv
        assert abs(datetime.now(UTC) - datetime.fromisoformat(record["since"])) < timedelta(minutes=1)


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    """A run directory whose .lock links elsewhere does not make us open, lock or truncate the target."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(outside)
    with pytest.raises(RunDirError, match="cannot open the lock file"):
        RunLock(run_dir).acquire()
    assert outside.read_text() == "keep me"
    assert holder(run_dir) is None


def test_garbage_in_the_lock_file_does_not_break_readers(tmp_path: Path) -> None:
    """A lock file holding junk (or another host's record) gives None or that record, never an error."""
    (tmp_path / LOCK_FILE).write_bytes(b"\xff[[[")
    assert holder(tmp_path) is None
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere", "argv": "not a list"}')
    assert holder(tmp_path) == {"pid": 1, "host": "elsewhere", "argv": []}
    RunLock(tmp_path).acquire().release()  # an unlocked file with junk is simply taken over


def test_an_unusable_run_directory_is_a_run_dir_error(tmp_path: Path) -> None:
    """A run directory below a file, or a .lock that is a directory, is a RunDirError, not an OSError."""
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=r"file/run/.lock: cannot open the lock file \(Not a directory\)"):
        RunLock(tmp_path / "file" / "run").acquire()
    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"cannot open the lock file \(Is a directory\)"):
        RunLock(tmp_path / "run").acquire()
