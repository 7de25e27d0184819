"""The checkout's state from fewer git calls: every field equal to what the six separate calls gave."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from reprokit import checkout
from reprokit.checkout import CodeState, code_state


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout (git will not look above tmp_path) with two committed files, one in a subdirectory."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    _git(project, "-c", "init.defaultBranch=main", "init", "-q")
    (project / "train.py").write_text("lr = 0.05\n")
    (project / "pkg" / "model.py").write_text("width = 8\n")
    _git(project, "add", ".")
    _git(project, "commit", "-q", "-m", "first")
    return project


def _git(repo: Path, *args: str) -> str:
    run = subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t",
                          *args], capture_output=True, text=True, check=True)
    return run.stdout.strip()


def _call(repo: Path | str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False, env=env,
                          stdin=subprocess.DEVNULL)


def _reference(repo: Path) -> CodeState:
    """The state as the six separate git calls recorded it before (reprokit 508c27d)."""
    top_run = _call(repo, "rev-parse", "--show-toplevel")
    assert top_run.returncode == 0
    top = top_run.stdout.decode().strip()
    assert _call(repo, "check-ignore", "-q", ".").returncode != 0
    head = _call(top, "rev-parse", "--verify", "-q", "HEAD")
    commit = head.stdout.decode().strip() if head.returncode == 0 else None
    branch_run = _call(top, "symbolic-ref", "--short", "-q", "HEAD")
    branch = branch_run.stdout.decode().strip() if branch_run.returncode == 0 else None
    base = commit or _call(top, "hash-object", "-t", "tree", "--stdin").stdout.decode().strip()
    diff = _call(top, "diff", base, "--binary", "--no-color", "--no-ext-diff", "--no-textconv").stdout
    untracked = _call(top, "ls-files", "--others", "--exclude-standard", "-z").stdout
    return CodeState(commit=commit, branch=branch, dirty=bool(diff),
                     diff_digest=xxhash.xxh3_128_hexdigest(diff) if diff else None,
                     diff=diff.decode("utf-8", "surrogateescape"), untracked=untracked.count(b"\0"), repo=top)


def _edit(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _nested_repository(r: Path) -> None:
    _edit(r / "vendor" / "lib.py", "x = 1\n")
    _git(r / "vendor", "init", "-q")


def _binary_rename_and_spaces(r: Path) -> None:
    _git(r, "mv", "train.py", "? renamed train.py")  # an original path that looks like an untracked entry
    (r / "pkg" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    _git(r, "add", "pkg/weights.bin")
    _edit(r / "new dir" / "a b.txt", "untracked\n")


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "clean": lambda r: None,
    "edited": lambda r: _edit(r / "train.py", "lr = 0.1\n"),
    "staged": lambda r: (_edit(r / "train.py", "lr = 0.2\n"), _git(r, "add", "train.py")),
    "staged then reverted in the work tree": lambda r: (_edit(r / "train.py", "lr = 0.3\n"),
                                                        _git(r, "add", "train.py"),
                                                        _edit(r / "train.py", "lr = 0.05\n")),
    "deleted": lambda r: (r / "pkg" / "model.py").unlink(),
    "untracked in subdirectories": lambda r: (_edit(r / "notes.txt", "a\n"),
                                              _edit(r / "x" / "y" / "z.txt", "b\n"),
                                              _edit(r / "x" / "w.txt", "c\n")),
    "ignored files": lambda r: (_edit(r / ".gitignore", "*.log\nbuild/\n"), _edit(r / "run.log", "x\n"),
                                _edit(r / "build" / "out.txt", "y\n")),
    "intent to add": lambda r: (_edit(r / "later.py", "z = 3\n"), _git(r, "add", "-N", "later.py")),
    "renamed, binary, spaces": _binary_rename_and_spaces,
    "nested repository": _nested_repository,
    "detached head": lambda r: _git(r, "checkout", "-q", "--detach"),
    "detached head, edited": lambda r: (_git(r, "checkout", "-q", "--detach"),
                                        _edit(r / "train.py", "lr = 1\n")),
    "branch named (detached)": lambda r: _git(r, "checkout", "-q", "-b", "(detached)"),
    "other branch with a slash": lambda r: _git(r, "checkout", "-q", "-b", "feature/x"),
    "merge conflict": lambda r: _conflict(r),
}


def _conflict(r: Path) -> None:
    _git(r, "checkout", "-q", "-b", "other")
    _edit(r / "train.py", "lr = 7\n")
    _git(r, "commit", "-q", "-am", "other")
    _git(r, "checkout", "-q", "main")
    _edit(r / "train.py", "lr = 8\n")
    _git(r, "commit", "-q", "-am", "main")
    subprocess.run(["git", "-C", str(r), "-c", "user.email=t@example.com", "-c", "user.name=t", "merge", "-q",
                    "other"], capture_output=True, check=False)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("where", [".", "pkg"])
def test_state_equals_the_six_call_reference(repo: Path, scenario: str, where: str) -> None:
    """Commit, branch, dirty, diff digest, diff, untracked count and top: each equal to the old calls'."""
    SCENARIOS[scenario](repo)
    expected = _reference(repo / where)
    assert code_state(repo / where) == expected
    assert expected.diff == code_state(repo / where).diff  # the text too (not in CodeState's repr)


@pytest.mark.parametrize("staged", [False, True])
def test_before_the_first_commit_matches_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       staged: bool) -> None:
    """No commit yet: commit None, the unborn branch, a diff against the empty tree once a file is staged."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    project = tmp_path / "fresh"
    project.mkdir()
    _git(project, "-c", "init.defaultBranch=trunk", "init", "-q")
    _edit(project / "a.py", "a = 1\n")
    if staged:
        _git(project, "add", "a.py")
    state = code_state(project)
    assert state == _reference(project)
    expected = (None, "trunk", staged, 0 if staged else 1)
    assert (state.commit, state.branch, state.dirty, state.untracked) == expected


def test_a_clean_checkout_takes_three_git_calls_and_an_edited_one_four(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diff is asked for only when status shows a tracked change; a detached HEAD asks its branch."""
    calls: list[tuple[str, ...]] = []
    start = checkout._start

    def counted(where: Path | str, *args: str) -> subprocess.Popen[bytes]:
        calls.append(args)
        return start(where, *args)

    monkeypatch.setattr(checkout, "_start", counted)
    code_state(repo)
    assert [c[0] for c in calls] == ["rev-parse", "check-ignore", "status"]
    calls.clear()
    _edit(repo / "train.py", "lr = 0.1\n")
    assert code_state(repo).dirty
    assert [c[0] for c in calls] == ["rev-parse", "check-ignore", "status", "diff"]
    calls.clear()
    _git(repo, "checkout", "-q", "--detach")
    assert code_state(repo).branch is None
    assert [c[0] for c in calls] == ["rev-parse", "check-ignore", "status", "symbolic-ref", "diff"]


def test_a_failing_status_is_a_reason_not_an_error(repo: Path) -> None:
    """A checkout whose index is unreadable gives no commit and a reason naming git status."""
    (repo / ".git" / "index").write_bytes(b"not an index")
    state = code_state(repo)
    assert state.commit is None and state.reason is not None and "git status failed" in state.reason
