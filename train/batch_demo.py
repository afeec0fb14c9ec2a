"""The batch command's evidence on the embedded miniature, end to end, as a user runs it.

    python -m train.batch_demo --out runs/batch_demo [--docs docs/batch]

A 12-product catalog (10 synthetic catalog shots, one unreadable photo, one empty mask) in
2 formats x 2 seeds:
1. a straight run: 10 done (40 images), 2 failed with their reasons, exit code 1;
2. the same command again: everything skipped, every file byte-identical, and its time against
   the first run's;
3. a run killed with SIGKILL at 3 random moments and resumed each time: the final files are
   byte-identical to the straight run's, and after each kill every output file is complete;
4. torchrun with 2 CPU processes (gloo): byte-identical to 1 process, each item once in the report;
5. reproduce of one PNG from its own recipe: identical pixels;
6. the gallery opened in headless Chromium: a screenshot.
Writes DOCS/demo.json (every number) and DOCS/gallery.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_catalog(root: Path, count: int = 10, seed: int = 7) -> Path:
    """Catalog shots: each synthetic scene's product on a white backdrop, its mask, its prompt."""
    from train.synthetic import make_scene, scene_prompt

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene, rendered, _ = make_scene(seed, i)
        shot = np.where(rendered["mask"][..., None], rendered["image"], 255).astype(np.uint8)
        Image.fromarray(shot).save(root / f"p{i:02d}.png")
        Image.fromarray(rendered["mask"].astype(np.uint8) * 255).save(root / f"p{i:02d}_mask.png")
        # This product, with another scene's stand and wall: a new background for the same product.
        prompt = scene_prompt(dict(make_scene(seed, 1000 + i)[0], product=scene["product"]))[0]
        lines.append({"id": f"sku-{i:02d}", "image": f"p{i:02d}.png", "mask": f"p{i:02d}_mask.png", "prompt": prompt})
    (root / "unreadable.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated upload")
    Image.new("L", (128, 128), 0).save(root / "empty_mask.png")
    lines.insert(3, {"id": "sku-unreadable", "image": "unreadable.png", "mask": "p00_mask.png", "prompt": lines[0]["prompt"]})
    lines.insert(7, {"id": "sku-empty-mask", "image": "p01.png", "mask": "empty_mask.png", "prompt": lines[1]["prompt"]})
    manifest = root / "products.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*_*.png"))}


def complete(out: Path) -> tuple[int, int]:
    """(output files that open as whole PNGs with a recipe, files that do not) under out."""
    good = bad = 0
    for p in out.glob("*/*_*.png"):
        try:
            with Image.open(p) as im:
                im.load()
                good += "dreampainter" in im.text
        except OSError:
            bad += 1
    return good, bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/batch_demo")
    p.add_argument("--docs", default=None, help="where demo.json and gallery.png go (e.g. docs/batch)")
    p.add_argument("--seed", type=int, default=0, help="for the kill moments")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    manifest = make_catalog(out / "catalog")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "dreampainter_core.batch", "--manifest", str(manifest), "--formats", "1:1,4:5",
            "--seeds", "0,1", "--dtype", "fp32"]
    result: dict = {"command": " ".join(base[1:]) + " --out DIR"}

    def run(target: Path, extra=()):
        t0 = time.perf_counter()
        done = subprocess.run([*base, "--out", str(target), *extra], env=env, capture_output=True, text=True)
        return done, time.perf_counter() - t0

    straight = out / "straight"
    done, seconds = run(straight)
    report = json.loads((straight / "report.json").read_text())
    reference = outputs(straight)
    result["straight"] = {"exit": done.returncode, "seconds": round(seconds, 1), "counts": report["counts"],
                          "images": len(reference),
                          "failed": {k: v["reason"] for k, v in report["items"].items() if v["status"] == "failed"}}
    print(json.dumps(result["straight"], indent=1))

    done, again = run(straight)
    report = json.loads((straight / "report.json").read_text())
    result["rerun"] = {"exit": done.returncode, "seconds": round(again, 1), "share_of_first": round(again / seconds, 3),
                       "counts": report["counts"], "byte_identical": outputs(straight) == reference}
    print(json.dumps(result["rerun"], indent=1))

    # Each kill falls while work is left: after a random number of new outputs (1 .. what is left
    # minus 1), plus a random fraction of a second, so it lands anywhere in an image's work.
    killed, rng, kills = out / "killed", random.Random(a.seed), []
    for _ in range(3):
        have = complete(killed)[0] if killed.exists() else 0
        target = have + rng.randint(1, max(1, len(reference) - have - 1))
        proc = subprocess.Popen([*base, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.perf_counter()
        while proc.poll() is None and (complete(killed)[0] if killed.exists() else 0) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        good, bad = complete(killed)
        kills.append({"after_s": round(time.perf_counter() - t0, 1), "outputs_before": have, "whole_outputs": good,
                      "broken_outputs": bad, "temp_files_left": len(list(killed.rglob("*.tmp")))})
    done, _ = run(killed)
    result["killed"] = {"kills": kills, "final_exit": done.returncode, "byte_identical": outputs(killed) == reference,
                        "temp_files_left": len(list(killed.rglob("*.tmp")))}
    print(json.dumps(result["killed"], indent=1))

    # CPU float sums depend on the thread count (as on GPU they depend on the card), so torchrun's
    # ranks (1 thread each, torchrun's default) are compared with one process at 1 thread.
    one_thread = {**env, "OMP_NUM_THREADS": "1"}
    one = out / "one_process_1_thread"
    subprocess.run([*base, "--out", str(one)], env=one_thread, capture_output=True, text=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    two = out / "torchrun"
    t0 = time.perf_counter()
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", *base[2:], "--out", str(two)], env=one_thread,
                          capture_output=True, text=True)
    report = json.loads((two / "report.json").read_text())
    result["torchrun_2"] = {"exit": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                            "byte_identical_to_1_process": outputs(two) == outputs(one) and len(outputs(one)) == 40,
                            "byte_identical_to_2_threads": outputs(two) == reference, "items_in_report": len(report["items"]),
                            "counts": report["counts"]}
    print(json.dumps(result["torchrun_2"], indent=1))

    chosen = straight / "sku-04" / "4x5_1.png"
    done = subprocess.run([sys.executable, "-m", "dreampainter_core.batch", "reproduce", str(chosen), "--out",
                           str(out / "remade.png"), "--dtype", "fp32"], env=env, capture_output=True, text=True)
    result["reproduce"] = {"file": "sku-04/4x5_1.png", "exit": done.returncode, "says": done.stdout.strip()[-60:]}
    print(json.dumps(result["reproduce"], indent=1))

    if a.docs:
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chromium:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--screenshot={docs / 'gallery.png'}", "--window-size=1280,1500",
                            (straight / "index.html").resolve().as_uri()], capture_output=True, timeout=120)
        (docs / "demo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
