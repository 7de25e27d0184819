"""The environment contract: ``REPROKIT_*`` variables that let a harness drive an unmodified script.

A script that constructs :class:`reprokit.Run` honours these, and the run records which were in
force (manifest ``overrides``), so a harness (the audit, the fault matrix, ``reprokit resume``)
can re-run a user's script with another seed, thread count or kill point without editing it.

    REPROKIT_RUN_DIR             the run directory (wins over the script's argument)
    REPROKIT_SEED                the seed, an int in [0, 2**32-1] (every source, as one int)
    REPROKIT_SEED_INIT           one source's seed (init, data order, augmentation, dropout): the
    REPROKIT_SEED_DATA_ORDER       run takes per-source seeds, the others from the script's seed
    REPROKIT_SEED_AUGMENTATION
    REPROKIT_SEED_DROPOUT
    REPROKIT_THREADS             intra-op threads, an int >= 1
    REPROKIT_DETERMINISTIC       1/0 (also true/false, yes/no, on/off)
    REPROKIT_NUM_WORKERS         DataLoader worker processes of every ``run.loader``, an int >= 0
    REPROKIT_CRASH_AT_STEP       SIGKILL right after optimizer step K (a fresh run only)
    REPROKIT_CRASH_DURING_SAVE   SIGKILL half-way through writing the checkpoint of step K (fresh run only)
    REPROKIT_FLIP_BIT            TENSOR:ELEMENT:BIT: flip one bit of one initial weight ("" = first tensor)
    REPROKIT_PROGRESS            1/0: show a progress bar
    REPROKIT_FORCE               1/0: resume even if the recipe changed (recorded in the manifest)
    REPROKIT_DIGEST_EVERY        per-tensor digests every N steps (0 = off): how the run is recorded
    REPROKIT_TRACE_EVERY         the tracer every N steps (0 = off)
    REPROKIT_CHECKPOINT_EVERY    a checkpoint every N steps (0 = off)
    REPROKIT_REDUCTION           ddp|canonical: the reduction mode under torchrun (wins over the
                                   script's; ddp drops the script's micro_batches, which it has none of)
    REPROKIT_MICRO_BATCHES       canonical mode's micro-batch count, an int >= 1 (wins over the script's)

``REPROKIT_LEDGER`` (the ledger file, :mod:`reprokit.ledger`) and ``REPROKIT_KERNEL`` (the
notebooks' kernel) are read elsewhere. A value that does not parse is an error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from reprokit.errors import ConfigError
from reprokit.faults import parse_flip

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_INTS = {"REPROKIT_SEED": 0, "REPROKIT_SEED_INIT": 0, "REPROKIT_SEED_DATA_ORDER": 0,
         "REPROKIT_SEED_AUGMENTATION": 0, "REPROKIT_SEED_DROPOUT": 0, "REPROKIT_THREADS": 1,
         "REPROKIT_NUM_WORKERS": 0,
         "REPROKIT_CRASH_AT_STEP": 1, "REPROKIT_CRASH_DURING_SAVE": 1, "REPROKIT_DIGEST_EVERY": 0,
         "REPROKIT_TRACE_EVERY": 0, "REPROKIT_CHECKPOINT_EVERY": 0,
         "REPROKIT_MICRO_BATCHES": 1}  # name -> smallest value
_BOOLS = ("REPROKIT_DETERMINISTIC", "REPROKIT_PROGRESS", "REPROKIT_FORCE")
_REDUCTIONS = ("ddp", "canonical")  # reprokit.runreduce.REDUCTIONS (L1; this module is L0)
VARIABLES = ("REPROKIT_RUN_DIR", *_INTS, *_BOOLS, "REPROKIT_FLIP_BIT", "REPROKIT_REDUCTION")


@dataclass(frozen=True)
class Overrides:
    """The ``REPROKIT_*`` values in force; ``None`` = not set."""

    run_dir: str | None = None
    seed: int | None = None
    seed_init: int | None = None
    seed_data_order: int | None = None
    seed_augmentation: int | None = None
    seed_dropout: int | None = None
    threads: int | None = None
    deterministic: bool | None = None
    num_workers: int | None = None
    crash_at_step: int | None = None
    crash_during_save: int | None = None
    progress: bool | None = None
    force: bool | None = None
    digest_every: int | None = None
    trace_every: int | None = None
    checkpoint_every: int | None = None
    flip_bit: tuple[str, int, int] | None = None
    reduction: str | None = None
    micro_batches: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The variables that were set, for the manifest."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def reduce(self, reduction: str, micro_batches: int | None) -> tuple[str, int | None]:
        """The reduction mode and micro-batch count a Run uses: the script's, overridden. Mode ddp
        has no micro-batches, so ``REPROKIT_REDUCTION=ddp`` drops the script's count (a loop that
        branches on ``run.reduction`` then runs in either mode); canonical mode needs a count."""
        if self.reduction == "ddp":
            return "ddp", self.micro_batches  # a count set here too is refused by Run, named
        count = self.micro_batches or micro_batches
        if self.reduction == "canonical" and count is None:
            raise ConfigError("REPROKIT_REDUCTION=canonical, but the script passes no micro_batches; set "
                              "REPROKIT_MICRO_BATCHES too, e.g. REPROKIT_MICRO_BATCHES=8")
        return self.reduction or reduction, count


def _int(env: Mapping[str, str], name: str, low: int) -> int | None:
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer; set e.g. {name}={max(low, 1)}") from None
    if value < low:
        raise ConfigError(f"{name}={value} is below {low}; set an integer >= {low}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    text = env.get(name)
    if not text:
        return None
    if text not in allowed:
        raise ConfigError(f"{name}={text!r} is not one of {list(allowed)}; set "
                          + " or ".join(f"{name}={a}" for a in allowed))
    return text


def read_overrides(environ: Mapping[str, str] | None = None) -> Overrides:
    """Parse the ``REPROKIT_*`` variables of ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    run_dir = env.get("REPROKIT_RUN_DIR")
    if run_dir is not None:
        if not run_dir.strip():
            raise ConfigError("REPROKIT_RUN_DIR is set but empty; unset it or give a directory path")
        values["run_dir"] = run_dir
    for name, low in _INTS.items():
        value = _int(env, name, low)
        if value is not None:
            values[name.removeprefix("REPROKIT_").lower()] = value
    for name in _BOOLS:
        text = env.get(name)
        if text is None or text == "":
            continue
        if text.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{name}={text!r} is not a yes/no value; set {name}=1 or {name}=0")
        values[name.removeprefix("REPROKIT_").lower()] = text.lower() in _TRUE
    reduction = _choice(env, "REPROKIT_REDUCTION", _REDUCTIONS)
    if reduction is not None:
        values["reduction"] = reduction
    flip = env.get("REPROKIT_FLIP_BIT")
    if flip:
        values["flip_bit"] = parse_flip(flip)
    return Overrides(**values)
