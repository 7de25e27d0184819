"""Reading checkpoints: each is verified before any of it is used.

A checkpoint directory (layout and commit protocol: :mod:`reprokit.checkpoint`) is trusted only
after every file ``contents.json`` lists has its recorded size and digest, and ``meta.json`` has
every field of the type and range a checkpoint of its step has. Readers never trust ``latest``
alone: they scan the directories and take the newest that verifies. Loading never unpickles
arbitrary objects: ``state.pt`` goes through ``torch.load(weights_only=True)``, the tensors through
safetensors, and everything else is JSON. Checkpoints of format 1 (every tensor inside
``state.pt``, no tensors file) still load.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from reprokit import tensorfile, untrusted
from reprokit.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    META_FILE,
    MODEL_KEY,
    PREFIX,
    RNG_KEY,
    SMALL_JSON,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointMeta,
    architecture,
    checkpoints_root,
    verify_contents,
)
from reprokit.differences import config_differences
from reprokit.errors import RunDirError

_NAME = re.compile(rf"{PREFIX}[0-9]{{1,19}}")  # what ``latest`` may name: a checkpoint directory of this run
_MAX_POINTER = 64  # bytes of a ``latest`` file ("step-0000060\n" is 13)


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Verify a checkpoint directory and load it; any damage raises :class:`CheckpointError`.

    Checks that every file listed in ``contents.json`` is present with its recorded size and
    digest, then loads ``state.pt`` with ``weights_only=True`` (a pickle that would run code is
    refused before anything runs). A checkpoint may come from someone else: every field is checked
    (types, ranges, file names inside the checkpoint, safetensors header against the file size).
    """
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"{path}: a symbolic link, not a checkpoint directory (it may lead out of the "
                              "run directory); remove it")
    listed = verify_contents(path)
    meta = _read_meta(path)
    try:
        state: Any = torch.load(path / STATE_FILE, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path / STATE_FILE}: refused to load: it holds objects other than tensors and plain "
            f"values, which could run code when unpickled; do not load it with weights_only=False "
            f"unless you made it yourself ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # RuntimeError, EOFError, ValueError...: what torch.load raises varies
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read as a torch file ({_one_line(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: holds {type(state).__name__}, not a dict; "
                              "not a reprokit checkpoint")
    if TENSORS_FILE in listed:
        try:
            state = tensorfile.join(state, tensorfile.read(path / TENSORS_FILE))
        except Exception as e:  # a forged file: its digest matched, its content is not ours
            raise CheckpointError(f"{path / TENSORS_FILE}: its tensors do not fit state.pt ({_one_line(e)})"
                                  ) from e
    missing = {MODEL_KEY, RNG_KEY} - set(state)  # a script run's optimizers are among its tracked objects
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: lacks {sorted(missing)}; not a reprokit checkpoint")
    return meta, state


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:600]}" if text else type(e).__name__


def _read_meta(path: Path) -> CheckpointMeta:
    """meta.json with every field of the type and range a checkpoint of ``path``'s step has."""
    where = path / META_FILE
    try:
        raw = untrusted.read_json(where, max_bytes=SMALL_JSON)
        if not isinstance(raw, dict):
            raise RunDirError(f"{where}: holds {type(raw).__name__}, not a JSON object")
        unknown = sorted(set(raw) - {f.name for f in fields(CheckpointMeta)})
        if unknown:
            raise RunDirError(f"{where}: unknown fields {unknown[:5]}; not a reprokit checkpoint meta file")
        checked: dict[str, Any] = {key: untrusted.expect(raw, key, int, path=where, lo=0)
                                   for key in ("step", "epoch", "batch")}
        for key in ("data_digest", "code_version", "manifest_digest"):
            checked[key] = untrusted.expect(raw, key, str, path=where, max_len=256)
        for key in ("created", "model_digest"):
            if key in raw:
                checked[key] = untrusted.expect(raw, key, str, path=where, max_len=256)
        checked["config"] = untrusted.expect(raw, "config", dict, path=where)
        files = untrusted.expect(raw, "run_files", dict, path=where, max_len=64)
        checked["run_files"] = {name: untrusted.expect(files, name, int, path=f"{where} run_files", lo=0)
                                for name in files}
        layout = untrusted.expect(raw, "architecture", dict, path=where, max_len=1 << 20) \
            if "architecture" in raw else {}
        checked["architecture"] = {name: _layout_entry(f"{where} architecture", layout, name)
                                   for name in layout}
        if "format_version" in raw:
            checked["format_version"] = untrusted.expect(raw, "format_version", int, path=where, lo=1,
                                                         hi=FORMAT_VERSION + 1)
    except RunDirError as e:
        raise CheckpointError(str(e)) from e
    meta = CheckpointMeta(**checked)
    if _NAME.fullmatch(path.name) and int(path.name[len(PREFIX):]) != meta.step:
        raise CheckpointError(f"{where}: says step {meta.step}, but the directory is {path.name}; the "
                              "checkpoint was moved or forged")
    return meta


def _layout_entry(where: str, layout: dict[str, Any], name: str) -> list[Any]:
    entry = untrusted.expect(layout, name, list, path=where, max_len=2)
    dtype = untrusted.expect(entry, 0, str, path=f"{where} {name!r}", max_len=64)
    shape = untrusted.expect(entry, 1, list, path=f"{where} {name!r}", max_len=64)
    return [dtype, [untrusted.expect(shape, i, int, path=f"{where} {name!r} shape", lo=0)
                    for i in range(len(shape))]]


def check_compatible(
    meta: CheckpointMeta, path: Path, *, config: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor] | None, ignore: frozenset[str] = frozenset(),
    layout: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint written for another config or another model architecture (that of
    ``model_state``, or ``layout`` as :func:`architecture` gives it; neither: not checked).

    The config fields in ``ignore`` (how the run is recorded: checkpoint cadence, workers) may differ.
    """
    diffs = config_differences(meta.config, dict(config), ignore=ignore)
    if diffs:
        raise CheckpointError(f"{path}: written for a different config ({'; '.join(diffs)})")
    if model_state is not None:
        layout = architecture(model_state)
    if layout is None:
        return
    have = dict(layout)
    if have != meta.architecture:
        names = sorted(n for n in set(have) | set(meta.architecture)
                       if have.get(n) != meta.architecture.get(n))
        shown = ", ".join(
            f"{n} (checkpoint {meta.architecture.get(n)}, model {have.get(n)})" for n in names[:3]
        )
        raise CheckpointError(
            f"{path}: written for a different model architecture: {len(names)} tensor(s) differ: {shown}"
        )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest step first (temporary ones excluded)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def latest_pointer(run_dir: str | Path) -> str | None:
    """The checkpoint name ``latest`` points to, if the pointer exists: a plain file holding the
    name of a checkpoint directory of this run (``step-N``), else a :class:`CheckpointError`.
    It may name a checkpoint since deleted: readers scan the directories and never trust it alone."""
    path = checkpoints_root(run_dir) / LATEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        fd, _ = untrusted.open_plain(path)
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_POINTER + 1)
    except RunDirError as e:
        raise CheckpointError(str(e)) from e
    name = data.decode("utf-8", "replace").strip()
    if len(data) > _MAX_POINTER or not _NAME.fullmatch(name):
        raise CheckpointError(f"{path}: names {name[:60]!r}, not a checkpoint of this run (expected "
                              f"{PREFIX}NNNNNNN); delete it: the next save writes it again")
    return name


def verify_run(run_dir: str | Path, *, config: Mapping[str, Any] | None = None,
               model_state: Mapping[str, torch.Tensor] | None = None,
               ignore: frozenset[str] = frozenset()) -> pd.DataFrame:
    """One row per checkpoint: name, step, status ("ok" or "bad"), size, and what is wrong.

    With ``config`` (the run's), a checkpoint written for another config (the ``ignore`` fields
    aside) counts as bad too, and with ``model_state`` one of another model architecture.
    """
    rows = []
    pointer = latest_pointer(run_dir)
    for path in list_checkpoints(run_dir):
        size = 0 if path.is_symlink() else sum(f.lstat().st_size for f in path.iterdir() if f.is_file())
        row: dict[str, Any] = {"checkpoint": path.name, "step": int(path.name[len(PREFIX):]),
                               "latest": path.name == pointer, "bytes": size}
        try:
            meta, _ = read_checkpoint(path)
            if config is not None:
                check_compatible(meta, path, config=config, model_state=model_state, ignore=ignore)
            row.update(status="ok", problem="")
        except CheckpointError as e:
            row.update(status="bad", problem=str(e))
        rows.append(row)
    return pd.DataFrame(rows, columns=["checkpoint", "step", "latest", "bytes", "status", "problem"])
