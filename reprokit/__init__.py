"""reprokit: prove a PyTorch training run is reproducible, traceable and recoverable."""

__version__ = "0.1.0"
