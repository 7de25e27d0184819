"""Resume: finish a killed run of the built-in trainer from its newest checkpoint that verifies.

The same ``train`` runs again on the run directory (``resume="required"``): :class:`reprokit.Run`
finds the newest checkpoint that verifies, refuses a changed recipe unless forced, cuts back the
rows the dead process wrote after the checkpoint, and puts every piece of state back at the moment
that makes the continuation bit-exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprokit.callbacks import Callback
from reprokit.checkpoint import architecture
from reprokit.config import RECORDING_FIELDS, TrainConfig
from reprokit.faults import NO_FAULTS, Faults
from reprokit.rundir import MANIFEST, RESULT, read_json
from reprokit.runresume import ResumeRefused, fitting, newest_valid
from reprokit.trainer import RunResult, reference_state, train

ResumeError = ResumeRefused  # a run cannot be resumed as asked (the name this module always had)


def resume(
    run_dir: str | Path,
    *,
    changes: dict[str, Any] | None = None,
    force: bool = False,
    callbacks: tuple[Callback, ...] = (),
    progress: bool | None = None,
    faults: Faults = NO_FAULTS,
) -> RunResult:
    """Finish the run in ``run_dir`` from its newest checkpoint that verifies.

    Args:
        run_dir: a run directory written by ``train`` (with checkpoints) that has no result yet.
        changes: config fields to change on resume, e.g. ``{"threads": 2}``. Fields that only say how
            the run is recorded (checkpoint cadence, workers, digests) may change freely; any
            other change, or a different dataset digest or code version, needs ``force``.
        force: resume despite the differences; they are recorded in the manifest's ``resumes`` log.
        callbacks, progress, faults: as for ``train``.

    Returns:
        The finished run's result; ``result.resume`` says where it resumed from and what it skipped.
    """
    run_dir = Path(run_dir)
    manifest = read_json(run_dir, MANIFEST)
    if (run_dir / RESULT).exists():
        raise ResumeError(f"run {str(run_dir)!r} already finished ({RESULT} exists); nothing to resume")
    original = TrainConfig.from_dict(manifest["config"])
    config = original.replace(**changes) if changes else original
    return train(config, run_dir, callbacks=callbacks, progress=progress, faults=faults, resume="required",
                 force=force)


def pick_checkpoint(run_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint :func:`resume` would continue from (``None``: start over) and the ones it
    would skip, with why, without training (nothing is built or seeded: only the files are read)."""
    config = read_json(run_dir, MANIFEST)["config"]
    chosen, skipped = newest_valid(Path(run_dir), config=config, ignore=RECORDING_FIELDS)
    layout = architecture(reference_state(TrainConfig.from_dict(config)))
    chosen = fitting(Path(run_dir), chosen, layout, config=config, ignore=RECORDING_FIELDS, skipped=skipped)
    return (chosen[2] if chosen else None), skipped
