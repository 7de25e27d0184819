"""The exceptions reprokit raises on bad input.

Every message names the bad value, the allowed range and the fix, so a user reading only the
last line of a traceback (or the CLI's one-line reason) knows what to change.
"""

from __future__ import annotations


class ReprokitError(Exception):
    """Base class: anything reprokit refuses because of what the caller passed."""


class ConfigError(ReprokitError, ValueError):
    """A configuration value is unknown, ill-typed or out of range."""


class SeedError(ReprokitError, ValueError):
    """A seed is of the wrong type or outside [0, 2**32-1]."""


class DataError(ReprokitError, ValueError):
    """A dataset name or split is not available."""


class ModelError(ReprokitError, ValueError):
    """A model name is unknown or does not fit the dataset."""


class ReportError(ReprokitError):
    """A notebook could not be executed or rendered."""


class DistributedError(ReprokitError, RuntimeError):
    """A distributed setup is refused (environment, world size, batch split) or a collective failed."""


class RunDirError(ReprokitError, ValueError):
    """A run directory, or a file in it, is missing, malformed or not what it claims to be."""


class RunLockedError(ReprokitError, RuntimeError):
    """Another process (or another open object of this one) is writing the run directory."""
