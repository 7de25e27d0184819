"""The divergence finder: are two runs identical, and if not, where, when and why did they split?

Where and when come from the per-step tensor digests (digests.csv): the first step at which any
digest differs, and which tensors. Digests say *whether* a tensor differs, not by how much, so
max |Δθ| is measured exactly only where both runs left the parameters themselves: the final
models (model.pt) and checkpoints the two runs share (same step). Between those, the gap is shown by
the loss difference (metrics.csv) and, when both runs were traced, by the largest difference of a
tensor's L2 norm, | ‖θ_a‖₂ − ‖θ_b‖₂ |, a lower bound on that tensor's ‖θ_a − θ_b‖₂. Why comes from
the manifests (every setting, version or digest the two disagree on) and, for runs with per-step
fingerprints, from the first fingerprint that differs: :class:`reprokit.causes.Cause`, confirmed by
replaying the step with ``replay=True`` (:mod:`reprokit.replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from reprokit.causes import Cause, attribute_cause, environment_differences, with_replay
from reprokit.checkpoint import MODEL_KEY, CheckpointError
from reprokit.checkpointreader import list_checkpoints, read_checkpoint
from reprokit.differences import manifest_differences
from reprokit.digests import first_divergence, max_abs_diff
from reprokit.errors import ReprokitError, RunDirError
from reprokit.rundir import (
    DIGESTS,
    MANIFEST,
    METRICS,
    MODEL,
    RESULT,
    read_digests,
    read_json,
    read_metrics,
    read_model,
    step_rows,
)
from reprokit.trace import TRACE, read_trace

GAP_COLUMNS = ("step", "differing_tensors", "loss_a", "loss_b", "loss_diff", "param_norm_gap",
               "max_abs_diff")


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_runs` found."""

    a: Path
    b: Path
    identical: bool  # both finished with the same final digest and no step's digests differ
    first_step: int | None  # first step (with digests in both) at which a tensor differs
    tensors: tuple[str, ...]  # the tensors that differ at first_step
    max_abs_diff: float  # largest |θ_a − θ_b| at first_step; NaN unless both runs kept the parameters
    final_max_abs_diff: float  # between the final models; NaN unless both finished
    metric_name: str
    final_metric_a: float
    final_metric_b: float
    gap: pd.DataFrame = field(repr=False)  # one row per step both runs recorded: GAP_COLUMNS
    manifest_differences: pd.DataFrame = field(repr=False)  # key, a, b
    cause: Cause = field(default_factory=lambda: Cause("unknown", None, explanation="not attributed"))

    @property
    def final_metric_delta(self) -> float:
        """Final metric of b minus that of a."""
        return self.final_metric_b - self.final_metric_a

    def describe(self) -> str:
        """A few readable lines: the verdict, where the runs split, the final gap and the why."""
        lines = [f"a: {self.a}", f"b: {self.b}", f"identical: {'yes' if self.identical else 'no'}"]
        if self.first_step is not None:
            shown = ", ".join(self.tensors[:5]) + (", ..." if len(self.tensors) > 5 else "")
            size = "unknown (no shared checkpoint there)" if math.isnan(self.max_abs_diff) \
                else f"{self.max_abs_diff:.3g}"
            lines.append(f"first divergence: step {self.first_step}, {len(self.tensors)} tensor(s): {shown}")
            lines.append(f"max |Δθ| at step {self.first_step}: {size}")
        elif not self.identical:
            lines.append("first divergence: not found at any step both runs recorded digests for; "
                         "rerun with digest_every=1 to find it")
        if not math.isnan(self.final_max_abs_diff):
            lines.append(f"final models: max |Δθ| {self.final_max_abs_diff:.3g}")
        lines.append(f"final {self.metric_name}: a {self.final_metric_a:.4f}, b {self.final_metric_b:.4f} "
                     f"(b - a = {self.final_metric_delta:+.4f})")
        lines += self.cause.describe()
        diffs = self.manifest_differences
        lines.append(f"manifest differences: {len(diffs)}")
        lines += [f"  {row.key}: {row.a!r} -> {row.b!r}" for row in diffs.head(20).itertuples()]
        if len(diffs) > 20:
            lines.append(f"  ... and {len(diffs) - 20} more (Comparison.manifest_differences)")
        return "\n".join(lines)


def compare_runs(a: str | Path, b: str | Path, *, replay: bool = False) -> Comparison:
    """Compare two run directories: identical or not, first diverging step and tensors, the gap
    over the steps, final metric delta, the manifest differences and the cause of the split.

    A run that has not finished (no result.json) can be compared up to where it stopped; it is
    never identical to anything. With ``replay``, a ``nondeterminism`` or ``environment`` cause is
    checked by replaying its step twice from run a's state before it (:mod:`reprokit.replay`).
    """
    a, b = Path(a), Path(b)
    manifest_a, manifest_b = read_json(a, MANIFEST), read_json(b, MANIFEST)
    digests_a, digests_b = _digests(a), _digests(b)
    divergence = first_divergence(digests_a, digests_b)
    result_a, result_b = _result(a), _result(b)
    final_gap = max_abs_diff(read_model(a), read_model(b)) \
        if (a / MODEL).is_file() and (b / MODEL).is_file() else math.nan
    gap = _gap(a, b, final_gap, result_a, result_b)
    first = divergence.step if divergence is not None else None
    at_first = gap.loc[gap["step"] == first, "max_abs_diff"] if first is not None else pd.Series()
    identical = result_a is not None and result_b is not None and divergence is None \
        and result_a["final_digest"] == result_b["final_digest"]
    differences = manifest_differences(manifest_a, manifest_b)
    cause = attribute_cause(a, b, manifest_a, manifest_b, digests_a, digests_b, identical=identical)
    if replay:
        cause = _replayed(a, cause, environment_differences(differences))
    return Comparison(
        a=a,
        b=b,
        identical=identical,
        first_step=first,
        tensors=divergence.tensors if divergence is not None else (),
        max_abs_diff=float(at_first.iloc[0]) if len(at_first) else math.nan,
        final_max_abs_diff=final_gap,
        metric_name=str((result_a or result_b or {}).get("metric_name", "final_metric")),
        final_metric_a=_metric(result_a),
        final_metric_b=_metric(result_b),
        gap=gap,
        manifest_differences=differences,
        cause=cause,
    )


def _replayed(a: Path, cause: Cause, environment: list[str]) -> Cause:
    """``cause`` checked by replaying its step in this process (only the two causes a replay tests)."""
    if cause.name not in ("nondeterminism", "environment") or cause.step is None:
        return replace(cause, evidence=(*cause.evidence, f"replay: not run (it tests nondeterminism and "
                                        f"environment, not {cause.name})"))
    from reprokit.replay import replay_step  # the built-in trainer, loaded only for a replay

    try:
        replayed = replay_step(a, cause.step)
    except ReprokitError as e:
        return replace(cause, evidence=(*cause.evidence, f"replay: not possible: {e}"))
    return with_replay(cause, replayed.equal, replayed.detail(), environment)


def _result(run_dir: Path) -> dict[str, Any] | None:
    return read_json(run_dir, RESULT) if (run_dir / RESULT).is_file() else None


def _digests(run_dir: Path) -> list[tuple[int, dict[str, str]]]:
    """digests.csv, each tensor name and digest a str: an empty cell (pandas' NaN) is a damaged file."""
    history = read_digests(run_dir)
    for step, digests in history:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise RunDirError(f"{run_dir / DIGESTS}: step {step} has an empty tensor name or digest; "
                              "the file is damaged")
    return history


def _metric(result: dict[str, Any] | None) -> float:
    """The final metric a result.json holds; NaN if none (a run without one may record ``null``)."""
    value = (result or {}).get("final_metric")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _numbers(path: Path, frame: pd.DataFrame, columns: list[str], *,
             text: tuple[str, ...] = ()) -> pd.DataFrame:
    """``frame[columns]``, each present and numeric (``step`` an integer, those in ``text`` any
    type); else a RunDirError naming the file: a damaged CSV, not a pandas KeyError or merge error."""
    numeric, integer = pd.api.types.is_numeric_dtype, pd.api.types.is_integer_dtype
    bad = [c for c in columns if c not in frame or (c not in text and not numeric(frame[c]))
           or (c == "step" and not integer(frame[c]))]
    if bad:
        raise RunDirError(f"{path}: column(s) {bad} missing or not numbers (step: integers); the file is "
                          "damaged or not reprokit's")
    return frame[columns]


def _gap(a: Path, b: Path, final_gap: float, result_a: dict[str, Any] | None,
         result_b: dict[str, Any] | None) -> pd.DataFrame:
    columns = ["step", "loss"]
    metrics_a, metrics_b = (_numbers(run / METRICS, step_rows(read_metrics(run)), columns) for run in (a, b))
    metrics = pd.merge(metrics_a, metrics_b, on="step", suffixes=("_a", "_b"))
    metrics["loss_diff"] = (metrics["loss_a"] - metrics["loss_b"]).abs()
    history_b = dict(_digests(b))
    differing = {step: sum(d.get(n) != theirs.get(n) for n in set(d) | set(theirs))
                 for step, d in _digests(a) if (theirs := history_b.get(step)) is not None}
    metrics["differing_tensors"] = metrics["step"].map(differing).astype("Int64")
    metrics["param_norm_gap"] = metrics["step"].map(_norm_gap(a, b)).astype(float)
    exact = _checkpoint_gaps(a, b)
    if result_a and result_b and result_a.get("steps") == result_b.get("steps") and not math.isnan(final_gap):
        exact[int(result_a["steps"])] = final_gap
    metrics["max_abs_diff"] = metrics["step"].map(exact).astype(float)
    return metrics[list(GAP_COLUMNS)]


def _norm_gap(a: Path, b: Path) -> dict[int, float]:
    """Per step, the largest | ‖θ_a‖₂ − ‖θ_b‖₂ | over tensors, when both runs were traced."""
    if not ((a / TRACE).is_file() and (b / TRACE).is_file()):
        return {}
    cols = ["step", "tensor", "param_norm"]
    trace_a, trace_b = (_numbers(run / TRACE, read_trace(run), cols, text=("tensor",)) for run in (a, b))
    both = pd.merge(trace_a, trace_b, on=["step", "tensor"], suffixes=("_a", "_b"))
    gap = (both["param_norm_a"] - both["param_norm_b"]).abs().groupby(both["step"]).max()
    return dict(zip(gap.index.astype(int), gap.astype(float), strict=True))


def _checkpoint_gaps(a: Path, b: Path) -> dict[int, float]:
    """max |θ_a − θ_b| at every step both runs hold a checkpoint that verifies."""
    def models(run_dir: Path) -> dict[int, Path]:
        return {int(p.name.split("-")[-1]): p for p in list_checkpoints(run_dir)}

    paths_a, paths_b = models(a), models(b)
    gaps: dict[int, float] = {}
    for step in sorted(paths_a.keys() & paths_b.keys()):
        try:
            state_a, state_b = read_checkpoint(paths_a[step])[1], read_checkpoint(paths_b[step])[1]
        except CheckpointError:
            continue  # a damaged checkpoint just leaves that step without an exact gap
        gaps[step] = max_abs_diff(state_a[MODEL_KEY], state_b[MODEL_KEY])
    return gaps
