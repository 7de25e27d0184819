"""Fine-tuning: start a run from a parent model, give it a fresh head, freeze what the strategy says.

    pretrain(config, run_dir)                      an ordinary run; its model.safetensors is the artifact
    finetune(config, parent, strategy, run_dir)    a run that starts from ``parent``
    lineage(run_dir)                               the chain child -> parent -> ... as a DataFrame

A parent is a finished run directory (its ``result.json`` records the digest its weights must hash
to) or a weights file: ``.safetensors`` (reprokit's carry the digest and run id in their header) or
a torchvision-style ``.pt``/``.pth`` state_dict, read with ``torch.load(weights_only=True)`` (torchvision's
own ImageNet resnet18 file included: its 3x7x7 stem is adapted, see ``adapt_torchvision_stem``).
Nothing is ever downloaded. Every tensor but the head's is copied into the freshly seeded model;
the head (the last ``nn.Linear``) keeps its seeded initialisation, sized for the new classes.

Strategies (``config.finetune``), after the essay's "freeze, replace the head, train, unfreeze":
    full                everything trains at ``lr`` from the first step
    feature_extraction  the backbone stays frozen; only the new head trains
    two_stage           the head alone for ``unfreeze_at`` steps, then everything, the backbone at
                        ``lr * backbone_lr_factor``

Resuming must give the uninterrupted run's bits, so which tensors train is a pure function of
(config, step), applied when the run starts or resumes and after every step, and the optimizer's
param groups (head, backbone) have one layout from step 0 on: a frozen tensor has no gradient, so
the optimizer skips it and keeps no state for it. "Frozen" means no gradient step; BatchNorm
running statistics still follow the new data in train mode, as in torchvision's fine-tuning tutorial.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import safetensors
import safetensors.torch
import torch
from torch import nn

from reprokit.callbacks import Callback, TrainState
from reprokit.config import TrainConfig
from reprokit.digests import model_digest
from reprokit.errors import ConfigError, ReprokitError
from reprokit.models import ParamGroups, head_name
from reprokit.rundir import MANIFEST, MODEL, RESULT, WEIGHTS, WEIGHTS_ORDER, read_json

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_SHOWN = 4  # mismatching tensor names listed in an error


class LineageError(ReprokitError, ValueError):
    """A parent model is missing, changed since it was recorded, or does not fit the model."""


@dataclass(frozen=True)
class Parent:
    """A parent model's weights, verified against the digest recorded for them (if any)."""

    path: Path  # the weights file read
    digest: str  # model_digest of ``state``
    run_id: str | None
    state: dict[str, torch.Tensor] = field(repr=False)

    def lineage(self) -> dict[str, Any]:
        """The manifest's ``lineage.parent`` entry."""
        return {"digest": self.digest, "run_id": self.run_id, "path": str(self.path)}


def load_parent(reference: str | Path) -> Parent:
    """Read and verify a parent: a finished run directory or a weights file.

    Raises:
        LineageError: the parent is missing or unreadable, or its bytes no longer hash to the
            digest its run (or its safetensors header) recorded.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / RESULT).is_file():
            raise LineageError(
                f"parent run {str(path)!r} has no {RESULT}: it did not finish; finish it with "
                f"`reprokit resume {path}` or pick a finished run"
            )
        weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / MODEL
        state, _ = _read_weights(weights)
        expected, source = read_json(path, RESULT)["final_digest"], str(path / RESULT)
        run_id = read_json(path, MANIFEST).get("run_id")
    elif path.is_file():
        weights = path
        state, header = _read_weights(weights)
        expected, source = header.get("final_digest"), "its safetensors header"
        run_id = header.get("run_id") or None
    else:
        raise LineageError(
            f"parent {str(path)!r} does not exist; pass a finished run directory or a "
            f"{'/'.join(WEIGHT_SUFFIXES)} weights file on this machine (nothing is downloaded)"
        )
    digest = model_digest(state)
    if expected is not None and digest != expected:
        raise LineageError(
            f"parent weights {str(weights)!r} hash to {digest} but {source} recorded {expected}: the "
            "file changed after it was written; restore it or rerun the parent"
        )
    return Parent(path=weights.resolve(), digest=digest, run_id=run_id, state=state)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state_dict in its recorded order, and the safetensors header (empty for .pt/.pth)."""
    if not path.is_file():
        raise LineageError(f"parent weights {str(path)!r} are missing; rerun the parent or restore the file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise LineageError(
            f"parent weights {str(path)!r} are not one of {list(WEIGHT_SUFFIXES)}; convert them to one"
        )
    try:
        if path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt") as f:
                header: dict[str, str] = f.metadata() or {}
            state = safetensors.torch.load_file(path)
            order = json.loads(header[WEIGHTS_ORDER]) if WEIGHTS_ORDER in header else list(state)
            return {name: state[name] for name in order}, header
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
            safetensors.SafetensorError) as e:
        raise LineageError(f"parent weights {str(path)!r} cannot be read ({e}); restore the file") from e
    if not isinstance(loaded, Mapping) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise LineageError(
            f"parent weights {str(path)!r} hold a {type(loaded).__name__}, not a state_dict of tensors; "
            "save model.state_dict()"
        )
    return dict(loaded), {}


def load_backbone(model: nn.Module, parent: Parent, name: str) -> None:
    """Copy every parent tensor but the head's into ``model`` (registry ``name``); the head keeps
    its initialisation.

    Raises:
        LineageError: listing the tensors missing from the parent, unexpected in it, or of another
            shape or dtype.
    """
    head = head_name(model) + "."
    own = {n: t for n, t in model.state_dict().items() if not n.startswith(head)}
    given = {n: t for n, t in parent.state.items() if not n.startswith(head)}
    if name == "resnet18":
        given = adapt_torchvision_stem(given, own)
    missing = [n for n in own if n not in given]
    unexpected = [n for n in given if n not in own]
    other = [f"{n} (parent {t.dtype} {list(t.shape)}, model {own[n].dtype} {list(own[n].shape)})"
             for n, t in given.items() if n in own and (t.shape, t.dtype) != (own[n].shape, own[n].dtype)]
    problems = [f"{len(names)} {what}: {', '.join(names[:_SHOWN])}{' ...' if len(names) > _SHOWN else ''}"
                for what, names in (("missing from the parent", missing), ("unexpected", unexpected),
                                    ("of another shape or dtype", other)) if names]
    if problems:
        raise LineageError(
            f"parent weights {str(parent.path)!r} do not fit model {name!r} (head {head[:-1]!r} aside): "
            f"{'; '.join(problems)}; pass weights saved from a {name!r} model for the same input shape"
        )
    with torch.no_grad():
        for name, tensor in given.items():
            own[name].copy_(tensor)


def adapt_torchvision_stem(
    given: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fit torchvision's ImageNet resnet18 stem (``conv1.weight`` 64x3x7x7) to ours (64xCx3x3).

    For one input channel the three colour filters are summed: exact for a grey image fed as
    three equal channels. Then the centre 3x3 of each 7x7 kernel is kept: an approximation (the
    stem's stride and the max-pool are gone too), so the features are a starting point, not
    ImageNet's. ``fc`` is the head and is replaced anyway. Any other tensor must match as is.
    """
    weight, target = given.get("conv1.weight"), own.get("conv1.weight")
    if weight is None or target is None or weight.shape == target.shape:
        return given
    if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2:] != (7, 7) or target.shape[2:] != (3, 3):
        return given  # not torchvision's stem: load_backbone reports the mismatch
    if target.shape[1] == 1:
        weight = weight.sum(dim=1, keepdim=True)
    return {**given, "conv1.weight": weight[:, :, 2:5, 2:5].contiguous().to(target.dtype)}


def unfreeze_step(config: TrainConfig, total_steps: int) -> int | None:
    """The step count from which the backbone trains: 0 for full, None (never) for feature extraction."""
    if config.finetune == "full":
        return 0
    if config.finetune == "feature_extraction":
        return None
    at = config.unfreeze_at if config.unfreeze_at is not None else total_steps // 2
    if at >= total_steps:
        raise ConfigError(
            f"unfreeze_at {at} is not before the last step {total_steps}; pass a value in "
            f"[1, {total_steps - 1}] or more steps"
        )
    return at


def set_trainable(model: nn.Module, config: TrainConfig, step: int, total_steps: int) -> None:
    """Let the backbone's tensors take gradients exactly when ``config``'s strategy trains them
    after ``step`` optimizer steps; the head always trains."""
    at = unfreeze_step(config, total_steps)
    backbone_trains = at is not None and step >= at
    head = head_name(model) + "."
    for name, p in model.named_parameters():
        p.requires_grad_(backbone_trains or name.startswith(head))


def prepare(
    config: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[ParamGroups, dict[str, Any] | None]:
    """Load the parent into the freshly seeded ``model``, freeze it for step 0 and return the
    optimizer's param groups (head at ``lr``, then backbone) and the manifest's lineage entry;
    without ``init_from``: all parameters in one group, and no parent."""
    if config.init_from is None:
        return list(model.parameters()), None
    parent = load_parent(config.init_from)
    load_backbone(model, parent, config.model)
    set_trainable(model, config, 0, total_steps)
    head = head_name(model) + "."
    named = list(model.named_parameters())
    factor = config.backbone_lr_factor if config.finetune == "two_stage" else 1.0
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if n.startswith(head)]},
        {"params": [p for n, p in named if not n.startswith(head)], "lr": config.lr * factor},
    ]
    return groups, parent.lineage()


class Freezer(Callback):
    """Applies :func:`set_trainable` when the loop starts (fresh or resumed) and again after the
    step at which the backbone unfreezes, the only step that changes it; its state follows from
    (config, step), so a checkpoint needs nothing from it."""

    def __init__(self) -> None:
        self._unfreeze: int | None = None

    def on_train_start(self, state: TrainState) -> None:
        self._unfreeze = unfreeze_step(state.config, state.total_steps)
        set_trainable(state.model, state.config, state.step, state.total_steps)

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self._unfreeze:
            set_trainable(state.model, state.config, state.step, state.total_steps)


def finetune_callbacks(config: TrainConfig) -> tuple[Callback, ...]:
    """The fine-tune's callbacks: a :class:`Freezer` when a strategy freezes anything."""
    return (Freezer(),) if config.init_from is not None and config.finetune != "full" else ()


def verify_parent(manifest: Mapping[str, Any], now: Mapping[str, Any] | None, init_from: str | None) -> None:
    """On resume: the parent (``now``, the lineage entry of the rebuilt run) must still be the model
    the run started from."""
    recorded = (manifest.get("lineage") or {}).get("parent")
    if (recorded or {}).get("digest") != (now or {}).get("digest"):
        where = now["path"] if now else init_from
        raise LineageError(
            f"parent {where!r} hashes to {(now or {}).get('digest')} but the run started from "
            f"{(recorded or {}).get('digest')}; restore the parent the run was started from"
        )


LINEAGE_COLUMNS = ("generation", "run_id", "path", "dataset", "model", "finetune", "final_metric",
                   "final_digest", "parent_run_id", "parent_digest", "verified")


def lineage(run_dir: str | Path) -> pd.DataFrame:
    """The chain from ``run_dir`` through its parents, child first (generation 0, 1, ...).

    ``verified`` (parents only): the parent's weights load and hash to the digest its child
    recorded. A parent that is a plain weights file, or a run directory no longer there, ends the
    chain with what the child recorded about it.
    """
    rows: list[dict[str, Any]] = []
    path: Path | None = Path(run_dir).resolve()
    recorded: dict[str, Any] | None = None  # what the previous generation recorded about this one
    seen: set[Path] = set()
    while path is not None and path not in seen:
        seen.add(path)
        run = path.parent if path.name in (WEIGHTS, MODEL) else path
        row: dict[str, Any] = {"generation": len(rows), "path": str(run), "verified": None}
        if recorded is not None:
            row.update(run_id=recorded.get("run_id"), final_digest=recorded["digest"],
                       verified=_verifies(run if (run / RESULT).is_file() else path, recorded["digest"]))
        if not (run / MANIFEST).is_file():  # a plain weights file, or a run directory gone
            rows.append({**row, "path": str(path)})
            break
        manifest = read_json(run, MANIFEST)
        result = read_json(run, RESULT) if (run / RESULT).is_file() else {}
        config, parent = manifest.get("config", {}), (manifest.get("lineage") or {}).get("parent")
        rows.append({
            **row, "run_id": manifest.get("run_id"), "dataset": config.get("dataset"),
            "model": config.get("model"), "finetune": config.get("finetune") if parent else None,
            "final_metric": result.get("final_metric"), "final_digest": result.get("final_digest"),
            "parent_run_id": parent.get("run_id") if parent else None,
            "parent_digest": parent.get("digest") if parent else None,
        })
        recorded = parent
        path = Path(parent["path"]) if parent and parent.get("path") else None
    return pd.DataFrame(rows, columns=list(LINEAGE_COLUMNS))


def _verifies(reference: Path, digest: str) -> bool:
    try:
        return load_parent(reference).digest == digest
    except LineageError:
        return False
