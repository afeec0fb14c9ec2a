"""Paired comparison of two train.evaluate reports on the same scenes and seeds.

    python -m train.compare A.json B.json [--mode tr2i] [--metrics wall_tone,pattern_patterned ...] [--json OUT]
    python -m train.compare A.json B.json --manifest test.jsonl --by product.shape     # per kind of scene
    python -m train.compare R.json R.json --mode-a vae --mode t2i     # one report's T2I against its VAE round trip

For each metric, the items (scenes, matched by id) that both reports measured in `--mode` are
paired and the mean of B - A is given with a 95% percentile-bootstrap interval
(train.metrics.paired_difference): an experiment arm against its baseline, a setting on against
off. Both reports must come from the same seed, steps and guidance, or the pairing would compare
different noise; that is checked. `--by FIELD` (a dotted path into each manifest line's synthetic
`scene`, e.g. product.shape, table.shape, background.pattern) repeats the comparison within each
group of scenes, to say where a setting helps or hurts. `--mode-a` takes A's items from another mode
than B's: with A = B, a mode against the VAE round trip (the ceiling) on the same scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dreampainter_core.fileio import atomic_write_text

from . import metrics as M
from .evaluate import BOOLEAN, NUMERIC, scene_value

DEFAULT_METRICS = ("object_consistency", "mask_recall", "product_psnr_raw", "background_color", "table_color",
                   "prompt_adherence", "pattern_patterned", "wall_tone", "reference_similarity", "quality",
                   "grid_energy", "grid_excess", "wall_unevenness", "wall_tone_mix", "stand_iou")
MUST_AGREE = ("seed", "steps", "guidance_scale")


def compare(a: dict, b: dict, mode: str, metrics=DEFAULT_METRICS, seed: int = 0, only=None,
            mode_a: str | None = None) -> dict[str, Any]:
    """{metric: {"a": mean, "b": mean, **paired_difference}} over the items both measured in `mode`
    (A in `mode_a` when given) and, given `only`, whose id is in it."""
    differ = [k for k in MUST_AGREE if a.get(k) != b.get(k)]
    if differ:
        raise ValueError("the reports were not made alike (" + ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in differ)
                         + "): a paired comparison needs the same scenes, seeds and sampler")
    rows = []
    for name, rep, m in (("A", a, mode_a or mode), ("B", b, mode)):
        if m not in rep.get("modes", {}):
            raise ValueError(f"report {name} has no mode {m!r} (it has {sorted(rep.get('modes', {}))})")
        rows.append({r["id"]: r for r in rep["modes"][m]["samples"]})
    ids = [i for i in rows[0] if i in rows[1] and (only is None or i in only)]
    out: dict[str, Any] = {"mode": mode, "n_items": len(ids)}
    if mode_a and mode_a != mode:
        out["mode_a"] = mode_a
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
    modes = f"B's mode {result['mode']} against A's {result['mode_a']}" if "mode_a" in result else f"mode {result['mode']}"
    lines = [f"{modes}, {result['n_items']} paired items: B - A, mean [95% CI]"]
    for k, v in result.items():
        if isinstance(v, dict):
            lo, hi = v["ci"]
            lines.append(f"  {k:22s} A {v['a']:.4g}  B {v['b']:.4g}  {v['mean_difference']:+.4g} [{lo:+.4g}, {hi:+.4g}]"
                         f"  (n {v['n']})")
    return "\n".join(lines)


def scene_groups(manifest: Path, field: str) -> dict[str, set[str]]:
    """{value of `field` in the line's scene: ids} for a train.synthetic manifest."""
    groups: dict[str, set[str]] = {}
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            try:
                value = scene_value(item.get("scene"), field)
            except KeyError:
                raise ValueError(f"{manifest} line {n}: its scene has no {field!r} (a synthetic manifest's "
                                 "scene fields are e.g. product.shape, table.shape, background.pattern)") from None
            groups.setdefault(str(value), set()).add(str(item["id"]))
    return groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="baseline report (train.evaluate JSON)")
    p.add_argument("b", help="the other report")
    p.add_argument("--mode", default="tr2i", help="t2i, tr2i or vae (default tr2i)")
    p.add_argument("--mode-a", default=None, help="A's mode, when not --mode (e.g. vae: against the round trip)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    p.add_argument("--json", default=None, help="also write the comparison here")
    p.add_argument("--manifest", default=None, help="the reports' manifest (for --by)")
    p.add_argument("--by", default=None, metavar="FIELD",
                   help="also compare within each value of this scene field, e.g. product.shape (needs --manifest)")
    a = p.parse_args(argv)
    if a.by and not a.manifest:
        print("error: --by needs --manifest (the manifest the reports were made from)", file=sys.stderr)
        return 2
    metrics = tuple(m for m in a.metrics.split(",") if m)
    try:
        reports = [json.loads(Path(x).read_text(encoding="utf-8")) for x in (a.a, a.b)]
        result = compare(*reports, mode=a.mode, metrics=metrics, mode_a=a.mode_a)
        groups = scene_groups(Path(a.manifest), a.by) if a.by else {}
        by = {value: compare(*reports, mode=a.mode, metrics=metrics, only=ids, mode_a=a.mode_a)
              for value, ids in sorted(groups.items())}
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["a"], result["b"] = a.a, a.b
    print(format_table(result))
    for value, sub in by.items():
        if sub["n_items"]:
            print(f"\n{a.by} = {value}: " + format_table(sub))
    if by:
        result["by"] = {"field": a.by, "groups": {v: sub for v, sub in by.items() if sub["n_items"]}}
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
