"""The tensors of a model's ``state_dict()`` (the same names, in the same order) without building
the state dict at every step.

``state_dict()`` walks the module tree, checks every module's hooks, detaches every tensor and
fills an ordered dict with version metadata: for a small conv net it costs more than hashing the
tensors themselves, and per-step digests call it every step. A ``StateView`` walks the tree once
into a plan of (name, the dict holding the tensor, its key) and reads the live tensors through it.
Reading through the holding dicts sees a tensor replaced under its name (``_apply``,
``load_state_dict(assign=True)``); a parameter, buffer or submodule registered anywhere marks the
plan stale (torch's global registration hooks), and a name gone from its dict rebuilds it. A
module that shapes its own state dict (a state-dict hook, its own ``_save_to_state_dict``,
``state_dict`` or extra state) is not planned: the view then calls ``state_dict()`` each time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

_Plan = list[tuple[str, dict[str, Any], str]]


def _plain(module: nn.Module) -> bool:
    cls = type(module)
    return (cls._save_to_state_dict is nn.Module._save_to_state_dict
            and cls.state_dict is nn.Module.state_dict
            and getattr(cls, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
            and not module._state_dict_hooks and not module._state_dict_pre_hooks)


def _walk(module: nn.Module, prefix: str, plan: _Plan) -> bool:
    """Appends ``module``'s entries in ``state_dict``'s order; False if a module is not plain."""
    if not _plain(module):
        return False
    params, buffers = module._parameters, module._buffers
    plan.extend((prefix + k, params, k) for k, p in params.items() if p is not None)
    skip = module._non_persistent_buffers_set
    plan.extend((prefix + k, buffers, k) for k, b in buffers.items() if b is not None and k not in skip)
    return all(_walk(child, f"{prefix}{name}.", plan) for name, child in module._modules.items()
               if child is not None)


class StateView:
    """``tensors()``: the live tensors of the modules' state dicts, keyed as ``state_dict()`` keys
    them (``{name}.{key}`` for each module when there are several)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._modules = modules
        self._plan: _Plan | None = None
        self._stale = True
        self._handles = [register(self._mark) for register in (
            module_hooks.register_module_parameter_registration_hook,
            module_hooks.register_module_buffer_registration_hook,
            module_hooks.register_module_module_registration_hook)]

    def _mark(self, *_: Any) -> None:
        self._stale = True

    def _build(self) -> _Plan | None:
        plan: _Plan = []
        several = len(self._modules) > 1
        for name, module in self._modules.items():
            if not _walk(module, f"{name}." if several else "", plan):
                return None
        return plan

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._stale:
            self._plan, self._stale = self._build(), False
        if self._plan is None:
            return self._state_dict()
        try:
            return {name: holder[key] for name, holder, key in self._plan}
        except KeyError:  # a name was deleted (no hook says so): plan again
            self._stale = True
            return self.tensors()

    def parameters(self) -> dict[str, nn.Parameter]:
        """The parameters among ``tensors()`` (what has a ``.grad``), under the same names."""
        if self._stale:
            self._plan, self._stale = self._build(), False
        if self._plan is not None:
            try:
                return {name: holder[key] for name, holder, key in self._plan
                        if isinstance(holder[key], nn.Parameter)}
            except KeyError:
                self._stale = True
                return self.parameters()
        several = len(self._modules) > 1
        return {(f"{name}.{k}" if several else k): p for name, m in self._modules.items()
                for k, p in m.named_parameters(remove_duplicate=False)}

    def _state_dict(self) -> dict[str, torch.Tensor]:
        if len(self._modules) == 1:
            return dict(next(iter(self._modules.values())).state_dict())
        return {f"{name}.{k}": v for name, m in self._modules.items() for k, v in m.state_dict().items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
