"""Validation images: a fixed set of products/prompts/references rendered at intervals, as one grid.

The set is the first ``validation.num`` good samples of ``validation.manifest`` (default: the
training manifest), each cropped to its aspect-ratio bucket exactly as in training. Every
render uses the same seed, so grids of different steps are comparable. Generation goes
through ``DreamPainterPipeline.prepare_inputs`` + ``generate`` (exactly what inference runs),
with prompt embeddings computed once up front, so the text encoder may be unloaded.

Grid rows are samples; columns: product on blank | text-only result | (stage 2:) reference |
text + reference result. An insertion branch (data.mask_policy = "insertion") is shown inserting:
the scene with its hole (white) | the result of ``fill_hole`` with the branch. Saved atomically as
``<output_dir>/validation/step_<step:08d>.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampainter_core.fileio import atomic_path
from dreampainter_core.options import ReferenceOptions, SamplingOptions

from .dataset import ManifestDataset
from .manifest import load_sample

__all__ = ["ValidationSet", "save_grid"]


def _pil(img: torch.Tensor) -> Image.Image:
    """[H, W, 3] 0..1 -> PIL."""
    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(a)


def _cell(img: Image.Image | None, size: int) -> Image.Image:
    out = Image.new("RGB", (size, size), (255, 255, 255))
    if img is None:
        return out
    w, h = img.size
    s = size / max(w, h)
    im = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    out.paste(im, ((size - im.size[0]) // 2, (size - im.size[1]) // 2))
    return out


def save_grid(rows: list[list[Image.Image | None]], path: str | os.PathLike, cell: int = 256) -> Path:
    """Rows of images (None = blank cell) as one PNG, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * cell, len(rows) * cell), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(_cell(img, cell), (j * cell, i * cell))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


class ValidationSet:
    """The fixed validation inputs; ``render`` makes a grid with the current model."""

    def __init__(self, manifest: str | os.PathLike, buckets, num: int, with_reference: bool, embed_fn, negative_prompt: str,
                 mask_policy: str = "product"):
        ds = ManifestDataset(manifest, buckets, on_bad="skip", reference_prob=0.0, second_prompt_prob=0.0,
                             mask_policy=mask_policy)
        self.insertion = mask_policy == "insertion"
        self.items = []
        for i in range(min(num, len(ds))):
            it = ds[i]
            line, sample = next((ln, s) for ln, s in ds.samples if ln == it["line"])
            ref = None
            if with_reference and sample.reference is not None:
                loaded = load_sample(sample, with_reference=True, line=line)
                a = np.asarray(loaded.reference, dtype=np.float32) / 255.0
                ref = torch.from_numpy(a)[None]  # [1, H, W, 3]
            self.items.append({
                "image": it["image"].permute(1, 2, 0)[None],
                "foreground": it["foreground"].permute(1, 2, 0)[None],
                "mask": it["mask"][0][None],
                "prompt": it["prompt"],
                "reference": ref,
                "embeds": embed_fn(it["prompt"])[None],
            })
        self.negative = embed_fn(negative_prompt)[None]
        self.with_reference = with_reference

    @torch.no_grad()
    def render(self, pipe, vcfg, path, autocast, shield_product: bool = False) -> Path:
        """The grid; `shield_product` samples with the reference kept off the product's tokens, as the
        stage was trained (train.shield_product)."""
        rows = []
        for it in self.items:
            h, w = it["mask"].shape[-2:]
            sampling = SamplingOptions(steps=vcfg.steps, guidance_scale=vcfg.guidance_scale, seed=vcfg.seed)
            row = [_pil(it["foreground"][0])]
            with autocast():
                if self.insertion:
                    out = pipe.fill_hole(it["image"], 1.0 - it["mask"], it["embeds"], self.negative, sampling=sampling,
                                         use_branch=True)
                    rows.append(row + [_pil(out.images[0])])
                    continue
                req = pipe.prepare(it["foreground"], it["mask"], width=int(w), height=int(h), sampling=sampling,
                                   reference=ReferenceOptions(lora_scale=vcfg.lora_scale))
                row.append(_pil(pipe.generate(req, it["embeds"], self.negative).images[0]))
                if self.with_reference:
                    row.append(_pil(it["reference"][0]) if it["reference"] is not None else None)
                    if it["reference"] is not None:
                        reference = ReferenceOptions(image=it["reference"], size=vcfg.reference_size,
                                                     lora_scale=vcfg.lora_scale, shield_product=shield_product)
                        req = pipe.prepare(it["foreground"], it["mask"], width=int(w), height=int(h),
                                           sampling=sampling, reference=reference)
                        row.append(_pil(pipe.generate(req, it["embeds"], self.negative).images[0]))
                    else:
                        row.append(None)
            rows.append(row)
        return save_grid(rows, path, vcfg.cell)
