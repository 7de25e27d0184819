"""Provenance: what produced a run, written to manifest.json before the first step.

Kept minimal for now (config, seeding, data, versions); the traceability work extends it with the
code state, the full environment and lineage.
"""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

import numpy as np
import torch

from reprokit import __version__
from reprokit.config import TrainConfig
from reprokit.data import DatasetBundle
from reprokit.seeding import SeedRecord

MANIFEST_VERSION = 1


def build_manifest(config: TrainConfig, seeds: SeedRecord, data: DatasetBundle) -> dict[str, Any]:
    """The manifest of a run about to start."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict(),
        "seeding": seeds.to_dict(),
        "data": {
            "name": data.name,
            "task": data.task,
            "train_size": len(data.x_train),
            "val_size": len(data.x_val),
            "digest": data.digest,
        },
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "reprokit": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }
