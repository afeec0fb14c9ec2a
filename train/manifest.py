"""The training manifest: JSON Lines, one sample per line.

Each line is a JSON object; paths are relative to the manifest file (absolute paths work too)::

    {"image": "img/0001.png",
     "mask": "mask/0001.png",              # or ["mask/0001_a.png", "mask/0001_b.png"]
     "prompt": "a red bottle on a white marble stand, studio photography",
     "prompt_2": "一个红色的瓶子放在白色大理石展台上，影棚摄影",   # optional, second language
     "reference": "ref/0001.png",          # optional: the scene without the product
     "id": "0001"}                         # optional

Several masks are instance masks of one image and are merged by union. Masks may be
mode L, 1 or RGBA/LA (the alpha channel is the mask). Blank lines are ignored; other keys
are kept in `Sample.extra` and otherwise ignored, so a manifest can carry more metadata.

`read_manifest` parses the structure (JSON, keys, types); `validate_sample` opens the
files and checks their content. `load_sample` does the same work but returns the decoded
data, so the dataset and `python -m train.data check` apply exactly the same rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dreampainter_core.errors import DreamPainterError

__all__ = [
    "ManifestError",
    "MaskFormatError",
    "Sample",
    "LoadedSample",
    "parse_line",
    "read_manifest",
    "validate_sample",
    "load_sample",
    "mask_array",
    "binarize_mask",
    "image_size",
    "MID_LOW",
    "MID_HIGH",
]

REQUIRED_KEYS = ("image", "mask", "prompt")
OPTIONAL_KEYS = ("prompt_2", "reference", "id")

# A mask pixel strictly between these is "grey". Anti-aliased edges give a few percent
# of such pixels; more than MAX_MID_FRACTION means a soft matte or a wrong file, unless the
# histogram is still clearly two-level (see binarize_mask).
MID_LOW, MID_HIGH = 10, 245
MAX_MID_FRACTION = 0.05
# Otsu's separability (between-class / total variance) above which a grey mask is still a
# clear two-level image (1.0 for exactly two values; 0.75 for a uniform ramp).
MIN_BIMODAL_SEPARABILITY = 0.95
# A mask covering less than this fraction is "empty", more than 1 - this is "full"
# (nothing left for the background to be painted on).
MIN_COVER_FRACTION = 0.0005


class MaskFormatError(DreamPainterError, ValueError):
    """A mask file decodes but its mode cannot be read as a mask."""


class ManifestError(DreamPainterError, ValueError):
    """A manifest line is unusable; `line` is 1-based, `problems` are readable reasons."""

    def __init__(self, line: int | None, problems: list[str], manifest: str | Path | None = None):
        self.line = line
        self.problems = list(problems)
        self.manifest = manifest
        where = f"{manifest} " if manifest else ""
        where += f"line {line}: " if line is not None else ""
        super().__init__(where + "; ".join(self.problems))


@dataclass(frozen=True)
class Sample:
    """One manifest line. Paths are kept as written (for messages); `root` resolves them."""

    image: str
    masks: tuple[str, ...]
    prompt: str
    prompt_2: str | None = None
    reference: str | None = None
    id: str | None = None
    root: Path = Path(".")
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def resolve(self, rel: str) -> Path:
        return self.root / rel

    @property
    def image_path(self) -> Path:
        return self.resolve(self.image)

    @property
    def mask_paths(self) -> list[Path]:
        return [self.resolve(m) for m in self.masks]

    @property
    def reference_path(self) -> Path | None:
        return None if self.reference is None else self.resolve(self.reference)

    def to_json(self) -> dict[str, Any]:
        """The manifest record (paths as written, one mask as a plain string)."""
        rec: dict[str, Any] = {}
        if self.id is not None:
            rec["id"] = self.id
        rec["image"] = self.image
        rec["mask"] = self.masks[0] if len(self.masks) == 1 else list(self.masks)
        rec["prompt"] = self.prompt
        if self.prompt_2 is not None:
            rec["prompt_2"] = self.prompt_2
        if self.reference is not None:
            rec["reference"] = self.reference
        rec.update(self.extra)
        return rec


@dataclass
class LoadedSample:
    image: Image.Image | None  # RGB; None from load_reference_only
    mask: np.ndarray | None  # bool [H, W], union of the instance masks; None from load_reference_only
    reference: Image.Image | None  # RGB, any size


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def parse_line(text: str, root: str | Path = ".") -> Sample:
    """Parse one manifest line. Raises ManifestError (line=None) listing every structural problem."""
    try:
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ManifestError(None, [f"not valid JSON: {e.msg} (column {e.colno})"]) from None
    if not isinstance(obj, dict):
        raise ManifestError(None, [f"not a JSON object (got {_type_name(obj)})"])

    problems = [f"missing key '{k}'" for k in REQUIRED_KEYS if k not in obj]

    image = obj.get("image")
    if "image" in obj and not (isinstance(image, str) and image.strip()):
        problems.append(f"'image' must be a non-empty path string, got {_type_name(image)}")

    mask = obj.get("mask")
    masks: tuple[str, ...] = ()
    if isinstance(mask, str) and mask.strip():
        masks = (mask,)
    elif isinstance(mask, list) and mask and all(isinstance(m, str) and m.strip() for m in mask):
        masks = tuple(mask)
    elif "mask" in obj:
        problems.append(
            f"'mask' must be a path string or a non-empty list of path strings, got {_type_name(mask)}"
        )

    # Emptiness of the prompts is content, checked in validate_sample; here only the type.
    prompt = obj.get("prompt")
    if "prompt" in obj and not isinstance(prompt, str):
        problems.append(f"'prompt' must be a string, got {_type_name(prompt)}")
    for key in ("prompt_2", "reference"):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            problems.append(f"'{key}' must be a string or null, got {_type_name(v)}")
    sid = obj.get("id")
    if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
        problems.append(f"'id' must be a string or an integer, got {_type_name(sid)}")

    if problems:
        raise ManifestError(None, problems)
    ref = obj.get("reference")
    return Sample(
        image=image,
        masks=masks,
        prompt=prompt,
        prompt_2=obj.get("prompt_2"),
        reference=ref if ref else None,  # "" means no reference, like null
        id=None if sid is None else str(sid),
        root=Path(root),
        extra={k: v for k, v in obj.items() if k not in REQUIRED_KEYS + OPTIONAL_KEYS},
    )


def read_manifest(
    path: str | Path, problems: list[tuple[int, list[str]]] | None = None
) -> list[tuple[int, Sample]]:
    """Read a JSONL manifest into (line_no, Sample) pairs, line numbers 1-based.

    A line that does not parse raises ManifestError naming it, unless `problems` is given:
    then (line_no, reasons) is appended there and the line is left out.
    """
    path = Path(path)
    root = path.parent
    out: list[tuple[int, Sample]] = []
    # utf-8-sig: editors on Windows like to start files with a BOM.
    with open(path, encoding="utf-8-sig") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                out.append((line_no, parse_line(text, root)))
            except ManifestError as e:
                if problems is None:
                    raise ManifestError(line_no, e.problems, path) from None
                problems.append((line_no, e.problems))
    return out


# ---------------------------------------------------------------------------------------
# Files


def _open_image(path: Path) -> Image.Image:
    # verify() catches corrupt data that a lazy open would not; it invalidates the object,
    # so the image is opened again to decode it fully (load() catches truncation).
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        # Phone photos store rotation in EXIF; training must see what a viewer shows.
        return ImageOps.exif_transpose(im)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block should not hide the size
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent product photos: flatten on white, the inference convention.
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def mask_array(im: Image.Image) -> np.ndarray:
    """The mask channel of a mask image as uint8 [H, W]. Raises MaskFormatError for unusable modes."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "L")
        mode = im.mode
    if mode in ("RGBA", "LA"):
        alpha = im.getchannel("A")
        lo, hi = alpha.getextrema()
        if lo != hi:
            return np.array(alpha)
        # Constant alpha: the mask was saved as an opaque black/white picture, read its grey.
        im = im.convert("RGB" if mode == "RGBA" else "L")
        mode = im.mode
    if mode == "1":
        return np.array(im.convert("L"))
    if mode == "L":
        return np.array(im)
    if mode == "RGB":
        a = np.array(im)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return a[..., 0].copy()
        raise MaskFormatError("mask is a colour image; save masks as L (greyscale), 1 or RGBA alpha")
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        a = np.array(im).astype(np.int64)
        if a.max(initial=0) > 255:  # 16-bit export of a 0/65535 mask
            a = a // 257
        return np.clip(a, 0, 255).astype(np.uint8)
    raise MaskFormatError(f"mask mode {mode} is not supported; use L, 1 or RGBA alpha")


def _otsu(a: np.ndarray) -> tuple[int, float]:
    """Otsu threshold and separability eta = between-class / total variance (0..1)."""
    hist = np.bincount(a.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * levels)
    mu_t = mu[-1]
    var_t = float((p * (levels - mu_t) ** 2).sum())
    if var_t == 0.0:
        return 128, 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        var_b = (mu_t * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    var_b = np.nan_to_num(var_b, nan=0.0, posinf=0.0)
    t = int(np.argmax(var_b))
    return t, float(var_b[t] / var_t)


def binarize_mask(a: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """uint8 mask -> (bool mask, None), or (None, reason) if it has no clear two-level split."""
    if a.size and a.max() == 1:
        # 0/1 label maps (common segmentation exports) would otherwise read as empty.
        return a == 1, None
    mid = float(((a > MID_LOW) & (a < MID_HIGH)).mean()) if a.size else 0.0
    if mid <= MAX_MID_FRACTION:
        return a >= 128, None
    t, eta = _otsu(a)
    if eta >= MIN_BIMODAL_SEPARABILITY:
        return a > t, None
    return None, (
        f"mask is not binary: {mid * 100:.1f}% of pixels are between {MID_LOW} and {MID_HIGH}"
    )


def _empty_problem(m: np.ndarray, what: str) -> str | None:
    n, k = m.size, int(m.sum())
    if k <= MIN_COVER_FRACTION * n:
        return f"{what}: mask is empty ({k} of {n} pixels set)"
    return None


def _full_problem(m: np.ndarray, what: str) -> str | None:
    n, k = m.size, int(m.sum())
    if n - k <= MIN_COVER_FRACTION * n:
        return f"{what}: mask is full (covers {100.0 * k / n:.1f}% of the image; no background left to paint)"
    return None


def _load_reference(sample: Sample, problems: list[str]) -> Image.Image | None:
    if sample.reference is None:
        return None
    try:
        return _to_rgb(_open_image(sample.reference_path))
    except FileNotFoundError:
        problems.append(f"reference {sample.reference}: file not found")
    except Exception as e:  # any decoder error is a bad file
        problems.append(f"reference {sample.reference}: cannot decode ({type(e).__name__}: {e})")
    return None


def _load(sample: Sample, with_reference: bool, problems: list[str]) -> LoadedSample | None:
    image = None
    try:
        image = _to_rgb(_open_image(sample.image_path))
    except FileNotFoundError:
        problems.append(f"image {sample.image}: file not found")
    except Exception as e:  # any decoder error is a bad file, whatever PIL calls it
        problems.append(f"image {sample.image}: cannot decode ({type(e).__name__}: {e})")

    union = None
    masks_ok = True
    for rel, path in zip(sample.masks, sample.mask_paths):
        what = f"mask {rel}"
        try:
            a = mask_array(_open_image(path))
        except FileNotFoundError:
            problems.append(f"{what}: file not found")
            masks_ok = False
            continue
        except MaskFormatError as e:
            problems.append(f"{what}: {e}")
            masks_ok = False
            continue
        except Exception as e:
            problems.append(f"{what}: cannot decode ({type(e).__name__}: {e})")
            masks_ok = False
            continue
        h, w = a.shape
        if image is not None and (w, h) != image.size:
            iw, ih = image.size
            problems.append(f"{what}: size {w}x{h} differs from image {iw}x{ih}")
            masks_ok = False
            continue
        m, why = binarize_mask(a)
        if m is None:
            problems.append(f"{what}: {why}")
            masks_ok = False
            continue
        empty = _empty_problem(m, what)
        if empty:
            problems.append(empty)
            masks_ok = False
            continue
        if union is None:
            union = m.copy()
        elif union.shape != m.shape:
            # No image to compare with (it failed); masks must still agree with each other.
            problems.append(f"{what}: size {w}x{h} differs from mask {sample.masks[0]}")
            masks_ok = False
        else:
            union |= m
    if masks_ok and union is not None:
        what = f"mask {sample.masks[0]}" if len(sample.masks) == 1 else f"masks (union of {len(sample.masks)})"
        full = _full_problem(union, what)
        if full:
            problems.append(full)

    reference = _load_reference(sample, problems) if with_reference else None

    if not sample.prompt.strip():
        problems.append("prompt is empty")
    if sample.prompt_2 is not None and not sample.prompt_2.strip():
        problems.append("prompt_2 is empty (leave it out or set null when there is none)")

    if problems:
        return None
    return LoadedSample(image=image, mask=union, reference=reference)


def validate_sample(sample: Sample, check_reference: bool = True) -> list[str]:
    """Open and check every file of a sample; returns readable problems ([] when good)."""
    problems: list[str] = []
    _load(sample, check_reference, problems)
    return problems


def load_sample(sample: Sample, with_reference: bool = True, line: int | None = None) -> LoadedSample:
    """Decode a sample with the same checks as validate_sample; raises ManifestError if bad."""
    problems: list[str] = []
    loaded = _load(sample, with_reference, problems)
    if loaded is None:
        raise ManifestError(line, problems)
    return loaded


def load_reference_only(sample: Sample, with_reference: bool = True, line: int | None = None) -> LoadedSample:
    """Like load_sample without decoding the image and masks (image and mask are None): for
    samples whose latents are cached, where only the reference and the prompt are still needed."""
    problems: list[str] = []
    reference = _load_reference(sample, problems) if with_reference else None
    if problems:
        raise ManifestError(line, problems)
    return LoadedSample(image=None, mask=None, reference=reference)
