"""How a :class:`reprokit.Run` is recorded and checkpointed: its arguments checked, with the
``REPROKIT_*`` overrides (:mod:`reprokit.overrides`) applied where a harness set them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprokit.errors import ConfigError
from reprokit.overrides import Overrides
from reprokit.seeding import SOURCES, Seeds


@dataclass(frozen=True)
class RunSettings:
    """A run's settings after the overrides."""

    path: Path
    sources: Seeds  # which seed feeds which stream
    threads: int | None
    deterministic: bool
    digest_every: int
    grad_every: int
    trace_every: int
    checkpoint_every: int
    checkpoint_seconds: float
    keep_last: int
    async_save: bool
    steps: int | None
    progress: bool | None
    force: bool
    num_workers: int | None
    crash_during_save: int | None  # REPROKIT_CRASH_DURING_SAVE, checked against checkpoint_every

    def recorded(self) -> dict[str, Any]:
        """The manifest's ``settings``: how the run is recorded (not part of its recipe)."""
        return {"digest_every": self.digest_every, "trace_every": self.trace_every,
                "grad_digest_every": self.grad_every, "checkpoint_every": self.checkpoint_every,
                "checkpoint_seconds": self.checkpoint_seconds, "keep_last": self.keep_last,
                "async_save": self.async_save}


def resolve_settings(env: Overrides, run_dir: str | Path | None, *, seed: int | Any, threads: int | None,
                     deterministic: bool, digest_every: int, grad_digest_every: int | None,
                     trace_every: int, checkpoint_every: int, checkpoint_seconds: float, keep_last: int,
                     async_save: bool, steps: int | None, progress: bool | None,
                     force: bool) -> RunSettings:
    """Check Run's arguments (an error names the value and the fix) and apply the overrides."""
    for name, value, low in (("digest_every", digest_every, 0), ("trace_every", trace_every, 0),
                             ("checkpoint_every", checkpoint_every, 0), ("keep_last", keep_last, 1),
                             ("grad_digest_every", grad_digest_every or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} {value!r} must be an int >= {low}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps {steps!r} must be an int >= 1, or None when the length is unknown")
    path = env.run_dir or run_dir
    if path is None:
        raise ConfigError("Run needs a run directory: pass Run('runs/NAME', ...) or set REPROKIT_RUN_DIR")
    digest_every = _pick(env.digest_every, digest_every)
    checkpoint_every = _pick(env.checkpoint_every, checkpoint_every)
    crash_save = env.crash_during_save
    if crash_save is not None and (not checkpoint_every or crash_save % checkpoint_every):
        raise ConfigError(f"REPROKIT_CRASH_DURING_SAVE={crash_save} is not a checkpoint step: "
                          f"checkpoints are saved every {checkpoint_every or 'no'} steps; pick a "
                          "multiple of checkpoint_every")
    sources = Seeds.parse(_pick(env.seed, seed))
    by_source = {s: v for s in SOURCES if (v := getattr(env, f"seed_{s}")) is not None}
    return RunSettings(
        path=Path(path), sources=sources.replace(**by_source) if by_source else sources,
        threads=_pick(env.threads, threads), deterministic=_pick(env.deterministic, deterministic),
        digest_every=digest_every,
        grad_every=digest_every if grad_digest_every is None else grad_digest_every,
        trace_every=_pick(env.trace_every, trace_every), checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds, keep_last=keep_last, async_save=async_save, steps=steps,
        progress=_pick(env.progress, progress), force=bool(force or env.force),
        num_workers=env.num_workers, crash_during_save=crash_save,
    )


def _pick(override: Any, value: Any) -> Any:
    return override if override is not None else value
