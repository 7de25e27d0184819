"""Resume: finish a killed run from its newest checkpoint that verifies, bit for bit.

The session is rebuilt from the manifest's config exactly as ``train`` builds it, then every piece
of state the checkpoint holds is put back: weights, optimizer, scheduler, every RNG, the callbacks'
state, and the position in the data (epoch and batch; the batch order is recomputed from the seed,
so nothing already consumed is replayed). Rows the dead process wrote after the checkpoint are cut
off, and the loop goes on where the checkpoint left it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from reprokit.callbacks import Callback, TrainState, callback_keys
from reprokit.checkpoint import (
    CALLBACKS_KEY,
    MODEL_KEY,
    OPTIMIZER_KEY,
    RNG_KEY,
    SCHEDULER_KEY,
    CheckpointError,
    CheckpointMeta,
    check_compatible,
    clean_temporaries,
    list_checkpoints,
    read_checkpoint,
)
from reprokit.config import RECORDING_FIELDS, TrainConfig, config_differences
from reprokit.data import batches_per_epoch
from reprokit.digests import model_digest, source_digest
from reprokit.errors import ReprokitError
from reprokit.factories import code_version, is_factory
from reprokit.faults import NO_FAULTS, Faults
from reprokit.finetuning import verify_parent
from reprokit.ledger import LedgerEntry
from reprokit.rundir import (
    MANIFEST,
    RESULT,
    RunWriter,
    append_resume,
    read_digests,
    read_json,
    read_metrics,
)
from reprokit.seeding import RngState, restore_rng_state
from reprokit.trainer import ResumeInfo, RunResult, Session, build_session, config_callbacks, run_loop


class ResumeError(ReprokitError):
    """A run cannot be resumed as asked."""


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
    started = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_json(run_dir, MANIFEST)
    if (run_dir / RESULT).exists():
        raise ResumeError(f"run {str(run_dir)!r} already finished ({RESULT} exists); nothing to resume")
    original = TrainConfig.from_dict(manifest["config"])
    config = original.replace(**changes) if changes else original
    differences = config_differences(original.to_dict(), config.to_dict())
    session = build_session(config)  # a fine-tune's parent is loaded and verified here ...
    verify_parent(manifest, session.parent, config.init_from)  # ... still the one the run started from
    faults.check(config.checkpoint_every, session.total_steps)
    callbacks = (*callbacks, *config_callbacks(config, run_dir))
    clean_temporaries(run_dir)
    chosen, skipped = _newest_valid(run_dir, original, session)
    if chosen is not None:
        meta = chosen[0]
        if meta.data_digest != session.data.digest:
            differences.append(f"data digest: {meta.data_digest} -> {session.data.digest}")
        now = code_version(source_digest(), config.model, config.dataset)
        if meta.code_version != now:
            what = "reprokit's or the model/dataset factory's" if is_factory(config.model + config.dataset) \
                else "reprokit"
            differences.append(f"{what} code version: {meta.code_version} -> {now}")
    if differences and not force:
        raise ResumeError(
            f"resuming {str(run_dir)!r} would change what the run computes: {'; '.join(differences)}; "
            "undo the change, or pass force=True (--force) to resume anyway and have it recorded"
        )
    state = TrainState(config, session.model, session.optimizer, session.data, session.total_steps)
    if chosen is not None:
        _restore(session, state, callbacks, *chosen)
        sizes = chosen[0].run_files
    else:
        sizes = None  # nothing committed: start over from the freshly seeded model
    writer = RunWriter(run_dir, manifest, truncate_to=sizes or {})
    earlier = read_metrics(run_dir).to_dict("records") if sizes else []
    rows = [{str(k): v for k, v in r.items()} for r in earlier]
    history = read_digests(run_dir) if sizes else []
    info = ResumeInfo(
        checkpoint=chosen[2] if chosen else None,
        from_step=state.step,
        skipped=tuple(skipped),
        latency_seconds=time.perf_counter() - started,
        differences=tuple(differences),
        forced=bool(differences),
    )
    append_resume(run_dir, {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": info.checkpoint, "from_step": state.step,
        "skipped": [list(s) for s in skipped], "forced": info.forced, "differences": list(differences),
        "threads": session.seeds.threads,
    })
    entry = LedgerEntry.open(run_dir, manifest, resumed=True) if "run_id" in manifest else None
    return run_loop(session, state, writer, callbacks=callbacks, progress=progress, faults=faults,
                    started=started, rows=rows, history=history, resume=info, ledger=entry)


def pick_checkpoint(run_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint :func:`resume` would continue from (``None``: start over) and the ones it
    would skip, with why, without training."""
    config = TrainConfig.from_dict(read_json(run_dir, MANIFEST)["config"])
    chosen, skipped = _newest_valid(Path(run_dir), config, build_session(config))
    return (chosen[2] if chosen else None), skipped


def _newest_valid(
    run_dir: Path, config: TrainConfig, session: Session
) -> tuple[tuple[CheckpointMeta, dict[str, Any], str] | None, list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    model_state = session.model.state_dict()
    for path in list_checkpoints(run_dir):
        try:
            meta, saved = read_checkpoint(path)
            check_compatible(meta, path, config=config.to_dict(), model_state=model_state,
                             ignore=RECORDING_FIELDS)
            return (meta, saved, path.name), skipped
        except CheckpointError as e:
            skipped.append((path.name, str(e)))
    return None, skipped


def _restore(
    session: Session, state: TrainState, callbacks: tuple[Callback, ...],
    meta: CheckpointMeta, saved: dict[str, Any], name: str,
) -> None:
    session.model.load_state_dict(saved[MODEL_KEY])
    if model_digest(session.model) != meta.model_digest:
        raise CheckpointError(f"{name}: the loaded weights do not match the digest the checkpoint recorded")
    session.optimizer.load_state_dict(saved[OPTIMIZER_KEY])
    if session.scheduler is not None:
        session.scheduler.load_state_dict(saved[SCHEDULER_KEY])
    restore_rng_state(RngState.from_dict(saved[RNG_KEY]), session.generators())
    for key, cb in zip(callback_keys(callbacks), callbacks, strict=True):
        cb.load_state_dict(saved.get(CALLBACKS_KEY, {}).get(key))
    state.step, state.epoch, state.batch = meta.step, meta.epoch, meta.batch
    if state.batch >= batches_per_epoch(len(session.data.x_train), session.config.batch_size):
        state.epoch, state.batch = state.epoch + 1, 0  # saved at an epoch's last batch

