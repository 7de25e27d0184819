"""The entry point of a run: which script, started how, from which checkout.

A run started from a user's script records the interpreter, ``sys.argv``, the working directory
and a digest of the script's bytes, so ``reprokit resume`` / ``reproduce`` can start the same
command again, and the git state of the checkout holding the *script* (not reprokit's own).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from reprokit.errors import ReprokitError


class EntryPointError(ReprokitError):
    """A recorded command cannot be run again as asked."""


@dataclass(frozen=True)
class EntryPoint:
    """How the process was started."""

    interpreter: str  # sys.executable
    argv: list[str]  # sys.argv as the script saw it
    cwd: str
    script: str | None  # the entry script's absolute path; None for ``python -c``, a REPL or a notebook
    script_digest: str | None  # xxh3-128 of its bytes (of the ``-c`` program's, for ``python -c``)
    module: str | None = None  # ``python -m NAME``: the module run as __main__
    code: str | None = None  # ``python -c CODE``: the program (e.g. a function run's import-and-call)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def command(self) -> list[str]:
        """The command line that starts this entry point again (no shell involved)."""
        if self.module is not None:
            return [self.interpreter, "-m", self.module, *self.argv[1:]]
        if self.code is not None:
            return [self.interpreter, "-c", self.code, *self.argv[1:]]
        if self.script is None:
            raise EntryPointError(
                "this run was not started from a script (a REPL or a notebook), so there is no command "
                "to run again; start it as `python train.py ...` or `python -c CODE` to make it "
                "re-executable"
            )
        return [self.interpreter, self.script, *self.argv[1:]]


def entry_point() -> EntryPoint:
    """Describe the running process's entry point."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = spec.name if spec is not None and spec.name != "__main__" else None
    path = getattr(main, "__file__", None)
    script = str(Path(path).resolve()) if path and Path(path).is_file() else None
    if module is not None and module.endswith(".__main__"):
        module = module.removesuffix(".__main__")
    code = _command_code() if script is None and module is None else None
    digest = file_bytes_digest(Path(script)) if script else None
    return EntryPoint(
        interpreter=sys.executable,
        argv=list(sys.argv),
        cwd=os.getcwd(),
        script=script,
        script_digest=xxhash.xxh3_128_hexdigest(code.encode()) if code is not None else digest,
        module=module,
        code=code,
    )


def _command_code() -> str | None:
    """The program of ``python -c CODE`` (``sys.argv[0]`` is then ``"-c"``; ``sys.orig_argv`` holds
    it), else None. Only the plain ``-c CODE`` spelling is recognised, not flags merged into it."""
    if not sys.argv or sys.argv[0] != "-c":
        return None
    orig = [str(a) for a in getattr(sys, "orig_argv", [])]
    rest = sys.argv[1:]
    for i, arg in enumerate(orig[:-1]):
        if arg == "-c" and orig[i + 2:] == rest:
            return orig[i + 1]
    return None


def file_bytes_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes."""
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


def code_root(entry: EntryPoint) -> Path:
    """The directory whose git checkout holds the user's code: the script's, else the cwd."""
    return Path(entry.script).parent if entry.script else Path(entry.cwd)
