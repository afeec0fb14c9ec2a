"""Paired comparison of two train.evaluate reports on the same scenes and seeds.

    python -m train.compare A.json B.json [--mode tr2i] [--metrics wall_tone,pattern_patterned ...] [--json OUT]

For each metric, the items (scenes, matched by id) that both reports measured in `--mode` are
paired and the mean of B - A is given with a 95% percentile-bootstrap interval
(train.metrics.paired_difference): an experiment arm against its baseline, a setting on against
off. Both reports must come from the same seed, steps and guidance, or the pairing would compare
different noise; that is checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dreampainter_core.fileio import atomic_write_text

from . import metrics as M
from .evaluate import BOOLEAN, NUMERIC

DEFAULT_METRICS = ("object_consistency", "mask_recall", "product_psnr_raw", "background_color", "table_color",
                   "prompt_adherence", "pattern_patterned", "wall_tone", "reference_similarity", "quality",
                   "grid_energy", "stand_iou")
MUST_AGREE = ("seed", "steps", "guidance_scale")


def compare(a: dict, b: dict, mode: str, metrics=DEFAULT_METRICS, seed: int = 0) -> dict[str, Any]:
    """{metric: {"a": mean, "b": mean, **paired_difference}} over the items both measured in `mode`."""
    differ = [k for k in MUST_AGREE if a.get(k) != b.get(k)]
    if differ:
        raise ValueError("the reports were not made alike (" + ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in differ)
                         + "): a paired comparison needs the same scenes, seeds and sampler")
    rows = []
    for name, rep in (("A", a), ("B", b)):
        if mode not in rep.get("modes", {}):
            raise ValueError(f"report {name} has no mode {mode!r} (it has {sorted(rep.get('modes', {}))})")
        rows.append({r["id"]: r for r in rep["modes"][mode]["samples"]})
    ids = [i for i in rows[0] if i in rows[1]]
    out: dict[str, Any] = {"mode": mode, "n_items": len(ids)}
    for k in metrics:
        if k not in NUMERIC + BOOLEAN:
            raise ValueError(f"unknown metric {k!r}; known: {', '.join(NUMERIC + BOOLEAN)}")
        va, vb = [rows[0][i].get(k) for i in ids], [rows[1][i].get(k) for i in ids]
        paired = M.paired_difference(va, vb, seed=seed)
        if paired is not None:
            used = [(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
            out[k] = {"a": sum(float(x) for x, _ in used) / len(used), "b": sum(float(y) for _, y in used) / len(used),
                      **paired}
    return out


def format_table(result: dict) -> str:
    lines = [f"mode {result['mode']}, {result['n_items']} paired items: B - A, mean [95% CI]"]
    for k, v in result.items():
        if isinstance(v, dict):
            lo, hi = v["ci"]
            lines.append(f"  {k:22s} A {v['a']:.4g}  B {v['b']:.4g}  {v['mean_difference']:+.4g} [{lo:+.4g}, {hi:+.4g}]"
                         f"  (n {v['n']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="baseline report (train.evaluate JSON)")
    p.add_argument("b", help="the other report")
    p.add_argument("--mode", default="tr2i", help="t2i, tr2i or vae (default tr2i)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    p.add_argument("--json", default=None, help="also write the comparison here")
    a = p.parse_args(argv)
    try:
        reports = [json.loads(Path(x).read_text(encoding="utf-8")) for x in (a.a, a.b)]
        result = compare(*reports, mode=a.mode, metrics=tuple(m for m in a.metrics.split(",") if m))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["a"], result["b"] = a.a, a.b
    print(format_table(result))
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
