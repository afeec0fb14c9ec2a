"""How the product is held, compared on the same held-out scenes: the base model alone (T2I +
paste-back, and the training-free mode with and without a reference) against DreamPainter
stage 1 and stage 2. One train.evaluate report per configuration, then one table.

    python -m train.modes_table --data runs/modes/data --out docs/miniature/modes
        [--model models/diffusers/dreampainter-miniature]
        [--weights models/dreampainter/dreampainter_miniature.safetensors] [--limit 400]

--data is a train.synthetic folder; its test split is drawn there first when it is missing
(the same scenes the miniature recipe holds out: scene i depends only on the seed and i).
Each configuration's report is written atomically and skipped when it exists, so an
interrupted comparison continues where it stopped. table.md is written last: the mean of each
metric per configuration, and paired differences (same scenes, same seeds, 95% bootstrap
interval) against T2I + paste-back for the product metrics and against the same
configuration's T2I for the wall tone (the part of the look only the reference carries).

"Stage 1" is the stage-2 file at lora_scale 0, which is exactly its stage-1 model (stage 2
trains only the LoRA; method.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics as M
from . import evaluate as E
from dreampainter_core.fileio import atomic_write_text

DEFAULT_MODEL = "models/diffusers/dreampainter-miniature"
DEFAULT_WEIGHTS = "models/dreampainter/dreampainter_miniature.safetensors"


@dataclass(frozen=True)
class Configuration:
    name: str
    label: str
    stage: int  # 0: the base alone, no DreamPainter file
    args: tuple[str, ...] = field(default=())


CONFIGURATIONS = (
    Configuration("base_t2i_paste", "base alone: T2I + paste-back (before)", 0,
                  ("--mode", "dreampainter", "--reference-mode", "none")),
    Configuration("base_training_free", "base alone: training-free (reference: init)", 0,
                  ("--mode", "training_free", "--training-free-reference", "init")),
    Configuration("base_in_context", "base alone: training-free (reference: in_context)", 0,
                  ("--mode", "training_free", "--training-free-reference", "in_context", "--reference-mode",
                   "manifest")),
    Configuration("stage1", "DreamPainter stage 1", 1, ("--mode", "dreampainter", "--reference-mode", "none",
                                                        "--lora-scale", "0")),
    Configuration("stage2", "DreamPainter stage 2", 2, ("--mode", "dreampainter",)),
)
BASELINE = "base_t2i_paste"
COLUMNS = (("object_consistency", "consistency"), ("mask_recall", "mask recall (raw)"),
           ("product_psnr_raw", "product PSNR raw (dB)"), ("seam_error", "seam error ↓"),
           ("background_color", "wall colour"), ("table_color", "stand colour"), ("wall_tone", "wall tone"),
           ("reference_similarity", "ref. similarity"), ("quality", "quality"))
VERSUS_BASELINE = ("mask_recall", "product_psnr_raw", "seam_error", "table_color", "quality")


def ensure_test_split(data: Path, count: int, size: int, seed: int) -> Path:
    manifest = data / "test.jsonl"
    if not manifest.is_file():
        from .synthetic import write_scenes

        write_scenes(data, count, size=size, seed=seed, only="test")
    return manifest


def measured_sampling_args(model: str) -> list[str]:
    """The DreamPainter file's sampler settings as the model was measured (its miniature.json, written by
    train.miniature): the stage rows sample as the README's main table and the demo do. [] without one."""
    path = Path(model) / "miniature.json"
    if not path.is_file():
        return []
    return E.sampling_args(json.loads(path.read_text(encoding="utf-8")).get("sampling", {}))


def run_configuration(cfg: Configuration, *, model: str, weights: str, manifest: Path, out: Path, limit: int,
                      steps: int, guidance: float) -> dict:
    report = out / f"{cfg.name}.json"
    if not report.is_file():  # train.evaluate writes it atomically: present means complete
        # A configuration's own arguments come last, so they win (stage 1 is lora_scale 0).
        measured = measured_sampling_args(model) if cfg.stage else []
        argv = ["--model", model, "--manifest", str(manifest), "--out", str(report), "--limit", str(limit),
                "--steps", str(steps), "--guidance", str(guidance), "--sheet", "8", "--plot", "pil", *measured,
                *cfg.args]
        if cfg.stage:
            argv += ["--weights", weights]
        print(f"[modes] {cfg.name}: python -m train.evaluate {' '.join(argv)}", file=sys.stderr)
        if E.main(argv) != 0:
            raise SystemExit(f"train.evaluate failed for {cfg.name}")
    return json.loads(report.read_text(encoding="utf-8"))


def _rows(report: dict, mode: str) -> dict[str, dict]:
    return {r["id"]: r for r in report["modes"].get(mode, {}).get("samples", [])}


def _paired(a: dict[str, dict], b: dict[str, dict], key: str) -> str:
    ids = [i for i in a if i in b]
    p = M.paired_difference([a[i].get(key) for i in ids], [b[i].get(key) for i in ids])
    if p is None:
        return "-"
    lo, hi = p["ci"]
    return f"{p['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def make_table(reports: dict[str, dict]) -> str:
    head = "| configuration | mode | n | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for cfg in CONFIGURATIONS:
        rep = reports.get(cfg.name)
        if rep is None:
            continue
        for mode, body in rep["modes"].items():
            s = body["summary"]
            cells = [E._fmt(s.get(k)) for k, _ in COLUMNS]
            lines.append(f"| {cfg.label} | {mode.upper()} | {s['n']} | " + " | ".join(cells) + " |")
    base = _rows(reports[BASELINE], "t2i") if BASELINE in reports else {}
    lines += ["", "Paired differences on the same scenes and seeds (mean, 95% bootstrap interval):", "",
              "| configuration | mode | vs T2I + paste-back: " + " | ".join(VERSUS_BASELINE) +
              " | wall tone vs its own T2I |", "|" + "---|" * (3 + len(VERSUS_BASELINE))]
    for cfg in CONFIGURATIONS:
        rep = reports.get(cfg.name)
        if rep is None or cfg.name == BASELINE:
            continue
        own_t2i = _rows(rep, "t2i")
        for mode in rep["modes"]:
            rows = _rows(rep, mode)
            cells = [_paired(base, rows, k) if base else "-" for k in VERSUS_BASELINE]
            tone = _paired(own_t2i, rows, "wall_tone") if mode == "tr2i" and own_t2i else "-"
            lines.append(f"| {cfg.label} | {mode.upper()} | " + " | ".join(cells) + f" | {tone} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.modes_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="train.synthetic folder (its test split is drawn when missing)")
    p.add_argument("--out", required=True, help="folder for one report per configuration and table.md")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base folder (diffusers layout)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="stage-2 DreamPainter file")
    p.add_argument("--only", action="append", choices=[c.name for c in CONFIGURATIONS], default=None,
                   help="run just these configurations (repeatable); the table uses every report present")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5, help="the miniature's (configs/miniature/recipe.toml)")
    p.add_argument("--count", type=int, default=4000, help="scenes of the synthetic set (its test split is used)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = ensure_test_split(Path(a.data), a.count, a.size, a.seed)
    reports = {}
    for cfg in CONFIGURATIONS:
        if a.only is None or cfg.name in a.only:
            reports[cfg.name] = run_configuration(cfg, model=a.model, weights=a.weights, manifest=manifest, out=out,
                                                  limit=a.limit, steps=a.steps, guidance=a.guidance)
        elif (out / f"{cfg.name}.json").is_file():
            reports[cfg.name] = json.loads((out / f"{cfg.name}.json").read_text(encoding="utf-8"))
    table = make_table(reports)
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
