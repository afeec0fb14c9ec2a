"""A whole catalog in one command: every product x format x seed, resumable, on many processes.

    python -m dreampainter_core.batch --manifest products.jsonl --out DIR
        [--base CogView4-6B/ [--weights dp.safetensors]] [--formats 1:1,4:5] [--seeds 0,1]
        [--steps N] [--cfg G] [--mode auto] [--box-ratio 0.6] [--resolution 1024] [--batch-size 4]
    python -m dreampainter_core.batch --images photos/ --category cosmetics --out DIR ...
    python -m dreampainter_core.batch check --manifest products.jsonl
    python -m dreampainter_core.batch reproduce DIR/<id>/<format>_<seed>.png [--out copy.png]
    torchrun --nproc_per_node 8 -m dreampainter_core.batch --manifest products.jsonl --out DIR ...

Without --base it runs on the embedded miniature model (at its own 128 px scale).

Manifest: one JSON object per line (paths relative to the manifest):

    {"id": "sku-001", "image": "photos/001.png", "mask": "masks/001.png",
     "prompt": "a perfume bottle on white marble, soft light",
     "reference": "refs/marble.jpg", "seeds": [0, 1], "steps": 30}

- ``id`` (letters, digits, ``-_.``) and ``image`` are required. Without ``mask`` the auto mask
  (rembg, the Auto Mask node's adapter) makes a soft one, and the product's edge is
  colour-decontaminated at paste-back (``--decontaminate auto``).
- the prompt: ``prompt`` or ``prompt_zh`` (both: the English one is used), or ``name`` with
  an optional ``category`` and ``style`` for ``dreampainter_core.prompts.build_prompt``.
- optional: ``reference``, ``negative_prompt``, ``seeds``, ``formats``, and per-item
  overrides of ``steps``, ``cfg``, ``shift``, ``lora_scale``, ``attention_scale``, ``shield_product``,
  ``harmonize``, ``reference_strength``, ``mode``, ``box_ratio``, ``placement``.

Formats (``FORMATS``): named canvases at 1024 px scale, scaled by ``--resolution`` and snapped to
the model's size rule; ``--formats-file FILE.toml`` adds or replaces some (``[formats]`` with
``"2:3" = [832, 1248]``). The product is centred in a box of ``box_ratio`` of the canvas
(``--placement center``), or kept where the photo has it, the photo fitted to the canvas
(``--placement keep``).

Outputs: ``DIR/<id>/<format>_<seed>.png``, written atomically (fsynced, then renamed), each with
its recipe in a PNG text chunk (``dreampainter``: prompt, seed, every setting, the input and model
fingerprints, and the seeds it was batched with), so ``reproduce`` remakes it bit for bit;
``DIR/<id>/contact.png`` (product, mask, every output), ``DIR/index.html`` (the gallery) and
``DIR/report.json`` (per item: done, skipped or failed with the reason and seconds; rewritten
after every item). A rerun skips every output whose recipe hash is unchanged (without loading the
model when nothing is left), so a changed setting regenerates only what it affects, and a killed
run loses at most the batch in progress. A broken item is recorded and the run goes on; out of
memory at a batch > 1 is retried image by image; the exit code is 0 only when every item succeeded.

Speed: each distinct prompt is encoded once, before sampling, and the text encoder is then freed;
the seeds of one product and format are sampled together (``--batch-size``; each image's noise
comes from its own seed). Batching changes only the last bits of an image (float sums in another
order), so the resume key leaves it out and the recipe records the batch for ``reproduce``.

Many processes: under ``torchrun`` or ``accelerate launch`` (RANK / WORLD_SIZE), rank r takes
items r, r + N, ... of the manifest and loads its own pipeline on its own GPU; rank 0 waits for
the others (a gloo barrier) and merges the report and the gallery. Over many nodes ``DIR`` must be
a shared file system; without one see the README (Ray Data).
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
from .fileio import atomic_write_bytes, atomic_write_text, file_digest
from .options import MAX_BATCH
from .product import PLACEMENTS

#: name -> (width, height) at 1024 px scale; every side divisible by 32 (CogView4's rule).
FORMATS = {"1:1": (1024, 1024), "4:5": (864, 1088), "3:4": (768, 1024), "16:9": (1344, 768), "9:16": (768, 1344)}
RECIPE_KEY = "dreampainter"
RECIPE_VERSION = 2  # 2: the recipe records the format's canvas and the placement
FORMAT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,31}$")  # it names output files (':' -> 'x')
FORMAT_SIDES = (64, 4096)  # at 1024 px scale
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OVERRIDES = {"steps": int, "cfg": float, "shift": float, "lora_scale": float, "attention_scale": float,
             "shield_product": bool, "harmonize": float, "reference_strength": float, "mode": str, "box_ratio": float,
             "placement": str}  # shield_product only where given: recipes without it keep their hashes
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
    from .prompts import PromptConfigError, build_prompt, prompt_problem

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
            continue  # no mask: the auto mask makes one
        if not isinstance(value, str) or not value:
            problems.append(f"{key} must be a path, got {value!r}")
            continue
        paths[key] = (root / value) if not Path(value).is_absolute() else Path(value)
        if not paths[key].is_file():
            problems.append(f"{key} {value}: file not found")
    prompt = rec.get("prompt") or rec.get("prompt_zh")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(f"prompt must be a string, got {prompt!r}")
    elif isinstance(prompt, str) and not prompt.strip():
        problems.append("prompt is blank: describe the background to paint")
    elif isinstance(prompt, str) and prompt_problem(prompt):
        problems.append(f"prompt {prompt_problem(prompt)}")
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
            ok = isinstance(value, kind) if kind in (str, bool) else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer()))
            if not ok:
                wanted = {str: "a string", bool: "true or false"}.get(kind, "a number")
                problems.append(f"{key} must be {wanted}, got {value!r}")
            elif key == "placement" and value not in PLACEMENTS:
                problems.append(f"placement must be one of {', '.join(PLACEMENTS)}, got {value!r}")
            else:
                overrides[key] = kind(value)
    if overrides:
        try:  # the values, by the pipeline's own checks (ranges), against the pack's defaults
            settings_options({**default_settings({}), **overrides})
        except InputError as exc:
            problems.append(str(exc))
    negative = rec.get("negative_prompt", "")
    if prompt_problem(negative):
        problems.append(f"negative_prompt {prompt_problem(negative)}")
    if problems:
        return None, problems
    return Item(line, sid, paths["image"], paths.get("mask"), prompt, negative, paths.get("reference"), seeds, formats,
                overrides), []


def output_name(fmt: str, seed: int) -> str:
    """An output's file name inside its product's folder (':' is not allowed in Windows names)."""
    return f"{fmt.replace(':', 'x')}_{seed}.png"


def read_batch_manifest(path, known_formats=FORMATS) -> list[Item]:
    """Every line checked (paths, prompt, seeds, overrides, duplicate ids) before any model loads."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    return parse_manifest(text.splitlines(), path.parent, path, known_formats)


def parse_manifest(lines, root: Path, name, known_formats=FORMATS) -> list[Item]:
    """Manifest lines (paths relative to `root`) -> items, or BatchManifestError listing every problem."""
    items, problems, seen = [], [], {}
    for n, raw in enumerate(lines, 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append((n, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        item, errs = _item(n, rec, root, known_formats)
        problems += [(n, e) for e in errs]
        sid = rec.get("id") if isinstance(rec, dict) else None
        if isinstance(sid, str):
            if sid in seen:
                problems.append((n, f"id {sid!r} already used on line {seen[sid]}"))
            seen.setdefault(sid, n)
        if item is not None:
            items.append(item)
    if problems:
        raise BatchManifestError(name, problems)
    if not items:
        raise InputError(f"{name}: no products in the manifest")
    return items


def canvas_size(name: str, resolution: int, multiple: int, formats=FORMATS) -> tuple[int, int]:
    return snap_canvas(formats[name], resolution, multiple)


def snap_canvas(canvas, resolution: int, multiple: int) -> tuple[int, int]:
    """A canvas at 1024 px scale -> pixels at `resolution`, on the model's size rule."""
    width, height = canvas
    snap = lambda v: max(multiple, round(v * resolution / 1024 / multiple) * multiple)  # noqa: E731
    return snap(width), snap(height)


def load_formats(path=None) -> dict[str, tuple[int, int]]:
    """FORMATS, with a user's TOML file's ``[formats]`` added (a name already there is replaced)."""
    formats = dict(FORMATS)
    if path is None:
        return formats
    import tomllib

    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"--formats-file {path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:  # its message carries the line and column
        raise InputError(f"--formats-file {path}: not TOML ({e})") from None
    extra = table.get("formats")
    if not isinstance(extra, dict) or not extra:
        raise InputError(f"--formats-file {path}: expected a [formats] table, e.g. \"2:3\" = [832, 1248]")
    lo, hi = FORMAT_SIDES
    for name, size in extra.items():
        if not FORMAT_NAME.match(name):
            raise InputError(f"--formats-file {path}: format name {name!r}: give 1-32 letters, digits, ':', '.', "
                             "'_' or '-' (it names the output files)")
        if not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in size)):
            raise InputError(f"--formats-file {path}: format {name!r} = {size!r}: expected [width, height], "
                             f"integers {lo}..{hi} at 1024 px scale")
        formats[name] = (size[0], size[1])
    return formats


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


def png_bytes(image: torch.Tensor, recipe: dict) -> bytes:
    """The image [H, W, 3] (0..1) as PNG, its recipe in the text chunk."""
    array = (image.clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(image: torch.Tensor, path: Path, recipe: dict) -> None:
    atomic_write_bytes(path, png_bytes(image, recipe))  # fsynced, then renamed: never a partial file


def default_settings(measured: dict, **chosen) -> dict:
    """Every setting a recipe records: the model's measured sampling settings (the embedded
    miniature has them), the pack's defaults, then `chosen` (the command line's)."""
    settings = {"steps": int(measured.get("steps", 30)), "cfg": float(measured.get("guidance", 3.5)),
                "shift": None, "lora_scale": 1.0, "attention_scale": 1.0, "harmonize": 0.2,
                "reference_strength": 0.8, "mode": "auto", "box_ratio": 0.6, "placement": "center",
                "decontaminate": "auto", "auto_mask_model": "u2netp"}
    unknown = set(chosen) - set(settings)
    if unknown:
        raise InputError(f"unknown batch setting(s) {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({k: v for k, v in chosen.items() if v is not None})
    return settings


def settings_options(settings: dict, seeds=(0,), reference=None) -> dict:
    """A recipe's settings as the pipeline's option objects, each checking its values (InputError):
    what build_request runs with, and how the manifest and the command line are checked before any
    model loads."""
    from .options import ControlOptions, OutputOptions, ReferenceOptions, SamplingOptions

    s = settings
    return dict(
        sampling=SamplingOptions(steps=s["steps"], guidance_scale=s["cfg"], shift=s.get("shift"),
                                 seed=seeds[0], image_seeds=seeds),
        reference=ReferenceOptions(image=reference, lora_scale=s["lora_scale"],
                                   attention_scale=s["attention_scale"], strength=s["reference_strength"],
                                   shield_product=s.get("shield_product", False)),
        control=ControlOptions(mode=s["mode"], harmonize=s["harmonize"]),
        output=OutputOptions(placement=s.get("placement", "center"), box_ratio=(s["box_ratio"], s["box_ratio"]),
                             decontaminate=s.get("decontaminate", False)),
    )


def build_request(pipe, image, mask, reference, settings: dict, width: int, height: int, seeds: list[int]):
    """The pipeline request for one product at `seeds` (one batch) from a recipe's settings."""
    return pipe.prepare(image, mask, width=width, height=height, batch_size=len(seeds),
                        **settings_options(settings, seeds, reference))


@dataclass
class Job:
    """The images of one product in one format rendered together: seeds of one batch."""

    item: Item
    format: str
    seeds: list[int]
    paths: list[Path]
    recipes: list[dict]
    missing: list[int]  # indices into seeds whose file is absent or has another recipe hash


def recipe_hash(recipe: dict) -> str:
    """The resume key: everything that decides the picture (inputs, prompt, seed, settings, model);
    not the batch the image was rendered in, which only moves the last bits."""
    keyed = {k: v for k, v in recipe.items() if k not in ("hash", "width", "height", "batch")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class Batch:
    """Plans, renders and records one shard of a catalog. The pipeline is loaded on first need, so
    a rerun with nothing to make never loads the model."""

    def __init__(self, load_pipe, *, base: Path, weights: Path | None, resolution: int, defaults: dict,
                 batch_size: int = 1, echo=print, formats=FORMATS):
        self._load_pipe, self._pipe, self.echo, self.formats = load_pipe, None, echo, formats
        self.resolution, self.defaults, self.batch_size = resolution, defaults, max(1, int(batch_size))
        self.model = {"base": str(base), "weights": None if weights is None else str(weights),
                      "fingerprint": model_fingerprint(base, weights)}
        self._embeds: dict[str, torch.Tensor] = {}
        self._digests: dict[Path, str] = {}
        self.masks_used: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.timings = {"text": 0.0, "render": 0.0, "write": 0.0}

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._load_pipe()
        return self._pipe

    # ---- recipes --------------------------------------------------------------------------
    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def settings(self, item: Item) -> dict:
        settings = {"placement": "center", **self.defaults, **item.overrides}
        if item.mask is None:
            settings["auto_mask"] = settings.get("auto_mask_model", "u2netp")
        settings.pop("auto_mask_model", None)
        decontaminate = settings.pop("decontaminate", "auto")
        settings["decontaminate"] = item.mask is None if decontaminate == "auto" else bool(decontaminate)
        return settings

    def recipe(self, item: Item, fmt: str, seed: int) -> dict:
        inputs = {k: None if p is None else {"path": str(p), "sha256": self._digest(p)}
                  for k, p in (("image", item.image), ("mask", item.mask), ("reference", item.reference))}
        recipe = {"version": RECIPE_VERSION, "id": item.id, "format": fmt, "canvas": list(self.formats[fmt]),
                  "resolution": self.resolution, "seed": seed, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
                  "settings": self.settings(item), "inputs": inputs, "model": self.model}
        recipe["hash"] = recipe_hash(recipe)
        return recipe

    def plan(self, item: Item, formats: list[str], seeds: list[int], out: Path) -> list[Job]:
        """The item's jobs: per format, its seeds in chunks of batch_size. The chunks depend only on
        the seed list, so a resumed run renders each image in the same batch as a straight run."""
        jobs = []
        item_seeds = item.seeds or seeds
        for fmt in item.formats or formats:
            for start in range(0, len(item_seeds), self.batch_size):
                chunk = item_seeds[start:start + self.batch_size]
                paths = [out / item.id / output_name(fmt, seed) for seed in chunk]
                recipes = [self.recipe(item, fmt, seed) for seed in chunk]
                missing = [i for i, (path, r) in enumerate(zip(paths, recipes))
                           if (read_recipe(path) or {}).get("hash") != r["hash"]]
                jobs.append(Job(item, fmt, list(chunk), paths, recipes, missing))
        return jobs

    # ---- rendering ------------------------------------------------------------------------
    def encode_prompts(self, prompts) -> None:
        """Each distinct prompt once; then the text encoder is freed (the VAE and transformer stay)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if not todo:
            return
        t0 = time.perf_counter()
        for prompt in todo:
            self._embeds[prompt] = self.pipe.encode_prompt([prompt]).cpu()
        self.timings["text"] += time.perf_counter() - t0

    def free_text_encoder(self) -> None:
        import gc

        if self._pipe is not None and self._pipe.text_encoder is not None:
            self._pipe.text_encoder = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def embeds(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeds:
            if self.pipe.text_encoder is None:
                raise InputError(f"prompt {prompt[:60]!r} was not encoded before the text encoder was freed")
            self.encode_prompts([prompt])
        return self._embeds[prompt]

    def inputs(self, recipe: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The product photo, its mask (the auto mask's soft alpha when the item has none) and the
        reference, read from the recipe's paths and checked against their recorded hashes."""
        from .generate import load_image, load_mask
        from .images import check_product_and_mask

        for key, entry in recipe["inputs"].items():
            if entry is not None and self._digest(Path(entry["path"])) != entry["sha256"]:
                raise InputError(f"{key} {entry['path']} changed since the recipe was made (its sha256 differs)")
        def read(key, loader):
            path = recipe["inputs"][key]["path"]
            try:
                return loader(path)
            except OSError as e:  # PIL's own words ("Truncated File Read") do not say which file
                raise InputError(f"{key} {path}: not a readable image ({e})") from None

        image = read("image", load_image)
        if recipe["inputs"]["mask"] is not None:
            mask = read("mask", load_mask)
        else:
            mask = auto_mask_of(image, recipe["settings"]["auto_mask"])
        check_product_and_mask(image, mask)  # an empty or mismatched mask, before any model runs
        self.masks_used[recipe["id"]] = (image, mask)  # for the contact sheet
        reference = recipe["inputs"]["reference"]
        return image, mask, None if reference is None else read("reference", load_image)

    def render(self, recipe: dict, seeds: list[int]) -> torch.Tensor:
        """The images of `recipe` at each of `seeds`, rendered as one batch: [len(seeds), H, W, 3]."""
        image, mask, reference = self.inputs(recipe)
        if "width" in recipe:  # a written recipe (reproduce) says its size
            width, height = recipe["width"], recipe["height"]
        else:
            canvas = recipe.get("canvas") or FORMATS[recipe["format"]]  # version 1 recipes name a built-in one
            width, height = snap_canvas(canvas, recipe["resolution"], self.pipe.size_rule.multiple)
        request = build_request(self.pipe, image, mask, reference, recipe["settings"], width, height, seeds)
        negative = self.embeds(recipe["negative_prompt"]) if request.sampling.uses_cfg else None
        positive = self.embeds(recipe["prompt"])
        t0 = time.perf_counter()
        images = self.pipe.generate(request, positive, negative).images
        self.timings["render"] += time.perf_counter() - t0
        return images

    def _write(self, image: torch.Tensor, path: Path, recipe: dict, seeds: list[int], index: int) -> None:
        width, height = image.shape[1], image.shape[0]
        t0 = time.perf_counter()
        write_png(image, path, {**recipe, "width": width, "height": height, "batch": {"seeds": seeds, "index": index}})
        self.timings["write"] += time.perf_counter() - t0

    def run_job(self, job: Job, progress) -> None:
        """Render the job's batch and write the images it misses; out of memory at a batch > 1 is
        retried once image by image (and later jobs use a smaller batch)."""
        try:
            images = self.render(job.recipes[0], job.seeds)
        except Exception as exc:
            if not _out_of_memory(exc) or len(job.seeds) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.batch_size = max(1, len(job.seeds) // 2)
            progress.write(f"[batch] {job.item.id} {job.format}: out of memory at batch {len(job.seeds)}; retrying "
                           f"one image at a time (next jobs at batch {self.batch_size})")
            for i in job.missing:
                image = self.render(job.recipes[i], [job.seeds[i]])[0]
                self._write(image, job.paths[i], job.recipes[i], [job.seeds[i]], 0)
                progress.update(1)
            return
        for i in job.missing:
            self._write(images[i], job.paths[i], job.recipes[i], job.seeds, i)
            progress.update(1)

    # ---- one shard ------------------------------------------------------------------------
    def run(self, items: list[Item], out: Path, formats: list[str], seeds: list[int], report_path: Path,
            position: int = 0, desc: str = "batch") -> dict:
        from .gallery import write_contact_sheet

        report = {"items": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        plans = {}
        for item in items:
            for stale in (out / item.id).glob(".*.tmp"):  # a killed run's unfinished file: never an output
                stale.unlink(missing_ok=True)
            try:
                plans[item.id] = self.plan(item, formats, seeds, out)
            except OSError as e:  # an input vanished since the manifest check
                plans[item.id] = e
        for item in items:  # read and check the inputs of what is to be made before the model loads
            jobs = plans[item.id]
            if isinstance(jobs, list) and any(j.missing for j in jobs):
                try:
                    self.inputs(jobs[0].recipes[0])
                except (DreamPainterError, OSError, ValueError) as e:
                    plans[item.id] = e
                self.masks_used.pop(item.id, None)  # read again when rendered: a catalog does not fit in memory
        todo = sum(len(j.missing) for jobs in plans.values() if isinstance(jobs, list) for j in jobs)
        progress = make_progress(todo, position, desc)
        prompts = [p for item in items if isinstance(plans[item.id], list) and any(j.missing for j in plans[item.id])
                   for p in (item.prompt, item.negative_prompt)]
        self.encode_prompts(prompts)  # once per distinct prompt, up front ...
        self.free_text_encoder()  # ... so the 9B text encoder does not sit beside the DiT
        for item in items:
            t0, jobs, shown = time.perf_counter(), plans[item.id], progress.n
            entry = {"line": item.line, "outputs": [], "made": 0, "skipped": 0}
            try:
                if isinstance(jobs, Exception):
                    raise jobs
                for job in jobs:
                    if job.missing:
                        self.run_job(job, progress)
                    entry["made"] += len(job.missing)
                    entry["skipped"] += len(job.seeds) - len(job.missing)
                    entry["outputs"] += [str(p.relative_to(out)) for p in job.paths]
                if entry["made"] or not (out / item.id / "contact.png").is_file():
                    if item.id not in self.masks_used:
                        self.inputs(jobs[0].recipes[0])
                    write_contact_sheet(out, item, self.masks_used.pop(item.id), [p for job in jobs for p in job.paths])
                entry["status"] = "done" if entry["made"] else "skipped"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one broken product must not stop a catalog
                reason = str(e) if isinstance(e, (DreamPainterError, OSError)) else f"{type(e).__name__}: {e}"
                if _out_of_memory(e):
                    reason = f"out of memory, also one image at a time: {e}"
                entry.update(status="failed", reason=reason)
                if isinstance(jobs, list):  # the bar still counts the images this item will not make
                    progress.update(sum(len(j.missing) for j in jobs) - (progress.n - shown))
                self.masks_used.pop(item.id, None)
                progress.write(f"[batch] {item.id} (line {item.line}) failed: {reason}")
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["items"][item.id] = entry
            write_report(report_path, report)
        progress.close()
        return write_report(report_path, report)


def write_report(path: Path, report: dict) -> dict:
    report["counts"] = {k: sum(1 for e in report["items"].values() if e["status"] == k)
                        for k in ("done", "skipped", "failed")}
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def make_progress(total: int, position: int = 0, desc: str = "batch"):
    """A tqdm bar over the images to make (with an ETA); a line per failure goes through its write."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, position=position, dynamic_ncols=True, mininterval=1.0)


def auto_mask_of(image: torch.Tensor, model: str) -> torch.Tensor:
    """The product's soft mask [H, W] from rembg, through the Auto Mask node's adapter."""
    from .auto_mask import rembg_masker

    masker = rembg_masker(model, "the batch's auto mask (items without 'mask')",
                          "Or give each manifest line a 'mask' (white = product).")
    pil = Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    alpha = torch.from_numpy(masker.alpha(pil).astype(np.float32) / 255.0)
    if not bool((alpha > 0.5).any()):
        raise InputError("the auto mask found no product in the photo (its mask is empty); give a 'mask'")
    return alpha


# ---- many processes: torchrun / accelerate launch set RANK and WORLD_SIZE --------------------
@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> "Shard":
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"RANK={rank} / WORLD_SIZE={world} from the launcher do not make a shard")
        return cls(rank, world)

    def take(self, items: list[Item]) -> list[Item]:
        """Every world-th item from rank on, in manifest order: disjoint, deterministic, and the same
        on every node without any talk between them."""
        return items[self.rank::self.world]

    def report_path(self, out: Path) -> Path:
        return out / "report.json" if self.world == 1 else out / f".report.rank{self.rank}-of-{self.world}.json"

    def barrier(self, timeout_hours: float) -> None:
        """Wait for every rank (gloo: works for CPU and GPU ranks, and only sends a few bytes)."""
        if self.world == 1:
            return
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=timeout_hours))
        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def merge_reports(out: Path, items: list[Item], world: int) -> dict:
    """Rank 0: the ranks' reports -> report.json, in manifest order, each item once."""
    merged, started = {}, []
    for rank in range(world):
        part = json.loads(Shard(rank, world).report_path(out).read_text(encoding="utf-8"))
        merged.update(part["items"])
        started.append(part["started"])
    missing = [i.id for i in items if i.id not in merged]
    if missing:
        raise DreamPainterError(f"the ranks' reports miss {len(missing)} item(s): {missing[:5]}")
    report = {"items": {i.id: merged[i.id] for i in items}, "started": min(started), "ranks": world}
    report = write_report(out / "report.json", report)
    for rank in range(world):
        Shard(rank, world).report_path(out).unlink()
    return report


def _load(base: str | None, weights: str | None, dtype: str, device: str):
    """(a function that loads the pipeline, base path, weights path, the miniature's measured
    sampling settings): the paths are known at once, the model is loaded only when needed."""
    from .embedded import embedded_model
    from .pipeline import DreamPainterPipeline

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if base is None:
        model = embedded_model()
        base_path, weights_path = model.base, Path(weights) if weights else model.weights
        measured = model.sampling()
    else:
        base_path, weights_path, measured = Path(base), Path(weights) if weights else None, {}
        if not base_path.is_dir():
            raise InputError(f"--base {base}: not a folder (give the CogView4 diffusers folder)")

    def load():
        return DreamPainterPipeline.from_pretrained(base_path, dreampainter_weights=weights_path, dtype=dtypes[dtype],
                                                    device=device)

    return load, base_path, weights_path, measured


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def folder_manifest(folder: Path, prompt: str | None, category: str | None, known_formats=FORMATS) -> list[Item]:
    """--images DIR: every photo in the folder is a product, id = its file name; its mask is
    DIR/masks/<name>.png when there is one (otherwise the auto mask); the prompt is --prompt, or the
    prompt builder's from the file name (words) and --category."""
    if not folder.is_dir():
        raise InputError(f"--images {folder}: not a folder")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not photos:
        raise InputError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in it")
    lines = []
    for photo in photos:
        ident = re.sub(r"[^A-Za-z0-9._-]", "-", photo.stem).strip("-.") or "item"
        rec = {"id": ident, "image": photo.name}
        if (folder / "masks" / f"{photo.stem}.png").is_file():
            rec["mask"] = f"masks/{photo.stem}.png"
        if prompt:
            rec["prompt"] = prompt
        else:
            rec["name"] = re.sub(r"[_-]+", " ", photo.stem).strip()
            if category:
                rec["category"] = category
        lines.append(json.dumps(rec))
    return parse_manifest(lines, folder, f"--images {folder}", known_formats)


class CatalogPainter:
    """A callable class for Ray Data (``Dataset.map_batches``), for a cluster without a shared file
    system: each actor loads its own pipeline once; a batch of rows goes in, PNGs come out.

    Rows: ``id``, ``image`` (H x W x 3 uint8), optional ``mask`` (H x W uint8, 255 = product;
    without it the auto mask), ``prompt``, optional ``seed`` (0), ``format`` (``1:1``),
    ``negative_prompt`` (""). Out: ``id``, ``format``, ``seed``, ``path`` (``<id>/<format>_<seed>.png``)
    and ``png`` (the encoded image with its recipe in the text chunk, as the batch command writes
    it). Ray does the scheduling, retries and data movement; this class only paints.
    """

    def __init__(self, base: str | None = None, weights: str | None = None, *, resolution: int | None = None,
                 dtype: str = "bf16", device: str | None = None, formats=FORMATS, **settings):
        load, base_path, weights_path, measured = _load(base, weights, dtype, _device(device))
        self.pipe, self.formats = load(), formats
        self.resolution = resolution or (1024 if base else int(measured.get("resolution", 128)))
        self.settings = default_settings(measured, **settings)
        self.model = {"base": str(base_path), "weights": None if weights_path is None else str(weights_path),
                      "fingerprint": model_fingerprint(base_path, weights_path)}

    def paint(self, ident: str, image: np.ndarray, mask: np.ndarray | None, prompt: str, seed: int = 0,
              fmt: str = "1:1", negative_prompt: str = "") -> tuple[str, bytes]:
        """One row -> (its output path, its PNG bytes)."""
        from .images import as_image_batch, as_mask_batch, check_product_and_mask

        if fmt not in self.formats:
            raise InputError(f"row {ident!r}: format {fmt!r} unknown; known: {', '.join(self.formats)}")
        product = as_image_batch(np.asarray(image), name=f"row {ident!r} image")[0]
        settings = dict(self.settings, decontaminate=mask is None if self.settings["decontaminate"] == "auto"
                        else bool(self.settings["decontaminate"]))
        matte = (auto_mask_of(product, settings["auto_mask_model"]) if mask is None
                 else as_mask_batch(np.asarray(mask), name=f"row {ident!r} mask")[0])
        check_product_and_mask(product, matte)
        width, height = snap_canvas(self.formats[fmt], self.resolution, self.pipe.size_rule.multiple)
        request = build_request(self.pipe, product, matte, None, settings, width, height, [seed])
        positive = self.pipe.encode_prompt([prompt])
        negative = self.pipe.encode_prompt([negative_prompt]) if request.sampling.uses_cfg else None
        picture = self.pipe.generate(request, positive, negative).images[0]
        recipe = {"version": RECIPE_VERSION, "id": ident, "format": fmt, "canvas": list(self.formats[fmt]),
                  "resolution": self.resolution, "seed": seed, "prompt": prompt, "negative_prompt": negative_prompt,
                  "settings": settings, "model": self.model, "width": width, "height": height,
                  "inputs": {"image": {"sha256": hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()}}}
        return f"{ident}/{output_name(fmt, seed)}", png_bytes(picture, recipe)

    def __call__(self, rows: dict) -> dict:
        n = len(rows["id"])
        column = lambda key, default: rows[key] if key in rows else [default] * n  # noqa: E731
        out = {"id": [], "format": [], "seed": [], "path": [], "png": []}
        for ident, image, mask, prompt, seed, fmt, negative in zip(
                rows["id"], rows["image"], column("mask", None), rows["prompt"], column("seed", 0),
                column("format", "1:1"), column("negative_prompt", "")):
            try:
                path, data = self.paint(str(ident), image, mask, str(prompt), int(seed), str(fmt), str(negative))
            except InputError as e:  # Ray shows the actor's traceback; the row's id says which product
                raise InputError(str(e) if str(e).startswith("row ") else f"row {str(ident)!r}: {e}") from None
            for key, value in (("id", str(ident)), ("format", str(fmt)), ("seed", int(seed)), ("path", path),
                               ("png", data)):
                out[key].append(value)
        return {k: np.array(v, dtype=object if k == "png" else None) for k, v in out.items()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("check", "reproduce") else "run"
    p = argparse.ArgumentParser(prog=f"python -m dreampainter_core.batch{'' if command == 'run' else ' ' + command}",
                                description=__doc__.split("\n\n")[0])
    if command == "reproduce":
        p.add_argument("png", help="an output of the batch")
        p.add_argument("--out", default=None, help="where to write the remade image (default: beside it, _remade)")
    else:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--manifest", help="one JSON line per product")
        source.add_argument("--images", help="a folder of product photos (masks in DIR/masks/<name>.png, else auto)")
        p.add_argument("--prompt", default=None, help="--images: one prompt for every photo")
        p.add_argument("--category", default=None, help="--images without --prompt: the prompt builder's category")
        p.add_argument("--formats-file", default=None,
                       help="a TOML file whose [formats] table adds output formats: \"2:3\" = [832, 1248] (1024 px scale)")
    if command == "run":
        p.add_argument("--out", required=True)
        p.add_argument("--formats", default="1:1", help=f"comma-separated, of {', '.join(FORMATS)} (default 1:1)")
        p.add_argument("--seeds", default="0", help="comma-separated seeds for items without their own")
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--cfg", type=float, default=None)
        p.add_argument("--mode", choices=("auto", "dreampainter", "training_free"), default="auto")
        p.add_argument("--placement", choices=PLACEMENTS, default="center",
                       help="center: the product centred in its box; keep: where the photo has it")
        p.add_argument("--box-ratio", type=float, default=0.6, help="the product's box, share of the canvas (center)")
        p.add_argument("--resolution", type=int, default=None,
                       help="scale of the formats (1024 = as listed; default 1024, the embedded model 128)")
        p.add_argument("--batch-size", type=int, default=1,
                       help="images of one product and format (its seeds) sampled together (default 1)")
        p.add_argument("--decontaminate", choices=("auto", "on", "off"), default="auto",
                       help="remove the backdrop colour from the product's soft edge (auto: for auto masks)")
        p.add_argument("--auto-mask-model", choices=("u2netp", "u2net"), default="u2netp",
                       help="rembg model for items without a mask")
        p.add_argument("--merge-timeout-hours", type=float, default=48.0,
                       help="torchrun: how long rank 0 waits for the other ranks before merging")
    if command != "check":
        p.add_argument("--base", default=None, help="CogView4 diffusers folder (default: the embedded miniature)")
        p.add_argument("--weights", default=None, help="DreamPainter file (optional)")
        p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
        p.add_argument("--device", default=None, help="default: cuda (this rank's GPU under torchrun) if there is one")
    a = p.parse_args(argv)
    try:
        if command == "check":
            items = _read_items(a, load_formats(a.formats_file))
            print(f"{a.manifest or a.images}: {len(items)} products, all lines good")
            return 0
        if command == "reproduce":
            return _reproduce(a)
        return _run(a)
    except DreamPainterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _read_items(a, formats) -> list[Item]:
    if a.manifest:
        return read_batch_manifest(a.manifest, formats)
    return folder_manifest(Path(a.images), a.prompt, a.category, formats)


def _device(requested: str | None) -> str:
    import os

    if requested:
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _reproduce(a) -> int:
    recipe = read_recipe(Path(a.png))
    if recipe is None:
        raise InputError(f"{a.png}: no DreamPainter recipe in this PNG (not made by the batch command?)")
    load, base, weights, _ = _load(a.base or recipe["model"]["base"], a.weights or recipe["model"]["weights"],
                                   a.dtype, _device(a.device))
    batch = Batch(load, base=base, weights=weights, resolution=recipe.get("resolution", 1024), defaults={})
    if batch.model["fingerprint"] != recipe["model"]["fingerprint"]:
        print("warning: the model files differ from the ones that made this image", file=sys.stderr)
    # The image's own batch again (its seeds; the batch mates are only rendered, not written).
    together = recipe.get("batch") or {"seeds": [recipe["seed"]], "index": 0}
    image = batch.render(recipe, together["seeds"])[together["index"]]
    out = Path(a.out) if a.out else Path(a.png).with_name(Path(a.png).stem + "_remade.png")
    write_png(image, out, recipe)
    same = np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(a.png)))
    print(f"wrote {out}: {'identical pixels' if same else 'pixels differ'}")
    return 0 if same else 1


def _run(a) -> int:
    from .gallery import write_gallery

    known = load_formats(a.formats_file)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in known]
    if bad or not formats:
        raise InputError(f"--formats: unknown {bad}; known: {', '.join(known)}"
                         + ("" if a.formats_file else " (--formats-file adds more)"))
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not 1 <= a.batch_size <= MAX_BATCH:
        raise InputError(f"--batch-size must be >= 1 and <= {MAX_BATCH}, got {a.batch_size}")
    try:
        settings_options(default_settings({}, steps=a.steps, cfg=a.cfg, mode=a.mode, box_ratio=a.box_ratio,
                                          placement=a.placement), seeds)
    except InputError as exc:  # --steps, --cfg, --seeds ... before the model loads
        raise InputError(f"batch settings: {exc}") from None
    items = _read_items(a, known)  # every line checked before the model loads
    shard = Shard.from_environment()
    mine = shard.take(items)
    if any(item.mask is None for item in mine):
        from .auto_mask import require_rembg

        lines = [str(item.line) for item in mine if item.mask is None]
        require_rembg(f"the auto mask for the products without a 'mask' (manifest lines {', '.join(lines[:10])})",
                      a.auto_mask_model, "Or give each of them a 'mask' (white = product).")
    load, base, weights, measured = _load(a.base, a.weights, a.dtype, _device(a.device))
    resolution = a.resolution or (1024 if a.base else int(measured.get("resolution", 128)))
    defaults = default_settings(measured, steps=a.steps, cfg=a.cfg, mode=a.mode, box_ratio=a.box_ratio,
                                placement=a.placement, auto_mask_model=a.auto_mask_model,
                                decontaminate={"auto": "auto", "on": True, "off": False}[a.decontaminate])
    out = Path(a.out)
    batch = Batch(load, base=base, weights=weights, resolution=resolution, defaults=defaults, batch_size=a.batch_size,
                  formats=known)
    t0 = time.perf_counter()
    report = batch.run(mine, out, formats, seeds, shard.report_path(out), position=shard.rank,
                       desc="batch" if shard.world == 1 else f"rank {shard.rank}/{shard.world}")
    shard.barrier(a.merge_timeout_hours)
    try:
        if shard.rank == 0:
            if shard.world > 1:
                report = merge_reports(out, items, shard.world)
            write_gallery(out, items, report)
    finally:
        shard.close()
    c = report["counts"]
    if shard.rank:  # its items are in rank 0's merged report and exit code
        print(f"rank {shard.rank}: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed")
        return 0
    print(f"{c['done']} done, {c['skipped']} skipped (already made), {c['failed']} failed in "
          f"{time.perf_counter() - t0:.1f} s; {out / 'report.json'}, {out / 'index.html'}")
    # Under torchrun a non-zero exit is reported by the launcher (ChildFailedError, its own trace).
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
