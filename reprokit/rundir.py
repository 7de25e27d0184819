"""The run directory: the unit every other part of reprokit reads (see DESIGN.md).

    RUN_DIR/manifest.json   written before the first step, never rewritten
    RUN_DIR/metrics.csv     one row per step, written at least every FLUSH_SECONDS (and at every
                            checkpoint, stop and finish), so a crash loses at most that second's rows
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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

import pandas as pd
import safetensors.torch
import torch
import xxhash

from reprokit import untrusted
from reprokit.diskerrors import writing
from reprokit.errors import RunDirError as RunDirError  # one class; ``reprokit.rundir.RunDirError`` stays
from reprokit.fingerprints import FINGERPRINT_COLUMNS, FINGERPRINTS, GRAD_COLUMNS, GRADS
from reprokit.runlock import RunLock

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
# the top-level fields of a run directory's JSON files that readers use, with the type each must have
# when present (None allowed where readers write ``x.get(k) or {}``): a forged file is refused on read
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    MANIFEST: {"config": (dict,), "kind": (str,), "run_id": (str,), RESUMES: (list,), "fingerprint": (str,),
               "code": (dict, type(None)), "data": (dict, type(None)), "lineage": (dict, type(None)),
               "seeding": (dict, type(None)), "entry": (dict, type(None)), "settings": (dict, type(None)),
               "tracked": (dict, type(None)), "environment": (dict, type(None)),
               "overrides": (dict, type(None))},
    RESULT: {"final_digest": (str,), "steps": (int,), "final_metric": (float, int, type(None)),
             "metric_name": (str, type(None)), "seconds": (float, int), "metrics": (dict, type(None))},
}
_REQUIRED = {MANIFEST: ("config",), RESULT: ("final_digest",)}
# how long rows wait in memory: writing each step's four rows as it comes costs four write calls
# and the formatting right after the step has evicted the caches (~0.1 ms a step, ~1.5 % of the
# example's); a checkpoint writes what waits first (it records the files' sizes), and a crash
# loses at most these seconds of rows, which a resume would cut back and write again anyway
FLUSH_SECONDS = 1.0


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
    with writing("manifest", "the manifest's resume log", Path(run_dir) / MANIFEST):
        atomic_write_json(Path(run_dir) / MANIFEST, manifest)


class RunWriter:
    """Writes one run directory as training goes; owns the directory's :class:`RunLock`, if given,
    and releases it when it closes."""

    def __init__(self, path: str | Path, manifest: Mapping[str, Any], *,
                 truncate_to: Mapping[str, int] | None = None, lock: RunLock | None = None) -> None:
        """Start a new run directory, or with ``truncate_to`` reopen an existing one for a resume:
        its metrics and digests files are cut back to the given byte lengths (what a checkpoint
        recorded) and appended to from there."""
        self.path, self._lock = Path(path), lock
        self._open: dict[str, IO[str]] = {}  # file name -> file
        # rows not yet written (FLUSH_SECONDS): metrics and fingerprint rows, (file, step, digests)
        self._metric_rows: list[Mapping[str, Any]] = []
        self._fingerprint_rows: list[Mapping[str, Any]] = []
        self._digest_batches: list[tuple[IO[str], int, Mapping[str, str]]] = []
        self._flush_at = time.monotonic() + FLUSH_SECONDS
        try:
            if truncate_to is None:
                if (self.path / MANIFEST).exists():
                    raise RunDirError(
                        f"run directory {str(self.path)!r} already holds a run (it has {MANIFEST}); "
                        "pass a new --run-dir, delete the old one, or `reprokit resume` it"
                    )
                with writing("manifest", "the run directory and its manifest", self.path / MANIFEST):
                    self.path.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(self.path / MANIFEST, manifest)
            self._manifest_digest = manifest_digest(manifest)
            self._run_id = str(manifest.get("run_id", ""))
            self._metrics_file, self._metrics = self._csv(METRICS, METRIC_COLUMNS, truncate_to)
            self._digests_file, self._digests = self._csv(DIGESTS, DIGEST_COLUMNS, truncate_to)
            self._digest_names: dict[str, str] = {}  # tensor name -> its csv field
            self._fingerprints_file, self._fingerprints = self._csv(FINGERPRINTS, FINGERPRINT_COLUMNS,
                                                                    truncate_to)
            self._grads_file, _ = self._csv(GRADS, GRAD_COLUMNS, truncate_to)
        except BaseException:
            self.close()
            raise

    @classmethod
    def holding(cls, path: str | Path, lock: RunLock | None) -> RunWriter:
        """A writer with no file open that only holds ``lock``: a relaunch's, until its checkpoint
        is settled and the writer opened there (:func:`RunWriter` with the lock it then holds)."""
        writer = cls.__new__(cls)
        writer.path, writer._lock, writer._open = Path(path), lock, {}
        writer._metric_rows, writer._fingerprint_rows, writer._digest_batches = [], [], []
        return writer

    def _csv(self, name: str, header: tuple[str, ...],
             truncate_to: Mapping[str, int] | None) -> tuple[IO[str], Any]:
        f, writer = _csv(self.path / name, header, truncate_to)
        self._open[name] = f
        return f, writer

    def manifest_digest(self) -> str:
        return self._manifest_digest

    def rewrite_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Replace the manifest before the first step (a script run adds its data digests then)."""
        with writing("manifest", "the manifest", self.path / MANIFEST):
            atomic_write_json(self.path / MANIFEST, manifest)
        self._manifest_digest = manifest_digest(manifest)

    def sync(self) -> dict[str, int]:
        """Write the rows waiting, flush and fsync the append-only files; return their byte lengths
        (a checkpoint keeps them, so a resume can drop the rows written after it)."""
        self.flush()
        sizes = {}
        for name, f in self._open.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[name] = f.tell()
        return sizes

    def step(self, row: Mapping[str, Any], tensor_digests: Mapping[str, str] | None) -> None:
        """A metrics row (and its per-tensor digests): written within :data:`FLUSH_SECONDS`."""
        self._metric_rows.append(row)
        if tensor_digests:
            self._digest_batches.append((self._digests_file, row["step"], tensor_digests))
        if time.monotonic() >= self._flush_at:
            self.flush()

    def fingerprint(self, row: Mapping[str, Any], grads: Mapping[str, str] | None) -> None:
        """A step's fingerprints (``reprokit.fingerprints``), and its per-tensor gradient digests."""
        self._fingerprint_rows.append(row)
        if grads:
            self._digest_batches.append((self._grads_file, row["step"], grads))

    def flush(self) -> None:
        """Write the rows waiting in memory to the OS (not fsynced: :meth:`sync` does that)."""
        self._flush_at = time.monotonic() + FLUSH_SECONDS
        metric_rows, fingerprint_rows = self._metric_rows, self._fingerprint_rows
        batches = self._digest_batches
        if not (metric_rows or fingerprint_rows or batches):
            return
        self._metric_rows, self._fingerprint_rows, self._digest_batches = [], [], []
        steps = [r["step"] for r in (*metric_rows, *fingerprint_rows)]
        span = f"step {steps[0]}" if min(steps) == max(steps) else f"steps {min(steps)}-{max(steps)}"
        with writing("metrics", f"the metrics rows, digests and fingerprints of {span}", self.path / METRICS):
            self._metrics.writerows([[r.get(c, "") for c in METRIC_COLUMNS] for r in metric_rows])
            self._fingerprints.writerows([[r.get(c, "") for c in FINGERPRINT_COLUMNS]
                                          for r in fingerprint_rows])
            lines: dict[IO[str], list[str]] = {}
            for file, step, digests in batches:
                lines.setdefault(file, []).extend(self._digest_lines(step, digests))
            for file, text in lines.items():
                file.write("".join(text))
            for f in self._files():
                f.flush()

    def _digest_lines(self, step: int, digests: Mapping[str, str]) -> list[str]:
        names, lines = self._digest_names, []
        for name, digest in digests.items():
            quoted = names.get(name)
            if quoted is None:  # what csv.writer writes for the name (quoted if it must be)
                quoted = names[name] = _csv_field(name)
            lines.append(f"{step},{quoted},{digest}\r\n")
        return lines

    def finish(self, state: Mapping[str, torch.Tensor], result: Mapping[str, Any]) -> None:
        with writing("result", "the final model and result.json", self.path / RESULT):
            self._finish(state, result)
        self.close()  # the lock last: result.json is written

    def _finish(self, state: Mapping[str, torch.Tensor], result: Mapping[str, Any]) -> None:
        self.flush()
        for f in self._files():
            f.close()
        tmp = self.path / f".{MODEL}.tmp"
        tmp.unlink(missing_ok=True)  # a link left there must not lead the write out of the run directory
        torch.save(dict(state), tmp)
        with open(tmp, "rb") as model:
            os.fsync(model.fileno())
        os.replace(tmp, self.path / MODEL)
        header = {"final_digest": str(result["final_digest"]), "run_id": self._run_id,
                  WEIGHTS_ORDER: json.dumps(list(state))}  # the digest's order: verifiable on its own
        atomic_write_bytes(self.path / WEIGHTS, safetensors.torch.save(dict(state), metadata=header))
        atomic_write_json(self.path / RESULT, result)

    def _files(self) -> tuple[IO[str], ...]:
        return tuple(self._open.values())

    def close(self) -> None:
        """Write the rows waiting, close the files and release the lock (once; later calls do nothing)."""
        try:
            if self._open and not next(iter(self._open.values())).closed:
                self.flush()
        finally:
            for f in self._files():
                f.close()
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()


def _csv_field(value: str) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([value])
    return out.getvalue()[:-2]  # without the writer's "\r\n"


def _csv(path: Path, header: tuple[str, ...], truncate_to: Mapping[str, int] | None) -> tuple[IO[str], Any]:
    if truncate_to is None or truncate_to.get(path.name, 0) == 0:
        f = _open_no_follow(path, os.O_TRUNC)
        writer = csv.writer(f)
        writer.writerow(header)
        return f, writer
    # a size the file cannot have (forged, or the file cut since) is a RunDirError, not EINVAL
    untrusted.safe_truncate(path, truncate_to[path.name])
    f = _open_no_follow(path, os.O_APPEND)
    return f, csv.writer(f)


def _open_no_follow(path: Path, flag: int) -> IO[str]:
    """``path`` opened for writing text; a symlink there (it may lead out of the run directory) is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flag, 0o644)
    except OSError as e:
        raise RunDirError(f"{path}: cannot be opened for writing ({e.strerror}); a run directory's files "
                          "are plain files, not symbolic links") from None
    return open(fd, "a" if flag == os.O_APPEND else "w", newline="")


def read_json(run_dir: str | Path, name: str) -> dict[str, Any]:
    """A JSON object of the run directory, checked (:func:`reprokit.untrusted.read_json`: size,
    depth, UTF-8, a plain file) and, for the manifest and result, the types of the fields readers
    use; anything else is a :class:`RunDirError` naming the file and the problem."""
    path = Path(run_dir) / name
    if not path.is_file() and not path.is_symlink():
        raise RunDirError(f"{str(path)!r} is missing; is {str(run_dir)!r} a reprokit run directory?")
    data = untrusted.read_json(path)
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: holds {type(data).__name__} {repr(data)[:60]}, not a JSON object; "
                          "the file is damaged or not reprokit's")
    for key in _REQUIRED.get(name, ()):
        if key not in data:
            raise RunDirError(f"{path}: field {key!r} is missing; the file is damaged or not reprokit's")
    for key, types in _FIELDS.get(name, {}).items():
        value = data.get(key)
        if key in data and type(value) not in types:
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise RunDirError(f"{path}: field {key!r} is {repr(value)[:60]} ({type(value).__name__}); "
                              f"expected {wanted} (the file is damaged or not reprokit's)")
    return data


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.csv as a DataFrame, one row per step (a script run: and per ``run.log``), with a
    script run's own metrics spread into columns of their names."""
    path = Path(run_dir) / METRICS
    frame = _read_csv(path, dtype={"digest": str, "kind": str, "metrics": str})
    if "metrics" in frame:
        cells = frame.pop("metrics")
        extra = pd.DataFrame([_metrics_cell(path, c) for c in cells], index=frame.index)
        frame = frame.join(extra.drop(columns=[c for c in extra if c in frame]))
    if "kind" in frame and frame["kind"].isna().all():
        frame = frame.drop(columns="kind")
    for column in ("val_loss", "val_metric"):
        if column in frame and frame[column].isna().all() and "kind" in frame:
            frame = frame.drop(columns=column)  # a script run's: its own metrics have their own names
    return frame


def _metrics_cell(path: Path, cell: Any) -> dict[str, Any]:
    if not isinstance(cell, str) or not cell:
        return {}
    try:
        value = json.loads(cell)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: a metrics cell {cell[:60]!r} is not a JSON object; the file is damaged")
    return value


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A run directory's CSV file; a missing, linked, unparsable or column-less one is a RunDirError."""
    fd, _ = untrusted.open_plain(path)
    try:
        with os.fdopen(fd, "rb") as f:
            frame: pd.DataFrame = pd.read_csv(f, **kwargs)
            return frame
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError) as e:
        raise RunDirError(f"{path}: not a CSV file reprokit wrote ({str(e).splitlines()[0][:200]})") from None


def _step_groups(path: Path, frame: pd.DataFrame) -> list[tuple[int, dict[str, str]]]:
    steps_ok = frame.empty or ("step" in frame and pd.api.types.is_integer_dtype(frame["step"]))
    if list(frame.columns[:3]) != list(DIGEST_COLUMNS) or not steps_ok:
        raise RunDirError(f"{path}: columns {list(frame.columns)[:5]} (step of dtype "
                          f"{frame.dtypes.get('step')}); expected {list(DIGEST_COLUMNS)} with integer steps")
    return [(int(cast(int, step)), dict(zip(group["tensor"], group["digest"], strict=True)))
            for step, group in frame.groupby("step", sort=True)]


def step_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step, 0..N: the initial model's and the optimizer steps' (not the ``run.log`` rows)."""
    if "kind" not in frame:
        return frame
    return frame[frame["kind"].isna() | frame["kind"].isin(["step", "init"])].reset_index(drop=True)


def read_digests(run_dir: str | Path) -> list[tuple[int, dict[str, str]]]:
    """digests.csv as ``[(step, {tensor: digest})]``, the form :func:`first_divergence` takes."""
    path = Path(run_dir) / DIGESTS
    return _step_groups(path, _read_csv(path, dtype={"tensor": str, "digest": str}))


def read_grads(run_dir: str | Path) -> list[tuple[int, dict[str, str]]]:
    """grads.csv as ``[(step, {tensor: digest})]`` (empty for a run recorded without it)."""
    path = Path(run_dir) / GRADS
    if not path.is_file():
        return []
    return _step_groups(path, _read_csv(path, dtype={"tensor": str, "digest": str}))


def read_fingerprints(run_dir: str | Path) -> pd.DataFrame:
    """fingerprints.csv, one row per recorded step, every digest a string ("" = not taken); an
    empty frame with those columns for a run recorded before fingerprints existed."""
    path = Path(run_dir) / FINGERPRINTS
    if not path.is_file():
        return pd.DataFrame(columns=list(FINGERPRINT_COLUMNS))
    frame = _read_csv(path, dtype=str, keep_default_na=False)
    try:
        frame["step"] = frame["step"].astype(int)
    except (KeyError, ValueError, OverflowError):
        raise RunDirError(f"{path}: its step column is missing or not integers; the file is damaged"
                          ) from None
    return frame


def read_model(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The final state_dict, loaded without unpickling arbitrary objects."""
    path = Path(run_dir) / MODEL
    if not path.is_file() and not path.is_symlink():
        raise RunDirError(f"{str(path)!r} is missing; the run did not finish")
    fd, _ = untrusted.open_plain(path)
    try:
        with os.fdopen(fd, "rb") as f:
            state = torch.load(f, weights_only=True)
    except Exception as e:  # a forged or damaged file: what torch.load raises varies with the damage
        raise RunDirError(f"{path}: cannot be loaded as a state_dict of tensors "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise RunDirError(f"{path}: holds {type(state).__name__}, not a state_dict of tensors")
    return state
