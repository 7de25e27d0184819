"""Tests for reprokit.digests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reprokit.digests import (
    Divergence,
    first_divergence,
    max_abs_diff,
    model_digest,
    state_digests,
    tensor_digest,
)


def _tensor() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7


def test_equal_tensors_equal_digests():
    """Two separately built but equal tensors have the same digest."""
    assert tensor_digest("w", _tensor()) == tensor_digest("w", _tensor().clone())


def test_digest_changes_with_name():
    """The name is part of the digest."""
    assert tensor_digest("w", _tensor()) != tensor_digest("b", _tensor())


def test_digest_changes_with_dtype_of_same_bytes():
    """The same bytes under another dtype give another digest."""
    t = _tensor()
    assert tensor_digest("w", t) != tensor_digest("w", t.view(torch.int32))


def test_digest_changes_with_shape_of_same_bytes():
    """The same bytes in another shape give another digest."""
    t = _tensor()
    assert tensor_digest("w", t) != tensor_digest("w", t.reshape(4, 3))
    assert tensor_digest("w", t) != tensor_digest("w", t.reshape(-1))


@pytest.mark.parametrize("byte_index", [0, 23, 47])
def test_digest_changes_with_one_byte(byte_index):
    """Flipping one bit of one byte changes the digest."""
    t = _tensor()
    changed = t.clone()
    raw = changed.view(torch.uint8).reshape(-1)
    raw[byte_index] ^= 1
    assert not torch.equal(t.view(torch.uint8), changed.view(torch.uint8))
    assert tensor_digest("w", t) != tensor_digest("w", changed)


def test_digest_bfloat16():
    """bfloat16 tensors (which numpy cannot hold) digest, and by value."""
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    assert tensor_digest("w", a) == tensor_digest("w", a.clone())
    assert tensor_digest("w", a) != tensor_digest("w", a + 1)


def test_digest_bool():
    """Bool tensors digest, and by value."""
    a = torch.tensor([True, False, True])
    assert tensor_digest("m", a) == tensor_digest("m", a.clone())
    assert tensor_digest("m", a) != tensor_digest("m", ~a)


def test_digest_zero_dim():
    """0-d tensors digest, by value, and differently from the same value with shape (1,)."""
    a = torch.tensor(3.5)
    assert tensor_digest("s", a) == tensor_digest("s", torch.tensor(3.5))
    assert tensor_digest("s", a) != tensor_digest("s", torch.tensor(4.5))
    assert tensor_digest("s", a) != tensor_digest("s", a.reshape(1))


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.t(),
        lambda t: t[:, ::2],
        lambda t: t[1:, 1:],
        lambda t: t[0:1].expand(5, 4),
    ],
    ids=["transpose", "strided", "offset", "expanded"],
)
def test_digest_non_contiguous_equals_contiguous(view):
    """A non-contiguous view digests like its .contiguous() copy."""
    v = view(_tensor())
    assert not v.is_contiguous() or v.storage_offset() > 0
    assert tensor_digest("w", v) == tensor_digest("w", v.contiguous())


def test_digest_ignores_requires_grad():
    """A parameter digests like the same values as a plain tensor."""
    t = _tensor()
    assert tensor_digest("w", nn.Parameter(t.clone())) == tensor_digest("w", t)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_model_digest_equals_state_dict_digest():
    """model_digest of a module equals model_digest of its state_dict (buffers included)."""
    model = _model()
    assert model_digest(model) == model_digest(model.state_dict())
    assert list(state_digests(model)) == list(model.state_dict())


def test_model_digest_changes_with_one_value():
    """Changing one parameter element (or a buffer) changes the model digest."""
    model = _model()
    before = model_digest(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    after_param = model_digest(model)
    assert after_param != before
    model[1].num_batches_tracked += 1
    assert model_digest(model) != after_param


def _history(steps: int = 5) -> list[tuple[int, dict[str, str]]]:
    return [
        (s, {"w": tensor_digest("w", torch.full((2,), float(s))),
             "b": tensor_digest("b", torch.full((1,), float(s)))})
        for s in range(1, steps + 1)
    ]


def test_first_divergence_none_for_equal_histories():
    """Equal histories have no divergence."""
    assert first_divergence(_history(), _history()) is None


def test_first_divergence_finds_step_and_tensor():
    """A tensor changed at step 3 (and after) is reported at step 3, by name only."""
    a, b = _history(), _history()
    for step, digests in b:
        if step >= 3:
            digests["b"] = tensor_digest("b", torch.full((1,), -1.0))
    assert first_divergence(a, b) == Divergence(step=3, tensors=("b",))
    assert first_divergence(b, a) == Divergence(step=3, tensors=("b",))


def test_first_divergence_lists_every_differing_tensor():
    """When several tensors differ at the first divergent step, all are named."""
    a, b = _history(), _history()
    b[2][1]["w"] = "x"
    b[2][1]["b"] = "y"
    assert first_divergence(a, b) == Divergence(step=3, tensors=("w", "b"))


def test_first_divergence_tensor_in_one_history_differs():
    """A tensor present in only one history counts as differing, whichever side has it."""
    a, b = _history(), _history()
    b[1][1]["extra"] = "abc"
    assert first_divergence(a, b) == Divergence(step=2, tensors=("extra",))
    assert first_divergence(b, a) == Divergence(step=2, tensors=("extra",))


def test_first_divergence_ignores_unshared_steps():
    """Steps recorded in only one history are skipped, not counted as divergences."""
    a = _history()
    b = [entry for entry in _history() if entry[0] != 2]
    b[-1][1]["w"] = "changed"
    assert first_divergence(a, b) == Divergence(step=5, tensors=("w",))


def _state() -> dict[str, torch.Tensor]:
    return {"w": _tensor(), "b": torch.zeros(3)}


def test_max_abs_diff_zero_for_equal():
    """Equal states differ by 0."""
    assert max_abs_diff(_state(), _state()) == 0.0


def test_max_abs_diff_perturbed():
    """The largest elementwise difference is reported, over all tensors."""
    a, b = _state(), _state()
    b["w"][1, 2] += 0.25
    b["b"][0] -= 0.5
    assert max_abs_diff(a, b) == pytest.approx(0.5)
    b["b"][0] += 0.5
    assert max_abs_diff(a, b) == pytest.approx(0.25, abs=1e-6)


def test_max_abs_diff_inf_for_shape_mismatch():
    """A shape mismatch makes the difference infinite."""
    a, b = _state(), _state()
    b["b"] = torch.zeros(4)
    assert max_abs_diff(a, b) == math.inf


def test_max_abs_diff_inf_for_name_missing_from_second():
    """A name missing from the second state makes the difference infinite."""
    a, b = _state(), _state()
    del b["b"]
    assert max_abs_diff(a, b) == math.inf


def test_max_abs_diff_inf_for_name_missing_from_first():
    """A name missing from the first state makes the difference infinite (the check is symmetric)."""
    a, b = _state(), _state()
    del a["b"]
    assert max_abs_diff(a, b) == math.inf


def test_max_abs_diff_nan_is_not_zero():
    """A NaN where the other state has a number is not reported as no difference."""
    a, b = _state(), _state()
    b["w"][0, 0] = float("nan")
    assert max_abs_diff(a, b) != 0.0
