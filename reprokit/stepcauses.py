"""The split at a step: :class:`Cause`, and the walk over the steps both runs recorded.

At the first step where a digest or a fingerprint differs (digests.csv, fingerprints.csv,
grads.csv: see :mod:`reprokit.fingerprints`), the inputs of that step are looked at in the order
they were made: sample indices, batch bytes, RNG streams, loss and gradients, updated parameters;
what differs first names the cause (the list is :mod:`reprokit.causes`'s). The run-level causes,
from the manifests, come first and live there.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reprokit.fingerprints import FINGERPRINTS, STREAMS
from reprokit.rundir import RESULT, read_fingerprints, read_grads, read_metrics, step_rows

# a loss that moves by more than this (relative) with the same parameters was computed on other
# inputs: a kernel's reduction order moves a float32 loss by ~1e-7
_INPUT_SCALE = 1e-4
_DIFF_LINES = 40  # of a code diff shown in the evidence


@dataclass(frozen=True)
class Cause:
    """Why two runs split: one of :data:`reprokit.causes.CAUSES`, where, and what to do about it."""

    name: str
    step: int | None  # the step whose fingerprints show it; None for a run-level cause
    tensors: tuple[str, ...] = ()  # the parameters (or gradients) that differ there
    streams: tuple[str, ...] = ()  # the RNG streams that differ (rng)
    explanation: str = ""
    fix: str = ""
    evidence: tuple[str, ...] = ()  # what the records say, one line each
    diff: str = field(default="", repr=False)  # code: the diff between the two runs' kept diffs
    replay: str | None = None  # "confirmed" / "cleared" once compare --replay ran the step again

    def describe(self) -> list[str]:
        """``cause: NAME`` and indented lines: where, why, the evidence, the fix."""
        lines = [f"cause: {self.name}", f"  {self.explanation}"]
        if self.step is not None:
            shown = ", ".join(self.tensors[:5]) + (", ..." if len(self.tensors) > 5 else "")
            lines.append(f"  step: {self.step}" + (f"; tensors: {shown}" if shown else "")
                         + (f"; streams: {', '.join(self.streams)}" if self.streams else ""))
        lines += [f"  evidence: {line}" for line in self.evidence]
        if self.diff:
            body = self.diff.splitlines()
            lines += [f"    {line}" for line in body[:_DIFF_LINES]]
            if len(body) > _DIFF_LINES:
                lines.append(f"    ... {len(body) - _DIFF_LINES} more lines (Cause.diff)")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return lines


def step_cause(a: Path, b: Path, digests_a: Mapping[int, Mapping[str, str]],
               digests_b: Mapping[int, Mapping[str, str]], environment: list[str]) -> Cause:
    """The cause found by walking the steps both run directories recorded, given their per-step
    parameter digests and the manifests' bit-relevant ``environment`` differences."""
    return _StepWalk(a, b, dict(digests_a), dict(digests_b), environment).cause()


class _StepWalk:
    """The steps both runs recorded, walked in order until something differs."""

    def __init__(self, a: Path, b: Path, digests_a: dict[int, Mapping[str, str]],
                 digests_b: dict[int, Mapping[str, str]], environment: list[str]) -> None:
        self.a, self.b, self.da, self.db, self.environment = a, b, digests_a, digests_b, environment
        self.fa, self.fb = _rows(read_fingerprints(a)), _rows(read_fingerprints(b))
        self.steps = sorted(digests_a.keys() & digests_b.keys())

    def cause(self) -> Cause:
        init = self._init()
        if init is not None:
            return init
        missing = [str(p) for p, f in ((self.a, self.fa), (self.b, self.fb)) if not f]
        if missing:
            return self._undetermined(f"{' and '.join(missing)} recorded no {FINGERPRINTS} (a run recorded "
                                      "before per-step fingerprints existed, or with digest_every=0)")
        previous = 0
        for step in self.steps:
            if step == 0:
                continue
            ra, rb = self.fa.get(step), self.fb.get(step)
            if ra is None or rb is None:
                continue
            found = self._at(step, previous, ra, rb)
            if found is not None:
                return found
            previous = step
        return self._undetermined("every step both runs recorded is equal")

    def _init(self) -> Cause | None:
        if 0 not in self.da or 0 not in self.db:
            return None
        tensors = _differing(self.da[0], self.db[0])
        if not tensors:
            return None
        evidence = [f"step 0: {len(tensors)} of {len(self.da[0])} initial parameter digests differ"]
        streams = _differing_streams(self.fa.get(0), self.fb.get(0))
        if streams:
            evidence.append(f"the RNG streams when the run began differ too: {', '.join(streams)}")
        return Cause("init", 0, tensors, streams, evidence=tuple(evidence),
                     explanation="the initial parameters differ with the same recipe: the model was "
                                 "initialised from an unseeded RNG, or after other random draws",
                     fix="create the model right after reprokit.Run(...) (which seeds every RNG), with no "
                         "random draw in between, or seed its own generator from the run's seed")

    def _at(self, step: int, previous: int, ra: Mapping[str, str], rb: Mapping[str, str]) -> Cause | None:
        params = _differing(self.da[step], self.db[step])
        columns = [c for c in ("indices", "batch", *STREAMS, "loss", "grads") if _differs(ra, rb, c)]
        if not params and not columns:
            return None
        evidence = [f"step {step}: " + (", ".join(columns) if columns else "no fingerprint") + " differ"
                    + (f"; {len(params)} parameter digest(s) after the update" if params else "")]
        narrowed = self._narrowed(step, previous, evidence)
        base = self._classify(step, ra, rb, columns, params, evidence)
        if narrowed is not None and narrowed < step and base.name in ("nondeterminism", "optimizer"):
            return self._undetermined(f"the losses place the split at step {narrowed - 1} or {narrowed}, "
                                      f"between recorded steps; rerun with digest_every=1", step=step,
                                      evidence=base.evidence)
        return base

    def _classify(self, step: int, ra: Mapping[str, str], rb: Mapping[str, str], columns: list[str],
                  params: tuple[str, ...], evidence: list[str]) -> Cause:
        if "indices" in columns:
            return Cause("data-order", step, params, evidence=tuple(evidence),
                         explanation=f"step {step} drew other samples: the data order is not a function of "
                                     "the seed",
                         fix="read the data through run.loader(...) (order = f(seed, epoch)) and iterate it "
                             "the same way in both runs")
        if "batch" in columns:
            return Cause("augmentation", step, params, evidence=tuple(evidence),
                         explanation=f"step {step} fetched the same samples with other bytes: a random "
                                     "transform draws from a source reprokit does not seed per sample (a "
                                     "random.Random(), np.random.default_rng() or torch.Generator of the "
                                     "dataset's own, seeded from time or OS entropy)",
                         fix="draw augmentations from the global random/numpy/torch RNGs, which run.loader "
                             "seeds per sample, or seed the dataset's own generator from the sample index")
        streams = tuple(s for s in STREAMS if s in columns)
        if streams:
            return self._rng(step, streams, params, evidence, "before the step's batch was yielded")
        grads = _differing(dict(_grads(self.a).get(step, {})), dict(_grads(self.b).get(step, {})))
        if "loss" in columns or "grads" in columns:
            unseen = self._unseen_batch(step, ra, rb, params, evidence)
            if unseen is not None:
                return unseen
            drawn = _differing_streams(*self._next(step))
            if drawn:
                return self._rng(step, drawn, params, evidence,
                                 "after the step's batch was yielded (the next step's streams differ)")
            where = "the forward pass (the loss differs)" if "loss" in columns else \
                "the backward pass (same loss, other gradients)"
            return self._arithmetic(step, grads or params, evidence, where)
        if ra.get("grads") and rb.get("grads"):
            lr = self._lr(step)
            return Cause("optimizer", step, params, evidence=(*evidence, *lr),
                         explanation=f"step {step} had the same gradients but other updated parameters: the "
                                     "update differs (optimizer state, a scheduler's lr, a fused kernel)",
                         fix="track the optimizer and scheduler with run.track(...) so checkpoints hold "
                             "their state, and step the scheduler the same way in both runs")
        unrecorded = f"step {step}: gradients not recorded (grad_digest_every), so the backward pass and " \
            "the update cannot be told apart"
        return self._arithmetic(step, params, (*evidence, unrecorded), "the backward pass or the update")

    def _rng(self, step: int, streams: tuple[str, ...], params: tuple[str, ...], evidence: Sequence[str],
             when: str) -> Cause:
        return Cause("rng", step, params, streams, evidence=(*evidence, f"streams {', '.join(streams)} "
                                                             f"differ {when}"),
                     explanation=f"with the same batch and parameters, the {'/'.join(streams)} RNG "
                                 f"stream(s) were drawn differently around step {step}: an extra or "
                                 "data-dependent draw, or dropout drawing from another stream",
                     fix="give side randomness (evaluation shuffling, a random crop outside the dataset) a "
                         "torch.Generator of its own, and make draws unconditional")

    def _arithmetic(self, step: int, tensors: tuple[str, ...], evidence: Sequence[str], where: str) -> Cause:
        if self.environment:
            return Cause("environment", step, tensors, evidence=(*evidence, *self.environment),
                         explanation=f"step {step} had the same batch, RNG streams and parameters but "
                                     f"differs in {where}, and the runs' environments differ",
                         fix="run both with the same threads (Run(threads=N) or REPROKIT_THREADS), library "
                             "versions, hardware and determinism flags")
        return Cause("nondeterminism", step, tensors,
                     evidence=(*evidence, "no recorded environment difference"),
                     explanation=f"step {step} had the same batch, RNG streams, parameters and environment "
                                 f"but differs in {where}: a nondeterministic kernel, or randomness reprokit "
                                 "does not see (OS entropy, time, hash order)",
                     fix="keep Run(deterministic=True), draw randomness only from the seeded RNGs (not "
                         "os.urandom, time or uuid), and confirm with `reprokit compare --replay`")

    def _unseen_batch(self, step: int, ra: Mapping[str, str], rb: Mapping[str, str], params: tuple[str, ...],
                      evidence: list[str]) -> Cause | None:
        """With no batch fingerprint (the loop does not read through run.loader), a loss that moved
        far beyond rounding with the same parameters says the step computed on other inputs."""
        if ra.get("batch") or rb.get("batch") or not (ra.get("loss") and rb.get("loss")):
            return None
        la, lb = _loss(ra["loss"]), _loss(rb["loss"])
        scale = max(abs(la), abs(lb), 1e-30)
        gap = abs(la - lb) / scale
        if not gap > _INPUT_SCALE:
            return None
        return Cause("data-order", step, params, evidence=(
            *evidence, f"step {step}: no batch fingerprint (its batches do not come through run.loader); the "
            f"loss moved by {gap:.2g} relative with the same parameters and RNG streams, far beyond rounding "
            f"(~1e-7)"),
            explanation=f"step {step} most likely computed on other samples: a DataLoader shuffling from an "
                        "unseeded generator (an unseeded augmentation leaves the same trace; without the "
                        "batch fingerprint the two cannot be told apart)",
            fix="read the data through run.loader(loader): order and augmentation become f(seed, epoch, "
                "index), and compare can then tell order from augmentation")

    def _next(self, step: int) -> tuple[Mapping[str, str] | None, Mapping[str, str] | None]:
        later = [s for s in self.fa if s > step and s in self.fb]
        return (self.fa[min(later)], self.fb[min(later)]) if later else (None, None)

    def _narrowed(self, step: int, previous: int, evidence: list[str]) -> int | None:
        """When the previous recorded step is not ``step - 1``, the first step in between whose loss
        differs (metrics.csv has every step), said in ``evidence``."""
        if step - previous <= 1:
            return None
        losses = self._losses()
        first = next((s for s in range(previous + 1, step + 1) if losses.get(s)), None)
        evidence.append(f"digests are recorded every {step - previous} steps here: the split lies in steps "
                        f"{previous + 1}..{step}" + (f"; the losses (every step) first differ at step {first}"
                                                     if first is not None else ""))
        return first

    def _losses(self) -> dict[int, bool]:
        """Per step of metrics.csv, whether the two runs' losses differ."""
        return {s: not (la == lb or (math.isnan(la) and math.isnan(lb)))
                for s, (la, lb) in self._column("loss").items()}

    def _lr(self, step: int) -> list[str]:
        la, lb = self._column("lr").get(step, (math.nan, math.nan))
        return [f"lr at step {step}: {la!r} -> {lb!r}"] if la != lb and not math.isnan(la) else []

    def _column(self, name: str) -> dict[int, tuple[float, float]]:
        cols = ["step", name]
        frames = [step_rows(read_metrics(p))[cols] for p in (self.a, self.b)]
        both = pd.merge(frames[0], frames[1], on="step", suffixes=("_a", "_b"))
        return {int(s): (float(x), float(y)) for s, x, y in both.itertuples(index=False)}

    def _undetermined(self, reason: str, *, step: int | None = None, evidence: Sequence[str] = ()) -> Cause:
        first = next((s for s in self.steps if _differing(self.da[s], self.db[s])), None)
        notes = list(evidence)
        if first is not None and step is None:
            notes.append(f"digests first differ at step {first}")
        for path in (self.a, self.b):
            if not (path / RESULT).is_file():
                notes.append(f"{path} did not finish (no {RESULT})")
        notes += self.environment
        return Cause("unknown", step if step is not None else first, (), evidence=tuple(notes),
                     explanation=f"undetermined: {reason}",
                     fix="rerun both with this reprokit and digest_every=1, then compare again")


def _rows(frame: pd.DataFrame) -> dict[int, dict[str, str]]:
    return {int(r["step"]): {str(k): str(v) for k, v in r.items() if k != "step"}
            for r in frame.to_dict("records")}


def _grads(run_dir: Path) -> dict[int, dict[str, str]]:
    return dict(read_grads(run_dir))


def _differs(ra: Mapping[str, str], rb: Mapping[str, str], column: str) -> bool:
    """Both runs took this fingerprint and it differs (an empty cell was not taken: no evidence)."""
    x, y = ra.get(column, ""), rb.get(column, "")
    return bool(x) and bool(y) and x != y


def _differing(a: Mapping[str, str], b: Mapping[str, str]) -> tuple[str, ...]:
    names = list(a) + [n for n in b if n not in a]
    return tuple(n for n in names if a.get(n) != b.get(n))


def _differing_streams(ra: Mapping[str, str] | None, rb: Mapping[str, str] | None) -> tuple[str, ...]:
    if ra is None or rb is None:
        return ()
    return tuple(s for s in STREAMS if _differs(ra, rb, s))


def _loss(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value
