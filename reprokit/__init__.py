"""reprokit: prove a PyTorch training run is reproducible, traceable and recoverable."""

__version__ = "0.1.0"

from reprokit.audit import audit_determinism, determinism_verdict, divergences, seed_variance
from reprokit.callbacks import Callback
from reprokit.checkpoint import CheckpointError, read_checkpoint, verify_run
from reprokit.compare import Comparison, compare_runs
from reprokit.config import TrainConfig
from reprokit.data import DatasetBundle, load_dataset, make_loader
from reprokit.digests import first_divergence, model_digest, state_digests, tensor_digest
from reprokit.display import explorer, headline
from reprokit.errors import ConfigError, DataError, ModelError, ReprokitError, SeedError
from reprokit.finetune import LineageError, finetune, lineage, pretrain
from reprokit.ledger import Ledger, runs
from reprokit.models import build_model
from reprokit.plots import (
    plot_loss_curves,
    plot_metric_distribution,
    plot_recovery_curves,
    plot_recovery_ratio,
)
from reprokit.provenance import build_manifest, fingerprint, manifest_differences
from reprokit.resume import ResumeError, resume
from reprokit.seeding import (
    SeedRecord,
    capture_rng_state,
    make_generator,
    restore_rng_state,
    seed_everything,
    seed_worker,
)
from reprokit.trace import Tracer, importance, read_importance, read_trace, traceability_score
from reprokit.train import RunResult, train

__all__ = [
    "Callback",
    "CheckpointError",
    "Comparison",
    "ConfigError",
    "DataError",
    "DatasetBundle",
    "Ledger",
    "LineageError",
    "ModelError",
    "ReprokitError",
    "ResumeError",
    "RunResult",
    "SeedError",
    "SeedRecord",
    "Tracer",
    "TrainConfig",
    "__version__",
    "audit_determinism",
    "build_manifest",
    "build_model",
    "capture_rng_state",
    "compare_runs",
    "determinism_verdict",
    "divergences",
    "explorer",
    "finetune",
    "fingerprint",
    "first_divergence",
    "headline",
    "importance",
    "lineage",
    "load_dataset",
    "make_generator",
    "make_loader",
    "manifest_differences",
    "model_digest",
    "plot_loss_curves",
    "plot_metric_distribution",
    "plot_recovery_curves",
    "plot_recovery_ratio",
    "pretrain",
    "read_checkpoint",
    "read_importance",
    "read_trace",
    "restore_rng_state",
    "resume",
    "runs",
    "seed_everything",
    "seed_variance",
    "seed_worker",
    "state_digests",
    "tensor_digest",
    "traceability_score",
    "train",
    "verify_run",
]
