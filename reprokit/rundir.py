"""The run directory: the unit every other part of reprokit reads (see DESIGN.md).

    RUN_DIR/manifest.json   written before the first step, never rewritten
    RUN_DIR/metrics.csv     one row per step, flushed as it goes, so a crash keeps every step done
    RUN_DIR/digests.csv     step, tensor, digest (long form: pandas reads it directly)
    RUN_DIR/checkpoints/    full-state checkpoints (reprokit.checkpoint)
    RUN_DIR/model.pt        final parameters and buffers (a plain state_dict)
    RUN_DIR/model.safetensors  the same tensors as safetensors, its header holding the final digest
                            and run id: the pretrained artifact a fine-tune starts from
    RUN_DIR/result.json     written last; its presence means the run finished

Every whole-file write goes to a temporary file in the same directory, is fsynced and then renamed
over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

import pandas as pd
import safetensors.torch
import torch
import xxhash

from reprokit.errors import ReprokitError
from reprokit.fingerprints import FINGERPRINT_COLUMNS, FINGERPRINTS, GRAD_COLUMNS, GRADS

MANIFEST = "manifest.json"
METRICS = "metrics.csv"
DIGESTS = "digests.csv"
MODEL = "model.pt"
WEIGHTS = "model.safetensors"
WEIGHTS_ORDER = "names"  # safetensors header entry: the state_dict order (the file's own is sorted)
RESULT = "result.json"
RESUMES = "resumes"  # manifest key: one entry per resume, appended
DIGEST_COLUMNS = ("step", "tensor", "digest")
# kind: "step" (one per optimizer step), "log" (run.log between steps), "init" (a script run's step 0);
# metrics: a script run's own metrics as a JSON object (read_metrics spreads them into columns)
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "digest", "val_loss", "val_metric", "kind", "metrics")


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


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """Digest of a manifest as first written (the ``resumes`` log appended later is left out)."""
    body = {k: v for k, v in manifest.items() if k != RESUMES}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, default=str).encode())


def append_resume(run_dir: str | Path, entry: Mapping[str, Any]) -> None:
    """Add one entry to the manifest's ``resumes`` log. The manifest is replaced atomically and
    every key it had before keeps its value, so its :func:`manifest_digest` does not change."""
    manifest = read_json(run_dir, MANIFEST)
    manifest[RESUMES] = [*manifest.get(RESUMES, []), dict(entry)]
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


class RunWriter:
    """Writes one run directory as training goes."""

    def __init__(self, path: str | Path, manifest: Mapping[str, Any], *,
                 truncate_to: Mapping[str, int] | None = None) -> None:
        """Start a new run directory, or with ``truncate_to`` reopen an existing one for a resume:
        its metrics and digests files are cut back to the given byte lengths (what a checkpoint
        recorded) and appended to from there."""
        self.path = Path(path)
        if truncate_to is None:
            if (self.path / MANIFEST).exists():
                raise RunDirError(
                    f"run directory {str(self.path)!r} already holds a run (it has {MANIFEST}); "
                    "pass a new --run-dir, delete the old one, or `reprokit resume` it"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path / MANIFEST, manifest)
        self._manifest_digest = manifest_digest(manifest)
        self._run_id = str(manifest.get("run_id", ""))
        self._metrics_file, self._metrics = _csv(self.path / METRICS, METRIC_COLUMNS, truncate_to)
        self._digests_file, self._digests = _csv(self.path / DIGESTS, DIGEST_COLUMNS, truncate_to)
        self._digest_names: dict[str, str] = {}  # tensor name -> its csv field
        self._fingerprints_file, self._fingerprints = _csv(self.path / FINGERPRINTS, FINGERPRINT_COLUMNS,
                                                           truncate_to)
        self._grads_file, _ = _csv(self.path / GRADS, GRAD_COLUMNS, truncate_to)

    def manifest_digest(self) -> str:
        return self._manifest_digest

    def rewrite_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Replace the manifest before the first step (a script run adds its data digests then)."""
        atomic_write_json(self.path / MANIFEST, manifest)
        self._manifest_digest = manifest_digest(manifest)

    def sync(self) -> dict[str, int]:
        """Flush and fsync the append-only files; return their byte lengths (a checkpoint keeps
        them, so a resume can drop the rows written after it)."""
        sizes = {}
        for f in self._files():
            f.flush()
            os.fsync(f.fileno())
            sizes[Path(f.name).name] = f.tell()
        return sizes

    def step(self, row: Mapping[str, Any], tensor_digests: Mapping[str, str] | None) -> None:
        if tensor_digests:
            self._digest_rows(self._digests_file, row["step"], tensor_digests)
        self._metrics.writerow([row.get(c, "") for c in METRIC_COLUMNS])
        self._metrics_file.flush()

    def fingerprint(self, row: Mapping[str, Any], grads: Mapping[str, str] | None) -> None:
        """A step's fingerprints (``reprokit.fingerprints``), and its per-tensor gradient digests."""
        if grads:
            self._digest_rows(self._grads_file, row["step"], grads)
        self._fingerprints.writerow([row.get(c, "") for c in FINGERPRINT_COLUMNS])
        self._fingerprints_file.flush()

    def _digest_rows(self, file: IO[str], step: int, digests: Mapping[str, str]) -> None:
        names, lines = self._digest_names, []
        for name, digest in digests.items():
            quoted = names.get(name)
            if quoted is None:  # what csv.writer writes for the name (quoted if it must be)
                quoted = names[name] = _csv_field(name)
            lines.append(f"{step},{quoted},{digest}\r\n")
        file.write("".join(lines))
        file.flush()

    def finish(self, state: Mapping[str, torch.Tensor], result: Mapping[str, Any]) -> None:
        self.close()
        tmp = self.path / f".{MODEL}.tmp"
        torch.save(dict(state), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MODEL)
        header = {"final_digest": str(result["final_digest"]), "run_id": self._run_id,
                  WEIGHTS_ORDER: json.dumps(list(state))}  # the digest's order: verifiable on its own
        atomic_write_bytes(self.path / WEIGHTS, safetensors.torch.save(dict(state), metadata=header))
        atomic_write_json(self.path / RESULT, result)

    def _files(self) -> tuple[IO[str], ...]:
        return self._metrics_file, self._digests_file, self._fingerprints_file, self._grads_file

    def close(self) -> None:
        for f in self._files():
            f.close()


def _csv_field(value: str) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([value])
    return out.getvalue()[:-2]  # without the writer's "\r\n"


def _csv(path: Path, header: tuple[str, ...], truncate_to: Mapping[str, int] | None) -> tuple[IO[str], Any]:
    if truncate_to is None or truncate_to.get(path.name, 0) == 0:
        f = open(path, "w", newline="")  # noqa: SIM115 - closed by RunWriter.close
        writer = csv.writer(f)
        writer.writerow(header)
        return f, writer
    size = truncate_to[path.name]
    if not path.is_file() or path.stat().st_size < size:
        raise RunDirError(
            f"{str(path)!r} is shorter than the {size} bytes the checkpoint recorded; the run "
            "directory was changed after the checkpoint was taken"
        )
    os.truncate(path, size)
    f = open(path, "a", newline="")  # noqa: SIM115 - closed by RunWriter.close
    return f, csv.writer(f)


def read_json(run_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunDirError(f"{str(path)!r} is missing; is {str(run_dir)!r} a reprokit run directory?")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv as a DataFrame, one row per step (a script run: and per ``run.log``), with a
    script run's own metrics spread into columns of their names."""
    frame = pd.read_csv(Path(run_dir) / METRICS, dtype={"digest": str, "kind": str, "metrics": str})
    if "metrics" in frame:
        cells = frame.pop("metrics")
        extra = pd.DataFrame([json.loads(c) if isinstance(c, str) and c else {} for c in cells],
                             index=frame.index)
        frame = frame.join(extra.drop(columns=[c for c in extra if c in frame]))
    if "kind" in frame and frame["kind"].isna().all():
        frame = frame.drop(columns="kind")
    for column in ("val_loss", "val_metric"):
        if column in frame and frame[column].isna().all() and "kind" in frame:
            frame = frame.drop(columns=column)  # a script run's: its own metrics have their own names
    return frame


def step_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step, 0..N: the initial model's and the optimizer steps' (not the ``run.log`` rows)."""
    if "kind" not in frame:
        return frame
    return frame[frame["kind"].isna() | frame["kind"].isin(["step", "init"])].reset_index(drop=True)


def read_digests(run_dir: str | Path) -> list[tuple[int, dict[str, str]]]:
    """digests.csv as ``[(step, {tensor: digest})]``, the form :func:`first_divergence` takes."""
    frame = pd.read_csv(Path(run_dir) / DIGESTS, dtype={"tensor": str, "digest": str})
    return [
        (int(cast(int, step)), dict(zip(group["tensor"], group["digest"], strict=True)))
        for step, group in frame.groupby("step", sort=True)
    ]


def read_grads(run_dir: str | Path) -> list[tuple[int, dict[str, str]]]:
    """grads.csv as ``[(step, {tensor: digest})]`` (empty for a run recorded without it)."""
    path = Path(run_dir) / GRADS
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"tensor": str, "digest": str})
    return [(int(cast(int, step)), dict(zip(group["tensor"], group["digest"], strict=True)))
            for step, group in frame.groupby("step", sort=True)]


def read_fingerprints(run_dir: str | Path) -> pd.DataFrame:
    """fingerprints.csv, one row per recorded step, every digest a string ("" = not taken); an
    empty frame with those columns for a run recorded before fingerprints existed."""
    path = Path(run_dir) / FINGERPRINTS
    if not path.is_file():
        return pd.DataFrame(columns=list(FINGERPRINT_COLUMNS))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["step"] = frame["step"].astype(int)
    return frame


def read_model(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The final state_dict, loaded without unpickling arbitrary objects."""
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise RunDirError(f"{str(path)!r} is missing; the run did not finish")
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return state
