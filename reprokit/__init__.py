"""reprokit: prove a PyTorch training run is reproducible, traceable and recoverable.

Exports are loaded on first use (PEP 562, https://peps.python.org/pep-0562/), so ``import reprokit``
and ``reprokit --help`` load no torch, pandas, matplotlib or scipy. To export a name, add one line to
``_EXPORTS``; the ``TYPE_CHECKING`` imports below mirror it for mypy and IDEs (a test checks they agree).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# exported name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "ReprokitError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ModelError": "errors",
    "SeedError": "errors",
    "SeedRecord": "seeding",
    "capture_rng_state": "seeding",
    "make_generator": "seeding",
    "restore_rng_state": "seeding",
    "seed_everything": "seeding",
    "seed_worker": "seeding",
    "first_divergence": "digests",
    "model_digest": "digests",
    "state_digests": "digests",
    "tensor_digest": "digests",
    "build_manifest": "provenance",
    "fingerprint": "provenance",
    "manifest_differences": "differences",
    "manifest_table": "provenance",
    "Ledger": "ledger",
    "runs": "ledger",
    "CheckpointError": "checkpoint",
    "read_checkpoint": "checkpointreader",
    "verify_run": "checkpointreader",
    "Tracer": "trace",
    "importance": "trace",
    "read_importance": "trace",
    "read_trace": "trace",
    "traceability_score": "trace",
    "TrainConfig": "config",
    "DatasetBundle": "data",
    "load_dataset": "data",
    "make_loader": "data",
    "build_model": "models",
    "Run": "run",
    "RunFinished": "run",
    "RunSummary": "run",
    "ResumeRefused": "run",
    "EXIT_STOPPED": "run",
    "Callback": "callbacks",
    "TrainState": "callbacks",
    "RunResult": "trainer",
    "train": "trainer",
    "ResumeError": "resumer",
    "resume": "resumer",
    "LineageError": "finetuning",
    "finetune": "trainer",
    "lineage": "finetuning",
    "pretrain": "trainer",
    "Cause": "causes",
    "Comparison": "compare",
    "compare_runs": "compare",
    "Reproduction": "reproduction",
    "reproduce": "reproduction",
    "audit_determinism": "audit",
    "determinism_verdict": "audit",
    "divergences": "audit",
    "seed_variance": "audit",
    "world_size_effect": "audit",
    "fault_matrix": "recovery",
    "plot_loss_curves": "plots",
    "plot_metric_distribution": "plots",
    "plot_recovery_curves": "plots",
    "plot_recovery_ratio": "plots",
    "explorer": "display",
    "headline": "display",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from reprokit.audit import audit_determinism as audit_determinism
    from reprokit.audit import determinism_verdict as determinism_verdict
    from reprokit.audit import divergences as divergences
    from reprokit.audit import seed_variance as seed_variance
    from reprokit.audit import world_size_effect as world_size_effect
    from reprokit.callbacks import Callback as Callback
    from reprokit.callbacks import TrainState as TrainState
    from reprokit.causes import Cause as Cause
    from reprokit.checkpoint import CheckpointError as CheckpointError
    from reprokit.checkpointreader import read_checkpoint as read_checkpoint
    from reprokit.checkpointreader import verify_run as verify_run
    from reprokit.compare import Comparison as Comparison
    from reprokit.compare import compare_runs as compare_runs
    from reprokit.config import TrainConfig as TrainConfig
    from reprokit.data import DatasetBundle as DatasetBundle
    from reprokit.data import load_dataset as load_dataset
    from reprokit.data import make_loader as make_loader
    from reprokit.differences import manifest_differences as manifest_differences
    from reprokit.digests import first_divergence as first_divergence
    from reprokit.digests import model_digest as model_digest
    from reprokit.digests import state_digests as state_digests
    from reprokit.digests import tensor_digest as tensor_digest
    from reprokit.display import explorer as explorer
    from reprokit.display import headline as headline
    from reprokit.errors import ConfigError as ConfigError
    from reprokit.errors import DataError as DataError
    from reprokit.errors import ModelError as ModelError
    from reprokit.errors import ReprokitError as ReprokitError
    from reprokit.errors import SeedError as SeedError
    from reprokit.finetuning import LineageError as LineageError
    from reprokit.finetuning import lineage as lineage
    from reprokit.ledger import Ledger as Ledger
    from reprokit.ledger import runs as runs
    from reprokit.models import build_model as build_model
    from reprokit.plots import plot_loss_curves as plot_loss_curves
    from reprokit.plots import plot_metric_distribution as plot_metric_distribution
    from reprokit.plots import plot_recovery_curves as plot_recovery_curves
    from reprokit.plots import plot_recovery_ratio as plot_recovery_ratio
    from reprokit.provenance import build_manifest as build_manifest
    from reprokit.provenance import fingerprint as fingerprint
    from reprokit.provenance import manifest_table as manifest_table
    from reprokit.recovery import fault_matrix as fault_matrix
    from reprokit.reproduction import Reproduction as Reproduction
    from reprokit.reproduction import reproduce as reproduce
    from reprokit.resumer import ResumeError as ResumeError
    from reprokit.resumer import resume as resume
    from reprokit.run import EXIT_STOPPED as EXIT_STOPPED
    from reprokit.run import ResumeRefused as ResumeRefused
    from reprokit.run import Run as Run
    from reprokit.run import RunFinished as RunFinished
    from reprokit.run import RunSummary as RunSummary
    from reprokit.seeding import SeedRecord as SeedRecord
    from reprokit.seeding import capture_rng_state as capture_rng_state
    from reprokit.seeding import make_generator as make_generator
    from reprokit.seeding import restore_rng_state as restore_rng_state
    from reprokit.seeding import seed_everything as seed_everything
    from reprokit.seeding import seed_worker as seed_worker
    from reprokit.trace import Tracer as Tracer
    from reprokit.trace import importance as importance
    from reprokit.trace import read_importance as read_importance
    from reprokit.trace import read_trace as read_trace
    from reprokit.trace import traceability_score as traceability_score
    from reprokit.trainer import RunResult as RunResult
    from reprokit.trainer import finetune as finetune
    from reprokit.trainer import pretrain as pretrain
    from reprokit.trainer import train as train


def __getattr__(name: str) -> Any:
    # only called for names not yet in the module's namespace; an AttributeError for any other name
    # lets `from reprokit import tensorfile` fall through to importing the submodule
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reprokit' has no attribute {name!r}")
    value = getattr(import_module(f"reprokit.{module}"), name)
    globals()[name] = value  # cached: the next lookup does not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
