"""Parameter trajectories: how every tensor moves, which tensors matter, and a traceability score.

    RUN_DIR/trace.csv       step, tensor, numel, change_rate, update_ratio, grad_norm, saliency,
                            delta_l1, param_norm, digest: long form, flushed every traced step
    RUN_DIR/importance.csv  tensor, numel, snip, fisher, uniform: each column sums to 1 (at the end)

The row ``step = t`` describes optimizer step t: Δθ = θ_t − θ_{t−1} and g = the gradient that step
used, evaluated at θ_{t−1}. That is the essay's |θ_{t+1} − θ_t|₁ / |θ_t|₁ labelled by the step that
made the change. With ``every=k`` only steps k, 2k, ... are traced, and the parameters are copied
only right before a traced step, so Δθ is still one step's change. A traced step copies the
parameters and gradients into flat rows and sums them in one compiled pass (``reprokit.flatkernels``,
float64 sums; 5 numbers per parameter while tracing), not with a handful of small ops per tensor
(each op's dispatch costs more than the arithmetic of most tensors). Without numba, or for
parameters that are not float32/float64 on the CPU, a dozen torch ops over the rows give the same
sums in float32 blocks (``reprokit.flatsums``; 11 numbers per parameter). trace.csv keeps 9
significant digits; :meth:`Tracer.frame` has the full doubles.

Zero denominators: a tensor that is exactly zero (a zero-initialised bias) has |θ|₁ = 0, so its
change rate and update ratio are 0 when it did not move and ``inf`` when it did (any move away
from zero is an unbounded relative change). No epsilon is added: it would invent a scale. The score
maps ``inf`` to a change term of 1.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import operator
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import xxhash

from reprokit.callbacks import Callback, TrainState
from reprokit.digests import tensor_digest
from reprokit.errors import ReprokitError, RunDirError
from reprokit.flatsums import FlatSums
from reprokit.rundir import atomic_write_bytes
from reprokit.untrusted import open_plain, safe_truncate

TRACE = "trace.csv"
IMPORTANCE = "importance.csv"
TRACE_COLUMNS = ("step", "tensor", "numel", "change_rate", "update_ratio", "grad_norm", "saliency",
                 "delta_l1", "param_norm", "digest")
IMPORTANCE_METHODS = ("snip", "fisher", "uniform")
# the change rate that scores 0.5: CS231n's rule of thumb for a healthy update-to-weight ratio
CHANGE_SCALE = 1e-3
MODEL = "(model)"  # the ``tensor`` value of the whole-model rows of a score frame
# a row: step, the tensor's "tensor,numel," (CSV-quoted, in place of {}), six floats, digest
_ROW = "%d,{}%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%s\n"


class TraceError(ReprokitError, ValueError):
    """A trace is missing, empty, or a score parameter is out of range."""


class Tracer(Callback):
    """Records per-tensor change rate, update ratio, gradient norm, saliency and digest.

    Args:
        run_dir: write ``trace.csv`` (and ``importance.csv`` at the end) here, usually the run's
            own directory; ``None`` keeps the rows in memory only (:meth:`frame`).
        every: trace steps ``every``, ``2*every``, ...; larger values bound the cost.
    """

    def __init__(self, run_dir: str | Path | None = None, *, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise TraceError(f"every {every!r} must be an int >= 1; pass 1 to trace every step")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.every = every
        self._rows: list[tuple[Any, ...]] = []
        # per tensor Σ saliency and Σ g² over the traced steps, and their count: the importance
        # at the end without reading trace.csv back; None after a resume from a tracer state
        # without them, which falls back to the file
        self._totals: list[list[float]] | None = None
        self._traced = 0
        self._restored: dict[str, Any] | None = None
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._flat: FlatSums | None = None
        self._turn = 0  # the turn of _flat whose θ_t row the next traced step fills
        # |θ_{t−1}|₁ and ‖θ_{t−1}‖₂² per tensor (None: sum them in the traced step); θ_t's once traced
        self._prev_norms: list[list[float]] | None = None
        self._cur_norms: list[list[float]] = []
        self._traced_step = -1
        self._headers: list[tuple[bytes, int, int]] | None = None
        self._resume_bytes: int | None = None
        self._file: io.FileIO | None = None
        self._close: weakref.finalize[..., Any] | None = None
        self._formats: list[str] = []  # _ROW with each tensor's "tensor,numel," CSV-quoted once

    def on_train_start(self, state: TrainState) -> None:
        named = list(state.model.named_parameters())
        if not named:
            raise TraceError("the model has no parameters to trace; pass a model with parameters")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._sizes = [p.numel() for p in self._params]
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in self._params))
        self._flat = FlatSums(self._params, dtype)
        self._rows, self._traced_step, self._turn, self._prev_norms = [], -1, 0, None
        restored, self._restored = self._restored, None
        fresh = [[0.0] * len(named), [0.0] * len(named)]
        self._totals = fresh if restored is None else restored.get("totals")
        self._traced = int(restored.get("traced", 0)) if restored else 0
        self._headers = None
        if self._params[0].device.type == "cpu" and all(p.dtype == dtype for p in self._params):
            # the framing tensor_digest hashes before a tensor's bytes, and where they lie in the copy
            starts = self._flat.starts[:-1]
            self._headers = [(f"{name}\0{p.dtype}\0{tuple(p.shape)}\0".encode(), dtype.itemsize * start,
                              dtype.itemsize * start + p.nbytes)
                             for name, p, start in zip(self._names, self._params, starts, strict=True)]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(zip(self._names, self._sizes, strict=True))
        self._formats = [_ROW.replace("{}", line.replace("%", "%%") + ",")
                         for line in buffer.getvalue().splitlines()]
        if self.run_dir is not None:
            self._start_file(self.run_dir / TRACE)
        self._snapshot_if_due(state.step)

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self._trace(state.step, state.digests)
        self._snapshot_if_due(state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.run_dir is None:
            return
        assert self._close is not None
        self._close()
        if self._totals is not None:
            if self._traced:  # the whole run's importance: steps traced before a resume count too
                snip, fisher = self._totals
                table = _importance_table(self._names, self._sizes, snip, fisher, self._traced)
                atomic_write_bytes(self.run_dir / IMPORTANCE, table.to_csv(index=False).encode())
            return
        trace = read_trace(self.run_dir)
        if len(trace):
            data = importance(trace).to_csv(index=False).encode()
            atomic_write_bytes(self.run_dir / IMPORTANCE, data)

    def state_dict(self) -> dict[str, Any] | None:
        """The byte length of trace.csv at the checkpoint (a resume cuts the file back to it) and
        the importance totals so far."""
        if self._file is None:
            return None
        os.fsync(self._file.fileno())
        return {"trace_bytes": self._file.tell(), "totals": self._totals, "traced": self._traced}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The checkpoint's record (a checkpoint may come from someone else: its types are checked)."""
        if state is not None and not (isinstance(state, dict) and type(state.get("trace_bytes")) is int
                                      and type(state.get("traced", 0)) is int
                                      and _totals_ok(state.get("totals"))):
            raise TraceError(f"the checkpoint's trace state {str(state)[:80]!r} is not a trace_bytes int, "
                             "a traced int and totals of two float lists; the checkpoint is damaged")
        self._resume_bytes = state["trace_bytes"] if state else None
        self._restored = {"totals": state.get("totals"), "traced": state.get("traced", 0)} if state else None

    def frame(self) -> pd.DataFrame:
        """The rows traced in this process, in the columns of ``read_trace``."""
        return pd.DataFrame(self._rows, columns=list(TRACE_COLUMNS))

    def _start_file(self, path: Path) -> None:
        """A new trace.csv, or after a resume the old one cut back to the checkpoint's length."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._resume_bytes is not None:
            # rows a killed process wrote after the checkpoint; a size the file cannot have: RunDirError
            safe_truncate(path, self._resume_bytes)
            self._resume_bytes = None
        else:
            path.unlink(missing_ok=True)  # a link there must not lead the writes out of the run directory
            path.write_text(",".join(TRACE_COLUMNS) + "\n")
        # unbuffered: a traced step's rows go to the OS in one write, no flush needed
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by on_train_end or finalizer
        # closed when the tracer is collected, too: a run that raised never reaches on_train_end
        self._close = weakref.finalize(self, self._file.close)

    def _snapshot_if_due(self, step: int) -> None:
        if (step + 1) % self.every:
            return
        if self._traced_step == step:  # every=1: θ_t and its norms are at hand from _trace
            self._prev_norms = self._cur_norms
        else:  # θ_{t−1} goes where the next traced step looks for it
            assert self._flat is not None
            self._flat.copy(self._flat.turns[1 - self._turn])
            self._prev_norms = None

    def _trace(self, step: int, known: dict[str, str] | None = None) -> None:
        flat = self._flat
        assert flat is not None
        turn = flat.turns[self._turn]
        if self._prev_norms is None:
            self._prev_norms = flat.norms(flat.turns[1 - self._turn])
        sal, d1, c1, d2, c2, g2 = flat.sums(turn)
        p1, p2 = self._prev_norms
        self._cur_norms, self._traced_step = [c1, c2], step
        if self._totals is not None:
            self._totals = [list(map(operator.add, self._totals[0], sal)),
                            list(map(operator.add, self._totals[1], g2))]
        self._traced += 1
        # the loop's own digests of this step, when it took them: the same tensor_digest values
        digests = [known[n] for n in self._names] if known and all(n in known for n in self._names) \
            else self._digests(turn.theta)
        self._turn = 1 - self._turn  # θ_t is θ_{t−1} of the next step
        lines, sqrt = [], math.sqrt  # %.9g: float32 sums carry ~7 digits, and repr is 3x slower
        for name, size, line, moved, moved2, grad2, saliency, norm2, before, before2, digest in zip(
                self._names, self._sizes, self._formats, d1, d2, g2, sal, c2, p1, p2, digests, strict=True):
            row = (step, name, size, _ratio(moved, before), _ratio(sqrt(moved2), sqrt(before2)), sqrt(grad2),
                   saliency, moved, sqrt(norm2), digest)
            self._rows.append(row)
            lines.append(line % (step, *row[3:]))
        if self._file is not None:
            data = memoryview("".join(lines).encode())
            while data:  # a write may take part of the data only
                data = data[self._file.write(data):]

    def _digests(self, theta: torch.Tensor) -> list[str]:
        """``tensor_digest`` of every parameter at θ_t, hashed straight from the flat copy's bytes
        (a tensor_digest call costs more in torch overhead than in hashing)."""
        if self._headers is None:  # mixed dtypes or not on the CPU: the flat copy's bytes differ
            return [tensor_digest(name, p) for name, p in zip(self._names, self._params, strict=True)]
        data = theta.view(torch.uint8).numpy()
        digests = []
        for header, start, end in self._headers:
            h = xxhash.xxh3_128(header)
            h.update(data[start:end].data)
            digests.append(h.hexdigest())
        return digests


def _totals_ok(totals: Any) -> bool:  # None, or two lists of numbers (SNIP and Fisher sums per tensor)
    return totals is None or (isinstance(totals, list) and len(totals) == 2 and all(
        isinstance(t, list) and all(type(v) in (int, float) for v in t) for t in totals))


def _ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 0 (a zero tensor that stayed zero) and x/0 = inf for x > 0; NaN stays."""
    if den == 0:
        return 0.0 if num == 0 else num * math.inf
    return num / den


def read_trace(run_dir: str | Path) -> pd.DataFrame:
    """trace.csv as a DataFrame, one row per traced step and tensor."""
    path = Path(run_dir) / TRACE
    if not path.is_file():
        raise TraceError(f"{str(path)!r} is missing; train with callbacks=(Tracer(run_dir),) to record it")
    return _read_csv(path, {"tensor": str, "digest": str})


def _read_csv(path: Path, dtype: dict[str, type]) -> pd.DataFrame:
    fd, _ = open_plain(path)  # a symlink (it may lead out of the run directory) is a RunDirError
    try:
        with os.fdopen(fd, "rb") as f:
            frame: pd.DataFrame = pd.read_csv(f, dtype=dtype)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RunDirError(f"{path}: not a CSV file reprokit wrote ({str(e).splitlines()[0][:200]})") from None
    return frame


def read_importance(run_dir: str | Path) -> pd.DataFrame:
    """importance.csv, or for a run that has not finished, the importance of the steps traced so far."""
    path = Path(run_dir) / IMPORTANCE
    if path.is_file():
        return _read_csv(path, {"tensor": str})
    return importance(read_trace(run_dir))


def importance(trace: pd.DataFrame) -> pd.DataFrame:
    """Per-tensor importance over the traced steps, each column normalised to sum to 1.

    ``snip``: SNIP's connection sensitivity Σ|g ⊙ θ| (Lee et al. 2019), averaged over traced steps
    (SNIP proper uses step 1 alone). ``fisher``: the empirical Fisher's diagonal summed over the
    tensor, Σ g² = grad_norm², averaged over traced steps; g is the mini-batch gradient, not
    per-sample ones. Both are sums over the tensor's elements, so a tensor's share is its part of
    the model's total. ``uniform``: the essay's equal importance for every parameter, i.e. a
    tensor's share of the parameter count; it says nothing about training and is kept only to show
    that a score built on it is meaningless.
    """
    _require(trace, ("tensor", "numel", "grad_norm", "saliency"), "read_trace(run_dir) or Tracer.frame()")
    if trace.empty:
        raise TraceError("the trace has no rows, so importance is undefined; trace at least one step "
                         "(Tracer every <= steps)")
    by_tensor = trace.assign(fisher=trace["grad_norm"] ** 2).groupby("tensor", sort=False)
    count = by_tensor.size()
    return _importance_table(list(count.index), by_tensor["numel"].first().tolist(),
                             by_tensor["saliency"].sum().tolist(), by_tensor["fisher"].sum().tolist(),
                             count.tolist())


def _importance_table(names: Sequence[str], sizes: Sequence[int], snip: Sequence[float],
                      fisher: Sequence[float], traced: int | Sequence[int]) -> pd.DataFrame:
    """Per-tensor means over ``traced`` steps of the summed saliency and g², and the parameter
    count, each column normalised to sum to 1."""
    counts = [traced] * len(names) if isinstance(traced, int) else list(traced)
    table = pd.DataFrame({
        "tensor": list(names), "numel": list(sizes),
        "snip": [v / n for v, n in zip(snip, counts, strict=True)],
        "fisher": [v / n for v, n in zip(fisher, counts, strict=True)],
        "uniform": [float(n) for n in sizes],
    })
    for column in IMPORTANCE_METHODS:
        total = table[column].sum()
        if not total > 0:
            raise TraceError(f"{column} importance sums to {total} over the model: no traced step had a "
                             "gradient; trace steps that run backward")
        table[column] = table[column] / total
    return table


def traceability_score(
    trace: pd.DataFrame,
    importance: pd.DataFrame,
    alpha: float | Sequence[float] = 0.5,
    *,
    method: str = "snip",
    scale: float = CHANGE_SCALE,
) -> pd.DataFrame:
    """The essay's score α·change + (1−α)·explainability, per step, per tensor and for the model.

    Change term, per tensor: r / (r + ``scale``) for change rate r, in [0, 1] (``inf`` gives 1).
    It depends on that step alone, so a step's score never moves when the run gets longer or is
    resumed (a min-max over the run would), and ``scale`` (1e-3) is the change rate that scores 0.5.
    For the model: the mean over tensors, as the essay averages change rates.

    Explainability: whether the step moved the tensors that matter. With p_i the tensor's share of
    the step's total movement |Δθ|₁ and I_i its share of importance (``method`` column), a tensor
    scores min(p_i, I_i) / max(p_i, I_i) (1 when they agree; 1 if both are 0) and the model
    Σ min(p_i, I_i) = 1 − total variation distance between the two distributions. Both are in
    [0, 1]; a step that moved nothing scores 0 for the model.

    Returns:
        Columns alpha, step, tensor, change, explainability, score; ``tensor == MODEL`` marks the
        whole-model rows. One block per value of ``alpha``.
    """
    alphas = [float(alpha)] if isinstance(alpha, int | float) else [float(a) for a in alpha]
    for a in alphas:
        if not 0 <= a <= 1:
            raise TraceError(f"alpha {a} is outside [0, 1]; pass a weight between 0 (explainability "
                             "only) and 1 (change only), e.g. alpha=0.5")
    if method not in IMPORTANCE_METHODS:
        raise TraceError(f"method {method!r} is not available; choose one of {list(IMPORTANCE_METHODS)}")
    if not 0 < scale < float("inf"):
        raise TraceError(f"scale {scale} must be a positive number; pass e.g. scale={CHANGE_SCALE}")
    _require(trace, ("step", "tensor", "change_rate", "delta_l1"), "read_trace(run_dir) or Tracer.frame()")
    _require(importance, ("tensor", method), "read_importance(run_dir) or importance(trace)")
    weights = importance.set_index("tensor")[method]
    unknown = sorted(set(trace["tensor"]) - set(weights.index))
    if unknown:
        raise TraceError(f"tensors {unknown[:3]} have no importance; pass the importance of the same run")
    t = trace[["step", "tensor"]].copy()
    rate = trace["change_rate"]
    t["change"] = (rate / (rate + scale)).where(rate != float("inf"), 1.0)
    moved = trace.groupby("step")["delta_l1"].transform("sum")
    share = (trace["delta_l1"] / moved).where(moved > 0, 0.0)
    imp = trace["tensor"].map(weights)
    low, high = share.where(share < imp, imp), share.where(share > imp, imp)
    t["explainability"] = (low / high).where(high > 0, 1.0)
    model = t.assign(low=low).groupby("step", sort=True).agg(change=("change", "mean"),
                                                             explainability=("low", "sum"))
    model = model.reset_index().assign(tensor=MODEL)
    layers = pd.concat([t, model], ignore_index=True)
    frames = [layers.assign(alpha=a, score=a * layers["change"] + (1 - a) * layers["explainability"])
              for a in alphas]
    columns = ["alpha", "step", "tensor", "change", "explainability", "score"]
    return pd.concat(frames, ignore_index=True)[columns]


def _require(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TraceError(f"the frame lacks column(s) {missing}; pass {source}")
