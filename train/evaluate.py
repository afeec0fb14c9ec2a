"""Evaluate a DreamPainter model on a manifest: the paper's metrics, in miniature.

    python -m train.evaluate --model BASE_DIR --weights dreampainter.safetensors \\
        --manifest data/scenes/test.jsonl --out runs/eval/report.json \\
        [--steps 20] [--limit 50] [--reference-mode none|manifest|both|vae] [--roundtrip] \\
        [--sweep lora_scale] [--sweep attention_scale] [--clip CLIP_DIR]

For every sample the product is the manifest's target image with its mask (placement
"keep": the canvas is the image, product pixels are not resampled), the prompt is the
manifest's prompt (or --prompt-field prompt_2) and, in TR2I mode, the reference is the
manifest's reference. Each sample uses seed --seed + its index in every mode, so modes and
sweep values differ only by their condition. One generation per sample and mode, with
paste-back off; the paste-back result is composited from it exactly as the pipeline does
(same feather), so both are measured from the same sample.

Metrics (train.metrics has the exact definitions; the report repeats them):

- object_consistency: the paper's 1 - Σ(M_gen ∉ M_gt)/Σ M_gt on the paste-back-OFF image,
  M_gen from a product segmenter: ColorShapeSegmenter with the scene's known product
  colour for synthetic manifests (train.synthetic), rembg's U²-Net otherwise (--segmenter).
- product_psnr_raw / product_psnr_pasted: PSNR inside the mask against the input product,
  without and with paste-back (reported capped at 100 dB; product_exact_pasted says
  whether every product pixel is bit-exact).
- seam_error: how far the colour gradient across the product edge (a 3 px band each side)
  is from the ground-truth photo's, on the paste-back image; lower is better.
- background_color / table_color / pattern adherence (synthetic scenes): the ground-truth
  wall / stand-top regions of the scene classified against the palette; prompt_adherence =
  background and table colour both right.
- wall_tone (synthetic scenes): is the wall in the scene's own tone (light / plain / deep of
  the named colour)? The prompt never names it, so without a reference it is a guess
  (~1/3): the sharpest measure of what a reference adds.
- reference_similarity (colour-histogram intersection) and reference_pixel_similarity
  (1 - RMSE) against the manifest's reference on the background away from the product and
  its shadow, measured in T2I mode too (the "without a reference" baseline).
- quality (palette_fit): an image-quality proxy for palette-drawn scenes.
- grid_energy / grid_excess / wall_unevenness on walls plain in the ground truth (and
  wall_tone_mix, the share drawn in another of the colour's tones, where it has several), and, on round
  stands, stand_iou (the top against the true ellipse) beside stand_iou_prior (what a perfectly
  round stand of a size the prompt does not fix scores; stand_iou_vs_prior pairs the two).
- clip_t (image vs prompt) and clip_i (image vs reference with the product composited on
  it) when --clip names a local CLIP folder.

Adherence, similarity, quality and CLIP are measured on the final (paste-back) image.

--sweep lora_scale / attention_scale (repeatable): TR2I generation at each of --sweep-values
(default 0, 0.2, ..., 1.0) with the other scale at 1.0: reference similarity, quality,
adherence and object consistency per value (the paper's Fig. 8 in miniature).

Writes the JSON report (atomically), a PNG table / plot next to it (<out>.png; matplotlib
when importable, else drawn with PIL) and a contact sheet of the first samples
(<out>_samples.png: product | reference | T2I | TR2I).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dreampainter_core.fileio import atomic_write_bytes
from dreampainter_core.errors import DreamPainterError
from dreampainter_core.options import ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions

from . import metrics as M
from .manifest import ManifestError, load_sample, read_manifest
from .synthetic import (FRONT_SHADE, PALETTE, WALL_TONES, redraw_round_stand, render_scene, scene_regions, tone_palette,
                        wall_colours, wall_tone_colours)

__all__ = ["evaluate", "write_report_png", "main", "DEFINITIONS", "SWEEP_VALUES", "PSNR_CAP"]

PSNR_CAP = 100.0
TABLE_BRIGHTEST = 0.3  # the stand probe holds the product's shadow: measure its brightest 30%
SWEEP_VALUES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SWEEP_PARAMS = ("lora_scale", "attention_scale", "reference_guidance")
SWEEP_INTERVALS = ("reference_similarity", "wall_tone", "pattern_patterned", "prompt_adherence", "quality",
                   "object_consistency")
#: reference_guidance's own default sweep (1 = the reference in both CFG passes; see DreamPainterPipeline.sample)
REFERENCE_GUIDANCE_VALUES = (1.0, 2.0, 3.5, 5.0)
REPORT_VERSION = 1
STAND_PRIOR_DRAWS = 8  # round stands redrawn per scene for stand_iou_prior
STAND_PRIOR_SEED = 20  # its own stream: the prior is the same in every mode and run

DEFINITIONS = {
    "object_consistency": "1 - |M_gen ∩ ¬M_gt| / |M_gt| (paper, section 5.1): product pixels segmented in the "
                          "paste-back-OFF image outside the input mask, over the input mask area; not clipped",
    "mask_iou": "IoU of the segmented product and the input mask (diagnostic)",
    "mask_recall": "fraction of the input mask segmented as product (diagnostic; the paper's formula ignores it)",
    "product_psnr_raw": f"PSNR (dB) inside the mask vs the input product, paste-back off (capped at {PSNR_CAP:g})",
    "product_psnr_pasted": f"PSNR (dB) inside the mask vs the input product, paste-back on (capped at {PSNR_CAP:g})",
    "product_exact_pasted": "every product pixel bit-identical to the input after paste-back",
    "seam_error": "mean over the band within 3 px of the mask edge of | |grad image| - |grad truth| | (RGB "
                  "forward differences, 0..1 units), paste-back image vs the ground-truth photo: a hard or "
                  "haloed edge, or a missing contact shadow, scores high (lower is better)",
    "background_color": "10%-trimmed mean colour of the wall probe (the scene's wall above base_y - 0.2 H, away "
                        "from the product) classified as the nearest palette colour (CIELAB) == prompt's",
    "table_color": "10%-trimmed mean colour of the brightest 30% of the stand probe (stand top within 3% of the "
                   "height of the product's base) classified as the nearest palette colour (CIELAB) == prompt's",
    "pattern": "wall-probe pattern classified from luminance variance features == prompt's pattern",
    "pattern_patterned": "pattern, on the scenes whose wall has a pattern (stripes, dots, checker, glow): does the "
                         "image draw the one the prompt names and the reference shows",
    "grid_energy": "scenes with a plain wall: variance of the wall's luminance means per phase (y mod 16, x mod 16) "
                   "of the token grid (VAE 8 px x patch 2), on the raw image; the ground truth scores 0, a grid "
                   "artifact its power (0..1 units squared); blotchy, uneven walls score too, at any period",
    "grid_excess": "scenes with a plain wall: the part of grid_energy tied to the grid, on the high-passed "
                   "luminance (minus a 4 px masked blur): its value at period 16 minus its mean at 14, 15, 17 and "
                   "18 px (about 0 on average for unevenness that is not on the grid; 0..1 units squared)",
    "wall_unevenness": "scenes with a plain wall: standard deviation over the wall of the luminance difference "
                       "raw image - ground truth, less its mean (0 = evenly lit like the truth; 0..1 units)",
    "wall_tone_mix": "scenes with a plain wall whose colour has several tones: the share of the wall (colours "
                     "blurred 3 px) nearest (CIELAB) another of those tones than the one most of it is in (0 = one "
                     "tone, right or wrong; a model mixing the tones no input names scores high)",
    "stand_iou": "round stands: IoU of the pixels nearest the stand-top colour (vs its front and the wall, CIELAB) "
                 "with the true top ellipse, in a box around it away from the product and its shadow",
    "stand_iou_prior": "stand_iou of round stands redrawn from the scene generator's distribution under the same product "
                       "(8 draws, mean): a perfectly round stand of a size and place the prompt does not fix; "
                       "stand_iou_vs_prior is stand_iou minus it, paired over scenes",
    "prompt_adherence": "background and table colour both right",
    "wall_tone": "the wall probe's trimmed mean colour is nearest (CIELAB) to that of the scene's own tone (light / "
                 "plain / deep) among the tones its colour can take, each drawn with the scene's pattern: the part "
                 "of the look only the reference carries (the prompt never names the tone; chance ~1/3; scenes "
                 "whose colour has one tone are left out)",
    "reference_similarity": "joint RGB histogram intersection (8 bins/channel) with the manifest reference over the "
                            "background away from the product and its shadow (1 = same colours)",
    "reference_pixel_similarity": "1 - RMSE (0..1) vs the manifest reference over the same region, pixel-aligned",
    "quality": "palette_fit: mean over the background of max(0, 1 - d/0.1), d = distance to the nearest palette "
               "(named colours and their wall tones) shade/tint line (image-quality proxy for palette scenes; ground truth ~0.99)",
    "clip_t": "cosine of CLIP image and prompt embeddings",
    "clip_i": "cosine of CLIP embeddings of the image and of the reference with the product composited on it",
    "comparison.paired": "TR2I minus T2I on the same scenes and seeds: mean difference, 95% percentile-bootstrap "
                         "interval over scenes (2000 resamples, seeded), shares of scenes where either is ahead",
}
# Metrics averaged in summaries; booleans become the fraction of True.
NUMERIC = ("object_consistency", "mask_iou", "mask_recall", "product_psnr_raw", "product_psnr_pasted", "seam_error",
           "reference_similarity", "reference_pixel_similarity", "quality", "grid_energy", "grid_excess",
           "wall_unevenness", "wall_tone_mix", "stand_iou", "stand_iou_prior", "clip_t",
           "clip_i")
BOOLEAN = ("product_exact_pasted", "background_color", "table_color", "pattern", "pattern_patterned",
           "prompt_adherence", "wall_tone")


# ----------------------------------------------------------------------------- helpers


def _save_png(img: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _finite(v):
    """JSON-safe: NaN -> None, inf -> cap, numpy scalars -> Python."""
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return PSNR_CAP if v > 0 else -PSNR_CAP
        # 6 decimals, but at least 6 significant digits: grid energies are ~1e-6
        return round(v, 6) if v == 0.0 or abs(v) >= 0.1 else round(v, 5 - math.floor(math.log10(abs(v))))
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return None if not vals else sum(vals) / len(vals)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Means of the numeric metrics and fractions of the boolean ones (None values left out)."""
    out: dict[str, Any] = {"n": len(rows)}
    for k in NUMERIC:
        vals = [r.get(k) for r in rows if r.get(k) is not None]
        if vals:
            out[k] = _mean(min(v, PSNR_CAP) if k.startswith("product_psnr") else v for v in vals)
            out[f"{k}_n"] = len(vals)
    if any(r.get("stand_iou_prior") is not None for r in rows):
        out["stand_iou_vs_prior"] = M.paired_difference([r.get("stand_iou_prior") for r in rows],
                                                        [r.get("stand_iou") for r in rows])
    for k in BOOLEAN:
        vals = [r.get(k) for r in rows if r.get(k) is not None]
        if vals:
            out[k] = sum(bool(v) for v in vals) / len(vals)
            out[f"{k}_n"] = len(vals)
    return out


# ----------------------------------------------------------------------------- samples


@dataclass
class EvalSample:
    index: int
    id: str
    prompt: str
    image: torch.Tensor  # [1, H, W, 3] 0..1
    mask: torch.Tensor  # [1, H, W] 0/1
    reference: torch.Tensor | None  # [1, h, w, 3]
    scene: dict | None
    regions: dict[str, np.ndarray] | None  # synthetic: wall/table/background...; else background only


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255.0)[None]


def load_samples(manifest: Path, limit: int | None, prompt_field: str = "prompt") -> list[EvalSample]:
    from dreampainter_core import masks as mask_ops

    samples = []
    for line, s in read_manifest(manifest):
        if limit is not None and len(samples) >= limit:
            break
        loaded = load_sample(s, with_reference=True, line=line)
        image = _to_tensor(loaded.image)
        mask = torch.from_numpy(loaded.mask.astype(np.float32))[None]
        prompt = s.prompt if prompt_field == "prompt" else (s.prompt_2 or s.prompt)
        scene = s.extra.get("scene") if isinstance(s.extra.get("scene"), dict) else None
        regions = None
        h, w = mask.shape[-2:]
        if scene is not None and tuple(scene.get("size", ())) == (w, h):
            regions = scene_regions(scene)
        else:
            scene = None
            margin = max(2, round(min(h, w) / 32))
            near = mask_ops.dilate(mask[0], 2 * margin + 1) > 0.5
            regions = {"background": (~near).numpy()}
        ref = None if loaded.reference is None else _to_tensor(loaded.reference)
        samples.append(EvalSample(len(samples), s.id or str(line), prompt, image, mask, ref, scene, regions))
    return samples


def make_segmenter(kind: str, sample: EvalSample):
    """(segmenter or None, name). kind: auto | color | rembg | none | color-or-none (colour for
    synthetic scenes, nothing for the others: auto when rembg is missing)."""
    if kind == "none":
        return None, "none"
    if kind in ("auto", "color", "color-or-none") and sample.scene is not None:
        return M.ColorShapeSegmenter(sample.scene["product"]["rgb"]), "color"
    if kind == "color-or-none":
        return None, "none"
    if kind == "color":
        raise DreamPainterError(f"--segmenter color needs synthetic scenes (a 'scene' entry); sample {sample.id} has none")
    return _rembg_segmenter(), "rembg"


_REMBG = None


def _rembg_segmenter():
    global _REMBG
    if _REMBG is None:
        _REMBG = M.RembgSegmenter()
    return _REMBG


def sampling_args(sampling: dict) -> list[str]:
    """The command-line arguments for a model's recorded sampler settings beyond steps and guidance
    (miniature.json's "sampling", written by train.miniature), so it is measured as it samples."""
    args = []
    if "reference_guidance" in sampling:
        args += ["--reference-guidance", str(float(sampling["reference_guidance"]))]
    if "lora_scale" in sampling:
        args += ["--lora-scale", str(float(sampling["lora_scale"]))]
    if sampling.get("shield_product"):
        args.append("--shield-product")
    return args


# ----------------------------------------------------------------------------- generation + measuring


class Runner:
    def __init__(self, pipe, steps: int, guidance: float, seed: int, segmenter: str, clip: M.ClipScorer | None,
                 palette: dict | None, quality_palette: dict | None = None, reference_guidance: float | None = None,
                 control: ControlOptions | None = None, reference_options: dict | None = None,
                 lora_scale: float = 1.0, tokens: tuple = (), shield_product: bool = False,
                 guidance_end: float = 1.0):
        self.pipe = pipe
        self.guidance_end = guidance_end  # the share of steps, from the first, that run CFG
        self.shield_product = shield_product  # the product's tokens do not attend to the reference
        self.tokens = tuple(tokens)  # learned words the prompts use (e.g. the background token)
        self.lora_scale = lora_scale  # 0 on a stage-2 file gives back its stage-1 model exactly
        self.control = control or ControlOptions(mode="dreampainter")
        self.reference_options = reference_options or {}
        self.steps = steps
        self.guidance = guidance
        self.reference_guidance = reference_guidance
        self.seed = seed
        self.segmenter = segmenter
        self.clip = clip
        self.palette = palette  # named colours: what prompts say
        self.quality_palette = quality_palette or palette  # every colour a scene can hold (wall tones)
        self._embeds: dict[str, torch.Tensor] = {}
        self._stand_priors: dict[str, float | None] = {}
        self.negative = pipe.encode_prompt([""]) if guidance > 1.0 else None

    def embeds(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeds:
            self._embeds[prompt] = self.pipe.encode_prompt([prompt], tokens=self.tokens)
        return self._embeds[prompt]

    def generate(self, s: EvalSample, reference: bool, lora_scale: float | None = None, attention_scale: float = 1.0,
                 reference_guidance: float | None = None):
        from dreampainter_core.product import paste_back

        request = self.pipe.prepare(
            s.image, s.mask,
            sampling=SamplingOptions(steps=self.steps, guidance_scale=self.guidance, seed=self.seed + s.index,
                                     guidance_end=self.guidance_end),
            reference=ReferenceOptions(
                image=s.reference if reference else None,
                lora_scale=self.lora_scale if lora_scale is None else lora_scale, attention_scale=attention_scale,
                guidance=reference_guidance if reference_guidance is not None else self.reference_guidance,
                shield_product=self.shield_product, **self.reference_options),
            control=self.control,
            output=OutputOptions(paste_back=False),
        )
        out = self.pipe.generate(request, self.embeds(s.prompt), self.negative)
        raw = out.images.float().clamp(0, 1)
        # As the pipeline pastes back: the feather blends the photo's own pixels around the product
        # (placement "keep": the photo is the canvas), not the white fill, which drew a 1 px halo.
        pasted = paste_back(raw, out.foreground, out.mask, feather=request.output.feather_radius, source=s.image)
        return raw, pasted, out.foreground, out.mask

    def stand_prior(self, s: EvalSample) -> float | None:
        """round_stand_prior of the sample's scene, once per scene (it does not depend on the mode)."""
        if s.id not in self._stand_priors:
            self._stand_priors[s.id] = round_stand_prior(s.scene, s.regions, seed=self.seed + s.index)
        return self._stand_priors[s.id]

    def roundtrip(self, s: EvalSample):
        """The true image through the VAE and back, measured as a generation would be: the ceiling
        of every metric, since no sampler can draw what its VAE cannot decode."""
        from dreampainter_core.product import paste_back

        raw = self.pipe.decode(self.pipe.encode_image(s.image)).float().clamp(0, 1)
        foreground = torch.where(s.mask[..., None] > 0.5, s.image, torch.ones_like(s.image))
        pasted = paste_back(raw, foreground, s.mask, feather=OutputOptions().feather_radius, source=s.image)
        return raw, pasted, foreground, s.mask

    def measure(self, s: EvalSample, raw, pasted, foreground, mask) -> dict[str, Any]:
        row: dict[str, Any] = {"id": s.id}
        seg, seg_name = make_segmenter(self.segmenter, s) if self.segmenter != "none" else (None, "none")
        if seg is not None:
            gen_mask = seg(raw)
            row["object_consistency"] = float(M.object_consistency(gen_mask[0], mask[0]))
            agree = M.mask_agreement(gen_mask[0], mask[0])
            row["mask_iou"], row["mask_recall"] = float(agree["iou"]), float(agree["recall"])
            row["segmenter"] = seg_name
        row["product_psnr_raw"] = float(M.masked_psnr(raw[0], foreground[0], mask[0]))
        row["product_psnr_pasted"] = float(M.masked_psnr(pasted[0], foreground[0], mask[0]))
        row["product_exact_pasted"] = bool(M.masked_max_abs_error(pasted[0], foreground[0], mask[0]) == 0.0)
        row["seam_error"] = float(M.seam_error(pasted[0], s.image[0], mask[0]))  # what the user gets, vs the photo
        image = pasted[0]
        reg = s.regions or {}
        if s.scene is not None and self.palette is not None:
            sc = s.scene
            # Layout-robust probes (train.synthetic.scene_regions): a text-only result need not put
            # the stand exactly where the ground truth has it.
            bg = M.background_color_match(image, reg["wall_probe"], palette=self.palette,
                                          expected_name=sc["background"]["color"])
            tb = M.table_color_match(image, reg["table_probe"], palette=self.palette,
                                     expected_name=sc["table"]["color"], brightest=TABLE_BRIGHTEST)
            pt = M.pattern_match(image, reg["wall_probe"], sc["background"]["pattern"])
            row["background_color"], row["background_predicted"] = bg.match, bg.predicted
            row["table_color"], row["table_predicted"] = tb.match, tb.predicted
            row["pattern"], row["pattern_predicted"] = pt.match, pt.predicted
            row["prompt_adherence"] = None if bg.match is None or tb.match is None else bool(bg.match and tb.match)
            if "tone" in sc["background"] and len(WALL_TONES.get(sc["background"]["color"], ())) > 1:
                tone = M.tone_match(image, reg["wall_probe"], wall_tone_colours(sc, reg["wall_probe"]),
                                    sc["background"]["tone"])
                row["wall_tone"], row["wall_tone_predicted"] = tone.match, tone.predicted
            row["quality"] = float(M.palette_fit(image, self.quality_palette, reg["background"]))
            if sc["background"]["pattern"] != "plain":
                row["pattern_patterned"] = row["pattern"]
            else:  # the token-grid artifact shows on walls that are flat in the ground truth
                row.update(M.plain_wall_measures(raw[0], s.image[0], reg["wall"]))
                if len(WALL_TONES.get(sc["background"]["color"], ())) > 1:
                    row["wall_tone_mix"] = M.wall_tone_mix(raw[0], reg["wall"], wall_tone_colours(sc, reg["wall"]))
            if sc["table"]["shape"] == "round":
                row["stand_iou"] = round_stand_iou(image, sc, reg)
                row["stand_iou_prior"] = self.stand_prior(s)
        if s.reference is not None:
            row["reference_similarity"] = float(M.reference_similarity(image, s.reference[0], reg["background"]))
            row["reference_pixel_similarity"] = float(M.reference_pixel_similarity(image, s.reference[0], reg["background"]))
        if self.clip is not None:
            row["clip_t"] = float(self.clip.clip_t(image[None], [s.prompt])[0])
            if s.reference is not None:
                row["clip_i"] = float(self.clip.clip_i_composited(image[None], s.reference[0], foreground[0], mask[0])[0])
        return row


def round_stand_iou(image, scene: dict, regions: dict) -> float | None:
    """Whether a round stand comes out round: IoU of the pixels drawn in the stand's colours (its
    top or its darker front, as told apart from the wall) with the true top ellipse, in a box
    around it grown by half its semi-axes, leaving out where the truth has the stand's front and
    the product and its shadow. What is left is the ellipse's outline against the wall: a block
    or a ragged blob fills the wall beside the arc, or misses part of it. (Top and front are not
    told apart: their 22% shade difference does not survive a VAE on dark stands.)"""
    t = scene["table"]
    (cx, cy), (a, b) = t["center"], t["axes"]
    h, w = regions["stand_top"].shape
    rows, cols = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    box = (np.abs(cols - cx) <= 1.5 * a) & (rows >= cy - 1.5 * b) & (rows <= cy + 2.0 * b)
    domain = box & ~regions["near_product"] & (regions["stand_top"] | (rows < cy))
    colours = {"top": t["rgb"], "front": [v * FRONT_SHADE for v in t["rgb"]], **wall_colours(scene)}
    return M.top_surface_iou(image, regions["stand_top"], domain, colours, ("top", "front"))


def round_stand_prior(scene: dict, regions: dict, draws: int = STAND_PRIOR_DRAWS, seed: int = 0) -> float | None:
    """What a text-only model that draws perfectly round stands scores on round_stand_iou: the mean
    over `draws` stands redrawn under the same product from the scene generator's own distribution
    (train.synthetic.redraw_round_stand), each rendered and measured against the true one. The
    prompt does not say a stand's size or exact place, so T2I is judged against this, not 1; a
    reference shows them, so TR2I can reach the VAE's."""
    rng = np.random.default_rng([STAND_PRIOR_SEED, int(seed)])
    values = []
    for _ in range(draws):
        image = render_scene(redraw_round_stand(scene, rng))["image"].astype(np.float32) / 255.0
        v = round_stand_iou(image, scene, regions)
        if v is not None:
            values.append(v)
    return float(np.mean(values)) if values else None


def scene_value(scene: Any, field: str) -> Any:
    """The value at dotted `field` (e.g. background.pattern) of a synthetic scene dict; KeyError if absent."""
    value = scene
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(field)
        value = value[key]
    return value


def select_samples(samples: list[EvalSample], where: str) -> list[EvalSample]:
    """The samples whose scene has FIELD == VALUE (`where` = "FIELD=VALUE"). Each keeps its index, so it
    is drawn with the seed it has in a run over the whole manifest and the two reports pair up."""
    field, sep, wanted = where.partition("=")
    if not sep or not field:
        raise DreamPainterError(f"--where {where!r}: expected FIELD=VALUE, e.g. background.pattern=plain")
    kept = []
    for s in samples:
        try:
            value = scene_value(s.scene, field)
        except KeyError:
            raise DreamPainterError(f"--where: sample {s.id} has no scene field {field!r} (a synthetic manifest's "
                                    "scene fields are e.g. product.shape, table.shape, background.pattern)") from None
        if str(value) == wanted:
            kept.append(s)
    if not kept:
        raise DreamPainterError(f"--where {where}: no sample matches")
    return kept


def load_pipeline(model: str, weights: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from dreampainter_core import DreamPainterPipeline

    return DreamPainterPipeline.from_pretrained(model, dreampainter_weights=weights, dtype=dtype, device=device)


def evaluate(pipe, samples: list[EvalSample], *, steps: int = 20, guidance: float = 3.5, seed: int = 0,
             reference_mode: str = "both", sweeps: tuple[str, ...] = (), sweep_values=None,
             segmenter: str = "auto", clip: M.ClipScorer | None = None, keep_images: int = 0,
             progress: bool = False, reference_guidance: float | None = None, control_mode: str = "dreampainter",
             training_free_reference: str = "init", reference_strength: float = 0.8,
             harmonize: float | None = None, lora_scale: float = 1.0,
             roundtrip: bool = False, mask_guidance: bool = False,
             shield_product: bool = False, guidance_end: float = 1.0) -> tuple[dict[str, Any], dict[str, list]]:
    """Run and measure; returns (report dict, {"t2i": [...images], "tr2i": [...]} for the first keep_images).

    control_mode: how the product is held ("dreampainter": the control branch, or on a base model
    plain T2I + paste-back; "training_free": the product's latent held on its noised trajectory,
    which follows a reference with any model, by `training_free_reference`).
    roundtrip (or reference_mode "vae"): also measure the true images through the VAE and back
    (mode "vae"), the ceiling of every metric."""
    training_free = ControlOptions(mode=control_mode).resolved_mode(pipe.transformer.control is not None) == "training_free"
    supports_ref = training_free or bool(getattr(pipe.transformer, "supports_reference", False))
    has_lora = bool(getattr(pipe.transformer, "has_lora", False))
    notes: list[str] = []
    with_refs = [s for s in samples if s.reference is not None]
    modes = {"none": ["t2i"], "manifest": ["tr2i"], "both": ["t2i", "tr2i"], "vae": []}[reference_mode]
    if roundtrip or reference_mode == "vae":
        modes = ["vae"] + modes
    if "tr2i" in modes and not supports_ref:
        if reference_mode == "manifest":
            raise DreamPainterError("--reference-mode manifest needs a stage-2 DreamPainter file (reference support)")
        modes = ["t2i"]
        notes.append("the model has no reference support (stage 1 or no DreamPainter weights): TR2I skipped")
    if "tr2i" in modes and not with_refs:
        modes = [m for m in modes if m != "tr2i"]
        notes.append("no sample in the manifest has a reference: TR2I skipped")
    control = ControlOptions(mode=control_mode, mask_guidance=mask_guidance,
                             **({} if harmonize is None else {"harmonize": harmonize}))
    runner = Runner(pipe, steps, guidance, seed, segmenter, clip, PALETTE, tone_palette(), reference_guidance,
                    control=control, reference_options=dict(training_free_method=training_free_reference,
                                                            strength=reference_strength),
                    lora_scale=lora_scale, shield_product=shield_product, guidance_end=guidance_end)
    report_modes: dict[str, Any] = {}
    kept: dict[str, list] = {m: [] for m in modes}
    timings: dict[str, float] = {}
    for mode in modes:
        rows = []
        t0 = time.perf_counter()
        for s in with_refs if mode == "tr2i" else samples:
            if mode == "vae":
                raw, pasted, fg, mask = runner.roundtrip(s)
            else:
                raw, pasted, fg, mask = runner.generate(s, reference=(mode == "tr2i"))
            rows.append(runner.measure(s, raw, pasted, fg, mask))
            if s.index < keep_images:
                kept[mode].append((s.index, raw[0], pasted[0]))
            if progress:
                print(f"[{mode}] {len(rows)}/{len(samples)} {s.id}", file=sys.stderr)
        timings[mode] = time.perf_counter() - t0
        report_modes[mode] = {"summary": summarize(rows), "samples": rows}

    comparison = None
    if "t2i" in report_modes and "tr2i" in report_modes:
        a, b = report_modes["t2i"]["summary"], report_modes["tr2i"]["summary"]
        comparison = {}
        # Same scene, same seed, with and without the reference: the paired interval says whether
        # a difference is larger than scene-to-scene spread would give by chance.
        t2i_by_id = {r["id"]: r for r in report_modes["t2i"]["samples"]}
        tr2i_rows = [r for r in report_modes["tr2i"]["samples"] if r["id"] in t2i_by_id]
        for k in ("reference_similarity", "reference_pixel_similarity", "wall_tone", "prompt_adherence", "background_color",
                  "table_color", "object_consistency", "quality", "clip_t", "clip_i"):
            if a.get(k) is not None and b.get(k) is not None:
                comparison[k] = {"t2i": a[k], "tr2i": b[k], "tr2i_minus_t2i": b[k] - a[k]}
                paired = M.paired_difference([t2i_by_id[r["id"]].get(k) for r in tr2i_rows],
                                             [r.get(k) for r in tr2i_rows], seed=seed)
                if paired is not None:
                    comparison[k]["paired"] = paired
        # The reference-gain comparison must be on the same samples: T2I restricted to those with references.
        ids = {s.id for s in with_refs}
        same = summarize([r for r in report_modes["t2i"]["samples"] if r["id"] in ids])
        if same.get("reference_similarity") is not None and b.get("reference_similarity") is not None:
            comparison["reference_similarity_same_samples"] = {
                "t2i": same["reference_similarity"], "tr2i": b["reference_similarity"],
                "tr2i_minus_t2i": b["reference_similarity"] - same["reference_similarity"]}

    sweep_report: dict[str, Any] = {}
    for param in sweeps:
        if param not in SWEEP_PARAMS:
            raise DreamPainterError(f"--sweep must be one of {SWEEP_PARAMS}, got {param!r}")
        if not supports_ref or not with_refs:
            notes.append(f"sweep {param} skipped: it needs a stage-2 model and samples with references")
            continue
        if param == "lora_scale" and not has_lora:
            notes.append("sweep lora_scale skipped: the model has no LoRA")
            continue
        points = []
        t0 = time.perf_counter()
        values = sweep_values if sweep_values is not None else \
            REFERENCE_GUIDANCE_VALUES if param == "reference_guidance" else SWEEP_VALUES
        rows_by_value = {}
        for v in values:
            rows = []
            for s in with_refs:
                # The other sliders at 1 (and reference_guidance at the run's value): one knob at a time.
                kw = {"lora_scale": 1.0, "attention_scale": 1.0}
                kw[param] = float(v)
                raw, pasted, fg, mask = runner.generate(s, reference=True, **kw)
                rows.append(runner.measure(s, raw, pasted, fg, mask))
            rows_by_value[float(v)] = rows
            points.append({"value": float(v), **summarize(rows)})
        # Each point's 95% interval, and its paired difference from the value 1 (as trained) on the same
        # scenes and seeds: whether a trend is larger than the scenes' spread.
        anchor = rows_by_value.get(1.0)
        for point in points:
            rows = rows_by_value[point["value"]]
            point["intervals"] = {k: M.mean_interval([r.get(k) for r in rows], seed=seed) for k in SWEEP_INTERVALS}
            if anchor is not None and point["value"] != 1.0:
                point["vs_1"] = {k: M.paired_difference([r.get(k) for r in anchor], [r.get(k) for r in rows], seed=seed)
                                 for k in SWEEP_INTERVALS}
            if progress:
                print(f"[sweep {param}={v:g}] done", file=sys.stderr)
        timings[f"sweep_{param}"] = time.perf_counter() - t0
        fixed = [f"{k}=1" for k in ("lora_scale", "attention_scale") if k != param]
        if param != "reference_guidance":
            fixed.append("reference_guidance=" + ("cfg" if reference_guidance is None else f"{reference_guidance:g}"))
        if shield_product:
            fixed.append("shield_product")
        sweep_report[param] = {"fixed": ", ".join(fixed), "points": points}

    first = samples[0] if samples else None
    report = {
        "version": REPORT_VERSION,
        "generator": "train.evaluate",
        "resolution": None if first is None else [int(first.image.shape[2]), int(first.image.shape[1])],
        "steps": steps,
        "guidance_scale": guidance,
        "guidance_end": guidance_end,
        "shield_product": shield_product,
        "reference_guidance": reference_guidance,
        "control_mode": "training_free" if training_free else "dreampainter",
        "harmonize": runner.control.harmonize if training_free else None,
        "training_free_reference": training_free_reference if training_free else None,
        "reference_strength": reference_strength if training_free and training_free_reference == "init" else None,
        "lora_scale": lora_scale if has_lora else None,
        "mask_guidance": mask_guidance,
        "seed": seed,
        "n_samples": len(samples),
        "n_with_reference": len(with_refs),
        "segmenter": segmenter,
        "clip": clip is not None,
        "model_supports_reference": supports_ref,
        "model_has_lora": has_lora,
        "definitions": DEFINITIONS,
        "modes": report_modes,
        "comparison": comparison,
        "sweeps": sweep_report,
        "timing_s": timings,
        "notes": notes,
    }
    return _finite(report), kept


# ----------------------------------------------------------------------------- PNG output

TABLE_ROWS = ("object_consistency", "mask_recall", "product_psnr_raw", "product_psnr_pasted", "product_exact_pasted",
              "background_color", "table_color", "pattern", "prompt_adherence", "wall_tone", "reference_similarity",
              "reference_pixel_similarity", "quality", "clip_t", "clip_i")
SWEEP_SERIES = (("reference_similarity", (200, 40, 40)), ("quality", (40, 80, 200)),
                ("prompt_adherence", (50, 150, 70)), ("object_consistency", (130, 60, 170)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


PAIRED_ROWS = ("wall_tone", "reference_similarity", "reference_pixel_similarity", "prompt_adherence",
               "object_consistency", "quality")


def _paired_cell(report: dict, key: str) -> str | None:
    """'+0.222 [+0.145, +0.308]': TR2I minus T2I on the same scenes with its confidence interval."""
    p = ((report.get("comparison") or {}).get(key) or {}).get("paired")
    if not p:
        return None
    lo, hi = p["ci"]
    return f"{p['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _pil_report(report: dict) -> Image.Image:
    font, small, big = _font(14), _font(12), _font(18)
    modes = list(report["modes"])
    col_w, label_w, row_h = 110, 230, 22
    sweeps = report.get("sweeps") or {}
    plot_w, plot_h = 420, 260
    paired_w = 230 if any(_paired_cell(report, k) for k in PAIRED_ROWS) else 0
    width = max(label_w + col_w * max(1, len(modes)) + paired_w + 40, (plot_w + 40) * max(1, len(sweeps)) + 40, 640)
    height = 70 + row_h * (len(TABLE_ROWS) + 2) + (plot_h + 80 + row_h * 8 if sweeps else 0) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    res = report.get("resolution") or ["?", "?"]
    d.text((20, 12), "DreamPainter evaluation", fill="black", font=big)
    d.text((20, 38), f"{report['n_samples']} samples at {res[0]}x{res[1]}, {report['steps']} steps, "
                     f"cfg {report['guidance_scale']}, segmenter {report['segmenter']}", fill=(80, 80, 80), font=small)
    y = 70
    d.text((20, y), "metric", fill="black", font=font)
    for j, m in enumerate(modes):
        d.text((label_w + j * col_w, y), m.upper(), fill="black", font=font)
    if paired_w:
        d.text((label_w + len(modes) * col_w, y), "TR2I - T2I [95% CI]", fill="black", font=font)
    y += row_h
    d.line([(20, y - 3), (label_w + col_w * max(1, len(modes)) + paired_w, y - 3)], fill=(160, 160, 160))
    for k in TABLE_ROWS:
        vals = [report["modes"][m]["summary"].get(k) for m in modes]
        if all(v is None for v in vals):
            continue
        d.text((20, y), k, fill="black", font=font)
        for j, v in enumerate(vals):
            d.text((label_w + j * col_w, y), _fmt(v), fill="black", font=font)
        if paired_w and k in PAIRED_ROWS and _paired_cell(report, k):
            d.text((label_w + len(modes) * col_w, y), _paired_cell(report, k), fill="black", font=small)
        y += row_h
    y += row_h
    for i, (param, sw) in enumerate(sweeps.items()):
        x0, y0 = 40 + i * (plot_w + 40), y
        d.text((x0, y0), f"sweep: {param} ({sw['fixed']})", fill="black", font=font)
        px0, py0, px1, py1 = x0 + 40, y0 + 28, x0 + plot_w - 10, y0 + 28 + plot_h - 60
        d.rectangle([px0, py0, px1, py1], outline=(120, 120, 120))
        for t in (0.0, 0.5, 1.0):
            yy = py1 - t * (py1 - py0)
            d.text((px0 - 32, yy - 7), f"{t:.1f}", fill=(80, 80, 80), font=small)
            d.line([(px0, yy), (px1, yy)], fill=(225, 225, 225))
        pts = sw["points"]
        vmax = max([p["value"] for p in pts] + [1.0])
        for p in pts:
            xx = px0 + p["value"] / vmax * (px1 - px0)
            d.text((xx - 8, py1 + 4), f"{p['value']:.1f}", fill=(80, 80, 80), font=small)
        for s_i, (key, colour) in enumerate(SWEEP_SERIES):
            line = [(px0 + p["value"] / vmax * (px1 - px0), py1 - max(0.0, min(1.0, p[key])) * (py1 - py0))
                    for p in pts if p.get(key) is not None]
            if len(line) >= 2:
                d.line(line, fill=colour, width=2)
            for xx, yy in line:
                d.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=colour)
            if line:
                d.text((px0 + 4, py1 + 22 + 14 * s_i), key, fill=colour, font=small)
        ty = py1 + 22 + 14 * len(SWEEP_SERIES) + 8
        d.text((x0, ty), "value  ref_sim  quality  adherence  obj_cons", fill="black", font=small)
        for p in pts:
            ty += 16
            d.text((x0, ty), f"{p['value']:.1f}    " + "   ".join(_fmt(p.get(k)) for k, _ in SWEEP_SERIES),
                   fill="black", font=small)
    return img


def _matplotlib_report(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    import io

    modes = list(report["modes"])
    sweeps = report.get("sweeps") or {}
    rows = [k for k in TABLE_ROWS if any(report["modes"][m]["summary"].get(k) is not None for m in modes)]
    ncols = 1 + len(sweeps)
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 5.5), squeeze=False)
    ax = axes[0][0]
    ax.axis("off")
    if rows and modes:
        cells = [[_fmt(report["modes"][m]["summary"].get(k)) for m in modes] for k in rows]
        labels = [m.upper() for m in modes]
        if any(_paired_cell(report, k) for k in PAIRED_ROWS):
            labels.append("TR2I - T2I [95% CI]")
            for row, k in zip(cells, rows):
                row.append((_paired_cell(report, k) if k in PAIRED_ROWS else None) or "")
        # bbox leaves the left part of the axes to the row labels
        table = ax.table(cellText=cells, rowLabels=rows, colLabels=labels,
                         bbox=[0.4, 0.05, 0.6, 0.85])
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    res = report.get("resolution") or ["?", "?"]
    ax.set_title(f"{report['n_samples']} samples, {res[0]}x{res[1]}, {report['steps']} steps")
    for i, (param, sw) in enumerate(sweeps.items(), start=1):
        ax = axes[0][i]
        xs = [p["value"] for p in sw["points"]]
        for key, colour in SWEEP_SERIES:
            ys = [p.get(key) for p in sw["points"]]
            if any(v is not None for v in ys):
                ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=key,
                        color=[c / 255 for c in colour])
        ax.set_xlabel(param)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"sweep {param} ({sw['fixed']})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_report_png(report: dict, path, backend: str = "auto") -> str:
    """Table of the summaries (+ a plot per sweep) as a PNG; returns the backend used."""
    path = Path(path)
    if backend in ("auto", "matplotlib") and _matplotlib_report(report, path):
        return "matplotlib"
    if backend == "matplotlib":
        raise DreamPainterError("--plot matplotlib: matplotlib is not installed (pip install matplotlib)")
    _save_png(_pil_report(report), path)
    return "pil"


def write_contact_sheet(samples: list[EvalSample], kept: dict[str, list], path: Path) -> None:
    """Rows: samples; columns: product on white | reference | T2I | TR2I (paste-back on)."""
    if not samples:
        return
    by_mode = {m: {i: pasted for i, _, pasted in v} for m, v in kept.items()}
    idx = sorted({i for v in kept.values() for i, _, _ in v})
    if not idx:
        return
    h, w = samples[0].image.shape[1:3]
    cols = ["product", "reference"] + list(kept)
    label_h = 18
    sheet = Image.new("RGB", (w * len(cols), label_h + h * len(idx)), "white")
    d = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        d.text((j * w + 4, 2), c, fill="black", font=_font(12))

    def put(t: torch.Tensor, r: int, c: int):
        a = (t.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(a)
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        sheet.paste(im, (c * w, label_h + r * h))

    for r, i in enumerate(idx):
        s = samples[i]
        put(torch.where(s.mask[0, ..., None] > 0.5, s.image[0], torch.ones(3)), r, 0)
        if s.reference is not None:
            put(s.reference[0], r, 1)
        for j, m in enumerate(kept, start=2):
            if i in by_mode[m]:
                put(by_mode[m][i], r, j)
    _save_png(sheet, path)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="CogView4 base folder (diffusers layout)")
    p.add_argument("--weights", default=None, help="DreamPainter weight file (.safetensors)")
    p.add_argument("--manifest", required=True, help="JSONL manifest (e.g. the synthetic test.jsonl)")
    p.add_argument("--out", required=True, help="report path (.json); the PNGs go next to it")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale (default 3.5)")
    p.add_argument("--shield-product", action="store_true",
                   help="the product's tokens do not attend to the reference (ReferenceOptions.shield_product)")
    p.add_argument("--reference-guidance", type=float, default=None,
                   help="TR2I guidance towards the reference, separate from --guidance (default: = --guidance, the "
                        "reference left out of the negative pass; 1: in both passes)")
    p.add_argument("--mode", choices=("dreampainter", "training_free", "auto"), default="dreampainter",
                   help="how the product is held: dreampainter (the control branch; on a base model plain T2I + "
                        "paste-back) or training_free (its latent held on its noised trajectory; any model)")
    p.add_argument("--training-free-reference", choices=("init", "in_context"), default="init")
    p.add_argument("--reference-strength", type=float, default=0.8)
    p.add_argument("--harmonize", type=float, default=None, help="training_free: share of free last steps")
    p.add_argument("--guidance-end", type=float, default=1.0,
                   help="the share of the steps, from the first, that run CFG (the rest: the conditional pass alone)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="LoRA scale outside the sweeps (0 on a stage-2 file: exactly its stage-1 model)")
    p.add_argument("--mask-guidance", action="store_true",
                   help="train-free mask guidance (seed 004): the control branch acts on the product's tokens only")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first K samples")
    p.add_argument("--where", default=None, metavar="FIELD=VALUE",
                   help="only the synthetic scenes (of the first K) with this scene field, e.g. background.pattern=plain; "
                        "each keeps the seed it has in a run over the whole manifest")
    p.add_argument("--reference-mode", choices=("none", "manifest", "both", "vae"), default="both",
                   help="none: T2I only; manifest: TR2I with the manifest's references; both (default); "
                        "vae: only the VAE round trip of the true images")
    p.add_argument("--roundtrip", action="store_true",
                   help="also measure the true images through the VAE and back (mode 'vae': every metric's ceiling)")
    p.add_argument("--sweep", action="append", choices=SWEEP_PARAMS, default=[],
                   help="sweep lora_scale, attention_scale or reference_guidance over --sweep-values (repeatable)")
    p.add_argument("--sweep-values", default=None,
                   help=f"comma-separated (default {','.join(f'{v:g}' for v in SWEEP_VALUES)}; reference_guidance: "
                        f"{','.join(f'{v:g}' for v in REFERENCE_GUIDANCE_VALUES)})")
    p.add_argument("--clip", default=None, help="local CLIP folder (CLIPModel + tokenizer) for CLIP-T / CLIP-I")
    p.add_argument("--segmenter", choices=("auto", "color", "rembg", "none"), default="auto",
                   help="product segmenter for object consistency (auto: colour for synthetic scenes, else rembg)")
    p.add_argument("--prompt-field", choices=("prompt", "prompt_2"), default="prompt")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sheet", type=int, default=8, help="samples in the contact sheet (0: none)")
    p.add_argument("--plot", choices=("auto", "pil", "matplotlib"), default="auto")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)

    out = Path(a.out)
    try:
        values = None if a.sweep_values is None else tuple(float(v) for v in a.sweep_values.split(","))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
        t0 = time.perf_counter()
        samples = load_samples(Path(a.manifest), a.limit, a.prompt_field)
        if not samples:
            raise DreamPainterError(f"{a.manifest}: no samples")
        if a.where:
            samples = select_samples(samples, a.where)
        segmenter = a.segmenter
        if segmenter == "color" and any(s.scene is None for s in samples):
            raise DreamPainterError("--segmenter color needs synthetic scenes (train.synthetic manifests with a "
                                    "'scene' entry of the image's size)")
        if segmenter == "rembg":
            _rembg_segmenter()  # fail before any generation if rembg is missing
        elif segmenter == "auto" and any(s.scene is None for s in samples):
            try:
                _rembg_segmenter()
            except M.MissingDependencyError as e:
                print(f"warning: object consistency skipped for non-synthetic samples: {e}", file=sys.stderr)
                segmenter = "color-or-none"
        pipe = load_pipeline(a.model, a.weights, dtype=dtype, device=a.device)
        clip = M.ClipScorer(a.clip, device=a.device) if a.clip else None
        report, kept = evaluate(pipe, samples, steps=a.steps, guidance=a.guidance, seed=a.seed,
                                reference_mode=a.reference_mode, sweeps=tuple(dict.fromkeys(a.sweep)),
                                sweep_values=values, segmenter=segmenter, clip=clip, keep_images=a.sheet,
                                progress=a.progress, reference_guidance=a.reference_guidance, control_mode=a.mode,
                                training_free_reference=a.training_free_reference,
                                reference_strength=a.reference_strength, harmonize=a.harmonize,
                                lora_scale=a.lora_scale, roundtrip=a.roundtrip, mask_guidance=a.mask_guidance,
                                shield_product=a.shield_product, guidance_end=a.guidance_end)
    except (DreamPainterError, ManifestError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report["model"] = str(a.model)
    report["weights"] = None if a.weights is None else str(a.weights)
    report["manifest"] = str(a.manifest)
    report["timing_s"]["total"] = round(time.perf_counter() - t0, 3)
    png = out.with_suffix(".png")
    report["plot"] = str(png.name)
    report["plot_backend"] = write_report_png(report, png, a.plot)
    if a.sheet > 0 and kept:
        sheet = out.with_name(out.stem + "_samples.png")
        write_contact_sheet(samples, kept, sheet)
        report["samples_sheet"] = sheet.name
    atomic_write_bytes(out, (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    for mode, body in report["modes"].items():
        s = body["summary"]
        print(f"{mode}: " + ", ".join(f"{k}={_fmt(s.get(k))}" for k in
                                      ("object_consistency", "product_psnr_raw", "product_exact_pasted",
                                       "prompt_adherence", "reference_similarity", "quality") if s.get(k) is not None))
    for k in PAIRED_ROWS:
        cell = _paired_cell(report, k)
        if cell:
            print(f"tr2i - t2i, same scenes, 95% CI: {k} {cell}")
    for param, sw in report["sweeps"].items():
        print(f"sweep {param}: " + "; ".join(
            f"{p['value']:g}: ref_sim={_fmt(p.get('reference_similarity'))} quality={_fmt(p.get('quality'))}"
            for p in sw["points"]))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
