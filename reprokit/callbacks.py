"""Callbacks: hooks into the training loop, and the state they see.

``train`` and ``resume`` call them in order; a callback that keeps state across a kill returns it
from ``state_dict`` and the checkpoint stores it under ``Name:n`` (the n-th callback of class
Name), so callbacks of other classes may come or go between the run and its resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    """What callbacks see after each optimizer step."""

    config: Any  # the built-in trainer's TrainConfig; a user's run: its config mapping
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    data: Any  # the built-in trainer's DatasetBundle; None for a user's run
    total_steps: int  # 0 when unknown (a user's loop)
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # batches of this epoch consumed
    loss: float = float("nan")
    # this step's tensor digests (state_dict name -> digest) when the loop computed them, else None
    digests: dict[str, str] | None = None


class Callback:
    """Hooks into the training loop; override what you need."""

    def on_train_start(self, state: TrainState) -> None:
        """Before the first step, with the freshly initialised model."""

    def on_step_end(self, state: TrainState) -> None:
        """After each optimizer step."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step and the final evaluation."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint must keep for this callback to resume exactly (tensors, plain values)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Put back what :meth:`state_dict` returned."""


def callback_keys(callbacks: tuple[Callback, ...]) -> list[str]:
    """``Name:n`` for the n-th callback of class Name: a callback's state finds it on resume
    even when callbacks of other classes come or go."""
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, -1) + 1
        keys.append(f"{name}:{seen[name]}")
    return keys
