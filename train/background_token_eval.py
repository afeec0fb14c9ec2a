"""The background token on the miniature: train it, generate prompt-free on held-out scenes, measure.

    python -m train.background_token_eval --base runs/miniature_v3/model \\
        --weights runs/miniature_v3/dreampainter.safetensors --manifest runs/miniature_v3/data/train.jsonl \\
        --out runs/background_token_eval [--test-manifest .../test.jsonl] [--scenes 240] [--budget-minutes 30]
    python -m train.background_token_eval --base DIR --manifest M --out OUT --smoke    # seconds: that it all runs

The question (Product2Img, issue 17): does a learned ``<background>`` token, given only the product's name,
make the model paint the background that suits the product, and do the contrastive terms add to it?
On the miniature, "suits" is measurable: v3 scenes (train.synthetic, SCENE_VERSION 3) give each product
shape its typical wall colours and stand with probability CATEGORY_PRIOR (cups before warm walls on a
brown table, bottles before cool walls on a white one, ...), and nothing else in a scene reveals the shape.

1. Two tokens are trained on the --manifest scenes (train.background_token, configs/miniature/background_token.toml,
   the same seed and steps): ``token_diffusion`` with the diffusion loss alone (contrastive.weight = 0) and
   ``token_cba`` with the paper's contrastive terms (λ = 0.01, τ = 0.05, the VAE-latent image features).
   Their steps fill --budget-minutes of CPU together: a 3-step run measures the time of a step first
   (the latent cache it fills is shared) and the plan is kept in OUT/plan.json, so a rerun resumes or
   reuses the same runs. --train-steps fixes the steps instead.
2. On --scenes held-out scenes (--test-manifest, default the manifest's test.jsonl; v3), the product kept at
   its place by the DreamPainter file (placement keep, paste-back), the same seed per scene in every setting:
   * ``name``: the product's name alone, "a red cup" (train.synthetic.product_name);
   * ``token_init``: "a red cup <background>" with the untrained token (= "a red cup background");
   * ``token_diffusion`` and ``token_cba``: the trained tokens;
   * ``prompt_builder``: dreampainter_core.prompts.build_prompt(name, category = the product's shape) with
     presets written from the typical looks in the miniature's words (OUT/miniature_presets.toml): what a
     seller gets from expert-written rules and a category, the rule-based upper bound.
3. Measured on the result (train.evaluate's probes and colour matching): the wall probe's and the stand
   probe's colours classified against the palette; ``wall_typical`` / ``stand_typical`` / ``both_typical``:
   train.synthetic.is_typical_look of those; ``quality``: metrics.palette_fit over the background. Each
   rate with its 95% bootstrap interval over scenes (metrics.mean_interval) and paired differences on the
   same scenes (metrics.paired_difference): token_init, token_diffusion, token_cba and prompt_builder
   against name; token_cba against token_diffusion (what the contrastive terms add) and prompt_builder.
   ``chance``: the share of scenes whose wall / stand would be typical if drawn uniformly from the
   palette (2/11 and 1/11), and ``data``: the rate in the training scenes themselves.

Writes OUT/report.json (plan, training reports, every row, summary, paired), OUT/table.md and OUT/samples.png
(rows of: product | name | token_init | token_diffusion | token_cba | prompt_builder | truth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dreampainter_core.errors import DreamPainterError, InputError
from dreampainter_core.fileio import atomic_write_text
from dreampainter_core.prompts import build_prompt, load_presets, name_with_token
from dreampainter_core.tokens import init_token, load_learned_token

from . import metrics as M
from .background_token import load_token_config, train_background_token
from .config import ConfigError
from .evaluate import TABLE_BRIGHTEST, Runner, load_samples
from .synthetic import (PALETTE, PALETTE_ZH, PRODUCT_SHAPES, PRODUCT_ZH, STAND_WORDS, STYLES, TYPICAL_LOOKS,
                        is_typical_look, product_name, tone_palette)
from .validation import _pil, save_grid

__all__ = ["SETTINGS", "COMPARISONS", "miniature_presets", "measure", "token_feature_spread", "evaluate_token", "main"]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "miniature" / "background_token.toml"
SETTINGS = ("name", "token_init", "token_diffusion", "token_cba", "prompt_builder")
TOKENS = {"token_diffusion": ["contrastive.weight=0"], "token_cba": []}
METRICS = ("wall_typical", "stand_typical", "both_typical", "quality")
COMPARISONS = (("name", "token_init"), ("name", "token_diffusion"), ("name", "token_cba"), ("name", "prompt_builder"),
               ("token_diffusion", "token_cba"), ("prompt_builder", "token_cba"))
CALIBRATION_STEPS = 3
SHEET_ROWS = 6


def miniature_presets(path: Path) -> Path:
    """A presets file (dreampainter_core/prompt_presets.toml's layout) with one category per product shape:
    its typical stand and walls in the miniature's words, the synthetic scenes' styles."""
    lines = ["# The miniature's categories (train.background_token_eval): each shape's typical look", "", "[styles]"]
    keys = []
    for i, (en, zh) in enumerate(STYLES):
        keys.append(f"s{i}")
        lines.append(f's{i} = {{ en = "{en}", zh = "{zh}" }}')
    for shape in PRODUCT_SHAPES:
        look = TYPICAL_LOOKS[shape]
        stand_shape, stand_colour = look["stand"]
        word_en, word_zh = STAND_WORDS[stand_shape]
        lines += ["", f"[categories.{shape}]", f'aliases = ["{PRODUCT_ZH[shape]}"]', f"styles = {json.dumps(keys)}",
                  f'stand = [{{ en = "a {stand_colour} {word_en}", zh = "{PALETTE_ZH[stand_colour]}的{word_zh}" }}]',
                  "background = [" + ", ".join(f'{{ en = "a simple {c} background", zh = "简约的{PALETTE_ZH[c]}背景" }}'
                                               for c in look["walls"]) + "]"]
    atomic_write_text(path, "\n".join(lines) + "\n")
    load_presets(path)  # checked as a user's file would be
    return path


def measure(image: torch.Tensor, sample, quality_palette: dict) -> dict:
    """Wall and stand colour of a result [H, W, 3] on the scene's probes, whether they are the shape's typical
    ones, and palette_fit over the background."""
    reg, scene = sample.regions, sample.scene
    shape = scene["product"]["shape"]
    # (expected: the scene's own colours; only the predicted names count here)
    wall = M.background_color_match(image, reg["wall_probe"], palette=PALETTE, expected_name=scene["background"]["color"])
    stand = M.table_color_match(image, reg["table_probe"], palette=PALETTE, expected_name=scene["table"]["color"],
                                brightest=TABLE_BRIGHTEST)
    typical = is_typical_look(shape, wall.predicted, stand.predicted)
    return {"wall": wall.predicted, "stand": stand.predicted, "wall_typical": typical["wall"],
            "stand_typical": typical["stand"], "both_typical": typical["both"],
            "quality": float(M.palette_fit(image, quality_palette, reg["background"]))}


def token_feature_spread(pipe, tokens: dict, colours=("red", "blue")) -> dict:
    """Does a token's text feature depend on the product it follows? For each token, GLM's feature at the
    token's position (the sequence's last) after "a <colour> <shape>" for every shape: ``spread``, the mean
    distance of those features from their mean over the mean's norm, and ``between_shapes`` the same for
    the per-shape means (colour averaged out). ``name_last_word``: the measure for the names' own last
    word, the scale of a feature that carries the product. A token the DiT is to read per product needs
    a feature that moves with the shape; the contrastive terms push that way."""

    def spread(features: torch.Tensor) -> float:
        mean = features.mean(0)
        return float((features - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-12))

    names = [f"a {c} {shape}" for c in colours for shape in PRODUCT_SHAPES]
    out = {"names": names}
    with torch.no_grad():
        words = torch.stack([pipe.encode_prompt([n])[0, -1] for n in names])
        out["name_last_word"] = {"spread": spread(words)}
        for setting, token in tokens.items():
            f = torch.stack([pipe.encode_prompt([name_with_token(n, token.token)], tokens=(token,))[0, -1]
                             for n in names])
            out[setting] = {"spread": spread(f),
                            "between_shapes": spread(f.view(len(colours), len(PRODUCT_SHAPES), -1).mean(0))}
    return out


def _train_tokens(cfg_args: dict, out: Path, plan: dict, echo) -> dict[str, dict]:
    reports = {}
    for setting, extra in TOKENS.items():
        folder = out / setting
        token_file = folder / "background_token.safetensors"
        report_file = folder / "report.json"
        if token_file.is_file() and report_file.is_file():
            reports[setting] = json.loads(report_file.read_text(encoding="utf-8"))
            echo(f"[{setting}] reusing {token_file}")
            continue
        cfg = load_token_config(CONFIG, [*cfg_args["overrides"], f"train.output_dir={folder}",
                                         f"train.steps={plan['steps']}", *extra])
        reports[setting] = train_background_token(cfg, echo)
        atomic_write_text(report_file, json.dumps(reports[setting], indent=1) + "\n")
    return reports


def _plan(cfg_args: dict, out: Path, budget_minutes: float, train_steps: int | None, max_steps: int, echo) -> dict:
    """The steps of each token run (OUT/plan.json: a rerun keeps them)."""
    path = out / "plan.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if train_steps:
        plan = {"steps": int(train_steps), "how": "--train-steps"}
    else:
        folder = out / "calibration"
        cfg = load_token_config(CONFIG, [*cfg_args["overrides"], f"train.output_dir={folder}",
                                         f"train.steps={CALIBRATION_STEPS}", "train.log_every=1",
                                         "train.checkpoint_every=0"])
        t0 = time.perf_counter()
        report = train_background_token(cfg, echo)
        seconds = [b["seconds"] - a["seconds"] for a, b in zip(report["log"], report["log"][1:])]
        per_step = max(float(np.median(seconds)) if seconds else report["seconds"], 1e-3)
        left = budget_minutes * 60.0 - (time.perf_counter() - t0)
        steps = max(min(10, max_steps), min(max_steps, int(left / len(TOKENS) / per_step)))
        plan = {"steps": steps, "how": f"--budget-minutes {budget_minutes:g}: {per_step:.3f} s per step measured "
                                       f"over {CALIBRATION_STEPS} steps (latents uncached: an overestimate)",
                "seconds_per_step": per_step}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(plan, indent=1) + "\n")
    echo(f"plan: {plan['steps']} steps per token ({plan['how']})")
    return plan


def _summary(rows: list[dict]) -> dict:
    out = {}
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if mine:
            out[setting] = {"n": len(mine), **{m: M.mean_interval([r[m] for r in mine]) for m in METRICS}}
    return out


def _paired(rows: list[dict]) -> dict:
    by = {(r["scene"], r["setting"]): r for r in rows}
    scenes = sorted({r["scene"] for r in rows})
    out = {}
    for a, b in COMPARISONS:
        keys = [s for s in scenes if (s, a) in by and (s, b) in by]
        if keys:
            out[f"{b} - {a}"] = {m: M.paired_difference([by[(s, a)][m] for s in keys], [by[(s, b)][m] for s in keys])
                                 for m in METRICS}
    return out


def _fmt(cell) -> str:
    if cell is None:
        return "-"
    if "mean_difference" in cell:
        return f"{cell['mean_difference']:+.3f} [{cell['ci'][0]:+.3f}, {cell['ci'][1]:+.3f}]"
    return f"{cell['mean']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]"


def _table(report: dict) -> str:
    head = "| {} | wall typical | stand typical | both typical | quality |\n|---|---|---|---|---|"
    lines = [head.format("setting (n)")]
    for setting, c in report["summary"].items():
        lines.append(f"| {setting} ({c['n']}) | " + " | ".join(_fmt(c[m]) for m in METRICS) + " |")
    ref = report["reference"]
    lines.append(f"| training scenes (data) | {ref['data']['wall_typical']:.3f} | {ref['data']['stand_typical']:.3f} | "
                 f"{ref['data']['both_typical']:.3f} | - |")
    lines.append(f"| uniform colours (chance) | {ref['chance']['wall_typical']:.3f} | "
                 f"{ref['chance']['stand_typical']:.3f} | {ref['chance']['both_typical']:.3f} | - |")
    lines += ["", head.format("paired, same scenes")]
    for name, cells in report["paired"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells.get(m)) for m in METRICS) + " |")
    features = report.get("token_features")
    if features:
        lines += ["", "| the token's text feature over the names (token_feature_spread) | spread | between shapes |",
                  "|---|---|---|", f"| the names' own last word | {features['name_last_word']['spread']:.3f} | - |"]
        lines += [f"| {k} | {v['spread']:.3f} | {v['between_shapes']:.3f} |" for k, v in features.items()
                  if isinstance(v, dict) and "between_shapes" in v]
    return "\n".join(lines) + "\n"


def _reference_rates(manifest: Path) -> dict:
    """How often the training scenes themselves have the typical look, and what uniform colours would give."""
    from .manifest import read_manifest

    flags = []
    for _, s in read_manifest(manifest):
        sc = s.extra.get("scene")
        if isinstance(sc, dict) and sc.get("version", 0) >= 3:
            flags.append(is_typical_look(sc["product"]["shape"], sc["background"]["color"], sc["table"]["color"]))
    n = max(1, len(flags))
    data = {k: sum(bool(f[k]) for f in flags) / n for k in ("wall", "stand", "both")}
    walls = np.mean([len(TYPICAL_LOOKS[s]["walls"]) for s in PRODUCT_SHAPES]) / len(PALETTE)
    stand = 1 / len(PALETTE)
    return {"data": {f"{k}_typical": v for k, v in data.items()}, "data_n": len(flags),
            "chance": {"wall_typical": walls, "stand_typical": stand, "both_typical": walls * stand}}


def evaluate_token(pipe, samples, out: Path, *, tokens: dict, steps: int, guidance: float, seed: int,
                   presets: Path, echo=print) -> tuple[list[dict], list]:
    """Generate and measure every setting on every sample; returns (rows, sample-sheet rows)."""
    runners = {}
    quality_palette = tone_palette()
    for setting in SETTINGS:
        token = tokens.get(setting)
        runners[setting] = Runner(pipe, steps, guidance, seed, "none", None, PALETTE, quality_palette,
                                  tokens=() if token is None else (token,))
    rows, sheet = [], []
    t0 = time.perf_counter()
    for k, sample in enumerate(samples):
        scene = sample.scene
        name = product_name(scene)[0]
        prompts = {"name": name, "prompt_builder": build_prompt(name, scene["product"]["shape"], seed=seed + k,
                                                                 presets=presets)}
        for setting in ("token_init", "token_diffusion", "token_cba"):
            prompts[setting] = name_with_token(name, tokens[setting].token)
        results = {}
        for setting in SETTINGS:
            s = dataclasses.replace(sample, prompt=prompts[setting])
            raw, pasted, fg, mask = runners[setting].generate(s, reference=False)
            results[setting] = pasted[0]
            rows.append({"scene": sample.id, "shape": scene["product"]["shape"], "setting": setting,
                         "prompt": prompts[setting], "truth_typical": bool(scene.get("typical")),
                         **measure(pasted[0], sample, quality_palette)})
        if k < SHEET_ROWS:
            product = torch.where(sample.mask[0][..., None] > 0.5, sample.image[0], torch.ones_like(sample.image[0]))
            sheet.append([_pil(product)] + [_pil(results[s]) for s in SETTINGS] + [_pil(sample.image[0])])
        if (k + 1) % 20 == 0:
            echo(f"{k + 1}/{len(samples)} scenes, {(time.perf_counter() - t0) / (k + 1):.1f} s each")
    return rows, sheet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.background_token_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a CogView4-architecture diffusers folder (a miniature trained on "
                                                 "v3 scenes), or 'embedded'")
    p.add_argument("--weights", default=None, help="its DreamPainter file (stage 1 or 2); 'none' = the base alone")
    p.add_argument("--manifest", required=True, help="v3 training scenes (train.synthetic), the token learns on them")
    p.add_argument("--test-manifest", default=None, help="held-out v3 scenes (default: test.jsonl beside --manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--scenes", type=int, default=240, help="held-out scenes to generate on (>= 200 for the table)")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="CPU minutes for training both tokens")
    p.add_argument("--train-steps", type=int, default=None, help="steps per token instead of the budget")
    p.add_argument("--max-train-steps", type=int, default=3000)
    p.add_argument("--sample-steps", type=int, default=None, help="default: the model's miniature.json (20), else 28")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's miniature.json (1.5), else 3.5")
    p.add_argument("--size", type=int, default=128, help="the scenes' side (the training buckets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2 training steps, 4 scenes, 2 sampling steps: that it runs")
    a = p.parse_args(argv)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from dreampainter_core.pipeline import DreamPainterPipeline

    from .dreampaint import _resolve_base

    try:
        out = Path(a.out)
        base, embedded_weights, _ = _resolve_base(a.base)
        weights = embedded_weights if a.weights is None else (None if a.weights == "none" else a.weights)
        test_manifest = Path(a.test_manifest) if a.test_manifest else Path(a.manifest).with_name("test.jsonl")
        scenes, max_steps, sample_steps = a.scenes, a.max_train_steps, a.sample_steps
        if a.smoke:  # the budget path still runs: a calibration, then 2 steps per token
            scenes, max_steps, sample_steps = 4, 2, 2
        samples = [s for s in load_samples(test_manifest, scenes) if s.scene is not None
                   and s.scene.get("version", 0) >= 3]
        if len(samples) < scenes:
            raise InputError(f"{test_manifest}: {len(samples)} held-out v3 scenes of the manifest's size, {scenes} "
                             "asked for; draw more (python -m train.synthetic --out DIR --count N --only test, the "
                             "same seed and size as the training scenes) or lower --scenes")
        sampling = {}
        if (base / "miniature.json").is_file():
            sampling = json.loads((base / "miniature.json").read_text(encoding="utf-8")).get("sampling", {})
        steps = sample_steps or int(sampling.get("steps", 28))
        guidance = a.guidance if a.guidance is not None else float(sampling.get("guidance", 3.5))
        overrides = [f"model.base={base}", f"model.dreampainter_weights={weights or 'none'}",
                     f"data.manifest={a.manifest}", f"data.base_sizes=[{a.size}]", f"train.seed={a.seed}",
                     f"train.cache_dir={out / 'latent_cache'}"]
        if a.smoke:
            overrides += ["train.batch_size=2", "train.checkpoint_every=0", "train.log_every=1"]
        cfg_args = {"overrides": overrides}
        load_token_config(CONFIG, overrides)  # every setting checked before anything trains
        out.mkdir(parents=True, exist_ok=True)
        presets = miniature_presets(out / "miniature_presets.toml")
        t0 = time.perf_counter()
        plan = _plan(cfg_args, out, a.budget_minutes, a.train_steps, max_steps, echo)
        trained = _train_tokens(cfg_args, out, plan, echo)
        train_seconds = time.perf_counter() - t0
        pipe = DreamPainterPipeline.from_pretrained(base, dreampainter_weights=weights)
        tokens = {s: load_learned_token(trained[s]["token_file"]) for s in TOKENS}
        tokens["token_init"] = init_token(pipe.tokenizer, pipe.text_encoder, tokens["token_cba"].token,
                                          init_word="background")
        features = token_feature_spread(pipe, {k: tokens[k] for k in ("token_init", "token_diffusion", "token_cba")})
        t1 = time.perf_counter()
        rows, sheet = evaluate_token(pipe, samples, out, tokens=tokens, steps=steps, guidance=guidance, seed=a.seed,
                                     presets=presets, echo=echo)
        report = {"base": str(base), "weights": weights, "manifest": str(a.manifest),
                  "test_manifest": str(test_manifest), "scenes": len(samples), "sampling": {"steps": steps,
                                                                                             "guidance": guidance},
                  "plan": plan, "trained": trained, "train_seconds": round(train_seconds, 1),
                  "generate_seconds": round(time.perf_counter() - t1, 1), "settings": list(SETTINGS),
                  "typical_looks": {k: {"walls": list(v["walls"]), "stand": list(v["stand"])}
                                    for k, v in TYPICAL_LOOKS.items()},
                  "reference": _reference_rates(Path(a.manifest)), "token_features": features,
                  "summary": _summary(rows), "paired": _paired(rows), "rows": rows}
        atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float) + "\n")
        atomic_write_text(out / "table.md", _table(report))
        save_grid(sheet, out / "samples.png", cell=max(64, a.size))
    except (DreamPainterError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    echo(f"done: tokens trained in {train_seconds:.0f} s, {len(samples)} scenes x {len(SETTINGS)} settings generated "
         f"in {report['generate_seconds']:.0f} s: {out / 'report.json'}")
    print(_table(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
