"""How good are the references that ``train.data references`` makes? On train.synthetic scenes,
whose true product-free scene is known (``refs/<id>.png``, pixel-aligned), compare each made
reference with the true one.

    python -m train.removal_eval --manifest runs/modes/data/test.jsonl --out docs/miniature/removal
        [--base models/diffusers/dreampainter-miniature] [--steps 30] [--cfg 3.5] [--limit N]

The references are made first (``train.references.make_references``: resumable, atomic,
into OUT/references/), then measured per scene:

- psnr_made / psnr_photo: PSNR against the true product-free scene over the removed region
  (the dilated mask), for the made reference and for the photo itself (doing nothing);
- product_left: the share of the product's pixels still segmented as product (the scene's
  product colour rule) in the made reference;
- wall_tone (made / true): the reference's wall read as the scene's own tone, the part of
  the look only a reference carries; the true reference gives the metric's ceiling.

OUT/removal.json holds the rows and the means with 95% bootstrap intervals of the paired
difference (made minus photo) where it applies.

Does training on made references work as well as on true ones?

    python -m train.removal_eval stage2 --data runs/removal/data --out docs/miniature/removal_stage2
        [--train-scenes 1000] [--eval-manifest runs/modes/data/test.jsonl] [--eval-limit 200]

trains stage 2 twice from the same stage-1 model (the embedded file's control branch) with the
miniature's stage-2 recipe and the same steps and seed, once on the first N training scenes with
their true references and once with references made by ``train.data references``, then
evaluates both (T2I and TR2I on the same held-out scenes and seeds) and writes
OUT/comparison.json: each run's reference gain (TR2I minus T2I: wall tone, reference
similarity) with its paired interval. Every step is skipped when its output exists, so an
interrupted comparison continues.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from dreampainter_core.fileio import atomic_write_text
from dreampainter_core.masks import dilate

from . import metrics as M
from .manifest import load_sample, read_manifest
from .references import RemovalSettings, make_references
from .synthetic import scene_regions, wall_tone_colours

PSNR_CAP = 100.0


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255.0)


def _psnr(a, b, region) -> float:
    return min(PSNR_CAP, float(M.masked_psnr(a, b, region)))


def measure(truth_manifest: Path, made_manifest: Path, settings: RemovalSettings) -> list[dict]:
    made = {s.id: (line, s) for line, s in read_manifest(made_manifest)}
    rows = []
    for line, sample in read_manifest(truth_manifest):
        if sample.id not in made or not isinstance(sample.extra.get("scene"), dict):
            continue
        truth = load_sample(sample, with_reference=True, line=line)
        mline, msample = made[sample.id]
        ours = load_sample(msample, with_reference=True, line=mline)
        scene = sample.extra["scene"]
        photo, true_ref, made_ref = _tensor(truth.image), _tensor(truth.reference), _tensor(ours.reference)
        mask = torch.from_numpy(truth.mask.astype(np.float32))
        h, w = mask.shape
        hole = (dilate(mask, 2 * settings.dilate_px(w, h) + 1) > 0.5).numpy()
        probe = scene_regions(scene)["wall_probe"]
        tones = wall_tone_colours(scene, probe)
        row = {"id": sample.id, "psnr_made": _psnr(made_ref, true_ref, hole),
               "psnr_photo": _psnr(photo, true_ref, hole),
               "product_left": float(M.ColorShapeSegmenter(scene["product"]["rgb"])(made_ref[None])[0][truth.mask].mean())}
        if "tone" in scene["background"] and len(tones) > 1:
            row["wall_tone_made"] = M.tone_match(made_ref, probe, tones, scene["background"]["tone"]).match
            row["wall_tone_true"] = M.tone_match(true_ref, probe, tones, scene["background"]["tone"]).match
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in ("psnr_made", "psnr_photo", "product_left", "wall_tone_made", "wall_tone_true"):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
        out[f"{key}_n"] = len(vals)
    out["psnr_made_minus_photo"] = M.paired_difference([r["psnr_photo"] for r in rows], [r["psnr_made"] for r in rows])
    out["wall_tone_made_minus_true"] = M.paired_difference([r.get("wall_tone_true") for r in rows],
                                                           [r.get("wall_tone_made") for r in rows])
    return out


def stage1_from_stage2(stage2: Path, out: Path) -> Path:
    """The stage-1 model inside a stage-2 file (its control branch; stage 2 trains only the LoRA)
    as a stage-1 file, for a fresh stage 2 to start from."""
    from safetensors import safe_open

    from dreampainter_core.weights import atomic_save_safetensors

    with safe_open(str(stage2), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("control.")}
    config = json.loads(meta["dreampainter_config"])
    config.update(lora_rank=0, lora_alpha=None)
    meta.update(stage="1", lora_rank="0", lora_targets="[]", dreampainter_config=json.dumps(config),
                derived_from=f"{stage2.name}: its control branch")
    return atomic_save_safetensors(tensors, out, meta)


def _subset(manifest: Path, n: int, out: Path) -> Path:
    """The first n lines of a manifest, with absolute paths (so it can live anywhere)."""
    lines = []
    for _, s in read_manifest(manifest)[:n]:
        rec = s.to_json()
        for key in ("image", "mask", "reference"):
            if isinstance(rec.get(key), str):
                rec[key] = str(Path(s.resolve(rec[key])).resolve())
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def train_stage2(manifest: Path, stage1: Path, base: Path, out: Path, seed: int) -> Path:
    from .config import apply_overrides, load_config, validate
    from .miniature import BASE_MODEL_NAME, REPO, _training_attention
    from .trainer import run

    export = out / "dreampainter_stage2.safetensors"
    if export.is_file():
        return export
    path = REPO / "configs" / "miniature" / "stage2.toml"
    cfg = load_config(2, path, [
        f"model.base={base}", f"model.base_model_name={BASE_MODEL_NAME}", f"model.stage1_weights={stage1}",
        f"data.manifest={manifest}", f"checkpoint.output_dir={out}", f"cache.dir={out / 'cache'}",
        f"train.seed={seed}", "validation.every=0", "checkpoint.export_dtype=bf16", "model.dtype=bf16",
        "train.mixed_precision=bf16"])
    cfg = validate(apply_overrides(cfg, [f"checkpoint.every={min(cfg.checkpoint.every, cfg.train.max_steps)}"]))
    with _training_attention("math"):  # as the miniature recipe trains (train/miniature.py)
        result = run(cfg, echo=lambda m: print(f"[stage2 {out.name}] {m}", file=sys.stderr))
    return Path(result.export_path)


def compare_stage2(a) -> int:
    from dreampainter_core.embedded import embedded_model

    from . import evaluate as E
    from .synthetic import write_scenes

    out, data = Path(a.out), Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "train.jsonl").is_file():
        write_scenes(data, a.count, size=a.size, seed=a.seed, only="train")
    true_manifest = out / "train_true.jsonl"
    if not true_manifest.is_file():
        _subset(data / "train.jsonl", a.train_scenes, true_manifest)
    made_dir = out / "made"
    settings = RemovalSettings(steps=a.steps, guidance=a.cfg)
    make_references(true_manifest, made_dir, settings, echo=lambda m: print(m, file=sys.stderr))
    model = embedded_model()
    stage1 = out / "stage1.safetensors"
    if not stage1.is_file():
        stage1_from_stage2(Path(model.weights), stage1)
    reports = {}
    for arm, manifest in (("true", true_manifest), ("made", made_dir / "manifest.jsonl")):
        weights = train_stage2(manifest, stage1, Path(model.base), out / f"stage2_{arm}", a.seed)
        report = out / f"eval_{arm}.json"
        if not report.is_file():
            rc = E.main(["--model", str(model.base), "--weights", str(weights), "--manifest", a.eval_manifest,
                         "--out", str(report), "--limit", str(a.eval_limit), "--steps", "20", "--guidance", "1.5",
                         "--sheet", "8", "--plot", "pil"])
            if rc != 0:
                raise SystemExit(f"train.evaluate failed for the {arm} run")
        reports[arm] = json.loads(report.read_text(encoding="utf-8"))
    result = {"train_scenes": a.train_scenes, "eval_scenes": a.eval_limit, "removal": settings.__dict__, "arms": {}}
    for arm, rep in reports.items():
        gains = {k: (rep.get("comparison") or {}).get(k) for k in ("wall_tone", "reference_similarity",
                                                                    "reference_pixel_similarity", "quality")}
        result["arms"][arm] = {"summary": {m: body["summary"] for m, body in rep["modes"].items()}, "gain": gains}
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    for arm, body in result["arms"].items():
        cells = []
        for k, g in body["gain"].items():
            if g and g.get("paired"):
                lo, hi = g["paired"]["ci"]
                cells.append(f"{k} {g['paired']['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"stage 2 on {arm} references: TR2I - T2I: " + "; ".join(cells))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stage2"]:
        q = argparse.ArgumentParser(prog="python -m train.removal_eval stage2")
        q.add_argument("--data", required=True, help="train.synthetic folder (its train split is drawn when missing)")
        q.add_argument("--out", required=True)
        q.add_argument("--train-scenes", type=int, default=1000)
        q.add_argument("--eval-manifest", required=True, help="held-out scenes (e.g. the test split)")
        q.add_argument("--eval-limit", type=int, default=200)
        q.add_argument("--steps", type=int, default=RemovalSettings.steps, help="removal sampling steps")
        q.add_argument("--cfg", type=float, default=RemovalSettings.guidance, help="removal guidance")
        q.add_argument("--count", type=int, default=4000)
        q.add_argument("--size", type=int, default=128)
        q.add_argument("--seed", type=int, default=0)
        return compare_stage2(q.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m train.removal_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="train.synthetic manifest with true references")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="model folder (default: the embedded miniature)")
    p.add_argument("--steps", type=int, default=RemovalSettings.steps)
    p.add_argument("--cfg", type=float, default=RemovalSettings.guidance)
    p.add_argument("--limit", type=int, default=None, help="the first N samples")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Path(a.manifest)
    if a.limit is not None:  # a smaller manifest beside the output
        manifest = _subset(manifest, a.limit, out / "input.jsonl")
    settings = RemovalSettings(steps=a.steps, guidance=a.cfg, base=a.base or "embedded")
    report = make_references(manifest, out, settings, echo=lambda m: print(m, file=sys.stderr))
    rows = measure(manifest, out / "manifest.jsonl", settings)
    result = {"settings": settings.__dict__, "made": report, "summary": summarize(rows), "rows": rows}
    atomic_write_text(out / "removal.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    s = result["summary"]
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    print(f"n={s['n']} PSNR in the removed region: made {fmt(s['psnr_made'])} dB vs photo {fmt(s['psnr_photo'])} dB; "
          f"product left {fmt(s['product_left'])}; wall tone made {fmt(s['wall_tone_made'])} "
          f"true {fmt(s['wall_tone_true'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
