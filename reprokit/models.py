"""Models: a registry by name, each built for the dataset's input shape and output width.

``resnet18`` is torchvision's architecture (never its downloaded weights) with the ImageNet stem
swapped for one that suits 1x8x8 digits: a 7x7 stride-2 conv and a max-pool would shrink an 8x8
image to 2x2 before the first block, so the stem is a 3x3 stride-1 conv and the pool is removed
(the usual CIFAR adaptation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from reprokit.errors import ModelError
from reprokit.factories import is_factory, resolve

MLP_HIDDEN = 64  # enough to fit digits to ~97% validation accuracy, small enough to trace per step


def _mlp(input_shape: tuple[int, ...], outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(MLP_HIDDEN, outputs),
    )


def _cnn(input_shape: tuple[int, ...], outputs: int) -> nn.Module:
    channels, height, width = _image_shape("cnn", input_shape)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 2) * (width // 2), 64),
        nn.ReLU(),
        nn.Linear(64, outputs),
    )


def _resnet18(input_shape: tuple[int, ...], outputs: int) -> nn.Module:
    from torchvision.models import resnet18  # imported here: torchvision is slow to import

    channels, _, _ = _image_shape("resnet18", input_shape)
    model: nn.Module = resnet18(weights=None, num_classes=outputs)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18": _resnet18,
}


def build_model(name: str, input_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """Build the registered model ``name`` for inputs of ``input_shape`` and ``outputs`` outputs.

    Parameters are initialised from torch's global RNG, so seed first.
    """
    if outputs < 1:
        raise ModelError(f"model {name!r} needs at least 1 output, got {outputs}")
    if is_factory(name):  # the user's own: "package.module:factory", called (input_shape, outputs)
        model = resolve("model", name)(tuple(input_shape), outputs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"model factory {name!r} returned a {type(model).__name__}, not an nn.Module")
        return model
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or a factory "
                         "'package.module:function'")
    return MODELS[name](tuple(input_shape), outputs)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"model {name!r} needs image input (channels, height, width) but the dataset gives "
            f"shape {input_shape}; use model 'mlp' for vector data"
        )
    c, h, w = input_shape
    return c, h, w


def head_name(model: nn.Module) -> str:
    """The name of the model's classification head: its last ``nn.Linear`` (``"3"`` for mlp,
    ``"8"`` for cnn, ``"fc"`` for resnet18). A fine-tune replaces it with a fresh one."""
    names: list[str] = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear layer to serve as the head")
    return names[-1]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


OPTIMIZERS = ("sgd", "adam", "adamw")
# how a fine-tune trains a pretrained backbone under a fresh head (reprokit.finetuning)
STRATEGIES = ("full", "feature_extraction", "two_stage")
ParamGroups = list[torch.nn.Parameter] | list[dict[str, Any]]


def build_optimizer(
    name: str, params: ParamGroups, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamw``; ``params`` may be torch param groups."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ModelError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


LR_SCHEDULES = ("constant", "cosine")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``constant`` (no scheduler) or ``cosine`` (anneal to 0 over ``total_steps``, stepped per step)."""
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ModelError(f"unknown lr_schedule {name!r}; choose one of {list(LR_SCHEDULES)}")
