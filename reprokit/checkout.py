"""The code a run ran: the git checkout's commit, branch and uncommitted diff.

:func:`code_state` looks at the checkout once and never raises (outside git, without git, or in an
ignored copy it says why there is no git information); :func:`save_code_diff` writes the diff next
to the manifest, so ``git apply code.diff`` on the commit restores the code that ran.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from reprokit.rundir import atomic_write_bytes

CODE_DIFF = "code.diff"  # the uncommitted diff, saved next to manifest.json when the checkout is dirty
NOT_A_CHECKOUT = "not a git checkout"
GIT_TIMEOUT = 30.0  # seconds per git call; a diff of a large checkout on a slow disk stays well inside
_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CodeState:
    """The state of the git checkout holding the code; ``reason`` says why there is none."""

    commit: str | None  # None outside git or before the first commit
    branch: str | None  # None outside git or on a detached HEAD
    dirty: bool  # tracked files differ from the commit (staged or not); untracked files do not count
    diff_digest: str | None  # xxh3-128 of ``diff``; None when clean
    diff: str = field(repr=False)  # ``git diff HEAD --binary``: ``git apply`` restores the edits
    untracked: int = 0  # files git neither tracks nor ignores
    repo: str | None = None  # the checkout's top directory
    reason: str | None = None  # why there is no git information; None inside a checkout

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``code`` entry (without the diff text, which goes to ``code.diff``)."""
        if self.reason is not None:
            return {"git": NOT_A_CHECKOUT, "reason": self.reason}
        return {"git": "checkout", "repo": self.repo, "commit": self.commit, "branch": self.branch,
                "dirty": self.dirty, "diff_digest": self.diff_digest, "untracked": self.untracked}


class _NoCheckout(Exception):
    pass


def code_state(repo_dir: Path | None = None) -> CodeState:
    """Describe the git checkout containing ``repo_dir``; never raises.

    Args:
        repo_dir: a directory in the checkout; default the reprokit package's own directory, so
            the answer is about the code that runs, whatever the working directory is. A directory
            the checkout ignores (an installed copy inside ``.venv``) counts as outside git.
    """
    repo = Path(repo_dir) if repo_dir is not None else _PACKAGE_DIR
    try:
        return _git_state(repo)
    except FileNotFoundError:
        reason = "git is not installed (not on PATH)"
    except subprocess.TimeoutExpired:
        reason = f"git did not answer within {GIT_TIMEOUT:g} s"
    except _NoCheckout as e:
        reason = str(e)
    return CodeState(commit=None, branch=None, dirty=False, diff_digest=None, diff="", reason=reason)


def _git(repo: Path | str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return _wait(_start(repo, *args))


def _start(repo: Path | str, *args: str) -> subprocess.Popen[bytes]:
    # GIT_OPTIONAL_LOCKS=0: parallel runs describing one checkout must not fight over index.lock
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.Popen(["git", "-C", str(repo), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)


def _wait(process: subprocess.Popen[bytes]) -> subprocess.CompletedProcess[bytes]:
    try:
        out, err = process.communicate(timeout=GIT_TIMEOUT)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace").strip()


def _git_state(repo: Path) -> CodeState:
    """Two to four git calls, the first three at once: where the checkout is, whether ``repo`` is
    ignored, and ``git status`` (HEAD's commit and branch, the untracked files, whether anything
    tracked changed); only then, and only when something did, the diff. A process start costs a
    few ms here, and this runs at every ``Run()``."""
    if not repo.is_dir():
        raise _NoCheckout(f"{str(repo)!r} is not a directory")
    started = []
    try:
        for args in (("rev-parse", "--show-toplevel"), ("check-ignore", "-q", "."), _STATUS):
            started.append(_start(repo, *args))
        top_run, ignore_run, status_run = (_wait(p) for p in started)
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                process.wait()
    if top_run.returncode != 0:
        message = top_run.stderr.decode(errors="replace").strip().splitlines()
        raise _NoCheckout(message[0] if message else f"git rev-parse failed in {str(repo)!r}")
    top = _out(top_run)
    if ignore_run.returncode == 0:
        raise _NoCheckout(f"{str(repo)!r} is ignored by the checkout at {top!r} (an installed copy?)")
    if status_run.returncode != 0:
        reason = status_run.stderr.decode(errors="replace").strip()
        raise _NoCheckout(f"git status failed in {top!r}: {reason}")
    status = _parse_status(status_run.stdout)
    branch = status.branch
    if branch is None and status.commit is not None:  # "(detached)", or a branch of that name
        branch_run = _git(top, "symbolic-ref", "--short", "-q", "HEAD")
        branch = _out(branch_run) if branch_run.returncode == 0 else None
    diff = _diff(top, status.commit) if status.changed else b""
    return CodeState(
        commit=status.commit, branch=branch, dirty=bool(diff),
        diff_digest=xxhash.xxh3_128_hexdigest(diff) if diff else None,
        diff=diff.decode("utf-8", "surrogateescape"),  # lossless: save_code_diff writes the same bytes
        untracked=status.untracked, repo=top,
    )


# every submodule change shown, so that "nothing changed" never hides a line the diff would have
_STATUS = ("status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all", "--ignore-submodules=none")


@dataclass(frozen=True)
class _Status:
    commit: str | None  # None before the first commit
    branch: str | None  # None on a detached HEAD (or a branch named "(detached)": asked again)
    untracked: int
    changed: bool  # a tracked file differs from HEAD in the index or the work tree (or is unmerged)


def _parse_status(out: bytes) -> _Status:
    """``git status --porcelain=v2 --branch -z``: headers ``# branch.oid``/``# branch.head``, then
    one entry per changed path: ``1``/``2`` (changed, renamed: its original path follows as a field
    of its own), ``u`` (unmerged), ``?`` (untracked); https://git-scm.com/docs/git-status#_porcelain_format_version_2"""
    commit = branch = None
    untracked, changed, skip = 0, False, False
    for entry in out.split(b"\0"):
        if skip or not entry:
            skip = False
            continue
        kind = entry[:2]
        if entry.startswith(b"# branch.oid "):
            oid = entry[len(b"# branch.oid "):].decode()
            commit = None if oid == "(initial)" else oid
        elif entry.startswith(b"# branch.head "):
            head = entry[len(b"# branch.head "):].decode(errors="replace")
            branch = None if head == "(detached)" else head
        elif kind == b"? ":
            untracked += 1
        elif kind in (b"1 ", b"2 ", b"u "):
            changed, skip = True, kind == b"2 "
    return _Status(commit, branch, untracked, changed)


def _diff(top: str, commit: str | None) -> bytes:
    # before the first commit, diff against the empty tree (its id depends on the hash format)
    base = commit or _out(_git(top, "hash-object", "-t", "tree", "--stdin"))
    diff_run = _git(top, "diff", base, "--binary", "--no-color", "--no-ext-diff", "--no-textconv")
    if diff_run.returncode != 0:
        raise _NoCheckout(f"git diff failed in {top!r}: {diff_run.stderr.decode(errors='replace').strip()}")
    return diff_run.stdout


def save_code_diff(run_dir: Path, code: CodeState) -> None:
    """Write ``code.diff`` into ``run_dir`` atomically when the checkout is dirty; else nothing."""
    if code.dirty:
        atomic_write_bytes(Path(run_dir) / CODE_DIFF, code.diff.encode("utf-8", "surrogateescape"))
