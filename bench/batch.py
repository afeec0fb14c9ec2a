#!/usr/bin/env python
"""Benchmark the catalog batch: images per second against batch size and format mix.

    python bench/batch.py [--products 4] [--seeds 4] [--batch-sizes 1 2 4]
                          [--mixes 1:1 1:1,4:5,16:9] [--repeats 2] [--base DIR --weights FILE]
                          [--device cpu|cuda] [--dtype fp32|bf16] [--json OUT]

Each variant (batch size x format mix) runs dreampainter_core.batch.Batch.run over the same
synthetic catalog (train.batch_demo's products) into a fresh folder, so every image is made.
All variants run in this process, taking turns within each repeat (load drift on a shared
machine hits all alike); the model is loaded fresh for each run and its load time is left out.
Printed per variant: images per second (median over repeats) and its ratio against the baseline
(batch 1, the first mix), and where the time went, as shares of the run:
  text    prompt encoding (each distinct prompt once per run)
  sample  the denoising loop (render minus decode)
  decode  the VAE decode (timed around pipe.decode)
  write   PNG encoding, fsync and rename
  other   the rest: reading and checking inputs, paste-back, contact sheets, the report.
Defaults to the embedded miniature, whose small tensors leave even a CPU underused at batch 1 (so
batching pays there too); at CogView4 scale a batch pays only where one image leaves the GPU idle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dreampainter_core.batch import Batch, _load, default_settings, read_batch_manifest  # noqa: E402
from train.batch_demo import make_catalog  # noqa: E402

PHASES = ("text", "sample", "decode", "write", "other")


def timed_loader(load):
    """load() with its pipe's decode timed; returns (loader, seconds dict, load seconds list)."""
    spent, loads = {"decode": 0.0}, []

    def loader():
        t0 = time.perf_counter()
        pipe = load()
        loads.append(time.perf_counter() - t0)
        decode = pipe.decode

        def timed_decode(latents):
            t1 = time.perf_counter()
            try:
                return decode(latents)
            finally:
                spent["decode"] += time.perf_counter() - t1

        pipe.decode = timed_decode
        return pipe

    return loader, spent, loads


def run_once(a, items, mix: list[str], batch_size: int, seeds: list[int], defaults: dict, resolution: int) -> dict:
    load, base, weights, _ = _load(a.base, a.weights, a.dtype, a.device)
    loader, spent, loads = timed_loader(load)
    out = Path(tempfile.mkdtemp(prefix="dp-bench-batch-"))
    try:
        batch = Batch(loader, base=base, weights=weights, resolution=resolution, defaults=defaults,
                      batch_size=batch_size, echo=lambda *_: None)
        t0 = time.perf_counter()
        report = batch.run(items, out, mix, seeds, out / "report.json")
        wall = time.perf_counter() - t0 - sum(loads)
        if report["counts"]["failed"]:
            raise SystemExit(f"bench: {report['counts']['failed']} items failed: "
                             f"{[e.get('reason') for e in report['items'].values() if e.get('reason')]}")
        images = sum(e["made"] for e in report["items"].values())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    t = batch.timings
    phases = {"text": t["text"], "sample": t["render"] - spent["decode"], "decode": spent["decode"],
              "write": t["write"]}
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return {"images": images, "seconds": wall, "phases": phases}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--products", type=int, default=4)
    p.add_argument("--seeds", type=int, default=4, help="images per product and format")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mixes", nargs="+", default=["1:1", "1:1,4:5,16:9"], help="comma-separated format lists")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="default: the model's measured setting")
    p.add_argument("--base", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dp-bench-catalog-"))
    try:
        items = read_batch_manifest(make_catalog(work, count=a.products))
        items = [i for i in items if i.id.startswith("sku-") and i.id[4:].isdigit()]  # the readable ones
        _, _, _, measured = _load(a.base, a.weights, a.dtype, a.device)
        resolution = 1024 if a.base else int(measured.get("resolution", 128))
        defaults = default_settings(measured, steps=a.steps)  # what the batch command would record
        seeds = list(range(a.seeds))
        variants = [(mix, bs) for mix in a.mixes for bs in a.batch_sizes]
        runs = {v: [] for v in variants}
        run_once(a, items[:1], ["1:1"], 1, [0], defaults, resolution)  # warm-up: kernels, thread pools, caches
        for _ in range(a.repeats):
            for mix, bs in variants:
                runs[(mix, bs)].append(run_once(a, items, mix.split(","), bs, seeds, defaults, resolution))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(rs):
        return statistics.median(r["images"] / r["seconds"] for r in rs)

    baseline = rate(runs[variants[0]])
    rows = []
    print(f"{len(items)} products x {a.seeds} seeds, {defaults['steps']} steps, {a.device} {a.dtype}, "
          f"{torch.get_num_threads()} threads; baseline: batch {variants[0][1]}, formats {variants[0][0]}")
    print(f"{'formats':<16}{'batch':>6}{'images':>8}{'img/s':>9}{'ratio':>7}  " + "  ".join(f"{k:>6}" for k in PHASES))
    for mix, bs in variants:
        rs = runs[(mix, bs)]
        total = sum(r["seconds"] for r in rs)
        shares = {k: sum(r["phases"][k] for r in rs) / total for k in PHASES}
        row = {"formats": mix, "batch_size": bs, "images": rs[0]["images"], "images_per_s": round(rate(rs), 4),
               "ratio": round(rate(rs) / baseline, 3), "shares": {k: round(v, 3) for k, v in shares.items()},
               "seconds": [round(r["seconds"], 2) for r in rs]}
        rows.append(row)
        print(f"{mix:<16}{bs:>6}{row['images']:>8}{row['images_per_s']:>9.3f}{row['ratio']:>7.2f}  "
              + "  ".join(f"{100 * shares[k]:>5.1f}%" for k in PHASES))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
                                            "steps": defaults["steps"], "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
