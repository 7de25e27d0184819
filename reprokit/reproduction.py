"""Reproduce a finished run from its manifest alone, and say how close the rerun came.

The essays' procedure — get the original setup, rerun it in the same or a similar environment,
compare the results — as one call. Before any training step the rerun checks what it can: the
config parses, the data it loads hashes to the recorded digest, and for a fine-tuned child the
parent's weights still hash to the digest the child recorded. A parent that is gone or changed is
re-created first from its own manifest (recursively), so a whole lineage can be reproduced.

Verdicts, strongest first:
    bitwise           every step's tensor digests and the final digest are equal
    within tolerance  the bits differ, the final metric is within ``tolerance`` (absolute)
    failed            the final metric moved by more than ``tolerance``
Next to the verdict: every manifest entry the two runs disagree on (thread count, package
versions, platform, dirty code, ...), which is usually the reason a rerun is not bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reprokit.compare import Comparison, compare_runs
from reprokit.config import TrainConfig
from reprokit.data import load_dataset
from reprokit.errors import ReprokitError
from reprokit.finetuning import LineageError, load_parent
from reprokit.relaunch import is_script_run, run_recorded
from reprokit.rundir import MANIFEST, RESULT, read_json
from reprokit.trainer import train

DEFAULT_TOLERANCE = 0.01  # absolute difference of the final metric (accuracy: one point in a hundred)
VERDICTS = ("bitwise", "within tolerance", "failed")
# manifest entries that differ between any two runs of one recipe, or that the rerun sets itself
_EXPECTED = ("code.untracked", "config.init_from", "lineage.parent.path")


class ReproduceError(ReprokitError):
    """A run cannot be reproduced: unfinished, its data changed, or its parent is unrecoverable."""


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` found."""

    original: Path
    reproduced: Path
    verdict: str  # one of VERDICTS
    tolerance: float
    comparison: Comparison = field(repr=False)
    parent: Reproduction | None = None  # the parent's reproduction, when it had to be re-created

    @property
    def identical(self) -> bool:
        return self.comparison.identical

    @property
    def metric_delta(self) -> float:
        """Final metric of the rerun minus the original's."""
        return self.comparison.final_metric_delta

    @property
    def differences(self) -> pd.DataFrame:
        """The manifest entries the two runs disagree on: key, original, reproduced."""
        diffs = self.comparison.manifest_differences
        if len(diffs):
            diffs = diffs[~diffs["key"].str.startswith(_EXPECTED)]
        return diffs.rename(columns={"a": "original", "b": "reproduced"}).reset_index(drop=True)

    def table(self) -> pd.DataFrame:
        """One row: the verdict table of a notebook (stack several with ``pd.concat``)."""
        c = self.comparison
        return pd.DataFrame([{
            "run": self.original.name, "verdict": self.verdict, "bitwise": c.identical,
            "first_divergence": c.first_step, "metric": c.metric_name,
            "original": c.final_metric_a, "reproduced": c.final_metric_b, "delta": self.metric_delta,
            "tolerance": self.tolerance, "final_max_abs_diff": c.final_max_abs_diff,
            "differences": "; ".join(f"{r.key}: {r.original!r} -> {r.reproduced!r}"
                                     for r in self.differences.itertuples()),
            "parent": self.parent.verdict if self.parent else ("verified" if self._has_parent() else None),
        }])

    def describe(self) -> str:
        on = f"tolerance {self.tolerance:g} on {self.comparison.metric_name}"
        lines = [f"original:   {self.original}", f"reproduced: {self.reproduced}",
                 f"verdict:    {self.verdict} ({on})"]
        if self.parent is not None:
            lines.append(f"parent re-created: {self.parent.verdict} ({self.parent.reproduced})")
        lines += self.comparison.describe().splitlines()[2:]  # its a:/b: lines repeat ours
        return "\n".join(lines)

    def _has_parent(self) -> bool:
        return bool((read_json(self.original, MANIFEST).get("lineage") or {}).get("parent"))


def reproduce(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    changes: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool | None = None,
) -> Reproduction:
    """Re-execute the finished run in ``run_dir`` from its manifest and compare.

    Args:
        run_dir: a finished run directory (it has ``result.json``).
        out: where the rerun goes; default ``<run_dir>-reproduced`` (``-2``, ``-3``, ... if taken).
        changes: config fields to change, e.g. ``{"threads": 2}`` to reproduce in another
            environment; they show up among the differences.
        tolerance: largest absolute difference of the final metric that still counts as reproduced.
        progress: show a progress bar (see ``train``).
    """
    run_dir = Path(run_dir)
    if not 0 <= tolerance < math.inf:
        raise ReproduceError(f"tolerance {tolerance} must be a number >= 0; pass e.g. {DEFAULT_TOLERANCE}")
    if (run_dir / MANIFEST).is_file() and is_script_run(run_dir):
        if changes:
            raise ReproduceError(f"changes {sorted(changes)} apply to built-in runs; a script run is "
                                 "reproduced with its own recorded command (REPROKIT_THREADS sets threads)")
        out = Path(out) if out is not None else _free_path(run_dir.parent / f"{run_dir.name}-reproduced")
        return reproduce_script(run_dir, out, tolerance=tolerance)
    if not (run_dir / RESULT).is_file():
        raise ReproduceError(f"run {str(run_dir)!r} has no {RESULT}: only a finished run can be reproduced; "
                             f"finish it with `reprokit resume {run_dir}`")
    manifest = read_json(run_dir, MANIFEST)
    config = TrainConfig.from_dict(manifest["config"])
    config = config.replace(**changes) if changes else config
    out = Path(out) if out is not None else _free_path(run_dir.parent / f"{run_dir.name}-reproduced")
    _check_data(config, manifest)
    config, parent = _check_parent(config, manifest, out, tolerance, progress)
    train(config, out, progress=progress)
    comparison = compare_runs(run_dir, out)
    delta = abs(comparison.final_metric_delta)
    verdict = "bitwise" if comparison.identical else "within tolerance" if delta <= tolerance else "failed"
    return Reproduction(run_dir, out, verdict, tolerance, comparison, parent)


def reproduce_script(run_dir: str | Path, out: str | Path, *, tolerance: float,
                     env: dict[str, str] | None = None) -> Reproduction:
    """Re-execute a finished script run into ``out`` and compare: a :class:`Reproduction`."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RESULT).is_file():
        raise ReproduceError(f"run {str(run_dir)!r} has no {RESULT}: only a finished run can be reproduced; "
                             f"finish it with `reprokit resume {run_dir}`")
    if (out / MANIFEST).exists():
        raise ReproduceError(f"{str(out)!r} already holds a run; pass a new --out directory")
    status = run_recorded(run_dir, out, env=env)
    if status != 0:
        raise ReproduceError(f"the recorded command exited with status {status}; see its output above")
    comparison = compare_runs(run_dir, out)
    delta = abs(comparison.final_metric_delta)
    verdict = "bitwise" if comparison.identical else \
        "within tolerance" if not math.isnan(delta) and delta <= tolerance else "failed"
    return Reproduction(run_dir, out, verdict, tolerance, comparison, None)


def _check_data(config: TrainConfig, manifest: dict[str, Any]) -> None:
    recorded = manifest["data"]["digest"]
    now = load_dataset(config.dataset, split_seed=config.split_seed, val_fraction=config.val_fraction,
                       train_limit=config.train_limit).digest
    if now != recorded:
        raise ReproduceError(
            f"dataset {config.dataset!r} hashes to {now} here but the run recorded {recorded}: the data "
            "changed (another scikit-learn release or a changed loader); nothing was trained"
        )


def _check_parent(
    config: TrainConfig, manifest: dict[str, Any], out: Path, tolerance: float, progress: bool | None
) -> tuple[TrainConfig, Reproduction | None]:
    """The parent the child recorded, verified; or re-created from its own manifest."""
    recorded = (manifest.get("lineage") or {}).get("parent")
    if config.init_from is None or not recorded:
        return config, None
    try:
        if load_parent(config.init_from).digest == recorded["digest"]:
            return config, None
        problem = "hashes to another digest than the child recorded"
    except LineageError as e:
        problem = str(e)
    source = Path(recorded.get("path") or config.init_from)
    parent_run = source if source.is_dir() else source.parent
    if not (parent_run / MANIFEST).is_file():
        raise ReproduceError(
            f"parent {config.init_from!r} {problem}, and there is no parent manifest at "
            f"{str(parent_run / MANIFEST)!r} to re-create it from; restore the parent weights"
        )
    if not (parent_run / RESULT).is_file():
        raise ReproduceError(f"parent run {str(parent_run)!r} never finished, so it cannot be re-created; "
                             f"finish it with `reprokit resume {parent_run}`")
    rebuilt = reproduce(parent_run, out.parent / f"{out.name}-parent", tolerance=tolerance, progress=progress)
    return config.replace(init_from=str(rebuilt.reproduced)), rebuilt


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
