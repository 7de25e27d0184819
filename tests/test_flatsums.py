"""Per-tensor sums over flat copies: the numbers the tracer's rows are made of."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprokit.flatsums import FlatSums


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch-ops"])
def test_sums_are_the_float64_sums_and_norms_repeat_them_bit_for_bit(compiled: bool) -> None:
    """With more than 4096 blocks of 128 values (the blocks grow), an empty tensor, a channels_last
    one and a frozen one, every per-tensor sum agrees with float64 to float32 accuracy, and
    ``norms`` gives the bits ``sums`` gave for the same θ: by the compiled loops and by torch ops."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(700, 800)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.zeros(0)),
              nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
              nn.Parameter(torch.randn(7))]
    for p in params[:-1]:
        p.grad = torch.randn_like(p)  # the last one is frozen: no gradient
    flat = FlatSums(params, torch.float32, compiled=compiled)
    assert (flat.kernels is not None) == compiled
    assert flat.blocked.shape[2] > 128
    before = [p.detach().double().clone() for p in params]
    flat.copy(flat.turns[1])  # θ_{t−1}
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-3)
    sums = flat.sums(flat.turns[0])
    for i, (p, prev) in enumerate(zip(params, before, strict=True)):
        theta, delta = p.detach().double(), p.detach().double() - prev
        grad = p.grad.double() if p.grad is not None else torch.zeros_like(theta)
        expected = [(grad * prev).abs().sum(), delta.abs().sum(), theta.abs().sum(), delta.square().sum(),
                    theta.square().sum(), grad.square().sum()]
        got = [row[i] for row in sums]
        assert got == pytest.approx([float(x) for x in expected], rel=2e-6, abs=1e-12)
    assert flat.norms(flat.turns[0]) == [sums[2], sums[4]]


def test_compiled_sums_refuse_what_they_cannot_sum_and_the_default_falls_back() -> None:
    params = [nn.Parameter(torch.randn(5, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match=r"compiled sums need .*torch\.bfloat16.*compiled=None"):
        FlatSums(params, torch.bfloat16, compiled=True)
    flat = FlatSums(params, torch.bfloat16)  # the default: torch ops for bf16
    assert flat.kernels is None
    params[0].grad = torch.ones_like(params[0])
    flat.copy(flat.turns[1])
    assert flat.sums(flat.turns[0])[5] == [5.0]  # Σg² of five ones
