"""Per-tensor sums over a model's parameters and gradients, in a few whole-model passes.

After a traced optimizer step the tracer (``reprokit.trace``) needs, for every tensor,
Σ|g·θ_{t−1}|, Σ|Δθ|, Σ|θ_t|, ΣΔθ², Σθ_t² and Σg². A handful of ops per tensor would cost a
dispatch each, more than the arithmetic of most tensors; and right after a training step every op
costs more than in a loop of its own (its code and data are out of cache). So the sums come
from a dozen ops over flat copies, whatever the number of tensors:

- Five rows θ_a, g·θ_{t−1}, Δθ, θ_b, g, each tensor starting at a multiple of ``block`` values
  (zeros between). θ_t and θ_{t−1} take turns in rows θ_a and θ_b, so whichever turn it is, the
  rows whose |x| is summed (θ_t, g·θ_{t−1}, Δθ) and those whose x² is (θ_t, Δθ, g) are each one
  evenly strided view: rows 0-2 and 0, 2, 4 while θ_t is θ_a, rows 1-3 and 2-4 while it is θ_b.
  One op each puts |x| and x² into the six rows of ``work``.
- One op sums ``work`` per block of ``block`` values (each block lies in one tensor), and a 0/1
  matrix adds each tensor's blocks up in float64, where no BLAS float32 mode (TF32, bf16) applies:
  float32 block sums, then float64, as accurate as float32 sums of each tensor.

11 numbers per parameter (5 + 6 rows), and one host transfer per traced step. Where numba is
installed and the parameters are float32/float64 on the CPU, :mod:`reprokit.flatkernels` sums the
five rows in one pass instead (5 numbers per parameter, the sums in float64).
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch


class Turn(NamedTuple):
    """The rows of a :class:`FlatSums` while θ_t is in one of its two θ rows."""

    theta: torch.Tensor  # θ_t's row
    prev: torch.Tensor  # θ_{t−1}'s row
    absolute: torch.Tensor  # the rows θ_t, g·θ_{t−1}, Δθ in some order: one view
    squared: torch.Tensor  # the rows θ_t, Δθ, g in some order: one view
    targets: list[torch.Tensor]  # θ_t's row cut into views shaped like each parameter, then g's
    order: tuple[int, ...]  # the rows of work that get Σ|g·θ_{t−1}|, Σ|Δθ|, Σ|θ_t|, ΣΔθ², Σθ_t², Σg²


def _kernels() -> ModuleType | None:
    """:mod:`reprokit.flatkernels` (imported on first use: numba is slow to import), or ``None``
    where numba is missing."""
    try:
        from reprokit import flatkernels
    except ImportError:
        return None
    return flatkernels


class FlatSums:
    """Flat copies of ``params`` (and their gradients) in ``dtype``, and their per-tensor sums.

    ``compiled``: sum with the one-pass loops of :mod:`reprokit.flatkernels` (default: where they
    apply, i.e. numba is installed and the parameters are float32/float64 on the CPU); ``False``
    takes the torch ops below on any device and dtype (and 6 more numbers per parameter).
    """

    def __init__(self, params: list[torch.Tensor], dtype: torch.dtype, *,
                 compiled: bool | None = None) -> None:
        self.params = params
        self.sources = [p.detach() for p in params]  # sharing the parameters' storage
        block = 128  # doubled until there are at most 4096 blocks: the matrix product stays cheap
        while sum(p.numel() for p in params) > 4096 * block:
            block *= 2
        # where each tensor starts in a row, and the row length
        self.starts = [0, *itertools.accumulate(-(-p.numel() // block) * block for p in params)]
        device = params[0].device
        rows = torch.zeros(5, self.starts[-1], dtype=dtype, device=device)
        usable = device.type == "cpu" and dtype in (torch.float32, torch.float64)
        self.kernels = _kernels() if usable and compiled is not False else None
        if compiled and self.kernels is None:
            raise ValueError(f"compiled sums need numba and float32/float64 parameters on the CPU, not "
                             f"{dtype} on {device}; pass compiled=None to fall back to torch ops")
        if self.kernels is not None:
            spans = [(start, start + p.numel()) for start, p in zip(self.starts[:-1], params, strict=True)]
            self.bounds = np.array(spans, dtype=np.int64).reshape(-1, 2)
            self.out = np.zeros((6, len(params)))
        # the torch ops' work rows; with the kernels they stay empty (no memory)
        self.work = torch.zeros(0 if self.kernels else 6, self.starts[-1], dtype=dtype, device=device)
        self.blocked = self.work.unflatten(1, (-1, block))
        self.blocks = torch.zeros(self.blocked.shape[:2], dtype=dtype, device=device)
        self.segments = torch.zeros(self.blocks.shape[1], len(params), dtype=torch.float64, device=device)
        for i, (start, end) in enumerate(itertools.pairwise(self.starts)):
            self.segments[start // block:end // block, i] = 1
        theta_a, self.saliency, self.delta, theta_b, self.grad = rows
        # views made once, as every other view here: making one is an op too
        self.absolute, self.squared = self.work[:3], self.work[3:]

        def targets(theta: torch.Tensor) -> list[torch.Tensor]:
            return [row[start:start + p.numel()].view(p.shape) for row in (theta, self.grad)
                    for start, p in zip(self.starts[:-1], params, strict=True)]

        self.turns = (Turn(theta_a, theta_b, rows[0:3], rows[0::2], targets(theta_a), (1, 2, 0, 4, 3, 5)),
                      Turn(theta_b, theta_a, rows[1:4], rows[2:5], targets(theta_b), (0, 1, 2, 3, 4, 5)))

    def copy(self, turn: Turn) -> None:
        """The parameters into ``turn``'s θ_t row."""
        torch._foreach_copy_(turn.targets[:len(self.sources)], self.sources)

    def sums(self, turn: Turn) -> list[list[float]]:
        """The parameters and their gradients into ``turn``'s θ_t and g rows, and per tensor
        Σ|g·θ_{t−1}|, Σ|Δθ|, Σ|θ_t|, ΣΔθ², Σθ_t², Σg². A missing gradient (a frozen tensor) counts
        as zero; gradients are detached (they require grad after backward(create_graph=True))."""
        torch._foreach_copy_(turn.targets, self.sources + [
            p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params])
        if self.kernels is not None:
            self.kernels.traced_sums(turn.theta.numpy(), turn.prev.numpy(), self.grad.numpy(), self.bounds,
                                     self.out)
            compiled: list[list[float]] = self.out.tolist()
            return compiled
        torch.sub(turn.theta, turn.prev, out=self.delta)
        torch.mul(self.grad, turn.prev, out=self.saliency)
        torch.abs(turn.absolute, out=self.absolute)
        torch.mul(turn.squared, turn.squared, out=self.squared)
        torch.sum(self.blocked, dim=2, out=self.blocks)
        sums = self._per_tensor()
        return [sums[i] for i in turn.order]

    def norms(self, turn: Turn) -> list[list[float]]:
        """Σ|θ_t| and Σθ_t² per tensor of ``turn``'s θ_t row, by the ops and rows that give them
        in :meth:`sums`: the same bits as there."""
        if self.kernels is not None:
            self.kernels.norms(turn.theta.numpy(), self.bounds, self.out)
            return [self.out[0].tolist(), self.out[1].tolist()]
        one, two = turn.order[2], turn.order[4]
        torch.abs(turn.theta, out=self.work[one])
        torch.mul(turn.theta, turn.theta, out=self.work[two])
        # only these two rows are summed per block: a third of the memory traffic of all six
        torch.sum(self.blocked[one::two - one][:2], dim=2, out=self.blocks[one::two - one][:2])
        sums = self._per_tensor()
        return [sums[one], sums[two]]

    def _per_tensor(self) -> list[list[float]]:
        """The block sums added up per tensor (in float64)."""
        sums: list[list[float]] = torch.mm(self.blocks.double(), self.segments).tolist()
        return sums
