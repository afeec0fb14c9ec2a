"""Dataset tools: check a manifest, build one from a folder of product photos.

    python -m train.data check MANIFEST [--json] [--jobs N]
    python -m train.data build --images DIR (--masks DIR | --auto-mask) --out MANIFEST
                               --prompts PROMPTS.toml [--references DIR] [--seed S] [--zh]
                               [--product-from-name]
    python -m train.data references --manifest M --out DIR [--base CogView4-6B/]   (train.references)
    python -m train.data example-prompts > prompts.toml

check exits 0 when every line is good, 1 otherwise, printing `line N: reason` per problem.

build pairs each image with its mask(s) by file stem, in --masks: `<stem>.<ext>`,
`<stem>_mask.<ext>`, or instance masks `<stem>_mask_<k>.<ext>` (merged by union at load);
references in --references as `<stem>.<ext>` or `<stem>_ref.<ext>`. --auto-mask cuts the
product out with rembg (model u2netp) and writes the masks to `masks/` next to the
manifest. The product description comes from a sidecar `<stem>.txt` beside the image
(`<stem>.zh.txt` for Chinese) or, with --product-from-name, from the file name; otherwise
it is drawn from the prompt config like the other components. The manifest is written
atomically (temp file + rename), so a crash never leaves half a manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dreampainter_core.auto_mask import rembg_masker, require_rembg
from dreampainter_core.errors import DreamPainterError, MissingDependencyError
from dreampainter_core.fileio import atomic_write_text

from .manifest import Sample, read_manifest, validate_sample
from dreampainter_core.prompts import EXAMPLE_TOML, PromptComposer, PromptConfigError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Stems of masks and references: skipped when listing photos, in case they share a folder.
_AUX_STEM = re.compile(r"_(mask(_\d+)?|ref|reference)$", re.IGNORECASE)

AUTO_MASK_MODEL = "u2netp"
WITHOUT_REMBG = "Or pass --masks DIR with masks you made yourself."


# ---------------------------------------------------------------------------------------
# check


def _check_one(item: tuple[int, Sample]) -> tuple[int, list[str]]:
    line, sample = item
    return line, validate_sample(sample)


def check_manifest(path: str | Path, jobs: int = 1) -> dict:
    """Validate every line. Returns {"manifest", "total", "good", "bad": [{"line", "problems"}]}."""
    path = Path(path)
    bad: dict[int, list[str]] = {}
    parse_problems: list[tuple[int, list[str]]] = []
    entries = read_manifest(path, problems=parse_problems)
    for line, problems in parse_problems:
        bad.setdefault(line, []).extend(problems)

    if jobs > 1 and len(entries) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            results = list(ex.map(_check_one, entries, chunksize=max(1, len(entries) // (jobs * 8))))
    else:
        results = [_check_one(e) for e in entries]
    for line, problems in results:
        if problems:
            bad.setdefault(line, []).extend(problems)

    # Duplicate ids break anything keyed by id (caches, evaluation splits).
    first_seen: dict[str, int] = {}
    for line, sample in entries:
        if sample.id is None:
            continue
        if sample.id in first_seen:
            bad.setdefault(line, []).append(f"id {sample.id!r} repeats line {first_seen[sample.id]}")
        else:
            first_seen[sample.id] = line

    total = len(entries) + len(parse_problems)
    return {
        "manifest": str(path),
        "total": total,
        "good": total - len(bad),
        "bad": [{"line": ln, "problems": bad[ln]} for ln in sorted(bad)],
    }


def cmd_check(args) -> int:
    try:
        report = check_manifest(args.manifest, jobs=args.jobs)
    except OSError as e:
        msg = f"cannot read manifest {args.manifest}: {e.strerror or e}"
        if args.json:
            print(json.dumps({"manifest": str(args.manifest), "error": msg}))
        else:
            print(msg, file=sys.stderr)
        return 1
    ok = not report["bad"] and report["total"] > 0
    if args.json:
        print(json.dumps({**report, "ok": ok}, ensure_ascii=False, indent=2))
        return 0 if ok else 1
    for entry in report["bad"]:
        for p in entry["problems"]:
            print(f"line {entry['line']}: {p}")
    if report["total"] == 0:
        print(f"{args.manifest}: no samples (empty manifest)")
    else:
        n_bad = len(report["bad"])
        print(f"{args.manifest}: {report['total']} samples, {report['good']} good, {n_bad} bad")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------
# build


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _index_by_stem(folder: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for p in _list_images(folder):
        index.setdefault(p.stem, []).append(p)
    return index


def find_masks(stem: str, index: dict[str, list[Path]], image: Path) -> list[Path]:
    """Masks for an image stem: <stem>.*, else <stem>_mask.*, else <stem>_mask_<k>.* (instances)."""
    exact = [p for p in index.get(stem, []) if p.resolve() != image.resolve()]
    if exact:
        return exact[:1]
    if index.get(f"{stem}_mask"):
        return index[f"{stem}_mask"][:1]
    inst = re.compile(re.escape(stem) + r"_mask_(\d+)$", re.IGNORECASE)
    found = sorted((int(m.group(1)), p) for s, ps in index.items() if (m := inst.match(s)) for p in ps[:1])
    return [p for _, p in found]


def _find_reference(stem: str, index: dict[str, list[Path]], image: Path) -> Path | None:
    for s in (stem, f"{stem}_ref", f"{stem}_reference"):
        for p in index.get(s, []):
            if p.resolve() != image.resolve():
                return p
    return None


def _rel(path: Path, root: Path) -> str:
    # Posix separators so a manifest written on one OS reads on another.
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def _name_to_product(stem: str) -> str | None:
    text = re.sub(r"[_\-.]+", " ", stem)
    text = re.sub(r"\b\d+\b", " ", text)  # running numbers say nothing about the product
    text = re.sub(r"\s+", " ", text).strip()
    return text or None


def _read_sidecar(path: Path) -> str | None:
    if path.is_file():
        text = " ".join(path.read_text(encoding="utf-8-sig").split())
        return text or None
    return None


def _auto_mask(masker, image_path: Path) -> np.ndarray:
    with Image.open(image_path) as im:
        im.load()
        src = im.convert("RGB")
    # Hard mask: training needs binary masks, and check would flag a soft matte.
    return masker.alpha(src) >= 128


def cmd_build(args) -> int:
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        print(f"--images {images_dir}: not a folder", file=sys.stderr)
        return 1
    if args.masks and not Path(args.masks).is_dir():
        print(f"--masks {args.masks}: not a folder", file=sys.stderr)
        return 1
    if args.references and not Path(args.references).is_dir():
        print(f"--references {args.references}: not a folder", file=sys.stderr)
        return 1

    if args.auto_mask:
        try:
            require_rembg("--auto-mask", AUTO_MASK_MODEL, WITHOUT_REMBG)
        except MissingDependencyError as e:
            print(e, file=sys.stderr)
            return 1

    try:
        composer = PromptComposer.from_file(args.prompts, seed=args.seed)
    except (PromptConfigError, OSError) as e:
        print(f"--prompts: {e}", file=sys.stderr)
        return 1
    if args.zh and not composer.has_zh:
        print(f"--zh: {args.prompts} lacks Chinese (zh) values for some component", file=sys.stderr)
        return 1

    out = Path(args.out)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    mask_index = _index_by_stem(Path(args.masks)) if args.masks else {}
    ref_index = _index_by_stem(Path(args.references)) if args.references else {}

    images = [p for p in _list_images(images_dir) if not _AUX_STEM.search(p.stem)]
    stems = Counter(p.stem for p in images)

    masker = None
    if args.auto_mask:
        try:
            masker = rembg_masker(AUTO_MASK_MODEL, "--auto-mask", WITHOUT_REMBG)
        except DreamPainterError as e:  # typically: no network to fetch the model
            print(e, file=sys.stderr)
            return 1
        (root / "masks").mkdir(exist_ok=True)

    records: list[str] = []
    skipped: list[str] = []
    n_ref = n_mixed_zh = 0
    for image in images:
        stem = image.stem
        if stems[stem] > 1:
            skipped.append(f"{image.name}: another image has the same stem '{stem}'; masks would be ambiguous")
            continue
        if masker is not None:
            try:
                m = _auto_mask(masker, image)
            except Exception as e:
                skipped.append(f"{image.name}: rembg failed ({type(e).__name__}: {e})")
                continue
            frac = float(m.mean())
            if frac < 0.0005 or frac > 0.9995:
                skipped.append(f"{image.name}: rembg found {'no product' if frac < 0.5 else 'no background'}")
                continue
            mask_path = root / "masks" / f"{stem}.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(mask_path)
            masks = [mask_path]
        else:
            masks = find_masks(stem, mask_index, image)
            if not masks:
                skipped.append(f"{image.name}: no mask {stem}.*, {stem}_mask.* or {stem}_mask_<k>.* in {args.masks}")
                continue

        product = _read_sidecar(image.with_suffix(".txt"))
        product_zh = _read_sidecar(image.with_name(f"{stem}.zh.txt"))
        if product is None and args.product_from_name:
            product = _name_to_product(stem)
        if product is not None and product_zh is None and args.zh:
            # No Chinese name known: keep the English one inside the Chinese prompt
            # (CogView4's GLM encoder reads mixed text) rather than lose prompt_2.
            product_zh = product
            n_mixed_zh += 1
        prompt = composer.compose(product=product, product_zh=product_zh, key=stem)

        rec = {"id": stem, "image": _rel(image, root)}
        rels = [_rel(p, root) for p in masks]
        rec["mask"] = rels[0] if len(rels) == 1 else rels
        rec["prompt"] = prompt.en
        if args.zh and prompt.zh:
            rec["prompt_2"] = prompt.zh
        ref = _find_reference(stem, ref_index, image) if ref_index else None
        if ref is not None:
            rec["reference"] = _rel(ref, root)
            n_ref += 1
        records.append(json.dumps(rec, ensure_ascii=False))

    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    if not records:
        print(f"no samples: nothing written to {out}", file=sys.stderr)
        return 1
    atomic_write_text(out, "".join(line + "\n" for line in records))
    print(
        f"wrote {len(records)} samples to {out} ({n_ref} with a reference"
        + (f", {n_mixed_zh} Chinese prompts with an English product name" if n_mixed_zh else "")
        + f"); skipped {len(skipped)}"
    )
    return 0


def cmd_example_prompts(args) -> int:
    sys.stdout.write(EXAMPLE_TOML)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.data", description="DreamPainter training data tools.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate every line of a JSONL manifest")
    c.add_argument("manifest")
    c.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    c.add_argument("--jobs", type=int, default=1, help="processes to decode images with (default 1)")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("build", help="build a manifest from product photos and masks")
    b.add_argument("--images", required=True, help="folder of product photos")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--masks", help="folder of masks named <stem>.*, <stem>_mask.* or <stem>_mask_<k>.*")
    g.add_argument("--auto-mask", action="store_true", help="make masks with rembg (u2netp)")
    b.add_argument("--out", required=True, help="manifest to write (.jsonl); paths are relative to it")
    b.add_argument("--prompts", required=True, help="prompt component config (.toml or .json)")
    b.add_argument("--references", help="folder of background references named <stem>.* or <stem>_ref.*")
    b.add_argument("--seed", type=int, default=None, help="prompt seed (default: the config's, else 0)")
    b.add_argument("--zh", action="store_true", help="also write a Chinese prompt as prompt_2")
    b.add_argument("--product-from-name", action="store_true", help="describe the product by its file name when there is no <stem>.txt")
    b.set_defaults(func=cmd_build)

    from .references import add_parser as add_references_parser

    add_references_parser(sub)

    e = sub.add_parser("example-prompts", help="print an example prompt config (TOML)")
    e.set_defaults(func=cmd_example_prompts)

    args = ap.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        ap.error("--jobs must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
