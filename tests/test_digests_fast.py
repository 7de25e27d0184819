"""The inlined per-step digests (named_digests, grad_digests) give tensor_digest's values, bit for bit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import xxhash
from torch import nn

from reprokit.digests import DigestMemo, named_digests, state_digests, tensor_digest
from reprokit.fingerprints import NO_GRAD, grad_digests


def _reference(name: str, tensor: torch.Tensor) -> str:
    """The digest as DESIGN.md defines it, from a plain copy of the bytes: name, dtype, shape, bytes."""
    plain = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    h = xxhash.xxh3_128(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    h.update(plain.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "float32 matrix": lambda: torch.randn(64, 512),
    "float64 bias": lambda: torch.randn(10, dtype=torch.float64),
    "bfloat16": lambda: torch.randn(7, 3).to(torch.bfloat16),
    "bool": lambda: torch.rand(9) > 0.5,
    "int64": lambda: torch.arange(5),
    "zero-dim": lambda: torch.tensor(3.5),
    "empty": lambda: torch.zeros(0, 3),
    "transposed": lambda: torch.randn(4, 6).t(),
    "strided slice": lambda: torch.randn(20)[::3],
    "offset view": lambda: torch.randn(30)[7:19].view(3, 4),
    "conjugate view": lambda: torch.randn(5, dtype=torch.complex64).conj(),
    "negative view": lambda: torch._neg_view(torch.randn(5, dtype=torch.complex64)),
    "requires grad": lambda: torch.randn(3, requires_grad=True),
    "parameter": lambda: nn.Parameter(torch.randn(2, 2)),
}


@pytest.mark.parametrize("kind", sorted(TENSORS))
def test_named_digests_equal_tensor_digest_and_the_reference(kind: str) -> None:
    """Every layout and dtype: the inlined loop, tensor_digest and a plain-bytes reference agree."""
    torch.manual_seed(0)
    tensor = TENSORS[kind]()
    expected = _reference("t", tensor)
    assert tensor_digest("t", tensor) == expected
    assert named_digests([("t", tensor)]) == {"t": expected}
    assert named_digests([("t", tensor)]) == {"t": expected}  # the second time through the header cache


def test_digests_are_the_values_recorded_before() -> None:
    """Pinned values from reprokit before the inlined loop (16248ac): recorded runs still compare equal."""
    assert tensor_digest("w", torch.arange(12, dtype=torch.float32).reshape(3, 4)) == \
        "91c56aaad67ea9773cf578e9d43d3ca3"
    assert named_digests([("b", torch.arange(6, dtype=torch.float64)[::2]),
                          ("h", torch.arange(5, dtype=torch.bfloat16)), ("e", torch.zeros(0, 3))]) == {
        "b": "4ae01eabfb9ecd8d201fd3c7e5fdbeec", "h": "a6e02abea74d73a7c275c32e9cac3bc6",
        "e": "7dd5f6affc173f2eae2e87c51faae1a8"}


def test_state_digests_keep_state_dict_order_and_values() -> None:
    """A module with buffers: one digest per state_dict entry, in its order, each the reference's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    state = model.state_dict()
    digests = state_digests(model)
    assert list(digests) == list(state)
    assert digests == {name: _reference(name, t) for name, t in state.items()}


def test_grad_digests_mark_missing_gradients_in_parameter_order() -> None:
    """Parameters without a gradient read NO_GRAD, in place; the others are their gradients' digests."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    params = dict(model.named_parameters())
    params["0.bias"].grad = None
    digests = grad_digests(params)
    assert list(digests) == list(params)
    assert digests["0.bias"] == NO_GRAD
    assert {n: d for n, d in digests.items() if n != "0.bias"} == {
        n: _reference(n, p.grad) for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    assert grad_digests(params) == dict.fromkeys(params, NO_GRAD)


def test_a_tensor_reshaped_in_place_gets_its_new_header() -> None:
    """The header cache is keyed by shape and dtype too: a parameter resized under one name hashes anew."""
    p = nn.Parameter(torch.arange(6, dtype=torch.float32))
    first = named_digests([("p", p)])["p"]
    p.data = p.data.reshape(2, 3)
    second = named_digests([("p", p)])["p"]
    assert first != second and second == _reference("p", p)


@pytest.mark.parametrize("kind", sorted(TENSORS))
def test_the_memo_gives_the_reference_digest_every_time(kind: str) -> None:
    """DigestMemo: the first, the remembered and the changed-in-place tensor: each the reference digest."""
    torch.manual_seed(0)
    tensor, memo = TENSORS[kind](), DigestMemo()
    assert memo.digests([("t", tensor)]) == {"t": _reference("t", tensor)}
    assert memo.digests([("t", tensor)]) == {"t": _reference("t", tensor)}
    if tensor.numel() and not tensor.requires_grad and tensor.dtype.is_floating_point:
        tensor.detach().mul_(2)  # an update in place: the same object, new bytes
        assert memo.digests([("t", tensor)]) == {"t": _reference("t", tensor)}


def test_the_memo_follows_a_parameter_whose_data_is_replaced() -> None:
    """p.data replaced (new memory; same memory as another dtype; a transposed view): never the old digest."""
    torch.manual_seed(0)
    p, memo = nn.Parameter(torch.randn(4, 4), requires_grad=False), DigestMemo()
    memo.digests([("p", p)])
    replacements = (lambda d: d.clone() + 1, lambda d: d.view(torch.int32), lambda d: d.t(),
                    lambda d: torch._neg_view(d.contiguous()), lambda d: d.contiguous().reshape(2, 8))
    for replace in replacements:
        p.data = replace(p.data)
        assert memo.digests([("p", p)]) == {"p": _reference("p", p)}
        assert memo.digests([("p", p)]) == {"p": _reference("p", p)}


def test_the_memo_digests_each_new_gradient() -> None:
    """Gradients made anew every step under one name (zero_grad drops them): each its own reference digest,
    also when one comes back non-contiguous or as a strided slice."""
    torch.manual_seed(0)
    model, memo = nn.Linear(3, 2), DigestMemo()
    for step in range(4):
        model.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        params = dict(model.named_parameters())
        if step == 2:
            params["weight"].grad = torch.randn(3, 2).t()
        if step == 3:
            params["bias"].grad = torch.randn(4)[::2]
        assert grad_digests(params, memo) == {n: _reference(n, p.grad) for n, p in params.items()}
