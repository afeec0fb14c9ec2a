"""A whole catalog in one command: every product x format x seed, resumable.

    python -m dreampainter_core.batch --manifest products.jsonl --out DIR
        [--base CogView4-6B/ [--weights dp.safetensors]] [--formats 1:1,4:5] [--seeds 0,1]
        [--steps N] [--cfg G] [--mode auto] [--box-ratio 0.6] [--resolution 1024]
    python -m dreampainter_core.batch check --manifest products.jsonl
    python -m dreampainter_core.batch reproduce DIR/<id>/<format>_<seed>.png [--out copy.png]

Without --base it runs on the embedded miniature model (at its own 128 px scale).

Manifest: one JSON object per line (paths relative to the manifest):

    {"id": "sku-001", "image": "photos/001.png", "mask": "masks/001.png",
     "prompt": "a perfume bottle on white marble, soft light",
     "reference": "refs/marble.jpg", "seeds": [0, 1], "steps": 30}

- ``id`` (letters, digits, ``-_.``) and ``image`` are required; ``mask`` too for now (the
  auto mask for photos without one is not wired into the batch yet).
- the prompt: ``prompt`` or ``prompt_zh`` (both: the English one is used), or ``name`` with
  an optional ``category`` and ``style`` for ``dreampainter_core.prompts.build_prompt``.
- optional: ``reference``, ``negative_prompt``, ``seeds``, ``formats``, and per-item
  overrides of ``steps``, ``cfg``, ``shift``, ``lora_scale``, ``attention_scale``,
  ``harmonize``, ``reference_strength``, ``mode``, ``box_ratio``.

Formats (``FORMATS``): named canvases at 1024 px scale, scaled by ``--resolution`` and snapped to
the model's size rule; the product is centred in a box of ``box_ratio`` of the canvas.

Outputs: ``DIR/<id>/<format>_<seed>.png``, written atomically, each with its recipe in a PNG
text chunk (``dreampainter``: prompt, seed, every setting, the input and model fingerprints),
so ``reproduce`` remakes it, and ``DIR/report.json`` (per item: done, skipped or failed with the
reason and seconds; rewritten after every item). A rerun skips every output whose recipe hash is
unchanged, so a changed setting regenerates only what it affects, and a killed run loses at most
the image in progress. A broken item is recorded and the run goes on; the exit code is 0 only
when every item succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .errors import DreamPainterError, InputError
from .fileio import atomic_path, atomic_write_text

#: name -> (width, height) at 1024 px scale; every side divisible by 32 (CogView4's rule).
FORMATS = {"1:1": (1024, 1024), "4:5": (864, 1088), "3:4": (768, 1024), "16:9": (1344, 768), "9:16": (768, 1344)}
RECIPE_KEY = "dreampainter"
RECIPE_VERSION = 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OVERRIDES = {"steps": int, "cfg": float, "shift": float, "lora_scale": float, "attention_scale": float,
             "harmonize": float, "reference_strength": float, "mode": str, "box_ratio": float}
KNOWN_KEYS = {"id", "image", "mask", "prompt", "prompt_zh", "name", "category", "style", "reference",
              "negative_prompt", "seeds", "formats", *OVERRIDES}


class BatchManifestError(DreamPainterError, ValueError):
    """The batch manifest has problems; ``problems`` lists ``(line, reason)``."""

    def __init__(self, path, problems: list[tuple[int, str]]):
        self.problems = problems
        lines = "\n".join(f"  line {n}: {reason}" for n, reason in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}{more}")


@dataclass
class Item:
    line: int
    id: str
    image: Path
    mask: Path | None
    prompt: str
    negative_prompt: str
    reference: Path | None
    seeds: list[int] | None
    formats: list[str] | None
    overrides: dict[str, Any] = field(default_factory=dict)


def _item(line: int, rec: Any, root: Path, known_formats) -> tuple[Item | None, list[str]]:
    from .prompts import PromptConfigError, build_prompt

    if not isinstance(rec, dict):
        return None, ["expected a JSON object"]
    problems = []
    unknown = sorted(set(rec) - KNOWN_KEYS)
    if unknown:
        problems.append(f"unknown key(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    sid = rec.get("id")
    if not isinstance(sid, str) or not ID_PATTERN.match(sid):
        problems.append(f"id {sid!r}: give 1-100 letters, digits, '-', '_' or '.' (it names the output folder)")
    paths = {}
    for key in ("image", "mask", "reference"):
        value = rec.get(key)
        if value is None:
            if key == "image":
                problems.append("missing 'image' (the product photo)")
            if key == "mask":
                problems.append("missing 'mask': the batch needs a mask per product (white = product) for now")
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"{key} must be a path, got {value!r}")
            continue
        paths[key] = (root / value) if not Path(value).is_absolute() else Path(value)
        if not paths[key].is_file():
            problems.append(f"{key} {value}: file not found")
    prompt = rec.get("prompt") or rec.get("prompt_zh")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(f"prompt must be a string, got {prompt!r}")
    elif not prompt:
        if rec.get("name"):
            try:
                prompt = build_prompt(rec["name"], rec.get("category"), "en", rec.get("style"),
                                      seed=int(hashlib.sha256(str(sid).encode()).hexdigest()[:8], 16))
            except PromptConfigError as e:
                problems.append(str(e))
        else:
            problems.append("no prompt: give 'prompt' (or 'prompt_zh'), or 'name' (+ 'category') for the prompt builder")
    seeds = rec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds)):
        problems.append(f"seeds must be a non-empty list of integers in 0..2^63-1, got {seeds!r}")
    formats = rec.get("formats")
    if formats is not None and not (isinstance(formats, list) and formats and all(f in known_formats for f in formats)):
        problems.append(f"formats must be a list of {sorted(known_formats)}, got {formats!r}")
    overrides = {}
    for key, kind in OVERRIDES.items():
        if key in rec:
            value = rec[key]
            ok = isinstance(value, str) if kind is str else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer()))
            if not ok:
                problems.append(f"{key} must be {'a string' if kind is str else 'a number'}, got {value!r}")
            else:
                overrides[key] = kind(value)
    negative = rec.get("negative_prompt", "")
    if not isinstance(negative, str):
        problems.append(f"negative_prompt must be a string, got {negative!r}")
    if problems:
        return None, problems
    return Item(line, sid, paths["image"], paths.get("mask"), prompt, negative, paths.get("reference"), seeds, formats,
                overrides), []


def read_batch_manifest(path, known_formats=FORMATS) -> list[Item]:
    """Every line checked (paths, prompt, seeds, overrides, duplicate ids) before any model loads."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    items, problems, seen = [], [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append((n, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        item, errs = _item(n, rec, path.parent, known_formats)
        problems += [(n, e) for e in errs]
        sid = rec.get("id") if isinstance(rec, dict) else None
        if isinstance(sid, str):
            if sid in seen:
                problems.append((n, f"id {sid!r} already used on line {seen[sid]}"))
            seen.setdefault(sid, n)
        if item is not None:
            items.append(item)
    if problems:
        raise BatchManifestError(path, problems)
    if not items:
        raise InputError(f"{path}: no products in the manifest")
    return items


def canvas_size(name: str, resolution: int, multiple: int, formats=FORMATS) -> tuple[int, int]:
    width, height = formats[name]
    snap = lambda v: max(multiple, round(v * resolution / 1024 / multiple) * multiple)  # noqa: E731
    return snap(width), snap(height)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(base: Path, weights: Path | None) -> str:
    """Configs and weight-file sizes of the base (hashing 20 GB on every run would cost minutes),
    and the DreamPainter file's full hash."""
    h = hashlib.sha256()
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".txt", ".model"):
            h.update(p.relative_to(base).as_posix().encode() + file_digest(p).encode())
        elif p.is_file() and p.suffix == ".safetensors":
            h.update(p.relative_to(base).as_posix().encode() + str(p.stat().st_size).encode())
    if weights is not None:
        h.update(file_digest(weights).encode())
    return h.hexdigest()[:16]


def read_recipe(png: Path) -> dict | None:
    try:
        with Image.open(png) as im:
            text = im.text.get(RECIPE_KEY) if hasattr(im, "text") else None
    except (OSError, ValueError):
        return None  # unreadable (a file from something else): regenerate it
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def write_png(image: torch.Tensor, path: Path, recipe: dict) -> None:
    array = (image.clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)


class Batch:
    def __init__(self, pipe, *, base: Path, weights: Path | None, resolution: int, defaults: dict, echo=print):
        self.pipe, self.echo = pipe, echo
        self.resolution, self.defaults = resolution, defaults
        self.model = {"base": str(base), "weights": None if weights is None else str(weights),
                      "fingerprint": model_fingerprint(base, weights)}
        self._embeds: dict[str, torch.Tensor] = {}

    def embeds(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeds:  # once per distinct prompt
            self._embeds[prompt] = self.pipe.encode_prompt([prompt])
        return self._embeds[prompt]

    def recipe(self, item: Item, fmt: str, seed: int) -> dict:
        settings = {**self.defaults, **item.overrides}
        width, height = canvas_size(fmt, self.resolution, self.pipe.size_rule.multiple)
        inputs = {k: None if p is None else {"path": str(p), "sha256": file_digest(p)}
                  for k, p in (("image", item.image), ("mask", item.mask), ("reference", item.reference))}
        recipe = {"version": RECIPE_VERSION, "id": item.id, "format": fmt, "width": width, "height": height,
                  "seed": seed, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
                  "settings": settings, "inputs": inputs, "model": self.model}
        recipe["hash"] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return recipe

    def render(self, recipe: dict) -> torch.Tensor:
        from .generate import load_image, load_mask
        from .options import ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions

        s, inputs = recipe["settings"], recipe["inputs"]
        reference = inputs["reference"]
        request = self.pipe.prepare(
            load_image(inputs["image"]["path"]), load_mask(inputs["mask"]["path"]),
            width=recipe["width"], height=recipe["height"],
            sampling=SamplingOptions(steps=s["steps"], guidance_scale=s["cfg"], shift=s.get("shift"),
                                     seed=recipe["seed"]),
            reference=ReferenceOptions(image=None if reference is None else load_image(reference["path"]),
                                       lora_scale=s["lora_scale"], attention_scale=s["attention_scale"],
                                       strength=s["reference_strength"]),
            control=ControlOptions(mode=s["mode"], harmonize=s["harmonize"]),
            output=OutputOptions(placement="center", box_ratio=(s["box_ratio"], s["box_ratio"])),
        )
        negative = self.embeds(recipe["negative_prompt"]) if request.sampling.uses_cfg else None
        return self.pipe.generate(request, self.embeds(recipe["prompt"]), negative).images[0]

    def run(self, items: list[Item], out: Path, formats: list[str], seeds: list[int]) -> dict:
        report = {"items": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        todo = sum(len(i.formats or formats) * len(i.seeds or seeds) for i in items)
        done = 0
        for item in items:
            t0, entry = time.perf_counter(), {"line": item.line, "outputs": [], "made": 0, "skipped": 0}
            try:
                for fmt in item.formats or formats:
                    for seed in item.seeds or seeds:
                        path = out / item.id / f"{fmt.replace(':', 'x')}_{seed}.png"
                        recipe = self.recipe(item, fmt, seed)
                        old = read_recipe(path) if path.is_file() else None
                        if old is not None and old.get("hash") == recipe["hash"]:
                            entry["skipped"] += 1
                        else:
                            write_png(self.render(recipe), path, recipe)
                            entry["made"] += 1
                        entry["outputs"].append(str(path.relative_to(out)))
                        done += 1
                        self.echo(f"[batch] {done}/{todo} {item.id} {fmt} seed {seed}")
                entry["status"] = "done" if entry["made"] else "skipped"
            except (DreamPainterError, OSError, ValueError) as e:
                entry.update(status="failed", reason=str(e))
                self.echo(f"[batch] {item.id} (line {item.line}) failed: {e}")
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["items"][item.id] = entry
            atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        counts = {k: sum(1 for e in report["items"].values() if e["status"] == k) for k in ("done", "skipped", "failed")}
        report["counts"] = counts
        atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return report


def _load(base: str | None, weights: str | None, dtype: str, device: str):
    from .embedded import embedded_model
    from .pipeline import DreamPainterPipeline

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if base is None:
        model = embedded_model()
        base_path, weights_path = model.base, Path(weights) if weights else model.weights
        measured = model.sampling()
    else:
        base_path, weights_path, measured = Path(base), Path(weights) if weights else None, {}
    pipe = DreamPainterPipeline.from_pretrained(base_path, dreampainter_weights=weights_path, dtype=dtypes[dtype],
                                                device=device)
    return pipe, base_path, weights_path, measured


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("check", "reproduce") else "run"
    p = argparse.ArgumentParser(prog=f"python -m dreampainter_core.batch{'' if command == 'run' else ' ' + command}",
                                description=__doc__.split("\n\n")[0])
    if command == "reproduce":
        p.add_argument("png", help="an output of the batch")
        p.add_argument("--out", default=None, help="where to write the remade image (default: beside it, _remade)")
    else:
        p.add_argument("--manifest", required=True)
    if command == "run":
        p.add_argument("--out", required=True)
        p.add_argument("--formats", default="1:1", help=f"comma-separated, of {', '.join(FORMATS)} (default 1:1)")
        p.add_argument("--seeds", default="0", help="comma-separated seeds for items without their own")
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--cfg", type=float, default=None)
        p.add_argument("--mode", choices=("auto", "dreampainter", "training_free"), default="auto")
        p.add_argument("--box-ratio", type=float, default=0.6, help="the product's box, share of the canvas")
        p.add_argument("--resolution", type=int, default=None,
                       help="scale of the formats (1024 = as listed; default 1024, the embedded model 128)")
    if command != "check":
        p.add_argument("--base", default=None, help="CogView4 diffusers folder (default: the embedded miniature)")
        p.add_argument("--weights", default=None, help="DreamPainter file (optional)")
        p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        if command == "check":
            items = read_batch_manifest(a.manifest)
            print(f"{a.manifest}: {len(items)} products, all lines good")
            return 0
        if command == "reproduce":
            recipe = read_recipe(Path(a.png))
            if recipe is None:
                raise InputError(f"{a.png}: no DreamPainter recipe in this PNG (not made by the batch command?)")
            pipe, base, weights, _ = _load(a.base or recipe["model"]["base"], a.weights or recipe["model"]["weights"],
                                           a.dtype, a.device)
            batch = Batch(pipe, base=base, weights=weights, resolution=1024, defaults={}, echo=print)
            if batch.model["fingerprint"] != recipe["model"]["fingerprint"]:
                print("warning: the model files differ from the ones that made this image", file=sys.stderr)
            out = Path(a.out) if a.out else Path(a.png).with_name(Path(a.png).stem + "_remade.png")
            write_png(batch.render(recipe), out, recipe)
            same = np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(a.png)))
            print(f"wrote {out}: {'identical pixels' if same else 'pixels differ'}")
            return 0 if same else 1
        formats = [f.strip() for f in a.formats.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise InputError(f"--formats: unknown {bad}; known: {', '.join(FORMATS)}")
        try:
            seeds = [int(s) for s in a.seeds.split(",")]
        except ValueError:
            raise InputError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
        items = read_batch_manifest(a.manifest)  # every line checked before the model loads
        pipe, base, weights, measured = _load(a.base, a.weights, a.dtype, a.device)
        resolution = a.resolution or (1024 if a.base else int(measured.get("resolution", 128)))
        defaults = {"steps": a.steps or int(measured.get("steps", 30)),
                    "cfg": a.cfg if a.cfg is not None else float(measured.get("guidance", 3.5)),
                    "shift": None, "lora_scale": 1.0, "attention_scale": 1.0, "harmonize": 0.2,
                    "reference_strength": 0.8, "mode": a.mode, "box_ratio": a.box_ratio}
        batch = Batch(pipe, base=base, weights=weights, resolution=resolution, defaults=defaults)
        report = batch.run(items, Path(a.out), formats, seeds)
    except DreamPainterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = report["counts"]
    print(f"{c['done']} done, {c['skipped']} skipped (already made), {c['failed']} failed; {Path(a.out) / 'report.json'}")
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
