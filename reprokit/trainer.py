"""Training: ``train(config) -> RunResult``, the built-in trainer, a client of :class:`reprokit.Run`.

load the data -> Run (seeds, manifest, relaunch = resume) -> build model, optimizer, scheduler ->
the loop a user could copy -> evaluate -> finish. Everything a run records, checkpoints and
restores is Run's; this module only says what to train. ``reprokit.resume`` calls the same
``train`` on the run directory with ``resume="required"``.

Under torchrun (``reprokit train --nproc N``) the config's ``reduction`` picks Run's mode: "ddp"
wraps the model in DistributedDataParallel at N > 1 (Run tracks the inner module); "canonical" runs
forward and backward once per micro-batch of ``run.micro_batches`` and gives the same bits at every
valid N, one process included. At one process in ddp mode the loop is the plain one.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from reprokit.callbacks import Callback
from reprokit.checkpointreader import verify_run
from reprokit.config import RECORDING_FIELDS, TrainConfig
from reprokit.data import DatasetBundle, batches_per_epoch, load_dataset, worker_context
from reprokit.distributed import world_from_env
from reprokit.errors import ConfigError
from reprokit.factories import factory_digests
from reprokit.faults import NO_FAULTS, Faults
from reprokit.finetuning import finetune_callbacks, prepare, verify_parent
from reprokit.models import build_model, build_optimizer, build_scheduler
from reprokit.provenance import data_entry
from reprokit.run import ResumeInfo, Run
from reprokit.rundir import MANIFEST, METRICS, read_digests, read_json
from reprokit.seeding import SeedRecord, Seeds, seed_everything

EVAL_BATCH = 512  # validation batch size: evaluation has no gradient, so a large batch is cheap
_ROW_COLUMNS = ("step", "epoch", "loss", "lr", "digest", "val_loss", "val_metric")

__all__ = ["ResumeInfo", "RunResult", "Session", "build_session", "finetune", "pretrain", "train"]


@dataclass
class RunResult:
    """Everything a finished run produced."""

    config: TrainConfig
    seed_record: SeedRecord
    data_digest: str
    metric_name: str
    final_metric: float
    final_val_loss: float
    final_digest: str
    steps: int
    seconds: float
    rows: list[dict[str, Any]] = field(repr=False)
    tensor_digests: list[tuple[int, dict[str, str]]] = field(repr=False)
    final_state: dict[str, torch.Tensor] = field(repr=False)
    run_dir: Path | None = None
    resume: ResumeInfo | None = None
    checkpoints: tuple[int, ...] = ()  # steps at which a checkpoint was committed in this process
    save_blocked_seconds: tuple[float, ...] = ()  # how long each save held up training

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per step: step, epoch, loss, lr, digest, val_loss, val_metric."""
        return pd.DataFrame(self.rows)


@dataclass
class Session:
    """The built objects of one run, in the order they are built (the model's initial weights
    come from the global RNG right after seeding; a fine-tune then loads its parent over all but
    the head)."""

    config: TrainConfig
    data: DatasetBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    total_steps: int
    parent: dict[str, Any] | None = None  # the manifest's lineage entry of a fine-tune (reprokit.finetuning)


def total_steps(config: TrainConfig, data: DatasetBundle) -> int:
    """Optimizer steps of the run: ``steps``, else whole epochs of ``batch_size`` batches."""
    if config.steps is not None:
        return config.steps
    size = len(data.x_train)
    # under N > 1 ranks or micro-batches run.loader drops an incomplete last batch (reprokit.runloader)
    whole_only = config.reduction == "canonical" or world_from_env().world_size > 1
    per_epoch = size // config.batch_size if whole_only else batches_per_epoch(size, config.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {size} training samples, and an "
                          "incomplete batch is dropped under torchrun or reduction='canonical'; pass a "
                          f"batch_size <= {size}")
    return config.epochs * per_epoch


def build(config: TrainConfig, data: DatasetBundle) -> Session:
    """Model, optimizer and scheduler for ``config`` on ``data``, from the global RNG as it is."""
    total = total_steps(config, data)
    model = build_model(config.model, data.input_shape, data.num_outputs)
    params, parent = prepare(config, model, total)
    optimizer = build_optimizer(config.optimizer, params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = build_scheduler(config.lr_schedule, optimizer, total)
    return Session(config, data, model, optimizer, scheduler, total, parent)


def build_session(config: TrainConfig) -> Session:
    """Seed, load the data and build what :func:`train` trains, outside a run (for inspection)."""
    seed_everything(Seeds.parse(config.seeds()).init, deterministic=config.deterministic,
                    threads=config.threads)
    return build(config, load_data(config))


def reference_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The state_dict layout ``config``'s model has (weights are irrelevant: only shapes count);
    the global RNG is left as it was."""
    data = load_dataset(config.dataset, split_seed=config.split_seed, val_fraction=config.val_fraction)
    with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG
        return build_model(config.model, data.input_shape, data.num_outputs).state_dict()


def verify_builtin(run_dir: str | Path) -> pd.DataFrame:
    """:func:`reprokit.verify_run` of a built-in run: its checkpoints' integrity, and that each was
    written for the run's config and the architecture that config's model has."""
    config = read_json(run_dir, MANIFEST)["config"]
    return verify_run(run_dir, config=config, model_state=reference_state(TrainConfig.from_dict(config)),
                      ignore=RECORDING_FIELDS)


def load_data(config: TrainConfig) -> DatasetBundle:
    return load_dataset(config.dataset, split_seed=config.split_seed, val_fraction=config.val_fraction,
                        train_limit=config.train_limit)


def train(
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    callbacks: tuple[Callback, ...] = (),
    progress: bool | None = None,
    faults: Faults = NO_FAULTS,
    resume: str = "never",
    force: bool = False,
) -> RunResult:
    """Train ``config``; with ``run_dir``, into that run directory (else a temporary one).

    Args:
        config: the run.
        run_dir: a new directory for manifest, metrics, digests, checkpoints, model, result.
        callbacks: hooks called at start, after every step and at the end.
        progress: show a progress bar; ``None`` shows one unless ``REPROKIT_PROGRESS=0``.
        faults: kill points for fault-injection experiments (needs ``run_dir``).
        resume: ``"never"`` (a directory holding a run is refused), ``"required"`` (continue the
            unfinished run it holds: what :func:`reprokit.resume` does) or ``"auto"``.
        force: with a resume, continue despite a changed recipe (recorded in the manifest).
    """
    started = time.perf_counter()
    data = load_data(config)
    total = total_steps(config, data)
    faults.check(config.checkpoint_every, total)
    ddp_ranks = config.reduction == "ddp" and world_from_env().world_size > 1
    if ddp_ranks and config.finetune == "two_stage":  # DDP syncs only what is trainable when it is built
        raise ConfigError("finetune='two_stage' under torchrun with reduction='ddp': DistributedDataParallel "
                          "would not all-reduce the backbone it unfreezes mid-run; pass "
                          "reduction='canonical' (with micro_batches), or train in one process")
    if (faults.crash_at_step or faults.crash_during_save) and run_dir is None:
        raise ConfigError("fault injection needs a run directory to resume from; pass run_dir")
    if run_dir is not None:
        return _train(config, data, total, Path(run_dir), callbacks=callbacks, progress=progress,
                      faults=faults, resume=resume, force=force, started=started, recorded=True)
    temporary = Path(tempfile.mkdtemp(prefix="reprokit-train-"))  # the rows and digests go through it
    try:
        return _train(config, data, total, temporary / "run", callbacks=callbacks, progress=progress,
                      faults=faults, resume=resume, force=force, started=started, recorded=False)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _train(config: TrainConfig, data: DatasetBundle, total: int, path: Path, *,
           callbacks: tuple[Callback, ...], progress: bool | None, faults: Faults, resume: str, force: bool,
           started: float, recorded: bool) -> RunResult:
    run = Run(path, seed=config.seeds(), config=config, threads=config.threads,
              deterministic=config.deterministic, digest_every=config.digest_every,
              trace_every=config.trace_every, checkpoint_every=config.checkpoint_every,
              checkpoint_seconds=config.checkpoint_seconds, keep_last=config.keep_last,
              async_save=config.async_save, progress=progress, steps=total,
              callbacks=(*callbacks, *finetune_callbacks(config)), faults=faults, kind="builtin",
              resume=resume, ignore=RECORDING_FIELDS, ledger=recorded, overrides=False, force=force,
              reduction=config.reduction, micro_batches=config.micro_batches)
    with run:
        session = build(config, data)  # after Run seeded: the initial weights are the seed's
        forward = _wrap(run, session)
        if run.resuming:  # a fine-tune's parent must still be the one the run started from
            verify_parent(run._manifest, session.parent, config.init_from)
        run.describe(data=data_entry(data, config.to_dict()), parent=session.parent,
                     factories=factory_digests(config.model, config.dataset))
        scheduler = {"scheduler": session.scheduler} if session.scheduler is not None else {}
        run.track(model=forward, optimizer=session.optimizer, **scheduler)  # a DDP: its settings recorded
        workers = {"multiprocessing_context": worker_context(), "persistent_workers": True} \
            if config.num_workers else {}
        loader = run.loader(TensorDataset(data.x_train, data.y_train), batch_size=config.batch_size,
                            shuffle=True, num_workers=config.num_workers, digest=False, **workers)
        _loop(run, session, loader, forward)
        run.flush()  # metrics.csv is read back before finish
        rows = _rows(run.path)  # this rank's: under torchrun rank r records in RUN_DIR/ranks/rank-r
        last = rows[-1]
        summary = run.finish(result={"final_val_loss": last["val_loss"]},
                             **{metric_name(data): last["val_metric"], "val_loss": last["val_loss"]})
    history = read_digests(run.path)  # closed by finish: complete
    return RunResult(
        config=config, seed_record=run.seeds, data_digest=data.digest, metric_name=metric_name(data),
        final_metric=rows[-1]["val_metric"], final_val_loss=rows[-1]["val_loss"],
        final_digest=summary.final_digest, steps=total, seconds=time.perf_counter() - started, rows=rows,
        tensor_digests=history, final_state=_final_state(session.model), run_dir=path if recorded else None,
        resume=run.resume_info, checkpoints=run.saved_steps, save_blocked_seconds=run.save_blocked_seconds,
    )


def _wrap(run: Run, session: Session) -> nn.Module:
    """What the loop calls forward on: in ddp mode under N > 1 ranks the model in
    DistributedDataParallel (Run tracks, digests and saves the inner module), else the model."""
    if run.world.world_size == 1 or run.reduction != "ddp":
        return session.model
    return DistributedDataParallel(session.model)


def _loop(run: Run, session: Session, loader: Any, forward: nn.Module) -> None:
    """The loop of a user's script, with the built-in's loss and evaluation."""
    config, model, optimizer, scheduler, data = (session.config, session.model, session.optimizer,
                                                 session.scheduler, session.data)
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy if data.task == "classification" else F.mse_loss
    total = session.total_steps
    run.begin()
    if run.global_step == 0:  # step 0 is the initial model: runs whose seeds differ already diverge here
        val_loss, val_metric = evaluate(model, data)
        run.log(val_loss=val_loss, val_metric=val_metric)
    model.train()
    for _ in run.epochs(math.ceil(total / len(loader))):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = _backward(run, forward, loss_fn, xb, yb)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step = run.global_step + 1
            evals = {}
            if step == total or (config.eval_every and step % config.eval_every == 0):
                evals = dict(zip(("val_loss", "val_metric"), evaluate(model, data), strict=True))
            run.step(loss=loss, **evals)


def _backward(run: Run, forward: nn.Module, loss_fn: Callable[..., torch.Tensor], xb: torch.Tensor,
              yb: torch.Tensor) -> torch.Tensor:
    """One batch's forward and backward; returns the loss to record. In canonical mode once per
    micro-batch, each its mean loss: Run averages their gradients into the batch's mean-loss gradient."""
    if run.reduction != "canonical":
        loss = loss_fn(forward(xb), yb)
        loss.backward()
        return loss
    losses = []
    for mx, my in run.micro_batches(xb, yb):
        loss = loss_fn(forward(mx), my)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()  # this rank's micro-batches (all of them in one process)


def _rows(path: Path) -> list[dict[str, Any]]:
    """RunResult's rows, one per step 0..N, from metrics.csv: the same for a run that went through
    and one that was resumed (read with the csv module: numbers parse exactly, and fast)."""
    rows = []
    with open(path / METRICS, newline="") as f:
        for record in csv.DictReader(f):
            if record.get("kind") not in (None, "", "init", "step"):
                continue  # a run.log row
            row: dict[str, Any] = {"step": int(record["step"]), "epoch": int(record["epoch"])}
            for column in _ROW_COLUMNS[2:]:
                value = record.get(column) or ""
                if column == "digest":
                    if value:
                        row[column] = value
                else:
                    row[column] = float(value) if value else math.nan
            rows.append(row)
    return rows


def _final_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

def pretrain(config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Train the upstream model into ``run_dir``: its ``model.safetensors`` and manifest are the
    pretrained artifact :func:`finetune` starts from. ``kwargs`` go to ``train``."""
    return train(config, run_dir, **kwargs)


def finetune(
    config: TrainConfig, parent: str | Path, strategy: str = "two_stage",
    run_dir: str | Path | None = None, **kwargs: Any,
) -> RunResult:
    """Train ``config`` (the downstream task) starting from ``parent`` with ``strategy``.

    Args:
        config: the downstream run; its ``init_from`` and ``finetune`` are set from the next two.
        parent: a finished run directory or a weights file (see :func:`load_parent`).
        strategy: ``"full"``, ``"feature_extraction"`` or ``"two_stage"``.
        run_dir, kwargs: as for ``train``.
    """
    changes = {"init_from": str(Path(parent).resolve()), "finetune": strategy}
    return train(config.replace(**changes), run_dir, **kwargs)


def show_progress(progress: bool | None) -> bool:
    """Resolve a ``progress`` argument: ``None`` means on unless ``REPROKIT_PROGRESS=0``."""
    return progress if progress is not None else os.environ.get("REPROKIT_PROGRESS", "1") != "0"


def metric_name(data: DatasetBundle) -> str:
    """``val_accuracy`` for classification, ``val_r2`` for regression: higher is better for both."""
    return "val_accuracy" if data.task == "classification" else "val_r2"


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetBundle) -> tuple[float, float]:
    """Validation loss and metric (accuracy or R²) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    outputs = torch.cat([model(xb) for xb in data.x_val.split(EVAL_BATCH)])
    model.train(was_training)
    if data.task == "classification":
        loss = F.cross_entropy(outputs, data.y_val)
        metric = (outputs.argmax(dim=1) == data.y_val).double().mean()
    else:
        loss = F.mse_loss(outputs, data.y_val)
        metric = 1 - ((outputs - data.y_val) ** 2).sum() / ((data.y_val - data.y_val.mean()) ** 2).sum()
    return float(loss), float(metric)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
