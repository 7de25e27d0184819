"""The objects a :class:`reprokit.Run` checkpoints, by name (``run.track(model=..., optimizer=...)``).

Anything with ``state_dict``/``load_state_dict`` can be tracked; the modules among them are the
model whose parameters are digested and saved, the first optimizer gives the learning rate, and
every tracked optimizer gets a step pre-hook (the run's ``before_update``) so an async save is
never overwritten mid-copy and the gradients are digested complete.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from reprokit.errors import ReprokitError
from reprokit.stateview import StateView


class Tracked:
    """The tracked objects; the set is fixed once the run began (:meth:`fix`)."""

    def __init__(self, before_update: Callable[..., None]) -> None:
        self.objects: dict[str, Any] = {}
        self._before_update = before_update
        self._modules: dict[str, nn.Module] | None = None  # found once the run began
        self._optimizer: torch.optim.Optimizer | None = None
        self._view: StateView | None = None  # the modules' state tensors, for per-step digests

    def add(self, objects: Mapping[str, Any]) -> None:
        """Track more objects; a name tracked twice or an object without a state is an error."""
        for name, obj in objects.items():
            if not all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict")):
                raise ReprokitError(f"run.track({name}=...): a {type(obj).__name__} has no state_dict() and "
                                    "load_state_dict(), so a checkpoint cannot hold it; track the object "
                                    "that owns its state")
            if name in self.objects:
                raise ReprokitError(f"run.track: {name!r} is tracked already; give each object its own name")
            self.objects[name] = obj
            if isinstance(obj, torch.optim.Optimizer):
                obj.register_step_pre_hook(self._before_update)

    def fix(self) -> list[nn.Module]:
        """The run begins: the modules and the first optimizer are found once. Returns the modules."""
        if not self.objects:
            raise ReprokitError("nothing is tracked: call run.track(model=..., optimizer=...) before the "
                                "first run.epochs()/run.step(), so checkpoints can hold them")
        self._modules = self.modules()
        self._optimizer = self._find_optimizer()
        return list(self._modules.values())

    def modules(self) -> dict[str, nn.Module]:
        """The tracked ``nn.Module``s by name (at least one)."""
        if self._modules is not None:
            return self._modules
        modules = {n: o for n, o in self.objects.items() if isinstance(o, nn.Module)}
        if not modules:
            raise ReprokitError("no nn.Module is tracked: pass the model too, run.track(model=model, ...)")
        return modules

    def module_state(self) -> dict[str, torch.Tensor]:
        """The modules' state_dict: one module's as it is, several prefixed by their names."""
        modules = self.modules()
        if len(modules) == 1:
            return next(iter(modules.values())).state_dict()
        return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}

    def others(self) -> dict[str, Any]:
        """The state_dicts of everything tracked that is not a module (optimizers, schedulers, ...)."""
        return {n: o.state_dict() for n, o in self.objects.items() if not isinstance(o, nn.Module)}

    def view(self) -> StateView:
        """The modules' state tensors without a state_dict() call per step."""
        if self._view is None:
            self._view = StateView(self.modules())
        return self._view

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in self.objects.values() if isinstance(o, torch.optim.Optimizer)]

    def optimizer(self) -> torch.optim.Optimizer | None:
        """The first tracked optimizer, if any."""
        return self._optimizer if self._modules is not None else self._find_optimizer()

    def lr(self) -> float:
        """The first optimizer's first group's learning rate (NaN without one)."""
        opt = self.optimizer()
        return float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else math.nan

    def updated_in_place(self) -> frozenset[int]:
        """The storages an optimizer step changes in place (parameters and optimizer state): an
        async save must copy them before the next update."""
        unchanged = [*(p for m in self.modules().values() for p in m.parameters()),
                     *(t for o in self.optimizers() for s in o.state.values() for t in s.values()
                       if isinstance(t, torch.Tensor))]
        return frozenset(t.data_ptr() for t in unchanged)

    def close(self) -> None:
        if self._view is not None:
            self._view.close()

    def _find_optimizer(self) -> torch.optim.Optimizer | None:
        return next(iter(self.optimizers()), None)
