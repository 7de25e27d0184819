"""StateView: the state dict's tensors, names and order, through module changes."""

from __future__ import annotations

import torch
from torch import nn

from reprokit.stateview import StateView


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.register_buffer("scratch", torch.zeros(1), persistent=False)
        self.shared = nn.Linear(2, 2)
        self.again = self.shared  # one module under two names: state_dict lists it twice


def _same(view: StateView, module: nn.Module) -> bool:
    got, want = view.tensors(), module.state_dict()
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_the_view_is_the_state_dict_through_replacements_and_registrations() -> None:
    net = _Net()
    view = StateView({"model": net})
    try:
        assert _same(view, net)
        net.conv.weight = nn.Parameter(torch.ones_like(net.conv.weight))  # replaced under its name
        net.bn.running_mean = torch.full((2,), 3.0)  # a buffer rebound
        assert _same(view, net)
        net.head = nn.Linear(2, 3)  # a new submodule
        net.register_buffer("extra", torch.arange(3.0))
        assert _same(view, net)
        del net.extra  # gone without a hook
        assert _same(view, net)
        net.shared = nn.Linear(2, 2)  # one of the two names now holds another module
        assert _same(view, net)
    finally:
        view.close()


def test_several_modules_are_prefixed_and_a_custom_state_dict_falls_back() -> None:
    class Extra(nn.Linear):
        def get_extra_state(self) -> int:
            return 7

        def set_extra_state(self, state: object) -> None:
            pass

    a, b = nn.Linear(2, 2), Extra(2, 2)
    view = StateView({"a": a, "b": b})
    try:
        got = view.tensors()
        want = {**{f"a.{k}": v for k, v in a.state_dict().items()},
                **{f"b.{k}": v for k, v in b.state_dict().items()}}
        assert list(got) == list(want) and "b._extra_state" in got  # the fallback: state_dict()
    finally:
        view.close()
