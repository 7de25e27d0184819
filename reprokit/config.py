"""TrainConfig: the one frozen description of a training run.

Notebook parameters mirror its fields. Unknown keys and ill-typed values are errors here, because
papermill only warns about a parameter the notebook does not declare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from reprokit import differences
from reprokit.data import DATASETS
from reprokit.errors import ConfigError
from reprokit.factories import check_reference, is_factory
from reprokit.models import LR_SCHEDULES, MODELS, OPTIMIZERS, STRATEGIES
from reprokit.runreduce import check_reduction
from reprokit.seeding import SEED_MAX
from reprokit.seeding import SOURCES as SEED_SOURCES


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's bits, plus how the run is recorded.

    The recording fields (``RECORDING_FIELDS``: checkpoints, digests, evaluation cadence, worker
    processes) do not change a single bit of the trained model, so a resume may change them freely.
    """

    dataset: str = "digits"  # bundled real data; "regression" is the essays' synthetic MLP task
    model: str = "cnn"  # small enough for many-seed studies on 2 CPU cores
    optimizer: str = "sgd"  # plain SGD is the essays' setting; "adam"/"adamw" for realism
    lr: float = 0.05  # digits with SGD+momentum converges in ~100 steps at this rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "cosine" anneals to 0 over the run (its state is checkpointed)
    batch_size: int = 64
    epochs: int = 1  # used only when steps is None
    steps: int | None = None  # optimizer steps; when set it wins over epochs
    seed: int = 0  # initialisation and batch order
    split_seed: int = 0  # train/validation split, kept apart so seed studies vary training only
    # per-source seeds (None = from seed; any set gives Run the per-source form, reprokit.seeding.Seeds)
    init_seed: int | None = None  # the initial weights
    data_order_seed: int | None = None  # the batch order
    augmentation_seed: int | None = None  # per-sample randomness of the data (the bundled data has none)
    dropout_seed: int | None = None  # the model's own random ops, re-seeded when the run begins
    val_fraction: float = 0.2
    deterministic: bool = True  # torch.use_deterministic_algorithms and the cuDNN/cuBLAS knobs
    threads: int | None = 1  # intra-op threads; they change the bits on CPU, so pin them by default
    num_workers: int = 0  # DataLoader worker processes; the batch order does not depend on it
    eval_every: int = 0  # validate every N steps as well as at the end; 0 = only at the end
    digest_every: int = 1  # per-tensor digests every N steps (finds the first divergence); 0 = off
    trace_every: int = 0  # parameter trajectories (trace.csv, importance.csv) every N steps; 0 = off
    checkpoint_every: int = 0  # full-state checkpoint every N steps; 0 = off
    checkpoint_seconds: float = 0.0  # ... and/or every T seconds of wall time; 0 = off
    keep_last: int = 3  # checkpoints kept; older ones are pruned only after a new one verifies
    async_save: bool = False  # write checkpoints in a background thread; the step waits only for a copy
    # fine-tuning (reprokit.finetuning): start from a parent model instead of a random initialisation
    train_limit: int | None = None  # keep only this many training samples: a low-data task; None = all
    init_from: str | None = None  # parent: a finished run directory, or a .safetensors/.pt(h) state_dict
    finetune: str = "full"  # with init_from: "full", "feature_extraction" (head only) or "two_stage"
    unfreeze_at: int | None = None  # two_stage only: head alone for this many steps, then all; None = half
    backbone_lr_factor: float = 0.1  # two_stage only: the unfrozen backbone learns at lr x this (head at lr)
    # under `reprokit train --nproc N` (reprokit.runreduce): "ddp" all-reduces in DistributedDataParallel's
    # order, so each world size gives its own model; "canonical" gives the same bits at every valid N
    reduction: str = "ddp"  # ddp at one process is exactly the plain loop: no bit changes by default
    micro_batches: int | None = None  # canonical only: equal micro-batches a batch is cut into, e.g. 8

    def seeds(self) -> int | dict[str, int]:
        """What ``Run(seed=...)`` gets: ``seed``, or the per-source mapping when any is set."""
        given = {s: getattr(self, f"{s}_seed") for s in SEED_SOURCES}
        if all(v is None for v in given.values()):
            return self.seed
        return {"base": self.seed, **{s: v for s, v in given.items() if v is not None}}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, tuple(MODELS))  # or a factory's import path, see factories.py
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("epochs", self.epochs, 1)
        _at_least("steps", self.steps, 1)
        _at_least("threads", self.threads, 1)
        _at_least("train_limit", self.train_limit, 1)
        self._check_finetune()
        self._check_reduction()
        for name in ("num_workers", "eval_every", "digest_every", "trace_every", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        _at_least("keep_last", self.keep_last, 1)
        if not self.checkpoint_seconds >= 0:
            raise ConfigError(
                f"checkpoint_seconds {self.checkpoint_seconds} must be >= 0; pass 0 to save by steps only"
            )
        for name in ("seed", "split_seed", *(f"{s}_seed" for s in SEED_SOURCES)):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= SEED_MAX:
                raise ConfigError(
                    f"{name} {value} is out of range [0, 2**32-1]; pass a non-negative int below 2**32"
                )
        if not 0 < self.lr < math.inf:  # written so that NaN fails too
            raise ConfigError(f"lr {self.lr} must be > 0 and finite; pass e.g. lr=0.05")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction {self.val_fraction} is outside (0, 1); pass e.g. 0.2")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # inf would make every weight NaN at the first step
                raise ConfigError(f"{name} {value} must be a number >= 0 and finite; pass e.g. {name}=0.0")

    def _check_finetune(self) -> None:
        _choice("finetune", self.finetune, STRATEGIES)
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("init_from '' names no parent; pass a run directory or weights file, or None")
        if self.finetune != "full" and self.init_from is None:
            raise ConfigError(
                f"finetune {self.finetune!r} freezes a pretrained backbone but init_from is None; pass "
                "init_from=PARENT (a run directory or weights file), or finetune='full' to train from scratch"
            )
        _at_least("unfreeze_at", self.unfreeze_at, 1)
        at, steps = self.unfreeze_at, self.steps  # with epochs, finetune checks it against the run's steps
        if self.finetune == "two_stage" and at is not None and steps is not None and at >= steps:
            raise ConfigError(
                f"unfreeze_at {at} is not before the last step {steps}; pass a value in [1, {steps - 1}]"
            )
        if not 0 < self.backbone_lr_factor < math.inf:
            raise ConfigError(f"backbone_lr_factor {self.backbone_lr_factor} must be > 0 and finite; "
                              "pass e.g. 0.1")

    def _check_reduction(self) -> None:
        check_reduction(self.reduction, self.micro_batches, 1)  # the world size is checked by Run
        m = self.micro_batches
        if m is not None and self.batch_size % m:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by micro_batches {m}: canonical mode cuts "
                f"each batch into {m} equal micro-batches; pass a batch_size that is a multiple of {m}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; keys not among the fields are an error listing the allowed ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of field: value, got {type(data).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(map(_shown, set(data) - allowed))  # a YAML key may be an int, not only a str
        if unknown:
            raise ConfigError(f"unknown config key(s) [{', '.join(unknown)}]; allowed keys are "
                              f"{sorted(allowed)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file; fields it leaves out take their defaults."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a .yaml or .json file")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                data = yaml.load(text, Loader=_Loader)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"config file {str(path)!r} is not .yaml, .yml or .json; rename it")
        except (yaml.YAMLError, ValueError, RecursionError, OSError) as e:
            # ValueError: not UTF-8, not JSON, or an int of more digits than Python converts
            # (sys.get_int_max_str_digits); RecursionError: nested deeper than the parser's stack
            why = " ".join(str(e).split())[:300] or type(e).__name__  # one line: YAML's spans several
            raise ConfigError(f"config file {str(path)!r} does not parse ({why}); fix or rewrite it"
                              ) from None
        return cls.from_dict(data if data is not None else {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def recording_fields() -> frozenset[str]:
        """The fields that only say how a run is recorded (:data:`RECORDING_FIELDS`)."""
        return RECORDING_FIELDS

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return self.from_dict({**self.to_dict(), **changes})


RECORDING_FIELDS = frozenset(
    {"num_workers", "eval_every", "digest_every", "trace_every", "checkpoint_every",
     "checkpoint_seconds", "keep_last", "async_save"}
)


def config_differences(
    a: dict[str, Any], b: dict[str, Any], *, ignore: frozenset[str] = RECORDING_FIELDS
) -> list[str]:
    """``"field: a -> b"`` for every field two TrainConfig dicts disagree on, recording fields left out."""
    return differences.config_differences(a, b, ignore=ignore)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2), not as the string PyYAML makes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted (and converted) for floats."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # what torch, numpy and the ledger hold
                raise ConfigError(f"config field {name!r} = {_shown(value)} is out of range "
                                  "[-2**63, 2**63); pass a smaller int")
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join("None" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"config field {name!r} = {_shown(value)} is a {type(value).__name__}; pass {wanted}")


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 80 characters; an int too long to print, by its size."""
    try:
        text = repr(value)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows to print
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= 80 else f"{text[:77]}..."


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if name in ("model", "dataset") and is_factory(value):
        check_reference(name, value)
        return
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not available; choose one of {sorted(choices)}")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name} {value} must be >= {low}")
