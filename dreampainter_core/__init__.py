"""DreamPainter on CogView4: model math, weights, masks and the sampler (no ComfyUI import here)."""

from .errors import (CapabilityError, DreamPainterError, InputError, ModelFilesError, NonFiniteError,
                     WeightFormatError)

__all__ = [
    "CapabilityError",
    "DreamPainterError",
    "InputError",
    "ModelFilesError",
    "NonFiniteError",
    "WeightFormatError",
    "DreamPainterPipeline",
]


def __getattr__(name):
    # Lazy so that `import dreampainter_core.masks` stays light (no diffusers import).
    if name == "DreamPainterPipeline":
        from .pipeline import DreamPainterPipeline

        return DreamPainterPipeline
    raise AttributeError(name)
