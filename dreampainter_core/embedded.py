"""The embedded demo model: the miniature DreamEcom model trained by ``python -m train.miniature``.

It ships inside the pack (about 20 MB, bf16), so the demo, the example workflows and the tests run
with no download. It is a 128x128 model of synthetic product scenes (coloured walls, stands and
simple products, described in plain English or Chinese colour words), not a photo model: it shows
that the whole system works and learns, and CogView4-6B with real DreamPainter weights replaces it
for real catalogs.

Layout (mirrors ComfyUI's models/ folders, so the node pack can list it beside the user's models)::

    models/diffusers/dreampainter-miniature/   diffusers folder: transformer/ vae/ text_encoder/
                                                tokenizer/ scheduler/ model_index.json miniature.json
    models/dreampainter/dreampainter_miniature.safetensors   the DreamPainter file (stage 2)
    models/miniature_demo/                     demo inputs: product.png, mask.png, reference.png, demo.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFilesError

PACK_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = PACK_ROOT / "models"
BASE_NAME = "dreampainter-miniature"
WEIGHTS_NAME = "dreampainter_miniature.safetensors"
REGENERATE = "python -m train.miniature --out runs/miniature --embed"


@dataclass(frozen=True)
class EmbeddedModel:
    base: Path
    weights: Path
    demo: Path

    def demo_spec(self) -> dict:
        """demo.json: prompts (English, Chinese) and the input file names."""
        return json.loads((self.demo / "demo.json").read_text(encoding="utf-8"))

    def sampling(self) -> dict:
        """The sampler settings (steps, guidance) the model's reports were measured at, from its
        miniature.json; {} when it does not record them."""
        path = self.base / "miniature.json"
        if not path.is_file():
            return {}
        return dict(json.loads(path.read_text(encoding="utf-8")).get("sampling", {}))


def embedded_model(models_dir: Path | None = None) -> EmbeddedModel:
    """The embedded model's paths; a clear error when a part is missing (e.g. a partial checkout)."""
    root = Path(models_dir) if models_dir is not None else MODELS_DIR
    model = EmbeddedModel(root / "diffusers" / BASE_NAME, root / "dreampainter" / WEIGHTS_NAME,
                          root / "miniature_demo")
    needed = [model.base / "model_index.json", model.base / "transformer", model.base / "vae",
              model.base / "text_encoder", model.base / "tokenizer", model.weights, model.demo / "demo.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ModelFilesError(
            f"the embedded miniature model is incomplete: missing {', '.join(missing)}. It is part of the "
            f"repository (git checkout -- models/ restores it); to rebuild it run: {REGENERATE}"
        )
    return model
