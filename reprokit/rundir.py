"""The run directory: the unit every other part of reprokit reads (see DESIGN.md).

    RUN_DIR/manifest.json   written before the first step, never rewritten
    RUN_DIR/metrics.csv     one row per step, flushed as it goes, so a crash keeps every step done
    RUN_DIR/digests.csv     step, tensor, digest (long form: pandas reads it directly)
    RUN_DIR/model.pt        final parameters and buffers (a plain state_dict)
    RUN_DIR/result.json     written last; its presence means the run finished

Every whole-file write goes to a temporary file in the same directory, is fsynced and then renamed
over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

import pandas as pd
import torch

from reprokit.errors import ReprokitError

MANIFEST = "manifest.json"
METRICS = "metrics.csv"
DIGESTS = "digests.csv"
MODEL = "model.pt"
RESULT = "result.json"
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "digest", "val_loss", "val_metric")


class RunDirError(ReprokitError):
    """A run directory is missing, incomplete or already used."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunWriter:
    """Writes one run directory as training goes."""

    def __init__(self, path: str | Path, manifest: Mapping[str, Any]) -> None:
        self.path = Path(path)
        if (self.path / MANIFEST).exists():
            raise RunDirError(
                f"run directory {str(self.path)!r} already holds a run (it has {MANIFEST}); "
                "pass a new --run-dir or delete the old one"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / MANIFEST, manifest)
        self._metrics_file, self._metrics = _csv(self.path / METRICS, METRIC_COLUMNS)
        self._digests_file, self._digests = _csv(self.path / DIGESTS, ("step", "tensor", "digest"))

    def step(self, row: Mapping[str, Any], tensor_digests: Mapping[str, str] | None) -> None:
        if tensor_digests:
            self._digests.writerows((row["step"], n, d) for n, d in tensor_digests.items())
            self._digests_file.flush()
        self._metrics.writerow([row.get(c, "") for c in METRIC_COLUMNS])
        self._metrics_file.flush()

    def finish(self, state: Mapping[str, torch.Tensor], result: Mapping[str, Any]) -> None:
        self.close()
        tmp = self.path / f".{MODEL}.tmp"
        torch.save(dict(state), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MODEL)
        atomic_write_json(self.path / RESULT, result)

    def close(self) -> None:
        self._metrics_file.close()
        self._digests_file.close()


def _csv(path: Path, header: tuple[str, ...]) -> tuple[IO[str], Any]:
    f = open(path, "w", newline="")  # noqa: SIM115 - closed by RunWriter.close
    writer = csv.writer(f)
    writer.writerow(header)
    return f, writer


def read_json(run_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunDirError(f"{str(path)!r} is missing; is {str(run_dir)!r} a reprokit run directory?")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv as a DataFrame, one row per step."""
    return pd.read_csv(Path(run_dir) / METRICS)


def read_digests(run_dir: str | Path) -> list[tuple[int, dict[str, str]]]:
    """digests.csv as ``[(step, {tensor: digest})]``, the form :func:`first_divergence` takes."""
    frame = pd.read_csv(Path(run_dir) / DIGESTS, dtype={"tensor": str, "digest": str})
    return [
        (int(cast(int, step)), dict(zip(group["tensor"], group["digest"], strict=True)))
        for step, group in frame.groupby("step", sort=True)
    ]


def read_model(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The final state_dict, loaded without unpickling arbitrary objects."""
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise RunDirError(f"{str(path)!r} is missing; the run did not finish")
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state
