"""Errors raised by lightning_local.

Every error names the problem and the fix. All derive from :class:`LocalLearningError`
(a ``ValueError``), so callers can catch the library's errors in one place.
"""

from __future__ import annotations


class LocalLearningError(ValueError):
    """Base class of the library's user-facing errors."""


class UnsupportedNetworkError(LocalLearningError):
    """The model does not expose an ordered list of blocks, or a block cannot be handled."""


class ShapeMismatchError(LocalLearningError):
    """Inputs, targets or block outputs have shapes that do not fit together."""


class NonFiniteEnergyError(LocalLearningError, FloatingPointError):
    """An energy, local loss or state became NaN or infinite during a step."""


class MissingBaseShapesError(LocalLearningError):
    """muP was requested on a model whose parameters carry no ``infshape``."""


class UnclassifiableParameterError(LocalLearningError):
    """A parameter's role (input, hidden, output, vector) cannot be read off its base shape."""


class CheckpointError(LocalLearningError):
    """A checkpoint or base-shape file is missing, truncated or does not fit the model."""


class DatasetNotFoundError(LocalLearningError, FileNotFoundError):
    """A data set's files are missing or corrupt in the local data folder; nothing downloads."""
