"""Errors a user can read and act on.

Every check that guards user input raises one of these *before* heavy work starts,
with a message that says which input was wrong, what was expected and what to do.
"""


class DreamPainterError(Exception):
    """Base class for all errors raised on purpose by DreamPainter."""


class InputError(DreamPainterError, ValueError):
    """An argument given to the pipeline (image, mask, size, steps, ...) is not usable."""


class ModelFilesError(DreamPainterError, FileNotFoundError):
    """A model folder or weight file is missing, truncated or of the wrong shape."""


class WeightFormatError(DreamPainterError, ValueError):
    """A DreamPainter weight file does not match this model or this format version."""


class CapabilityError(DreamPainterError, ValueError):
    """The loaded model cannot do what was asked (e.g. a reference with a stage-1 model)."""


class MissingDependencyError(DreamPainterError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


class NonFiniteError(DreamPainterError, ArithmeticError):
    """A computation gave NaN or infinite values (e.g. the latents at one sampling step); the
    message names where and the likely causes instead of letting a blank image come back."""
