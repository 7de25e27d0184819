"""Fault injection: kill the training process with SIGKILL at an exact, reproducible point.

SIGKILL, not an exception: nothing in the process gets to clean up, flush or close, which is what
a power cut, an OOM kill or a pre-empted node does to a real run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from reprokit.errors import ConfigError


@dataclass(frozen=True)
class Faults:
    """Where to kill the run (each ``None`` = never).

    crash_at_step: die right after optimizer step K updated the weights in memory, before step K's
        metrics row or checkpoint reach the disk (the work of step K is lost).
    crash_during_save: die half-way through writing the checkpoint of step K (its tensors file is half
        written, nothing is committed).
    flip_bit: ``(tensor, element, bit)``: flip one bit of one initial weight before the first step
        (the one-bit perturbation of Summers & Dinneen); ``tensor`` "" = the first floating-point
        tensor of the model's state, ``element`` an index into it flattened, ``bit`` 0 = the lowest.
    """

    crash_at_step: int | None = None
    crash_during_save: int | None = None
    flip_bit: tuple[str, int, int] | None = None

    def check(self, checkpoint_every: int, total_steps: int) -> None:
        """Raise :class:`ConfigError` if a kill point can never be reached in this run."""
        k = self.crash_at_step
        if k is not None and not 1 <= k <= total_steps:
            raise ConfigError(f"--crash-at-step {k} is outside the run's steps [1, {total_steps}]")
        k = self.crash_during_save
        if k is None:
            return
        every = checkpoint_every
        if not every:
            raise ConfigError(
                f"--crash-during-save {k} needs checkpoints by step; set checkpoint_every in the config"
            )
        if k % every or not 1 <= k < total_steps:
            raise ConfigError(
                f"--crash-during-save {k} is not a checkpoint step: checkpoints are saved every "
                f"{every} steps before the last step {total_steps}; pick a multiple of {every} below it"
            )


NO_FAULTS = Faults()

_INT_VIEWS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}


def parse_flip(text: str) -> tuple[str, int, int]:
    """``"TENSOR:ELEMENT:BIT"`` (TENSOR may be empty) as a ``Faults.flip_bit`` value."""
    parts = text.rsplit(":", 2)
    try:
        if len(parts) != 3:
            raise ValueError
        name, element, bit = parts[0], int(parts[1]), int(parts[2])
        if element < 0 or bit < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"flip bit {text!r} is not TENSOR:ELEMENT:BIT; e.g. 'conv1.weight:0:0', or "
                          "':0:0' for the first floating-point tensor") from None
    return name, element, bit


def flip_bit(state: Mapping[str, torch.Tensor], spec: tuple[str, int, int]) -> dict[str, Any]:
    """Flip the bit ``spec`` names in the tensor of ``state`` (changed in place); what was flipped."""
    name, element, bit = spec
    floats = [n for n, t in state.items() if t.dtype in _INT_VIEWS]
    if not name:
        if not floats:
            raise ConfigError("flip bit: the model has no floating-point tensor to flip a bit of")
        name = floats[0]
    if name not in floats:
        raise ConfigError(f"flip bit: no floating-point tensor {name!r}; the model's are {floats[:8]}")
    tensor = state[name]
    width = tensor.element_size() * 8
    if element >= tensor.numel() or bit >= width:
        raise ConfigError(f"flip bit: {name!r} has {tensor.numel()} elements of {width} bits; element "
                          f"{element}, bit {bit} is outside it")
    with torch.no_grad():
        flat = tensor.view(_INT_VIEWS[tensor.dtype]).view(-1)
        before = float(tensor.view(-1)[element])
        mask = (1 << bit) if bit < width - 1 else -(1 << bit)  # the sign bit of a signed view
        flat[element] ^= mask
    return {"tensor": name, "element": element, "bit": bit, "before": before,
            "after": float(tensor.view(-1)[element])}


def kill_self() -> None:
    """SIGKILL this process (does not return)."""
    os.kill(os.getpid(), signal.SIGKILL)
