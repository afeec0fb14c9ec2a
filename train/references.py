"""Background references for your own training data: remove the product from each photo.

    python -m train.data references --manifest M --out DIR [--base CogView4-6B/] [--weights F]
        [--prompt "an empty display stand, nothing on it"] [--dilate PX] [--steps N] [--cfg G]

The paper made its references by removing the product with an editing model. This does it
with the pack's training-free inpainting (``DreamPainterPipeline.inpaint``): the product mask
is dilated to cover shadows and reflections, that region is repainted from the prompt, and
every other pixel is the photo's own. Any model the pack loads works; the public CogView4-6B
alone is enough. Without ``--base`` the embedded miniature model is used (for the synthetic
scenes only).

Writes ``DIR/references/<id>.png`` (atomically, one by one) and ``DIR/manifest.jsonl``: the
input manifest with ``reference`` set on every line, paths relative to DIR. Rerunning the
same command skips the references already made; ``DIR/references/settings.json`` records
the settings, and a rerun with other settings is refused instead of mixing two kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampainter_core.errors import DreamPainterError, InputError
from dreampainter_core.fileio import atomic_path, atomic_write_text
from dreampainter_core.masks import dilate
from dreampainter_core.options import ControlOptions, SamplingOptions

from .manifest import ManifestError, load_sample, read_manifest

EMPTY_SCENE_PROMPT = "an empty display stand with nothing on it, a clean empty background, no objects"


@dataclass(frozen=True)
class RemovalSettings:
    prompt: str = EMPTY_SCENE_PROMPT
    negative_prompt: str = "product, object, bottle, box, text, watermark"
    dilate: int | None = None  # px; None = 3% of the image's shorter side (at least 3)
    steps: int = 30
    guidance: float = 3.5
    harmonize: float = 0.0  # the photo around the hole stays held to the end
    seed: int = 0
    base: str = "embedded"
    weights: str | None = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def dilate_px(self, width: int, height: int) -> int:
        return self.dilate if self.dilate is not None else max(3, round(0.03 * min(width, height)))


def _safe_name(sample_id: str | None, line: int) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id or f"line{line:06d}").strip("._") or f"line{line:06d}"
    return name[:100]


def load_pipeline(settings: RemovalSettings, device: str, dtype: torch.dtype):
    from dreampainter_core.pipeline import DreamPainterPipeline

    if settings.base == "embedded":
        from dreampainter_core.embedded import embedded_model

        base = embedded_model().base
    else:
        base = settings.base
    return DreamPainterPipeline.from_pretrained(base, dreampainter_weights=settings.weights, dtype=dtype, device=device)


def remove_product(pipe, image: torch.Tensor, product_mask: torch.Tensor, settings: RemovalSettings,
                   seed: int) -> torch.Tensor:
    """[H, W, 3] photo, [H, W] product mask -> [H, W, 3] the scene without the product."""
    height, width = product_mask.shape
    hole = dilate(product_mask, 2 * settings.dilate_px(width, height) + 1)
    sampling = SamplingOptions(steps=settings.steps, guidance_scale=settings.guidance, seed=seed)
    return pipe.inpaint(settings.prompt, image, hole, negative_prompt=settings.negative_prompt, sampling=sampling,
                        control=ControlOptions(harmonize=settings.harmonize))[0]


def make_references(manifest: str | os.PathLike, out_dir: str | os.PathLike, settings: RemovalSettings,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, pipe=None, echo=print) -> dict:
    """Make a reference for every sample; returns a report. Resumable and atomic (module doc)."""
    samples = read_manifest(manifest)  # a bad line stops here, before any model loads
    if not samples:
        raise InputError(f"{manifest}: the manifest has no samples")
    out_dir = Path(out_dir)
    ref_dir = out_dir / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    settings_path = ref_dir / "settings.json"
    record = {"fingerprint": settings.fingerprint(), "settings": asdict(settings)}
    if settings_path.is_file():
        earlier = json.loads(settings_path.read_text(encoding="utf-8"))
        if earlier.get("fingerprint") != record["fingerprint"]:
            raise InputError(
                f"{ref_dir} holds references made with other settings ({earlier.get('settings')}); use another "
                "--out, or delete that folder to remake them with these settings"
            )
    else:
        atomic_write_text(settings_path, json.dumps(record, indent=2) + "\n")
    names = {}
    for line, sample in samples:
        name = _safe_name(sample.id, line)
        if name in names.values():
            name = f"{name}_line{line}"
        names[line] = name

    todo = [(line, s) for line, s in samples if not (ref_dir / f"{names[line]}.png").is_file()]
    echo(f"[references] {len(samples)} samples, {len(samples) - len(todo)} already made, {len(todo)} to make")
    start = time.time()
    if todo and pipe is None:
        pipe = load_pipeline(settings, device, dtype)
    failed = {}
    for k, (line, sample) in enumerate(todo):
        try:
            loaded = load_sample(sample, with_reference=False, line=line)
        except ManifestError as e:
            failed[line] = "; ".join(e.problems)
            echo(f"[references] line {line}: skipped: {failed[line]}")
            continue
        image = torch.from_numpy(np.asarray(loaded.image, dtype=np.float32) / 255.0)
        mask = torch.from_numpy(loaded.mask.astype(np.float32))
        try:
            scene = remove_product(pipe, image, mask, settings, seed=settings.seed + line)
        except DreamPainterError as e:
            failed[line] = str(e)
            echo(f"[references] line {line}: failed: {e}")
            continue
        with atomic_path(ref_dir / f"{names[line]}.png") as tmp:
            Image.fromarray((scene.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        if (k + 1) % 10 == 0 or k + 1 == len(todo):
            echo(f"[references] {k + 1}/{len(todo)} made ({time.time() - start:.0f} s)")

    lines = []
    for line, sample in samples:
        if line in failed:
            continue
        rec = sample.to_json()
        for key in ("image", "mask"):
            paths = [rec[key]] if isinstance(rec[key], str) else rec[key]
            moved = [os.path.relpath(sample.resolve(p), out_dir) for p in paths]
            rec[key] = moved[0] if len(moved) == 1 else moved
        rec["reference"] = f"references/{names[line]}.png"
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(out_dir / "manifest.jsonl", "\n".join(lines) + "\n")
    report = {"samples": len(samples), "made": len(todo) - len(failed), "skipped_existing": len(samples) - len(todo),
              "failed": {str(k): v for k, v in failed.items()}, "seconds": round(time.time() - start, 1),
              "manifest": str(out_dir / "manifest.jsonl")}
    echo(f"[references] wrote {report['manifest']} ({len(lines)} lines; {len(failed)} failed)")
    return report


def cmd_references(args) -> int:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    settings = RemovalSettings(
        prompt=args.prompt, dilate=args.dilate, steps=args.steps, guidance=args.cfg, harmonize=args.harmonize,
        seed=args.seed, base=args.base or "embedded", weights=args.weights,
    )
    try:
        report = make_references(args.manifest, args.out, settings, device=args.device, dtype=dtypes[args.dtype])
    except DreamPainterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0


def add_parser(sub) -> None:
    r = sub.add_parser("references", help="make background references: remove the product from every photo")
    r.add_argument("--manifest", required=True, help="the manifest to make references for")
    r.add_argument("--out", required=True, help="folder for references/ and the new manifest.jsonl")
    r.add_argument("--base", help="CogView4 diffusers folder (default: the embedded miniature model)")
    r.add_argument("--weights", help="optional DreamPainter file (not needed: the control branch is not used)")
    r.add_argument("--prompt", default=EMPTY_SCENE_PROMPT, help="what the emptied region shows")
    r.add_argument("--dilate", type=int, default=None,
                   help="px the product mask grows to cover shadows and reflections (default 3%% of the short side)")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--cfg", type=float, default=3.5)
    r.add_argument("--harmonize", type=float, default=0.0, help="share of the last steps run unconstrained")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    r.set_defaults(func=cmd_references)
