"""Synthetic e-commerce scenes with ground truth: a miniature DreamEcom.

    python -m train.synthetic --out data/scenes --count 2000 --size 128 --seed 0 [--splits 0.8,0.1,0.1]

Each scene is drawn procedurally (numpy + PIL, no model): a wall in one of a small named
palette of colours, in a tone (light / plain / deep) that the prompt does not name, so the
reference is the only source of it, with a pattern (plain, stripes, dots, checker, gradient), a display
stand (a full-width table, or a round stand) in another palette colour, a product (bottle,
box, can, ball, cup, jar) in a third colour with simple shading, and a soft shadow under
the product cast away from the light. Edges are hard (no anti-aliasing): the product mask
is exact and every product pixel is a shade of the product colour.

Written per sample (``<id>`` = six digits):

- ``images/<id>.png``  the target scene (RGB)
- ``masks/<id>.png``   the product's instance mask (L, exactly 0/255)
- ``refs/<id>.png``    the background reference: the SAME scene without the product and its
  shadow (bit-identical to the target wherever the target has neither)

and the manifest lines ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` (train.manifest
format; paths relative to the manifest). Besides image / mask / prompt / prompt_2 /
reference / id, each line carries the ground truth under ``"scene"`` (kept by the manifest
reader in ``Sample.extra``): every parameter the renderer needs, so ``render_scene(scene)``
redraws the sample exactly and ``scene_regions(scene)`` gives the wall / table / product /
shadow regions the metrics measure on. ``dataset.json`` records the settings and palette.

Prompts follow the paper's five components in order (product, display stand,
environment, background, style; see dreampainter_core.prompts), in simple words, e.g.

    a red bottle on a white table, soft shadow, blue striped background, studio photography
    一个红色的瓶子放在白色的桌子上，柔和的影子，蓝色条纹背景，室内摄影

Every English word and Chinese character used is in the tiny test tokenizer's vocabulary
(train.tiny), so a miniature model never sees [UNK]. Pattern words: plain ->
"simple", stripes -> "striped", dots -> "dotted", checker -> "square pattern",
gradient -> "glow" (a radial glow).

Deterministic: sample i is drawn from its own generator seeded by (seed, i), so the same
seed gives byte-identical files whatever the count, and a larger count only appends
samples. Splits are consecutive blocks (train first); samples are i.i.d., so that is an
unbiased split. Every file is written atomically (temporary file + rename).

The older toy dataset (one flat shape on a gradient; fixed-length prompts) used by the
training tests stays available as ``write_synthetic_dataset`` / ``tiny_config``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dreampainter_core.fileio import atomic_write_bytes

from .metrics import nearest_palette_color, region_color, shade_distance, srgb_to_lab

__all__ = [
    "PALETTE",
    "PALETTE_ZH",
    "PATTERNS",
    "PRODUCT_SHAPES",
    "STAND_SHAPES",
    "SCENE_VERSION",
    "CATEGORY_PRIOR",
    "TYPICAL_LOOKS",
    "is_typical_look",
    "wall_colours",
    "TONES",
    "WALL_TONES",
    "tone_rgb",
    "tone_palette",
    "wall_tone_colours",
    "with_wall_tone",
    "sample_scene",
    "make_scene",
    "render_scene",
    "scene_regions",
    "scene_prompt",
    "product_name",
    "HELD_OUT_PRODUCTS",
    "catalog_scene",
    "write_catalog",
    "held_out_scene",
    "held_out_prompt",
    "write_scenes",
    "write_synthetic_dataset",
    "tiny_config",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
SCENE_VERSION = 3  # 2: wall tones (light / plain / deep), unnamed in the prompt; 3: category prior
SCENE_VERSIONS = (2, 3)  # what sample_scene can still draw

# ---------------------------------------------------------------------------------------
# Vocabulary

#: Named colours (sRGB 0..255). Chosen far apart (every pair >= 37 CIELAB ΔE apart) so a
#: region's mean colour is classified back to its name even through patterns and shading.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 210, 50),
    "green": (50, 150, 70),
    "blue": (40, 80, 200),
    "purple": (160, 50, 160),
    "pink": (240, 150, 190),
    "brown": (120, 75, 40),
    "white": (240, 240, 235),
    "grey": (130, 130, 130),
    "black": (30, 30, 30),
}
PALETTE_ZH = {
    "red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色", "purple": "紫色",
    "pink": "粉色", "brown": "棕色", "white": "白色", "grey": "灰色", "black": "黑色",
}
PATTERNS = ("plain", "stripes", "dots", "checker", "gradient")
# English: "{colour} background" with these words; Chinese: "{colour}{word}背景".
PATTERN_WORDS = {
    "plain": ("simple {c} background", "简约的{c}背景"),
    "stripes": ("{c} striped background", "{c}条纹背景"),
    "dots": ("{c} dotted background", "{c}圆点背景"),
    "checker": ("{c} square pattern background", "{c}方形图案背景"),
    "gradient": ("{c} glow background", "{c}柔光背景"),
}
PRODUCT_SHAPES = ("bottle", "box", "can", "ball", "cup", "jar")
PRODUCT_ZH = {"bottle": "瓶子", "box": "盒子", "can": "柱形罐", "ball": "球", "cup": "杯子", "jar": "罐子"}
STAND_SHAPES = ("table", "round")
STAND_WORDS = {"table": ("table", "桌子"), "round": ("round stand", "圆形展台")}
SHADOW_WORDS = {"short": ("soft shadow", "柔和的影子"), "long": ("long soft shadow", "长长的柔和影子")}
STYLES = (
    ("studio photography", "室内摄影"),
    ("minimalist product photo", "简约商品照片"),
    ("clean commercial photography", "清晰的商业摄影"),
)
STYLE_RATIO = 0.5  # the style component is optional (the paper samples components by ratio)
LIGHTS = ("left", "right", "front")

# Category prior (Product2Img): each product shape has a typical look, as real catalogues do (cups
# on wooden tables before warm walls, bottles on marble before cool walls). With probability
# CATEGORY_PRIOR a scene takes one of its shape's typical wall colours and its typical stand
# (shape and colour); otherwise wall and stand are drawn uniformly, as before. Only the colours and
# the stand carry it: patterns, tones, sizes and light are drawn alike for every shape, and the
# prompt names the colours either way. So a model shown only the product's name can learn which
# background suits it from the images alone (train.background_token measures that).
CATEGORY_PRIOR = 0.6
TYPICAL_LOOKS: dict[str, dict[str, Any]] = {
    "cup": {"walls": ("orange", "yellow"), "stand": ("table", "brown")},  # wooden table, warm wall
    "bottle": {"walls": ("blue", "green"), "stand": ("table", "white")},  # marble, cool wall
    "box": {"walls": ("grey", "white"), "stand": ("round", "black")},
    "can": {"walls": ("red", "pink"), "stand": ("round", "white")},
    "ball": {"walls": ("purple", "green"), "stand": ("round", "yellow")},
    "jar": {"walls": ("brown", "black"), "stand": ("table", "grey")},
}

# Held-out products (DreamPaint's miniature evidence, train.dreampaint_eval): shapes and patterns that
# sample_scene never draws, so the base never saw them. Each is two palette colours in a pattern
# (period: a share of the product's height) and is learned from catalog views (catalog_scene) and
# inserted into new scenes (held_out_scene), where its true silhouette is known.
# The pattern's period is a share of the product's height. In the insertion scenes a product is about 35 px
# tall, and the miniature's VAE (8x down) cannot encode finer patterns: with periods of 0.16-0.22 its own
# round trip of the true scene drew the star vase's stripes as a magenta blur (shape IoU 0.01), so no
# insertion could have drawn them either. At 0.45 (a period of about 16 px) the round trip keeps the
# shape (IoU 0.5-0.63) and both colours.
HELD_OUT_PRODUCTS: dict[str, dict[str, Any]] = {
    "star_vase": {"class_noun": "vase", "colors": ("blue", "yellow"), "pattern": "stripes", "period": 0.45,
                  "aspect": (0.75, 0.9)},
    "dotted_lamp": {"class_noun": "lamp", "colors": ("green", "white"), "pattern": "dots", "period": 0.45,
                    "aspect": (0.6, 0.75)},
    "diamond_jar": {"class_noun": "jar", "colors": ("red", "white"), "pattern": "checker", "period": 0.45,
                    "aspect": (0.7, 0.85)},
}
HELD_OUT_SEED = 7_000_003  # the held-out scenes' and catalog views' seed namespace (apart from any run's)
CATALOG_HEIGHT = (0.25, 0.65)  # the product's height in a catalog view, a share of the frame
CATALOG_BACKDROPS = ("white", "grey", "pink", "yellow", "blue", "orange")  # plain studio walls, light tone

# Wall tones: the wall is its named colour, or that colour moved TONE_STEP towards white
# ("light") or black ("deep"). The prompt never names the tone ("a blue background" is any of
# the three blues), so only the background reference tells which: the part of the reference's
# look that text does not carry, as with real photos. A tone is allowed for a colour only where
# it still reads back as that colour (nearest palette colour in CIELAB, also mixed 50/50 with
# its pattern tint), so prompt adherence stays measurable; see WALL_TONES.
TONE_STEP = 0.2
TONES = ("light", "plain", "deep")
MIN_TONE_DELTA_E = 8.0  # a tone must differ visibly (CIE76) from the plain colour

# Rendering constants (see render_scene).
TINT = 0.22  # pattern secondary colour: this far towards white (dark colours) or black (light ones)
FRONT_SHADE = 0.78  # the stand's front face
SHADOW_STRENGTH = 0.55  # darkening at full shadow alpha
PRODUCT_SHADE = (0.72, 1.08)  # product shading factors (cylinder / sphere / box faces)
_SEPARATION = 0.24  # min distance (0..1 RGB) between any scene colour and the product's shade line
#                     (the colour segmenter's rule: metrics.shade_distance, metrics.PRODUCT_RULE_SHADE)


def _luma(rgb) -> float:
    r, g, b = (float(v) / 255.0 for v in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def pattern_tint(rgb) -> tuple[int, int, int]:
    """The secondary colour of a patterned wall: a mild tint (dark colours) or shade (light ones)."""
    c = np.array(rgb, np.float64)
    target = 255.0 if _luma(rgb) < 0.6 else 0.0
    return tuple(int(round(v)) for v in c + TINT * (target - c))


def tone_rgb(rgb, tone: str) -> tuple[int, int, int]:
    """The wall colour of a named colour in a tone ("light", "plain", "deep")."""
    if tone not in TONES:
        raise ValueError(f"tone must be one of {TONES}, got {tone!r}")
    c = np.array(rgb, np.float64)
    if tone != "plain":
        c = c + TONE_STEP * ((255.0 if tone == "light" else 0.0) - c)
    return tuple(int(round(v)) for v in c)


def _allowed_tones() -> dict[str, tuple[str, ...]]:
    out = {}
    for name, rgb in PALETTE.items():
        keep = []
        for tone in TONES:
            v = np.array(tone_rgb(rgb, tone), np.float64)
            mixed = (v + np.array(pattern_tint(v), np.float64)) / 2.0  # a checker's mean colour
            visible = tone == "plain" or np.linalg.norm(srgb_to_lab(v) - srgb_to_lab(np.array(rgb, np.float64))) >= MIN_TONE_DELTA_E
            if visible and nearest_palette_color(v, PALETTE)[0] == name and nearest_palette_color(mixed, PALETTE)[0] == name:
                keep.append(tone)
        out[name] = tuple(keep)
    return out


#: The tones each colour may take (see TONE_STEP): every colour has "plain"; e.g. brown has no
#: "light" (it would read as orange), white and black only "plain" (a white's light tone is
#: invisible, its deep one grey).
WALL_TONES: dict[str, tuple[str, ...]] = _allowed_tones()


def tone_palette() -> dict[str, tuple[int, int, int]]:
    """Every wall colour a scene can hold ("blue/light", ...) plus the named ones: the palette
    the image-quality proxy (metrics.palette_fit) measures scenes against."""
    out = dict(PALETTE)
    for name, rgb in PALETTE.items():
        for tone in WALL_TONES[name]:
            if tone != "plain":
                out[f"{name}/{tone}"] = tone_rgb(rgb, tone)
    return out


def _a(word: str) -> str:
    """The indefinite article for a word: "an orange", "a red"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------
# Sampling


def _scene_colours(wall_rgb, pattern: str, table: str) -> np.ndarray:
    """Every colour the background layer can hold, times every shadow factor, 0..1 [N, 3]."""
    base = np.array(wall_rgb, np.float64)
    cols = [base, np.array(pattern_tint(wall_rgb), np.float64)]
    if pattern == "gradient":
        for g in np.linspace(0.0, 1.0, 6):
            cols.append(_glow_colour(base, g))
    t = np.array(PALETTE[table], np.float64)
    cols += [t, t * FRONT_SHADE]
    cols = np.stack(cols) / 255.0
    factors = np.linspace(1.0 - SHADOW_STRENGTH, 1.0, 12)
    return (cols[None, :, :] * factors[:, None, None]).reshape(-1, 3)


def _glow_colour(base: np.ndarray, g) -> np.ndarray:
    """Wall colour at glow strength g (0 = edge, 1 = centre); works on arrays of g too."""
    g = np.asarray(g, np.float64)[..., None]
    if _luma(base) < 0.3:  # dark colours brighten towards white at the centre
        out = base + 0.35 * g * (255.0 - base)
    else:  # others: brighter at the centre, a little darker away from it
        out = base * (0.895 + 0.3 * g)
    return np.clip(out, 0.0, 255.0)


def _r(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


def sample_scene(seed: int, index: int, size: int | tuple[int, int] = 128, attempt: int = 0,
                 version: int = SCENE_VERSION) -> dict[str, Any]:
    """The parameters of scene `index` for `seed` (and `attempt`, see make_scene): a JSON-ready dict.
    `version` 2 draws the scenes of version 2 (no category prior) bit for bit: a model trained on
    them is measured on them."""
    if version not in SCENE_VERSIONS:
        raise ValueError(f"scene version must be one of {SCENE_VERSIONS}, got {version!r}")
    width, height = (size, size) if isinstance(size, int) else size
    s = float(min(width, height))
    rng = np.random.default_rng([int(seed), int(index), int(version), int(attempt)])
    names = list(PALETTE)
    typical = False
    if version >= 3:  # the product first: its shape's typical look may decide the colours
        shape = PRODUCT_SHAPES[int(rng.integers(len(PRODUCT_SHAPES)))]
        typical = bool(rng.random() < CATEGORY_PRIOR)
        look = TYPICAL_LOOKS[shape]
        stand = look["stand"][0] if typical else STAND_SHAPES[int(rng.integers(len(STAND_SHAPES)))]
    while True:  # redraw until the product colour is separable from the scene (rare)
        if typical:
            bg, table = look["walls"][int(rng.integers(len(look["walls"])))], look["stand"][1]
        else:
            bg = names[int(rng.integers(len(names)))]
            table = names[int(rng.integers(len(names)))]
        if table == bg:
            continue
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        tones = WALL_TONES[bg]
        tone = tones[int(rng.integers(len(tones)))]
        wall_rgb = tone_rgb(PALETTE[bg], tone)
        scene_cols = _scene_colours(wall_rgb, pattern, table)
        allowed = [
            n for n in names
            if n not in (bg, table)
            and shade_distance(scene_cols, np.asarray(PALETTE[n], np.float64) / 255.0).min() > _SEPARATION
        ]
        if allowed:
            product_colour = allowed[int(rng.integers(len(allowed)))]
            break

    # Wall pattern geometry.
    period = int(rng.integers(max(6, round(s / 12)), max(8, round(s / 7)) + 1))
    pat: dict[str, Any] = {}
    if pattern == "stripes":
        pat = {"orientation": ["vertical", "horizontal"][int(rng.integers(2))], "period": period,
               "width": max(2, int(round(period * 0.4))), "phase": int(rng.integers(period))}
    elif pattern == "dots":
        pat = {"period": period, "radius": _r(max(2.0, period * rng.uniform(0.18, 0.26))),
               "phase": [int(rng.integers(period)), int(rng.integers(period))]}
    elif pattern == "checker":
        pat = {"cell": period, "phase": [int(rng.integers(period)), int(rng.integers(period))]}
    elif pattern == "gradient":
        pat = {"center": [_r(rng.uniform(0.25, 0.75) * width), _r(rng.uniform(0.1, 0.4) * height)],
               "radius": _r(rng.uniform(0.4, 0.65) * s)}

    # Stand.
    if version < 3:
        stand = STAND_SHAPES[int(rng.integers(len(STAND_SHAPES)))]
    top = int(round(rng.uniform(0.55, 0.72) * height))

    # Product size and aspect (width / height).
    if version < 3:
        shape = PRODUCT_SHAPES[int(rng.integers(len(PRODUCT_SHAPES)))]
    aspect = {"bottle": (0.36, 0.5), "box": (0.6, 1.1), "can": (0.5, 0.7), "ball": (1.0, 1.0),
              "cup": (0.85, 1.1), "jar": (0.75, 1.0)}[shape]
    ph = rng.uniform(0.26, 0.42) * s if shape != "ball" else rng.uniform(0.2, 0.3) * s
    pw = ph * rng.uniform(*aspect)
    pw = min(pw, 0.5 * width)

    light = LIGHTS[int(rng.integers(len(LIGHTS)))]
    shadow_len = ["short", "long"][int(rng.integers(2))]
    margin = 0.08 * s
    lo, hi = max(0.3 * width, pw / 2 + margin), min(0.7 * width, width - pw / 2 - margin)
    cx = rng.uniform(lo, hi) if hi > lo else width / 2

    if stand == "table":
        depth = int(round(rng.uniform(0.13, 0.2) * height))
        front = min(top + depth, height - 2)
        base_y = top + rng.uniform(0.4, 0.8) * (front - top)
        stand_geo = {"top": top, "front": front}
    else:
        a, b, dx, lift = _round_stand_draws(rng, pw, s)
        stand_geo = {"top": top, "center": [_r(cx + dx), _r(top + b)], "axes": [_r(a), _r(b)]}
        base_y = top + lift
    ph = min(ph, base_y - 0.06 * s)  # keep the product inside the canvas
    style = None
    if rng.random() < STYLE_RATIO:
        style = int(rng.integers(len(STYLES)))

    scene = {
        "version": int(version),
        "size": [int(width), int(height)],
        "background": {"color": bg, "tone": tone, "rgb": list(wall_rgb), "pattern": pattern, "pattern_params": pat,
                       "tint_rgb": list(pattern_tint(wall_rgb))},
        "table": {"color": table, "rgb": list(PALETTE[table]), "shape": stand, **stand_geo},
        "product": {"shape": shape, "color": product_colour, "rgb": list(PALETTE[product_colour]),
                    "center_x": _r(cx), "base_y": _r(base_y), "width": _r(pw), "height": _r(ph)},
        "shadow": {"length": shadow_len, "light": light},
        "style": None if style is None else STYLES[style][0],
    }
    if version >= 3:
        scene["typical"] = typical  # drawn from the shape's typical look (CATEGORY_PRIOR)
    return scene


# ---------------------------------------------------------------------------------------
# Rendering


def _round_stand_draws(rng: np.random.Generator, product_width: float, s: float) -> tuple[float, float, float, float]:
    """A round stand's semi-axes (a, b), its centre's offset from the product's and how far below
    its top the product's base sits: what no prompt says (sample_scene's draws, in its order)."""
    a = max(product_width * 1.15, rng.uniform(0.24, 0.36) * s)
    b = a * rng.uniform(0.22, 0.3)
    dx = rng.uniform(-0.15, 0.15) * product_width
    return a, b, dx, b * rng.uniform(0.9, 1.3)


def redraw_round_stand(scene: dict, rng: np.random.Generator) -> dict:
    """A copy of a round-stand scene with the stand drawn anew under the same product, as
    sample_scene draws stands (the product's base fixed, the top following from it): another
    round stand the same prompt allows. Measuring it as a generation shows what a text-only
    model that draws perfectly round stands can score against the true one."""
    if scene["table"]["shape"] != "round":
        raise ValueError(f"redraw_round_stand needs a round stand, got {scene['table']['shape']!r}")
    p = scene["product"]
    a, b, dx, lift = _round_stand_draws(rng, p["width"], float(min(scene["size"])))
    top = p["base_y"] - lift
    table = {**scene["table"], "top": int(round(top)), "center": [p["center_x"] + dx, top + b], "axes": [a, b]}
    return {**scene, "table": table}


def _draw(size: tuple[int, int], fn) -> np.ndarray:
    im = Image.new("L", size, 0)
    fn(ImageDraw.Draw(im))
    return np.array(im) > 127


def _wall(scene: dict, width: int, height: int) -> np.ndarray:
    bgd = scene["background"]
    base = np.array(bgd["rgb"], np.float64)
    tint = np.array(bgd["tint_rgb"], np.float64)
    p = bgd["pattern_params"]
    yy, xx = np.mgrid[0:height, 0:width]
    pattern = bgd["pattern"]
    secondary = None
    if pattern == "stripes":
        coord = xx if p["orientation"] == "vertical" else yy
        secondary = (coord + p["phase"]) % p["period"] < p["width"]
    elif pattern == "dots":
        per = p["period"]
        # Centres on a grid shifted by phase; distance to the nearest centre (pixel centres).
        dx = (xx + 0.5 + p["phase"][0]) % per - per / 2
        dy = (yy + 0.5 + p["phase"][1]) % per - per / 2
        secondary = dx * dx + dy * dy <= p["radius"] ** 2
    elif pattern == "checker":
        c = p["cell"]
        secondary = ((xx + p["phase"][0]) // c + (yy + p["phase"][1]) // c) % 2 == 1
    if pattern == "gradient":
        cx, cy = p["center"]
        d = np.sqrt((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2)
        g = np.clip(1.0 - d / p["radius"], 0.0, 1.0)
        wall = _glow_colour(base, g)
    else:
        wall = np.broadcast_to(base, (height, width, 3)).copy()
        if secondary is not None:
            wall[secondary] = tint
    return wall


def _stand(scene: dict, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(top surface, front face) boolean maps."""
    t = scene["table"]
    size = (width, height)
    if t["shape"] == "table":
        top = np.zeros((height, width), bool)
        top[t["top"] : t["front"]] = True
        front = np.zeros((height, width), bool)
        front[t["front"] :] = True
        return top, front
    (cx, cy), (a, b) = t["center"], t["axes"]
    ellipse = _draw(size, lambda d: d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=255))
    body = _draw(size, lambda d: d.rectangle([cx - a, cy, cx + a, height], fill=255))
    return ellipse, body & ~ellipse


def _product_parts(scene: dict, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, shading factor map) of the product."""
    p = scene["product"]
    shape, cx, by, pw, ph = p["shape"], p["center_x"], p["base_y"], p["width"], p["height"]
    light = scene["shadow"]["light"]
    size = (width, height)
    lo_k, hi_k = PRODUCT_SHADE
    yy, xx = np.mgrid[0:height, 0:width]
    x = xx + 0.5
    y = yy + 0.5
    lx = {"left": -1.0, "right": 1.0, "front": 0.0}[light]
    top = by - ph

    def cylinder(cx_, half):
        u = (x - cx_) / max(half, 1e-6)
        v = np.clip(1.0 - ((u + 0.35 * lx) / 1.35) ** 2, 0.0, 1.0)
        return lo_k + (hi_k - lo_k) * v

    mask = np.zeros((height, width), bool)
    k = np.ones((height, width))
    if shape == "ball":
        r = pw / 2
        c = (cx, by - r)
        mask = _draw(size, lambda d: d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255))
        hx, hy = c[0] + 0.35 * lx * r, c[1] - 0.35 * r
        dist = np.sqrt((x - hx) ** 2 + (y - hy) ** 2) / (1.35 * r)
        k = lo_k + (hi_k - lo_k) * np.clip(1.0 - dist**2, 0.0, 1.0)
    elif shape == "box":
        dpt = 0.22 * pw
        fw = pw - dpt
        x0 = cx - pw / 2
        front = _draw(size, lambda d: d.rectangle([x0, top + dpt, x0 + fw, by], fill=255))
        lid = _draw(size, lambda d: d.polygon([(x0, top + dpt), (x0 + dpt, top), (x0 + pw, top), (x0 + fw, top + dpt)], fill=255))
        side = _draw(size, lambda d: d.polygon([(x0 + fw, top + dpt), (x0 + pw, top), (x0 + pw, by - dpt), (x0 + fw, by)], fill=255))
        side &= ~front
        lid &= ~front & ~side
        mask = front | lid | side
        face_front, face_side = (0.95, 0.76) if light != "right" else (0.86, 1.0)
        k = np.where(front, face_front, np.where(side, face_side, hi_k))
    elif shape == "bottle":
        neck_w, cap_w = 0.36 * pw, 0.42 * pw
        body_top = by - 0.62 * ph
        shoulder = by - 0.74 * ph
        neck_top = by - 0.9 * ph
        rad = max(1, int(0.12 * pw))
        body = _draw(size, lambda d: d.rounded_rectangle([cx - pw / 2, body_top, cx + pw / 2, by], radius=rad, fill=255))
        sh = _draw(size, lambda d: d.polygon([(cx - pw / 2, body_top + rad), (cx + pw / 2, body_top + rad),
                                               (cx + neck_w / 2, shoulder), (cx - neck_w / 2, shoulder)], fill=255))
        neck = _draw(size, lambda d: d.rectangle([cx - neck_w / 2, neck_top, cx + neck_w / 2, shoulder], fill=255))
        cap = _draw(size, lambda d: d.rectangle([cx - cap_w / 2, top, cx + cap_w / 2, neck_top], fill=255))
        mask = body | sh | neck | cap
        k = np.where(cap & ~body & ~sh, lo_k + 0.04, cylinder(cx, pw / 2))
    elif shape == "can":
        e = 0.12 * pw
        body = _draw(size, lambda d: d.rectangle([cx - pw / 2, top + e, cx + pw / 2, by - e], fill=255))
        bottom = _draw(size, lambda d: d.ellipse([cx - pw / 2, by - 2 * e, cx + pw / 2, by], fill=255))
        lid = _draw(size, lambda d: d.ellipse([cx - pw / 2, top, cx + pw / 2, top + 2 * e], fill=255))
        mask = body | bottom | lid
        k = np.where(lid, hi_k, cylinder(cx, pw / 2))
    elif shape == "cup":
        bw = 0.74 * pw
        bx0 = cx - pw / 2
        bx1 = bx0 + bw
        body = _draw(size, lambda d: d.polygon([(bx0, top), (bx1, top), (bx1 - 0.1 * bw, by), (bx0 + 0.1 * bw, by)], fill=255))
        hr = 0.26 * pw
        hcy = top + 0.45 * ph
        handle = _draw(size, lambda d: d.ellipse([bx1 - hr, hcy - 1.2 * hr, bx1 + hr, hcy + 1.2 * hr], outline=255,
                                                 width=max(2, int(0.09 * pw))))
        mask = body | handle
        k = np.where(handle & ~body, lo_k + 0.06, cylinder(bx0 + bw / 2, bw / 2))
    elif shape == "jar":
        lid_h = 0.16 * ph
        rad = max(1, int(0.15 * pw))
        body = _draw(size, lambda d: d.rounded_rectangle([cx - pw / 2, top + lid_h, cx + pw / 2, by], radius=rad, fill=255))
        lid = _draw(size, lambda d: d.rectangle([cx - 0.42 * pw, top, cx + 0.42 * pw, top + lid_h], fill=255))
        mask = body | lid
        k = np.where(lid & ~body, lo_k + 0.04, cylinder(cx, pw / 2))
    elif shape == "star_vase":  # held out: a five-pointed star body between a neck and a foot
        outer = min(pw / 2, 0.42 * ph)
        cy = top + 0.18 * ph + outer
        points = [(cx + (outer if i % 2 == 0 else 0.45 * outer) * np.cos(np.radians(-90 + 36 * i)),
                   cy + (outer if i % 2 == 0 else 0.45 * outer) * np.sin(np.radians(-90 + 36 * i))) for i in range(10)]
        body = _draw(size, lambda d: d.polygon(points, fill=255))
        neck = _draw(size, lambda d: d.rectangle([cx - 0.15 * pw, top, cx + 0.15 * pw, top + 0.24 * ph], fill=255))
        foot = _draw(size, lambda d: d.rectangle([cx - 0.18 * pw, cy + 0.7 * outer, cx + 0.18 * pw, by], fill=255))
        mask = body | neck | foot
        k = cylinder(cx, pw / 2)
    elif shape == "dotted_lamp":  # held out: a conical shade on a thin stem and a round foot
        shade = _draw(size, lambda d: d.polygon([(cx - 0.275 * pw, top), (cx + 0.275 * pw, top),
                                                  (cx + pw / 2, top + 0.45 * ph), (cx - pw / 2, top + 0.45 * ph)],
                                                 fill=255))
        half_stem = max(1.0, 0.05 * pw)
        stem = _draw(size, lambda d: d.rectangle([cx - half_stem, top + 0.45 * ph, cx + half_stem, by - 0.1 * ph],
                                                 fill=255))
        foot = _draw(size, lambda d: d.ellipse([cx - 0.35 * pw, by - 0.14 * ph, cx + 0.35 * pw, by], fill=255))
        mask = shade | stem | foot
        k = cylinder(cx, pw / 2)
    elif shape == "diamond_jar":  # held out: a rhombus body standing on its tip, under a lid
        lid = _draw(size, lambda d: d.rectangle([cx - 0.2 * pw, top, cx + 0.2 * pw, top + 0.16 * ph], fill=255))
        mid = top + 0.12 * ph + 0.44 * ph
        body = _draw(size, lambda d: d.polygon([(cx, top + 0.12 * ph), (cx + pw / 2, mid), (cx, by), (cx - pw / 2, mid)],
                                                fill=255))
        mask = lid | body
        k = cylinder(cx, pw / 2)
    else:
        raise ValueError(f"unknown product shape {shape!r}; known: {PRODUCT_SHAPES + tuple(HELD_OUT_PRODUCTS)}")
    return mask, np.where(mask, k, 1.0)


def _product_pattern(scene: dict, width: int, height: int) -> np.ndarray:
    """Where a patterned (held-out) product shows its second colour: bool [H, W], in the product's own
    frame (top left of its box), so the pattern moves and scales with the product."""
    p = scene["product"]
    pat = p["pattern"]
    period = float(pat["period"])
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    u, v = xx - (p["center_x"] - p["width"] / 2), yy - (p["base_y"] - p["height"])
    if pat["kind"] == "stripes":  # horizontal bands
        return np.floor(v / (period / 2)) % 2 == 1
    if pat["kind"] == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    if pat["kind"] == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    raise ValueError(f"unknown product pattern {pat['kind']!r}")


def _shadow_alpha(scene: dict, width: int, height: int, surface: np.ndarray) -> np.ndarray:
    """Soft shadow alpha (0..1, exactly 0 far from the product), clipped to the stand."""
    p = scene["product"]
    cx, by, pw = p["center_x"], p["base_y"], p["width"]
    s = min(width, height)
    lx = {"left": -1.0, "right": 1.0, "front": 0.0}[scene["shadow"]["light"]]
    length = (0.25 if scene["shadow"]["length"] == "short" else 0.85) * pw
    im = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(im)
    d.ellipse([cx - 0.6 * pw, by - 0.1 * pw, cx + 0.6 * pw, by + 0.1 * pw], fill=255)  # contact
    # cast shadow, away from the light (straight back for frontal light)
    sx = cx - lx * length * 0.6
    sy = by - (0.08 * pw if lx else 0.18 * pw)
    half_w = 0.5 * pw + 0.5 * length * abs(lx)
    d.ellipse([sx - half_w, sy - 0.13 * pw, sx + half_w, sy + 0.09 * pw], fill=200)
    im = im.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.025 * s)))
    alpha = np.array(im, np.float64) / 255.0
    return np.where(surface, alpha, 0.0)


def wall_colours(scene: dict) -> dict[str, list[float]]:
    """The colours a scene's wall is drawn in (0..255): its own, its pattern's tint, or the centre
    of its glow."""
    bg = scene["background"]
    out = {"wall": [float(v) for v in bg["rgb"]]}
    if bg["pattern"] == "gradient":
        out["wall_glow"] = [float(v) for v in _glow_colour(np.array(bg["rgb"], np.float64), 1.0)]
    elif bg["pattern"] != "plain":
        out["wall_tint"] = [float(v) for v in bg["tint_rgb"]]
    return out


def is_typical_look(shape: str, wall_colour: str | None, stand_colour: str | None) -> dict[str, bool | None]:
    """Whether a wall and a stand colour (as read from an image) are the product shape's typical ones."""
    look = TYPICAL_LOOKS[shape]
    wall = None if wall_colour is None else wall_colour in look["walls"]
    stand = None if stand_colour is None else stand_colour == look["stand"][1]
    both = None if wall is None or stand is None else wall and stand
    return {"wall": wall, "stand": stand, "both": both}


def render_scene(scene: dict) -> dict[str, np.ndarray]:
    """Draw a scene from its parameters.

    Returns uint8 "image" [H, W, 3] (target), "reference" [H, W, 3] (no product, no shadow),
    bool "mask" [H, W] (product), float "shadow" [H, W] (alpha actually applied, 0..1) and
    int "labels" [H, W]: 0 wall, 1 stand top surface, 2 stand front face, 3 product.
    """
    width, height = scene["size"]
    wall = _wall(scene, width, height)
    top, front = _stand(scene, width, height)
    t = np.array(scene["table"]["rgb"], np.float64)
    layer = wall
    layer[top] = t
    layer[front] = t * FRONT_SHADE
    reference = np.clip(np.round(layer), 0, 255).astype(np.uint8)
    labels = np.zeros((height, width), np.int64)
    labels[top] = 1
    labels[front] = 2

    mask, k = _product_parts(scene, width, height)
    alpha = _shadow_alpha(scene, width, height, top | front)
    alpha = np.where(mask, 0.0, alpha)
    shaded = reference.astype(np.float64) * (1.0 - SHADOW_STRENGTH * alpha)[..., None]
    image = np.where(alpha[..., None] > 0, np.clip(np.round(shaded), 0, 255), reference.astype(np.float64))
    prod = np.array(scene["product"]["rgb"], np.float64)[None, None, :] * k[..., None]
    if "pattern" in scene["product"]:  # held-out products only: their second colour
        second = np.array(scene["product"]["pattern"]["rgb"], np.float64)[None, None, :] * k[..., None]
        prod = np.where(_product_pattern(scene, width, height)[..., None], second, prod)
    image = np.where(mask[..., None], np.clip(np.round(prod), 0, 255), image).astype(np.uint8)
    labels[mask] = 3
    return {"image": image, "reference": reference, "mask": mask, "shadow": alpha, "labels": labels}


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (pixels outside the image are ignored)."""
    if r <= 0:
        return m.copy()
    h = m.copy()
    for d in range(1, r + 1):
        h[:, d:] |= m[:, :-d]
        h[:, :-d] |= m[:, d:]
    v = h.copy()
    for d in range(1, r + 1):
        v[d:] |= h[:-d]
        v[:-d] |= h[d:]
    return v


def _erode(m: np.ndarray, r: int) -> np.ndarray:
    return ~_dilate(~m, r)


def scene_regions(scene: dict, margin: int | None = None, rendered: dict | None = None) -> dict[str, np.ndarray]:
    """Boolean regions [H, W] of a scene, for measuring images generated for it.

    As drawn: "product", "shadow" (alpha > 0.02); "wall" and "table" (the stand's top
    surface) eroded by 1 px and kept `margin` px (default size/32, at least 2) away from the
    product and its shadow's core (alpha > 0.1, i.e. > 5% darker); "background": everything
    that far from the product and the shadow core.

    Layout-robust probes, for text-only generations whose stand may sit a little higher or
    lower than in the ground truth (a model only knows that the product stands on it):
    "wall_probe" is the wall above base_y - 0.2 * height (every scene's stand top lies below
    that, the product's base being on the stand), away from the product; "table_probe" is
    the stand's top surface in the rows within 3% of the height (at least 2 px) of the
    product's base (round stands: within 0.9 product widths of its centre), the surface the
    product stands on, minus the product grown by 1 px. The shadow falls in it too: measure
    its brightest part (color_match(brightest=...)).

    "stand_top" is the whole top surface as drawn (under the product too) and "near_product"
    the product and shadow core grown by `margin`: what the stand-shape measure leaves out.
    """
    r = rendered if rendered is not None else render_scene(scene)
    width, height = scene["size"]
    if margin is None:
        margin = max(2, round(min(width, height) / 32))
    near = _dilate(r["mask"] | (r["shadow"] > 0.1), margin)
    labels = r["labels"]
    rows = np.arange(height)[:, None] + 0.5
    base = scene["product"]["base_y"]
    band = max(2.0, 0.03 * height)
    wall = _erode(labels == 0, 1)
    near_columns = np.ones((1, width), bool)
    if scene["table"]["shape"] == "round":  # any round stand is wider than this (semi-axis >= 1.15 x width)
        p = scene["product"]
        near_columns = np.abs(np.arange(width)[None, :] + 0.5 - p["center_x"]) <= 0.9 * p["width"]
    return {
        "product": r["mask"].copy(),
        "shadow": r["shadow"] > 0.02,
        "wall": wall & ~near,
        "table": _erode(labels == 1, 1) & ~near,
        "background": ~near,
        "wall_probe": wall & (rows < base - 0.2 * height) & ~_dilate(r["mask"], margin),
        "table_probe": (labels == 1) & (np.abs(rows - base) <= band) & near_columns & ~_dilate(r["mask"], 1),
        "stand_top": labels == 1,
        "near_product": near,
    }


def wall_tone_colours(scene: dict, region: np.ndarray) -> dict[str, list[float]]:
    """{tone: the wall's measured colour (metrics.region_color over `region`, 0..255)} for
    every tone the scene's wall colour may take, each drawn with the scene's own pattern:
    what metrics.tone_match compares a generated wall with (which of the blues is it?)."""
    w, h = scene["size"]
    out = {}
    for tone in WALL_TONES[scene["background"]["color"]]:
        wall = _wall(with_wall_tone(scene, tone), w, h)
        out[tone] = [float(v) for v in region_color(np.clip(np.round(wall), 0, 255) / 255.0, region)]
    return out


def with_wall_tone(scene: dict, tone: str) -> dict:
    """A copy of the scene with its wall in another tone of the same named colour."""
    bg = scene["background"]
    rgb = tone_rgb(PALETTE[bg["color"]], tone)
    return {**scene, "background": {**bg, "tone": tone, "rgb": list(rgb), "tint_rgb": list(pattern_tint(rgb))}}


MIN_WALL_FRACTION = 0.15
MIN_TABLE_FRACTION = 0.01


def make_scene(seed: int, index: int, size: int | tuple[int, int] = 128,
               version: int = SCENE_VERSION) -> tuple[dict, dict, dict]:
    """(scene, render_scene output, scene_regions) of sample `index`: the first attempt whose
    wall regions and stand-top regions are large enough to measure (>= 15% of the image,
    and >= 1% / 16 px)."""
    for attempt in range(100):
        scene = sample_scene(seed, index, size, attempt, version)
        r = render_scene(scene)
        reg = scene_regions(scene, rendered=r)
        n = r["mask"].size
        small = max(16, MIN_TABLE_FRACTION * n)
        if (reg["wall"].sum() >= MIN_WALL_FRACTION * n and reg["wall_probe"].sum() >= MIN_WALL_FRACTION * n
                and reg["table"].sum() >= small and reg["table_probe"].sum() >= small):
            if attempt:
                scene["attempt"] = attempt
            return scene, r, reg
    raise RuntimeError(f"no measurable scene for seed {seed}, index {index} at size {size}")


def product_name(scene: dict) -> tuple[str, str]:
    """(English, Chinese) name of a scene's product, as its prompt starts: "a red cup", "一个红色的杯子".
    What a seller has (Product2Img): the prompt-free mode gets this alone."""
    p = scene["product"]
    return f"{_a(p['color'])} {p['color']} {p['shape']}", f"一个{PALETTE_ZH[p['color']]}的{PRODUCT_ZH[p['shape']]}"


def scene_prompt(scene: dict, product: tuple[str, str] | None = None) -> tuple[str, str]:
    """(English, Chinese) prompt: product, stand, environment, background[, style]. ``product``: the
    product's words instead of its colour and shape (held-out products: "a sks vase")."""
    t, b = scene["table"], scene["background"]
    stand_en, stand_zh = STAND_WORDS[t["shape"]]
    shadow_en, shadow_zh = SHADOW_WORDS[scene["shadow"]["length"]]
    bg_en, bg_zh = PATTERN_WORDS[b["pattern"]]
    product_en, product_zh = product or product_name(scene)
    en = f"{product_en} on {_a(t['color'])} {t['color']} {stand_en}, {shadow_en}, "
    en += bg_en.format(c=b["color"])
    zh = f"{product_zh}放在{PALETTE_ZH[t['color']]}的{stand_zh}上，{shadow_zh}，"
    zh += bg_zh.format(c=PALETTE_ZH[b["color"]])
    if scene.get("style"):
        style_zh = dict(STYLES)[scene["style"]]
        en += f", {scene['style']}"
        zh += f"，{style_zh}"
    return en, zh


# ---------------------------------------------------------------------------------------
# Held-out products: catalog views and insertion scenes


def _held_out_product(name: str, rng: np.random.Generator, height: float, center_x: float, base_y: float,
                      max_width: float) -> dict[str, Any]:
    spec = HELD_OUT_PRODUCTS[name]
    first, second = spec["colors"]
    width = min(height * rng.uniform(*spec["aspect"]), max_width)
    return {"shape": name, "color": first, "rgb": list(PALETTE[first]), "center_x": _r(center_x),
            "base_y": _r(base_y), "width": _r(width), "height": _r(height),
            "pattern": {"kind": spec["pattern"], "color": second, "rgb": list(PALETTE[second]),
                        "period": _r(spec["period"] * height, 2)}}


def _separable(name: str, colours: np.ndarray) -> bool:
    """Whether every scene colour is far from both of the product's shading lines (its pixels can be
    segmented by colour, as metrics.ColorShapeSegmenter does)."""
    return all(shade_distance(colours, np.asarray(PALETTE[c], np.float64) / 255.0).min() > _SEPARATION
               for c in HELD_OUT_PRODUCTS[name]["colors"])


def catalog_scene(name: str, seed: int, view: int, size: int = 128) -> dict[str, Any]:
    """Catalog view `view` of held-out product `name`: the product at a drawn size (CATALOG_HEIGHT of the
    frame's height, a quarter of that range per view) and place, before a plain studio backdrop in a light tone of a palette colour (the
    backdrop, scale and position vary from view to view), no stand."""
    if name not in HELD_OUT_PRODUCTS:
        raise ValueError(f"unknown held-out product {name!r}; known: {', '.join(HELD_OUT_PRODUCTS)}")
    key = list(HELD_OUT_PRODUCTS).index(name)
    rng = np.random.default_rng([HELD_OUT_SEED, int(seed), 1, key, int(view)])
    backdrops = [c for c in CATALOG_BACKDROPS if c not in HELD_OUT_PRODUCTS[name]["colors"]]
    first = int(np.random.default_rng([HELD_OUT_SEED, int(seed), 1, key]).integers(len(backdrops)))
    backdrop = backdrops[(first + int(view)) % len(backdrops)]  # another backdrop for every view
    tone = "light" if "light" in WALL_TONES[backdrop] else "plain"
    wall = tone_rgb(PALETTE[backdrop], tone)
    s = float(size)
    # one view in each quarter of CATALOG_HEIGHT: from the size a product has in the insertion scenes (about
    # 0.27 of the frame) to a close-up. Views at 0.45-0.75 alone taught the miniature's product LoRA the
    # product at twice the size it is inserted at, and it drew a blob there.
    low, high = CATALOG_HEIGHT
    height = (low + (high - low) * ((view % 4) + rng.uniform(0.0, 1.0)) / 4) * s
    base_y = rng.uniform(height + 0.06 * s, 0.96 * s)
    product = _held_out_product(name, rng, height, 0.0, base_y, 0.8 * s)
    half = product["width"] / 2 + 0.04 * s
    product["center_x"] = _r(rng.uniform(half, s - half))
    return {"version": SCENE_VERSION, "size": [size, size],
            "background": {"color": backdrop, "tone": tone, "rgb": list(wall), "pattern": "plain", "pattern_params": {},
                           "tint_rgb": list(pattern_tint(wall))},
            "table": {"color": backdrop, "rgb": list(wall), "shape": "table", "top": size, "front": size},
            "product": product, "shadow": {"length": "short", "light": LIGHTS[int(rng.integers(len(LIGHTS)))]},
            "style": None, "catalog_view": int(view)}


def write_catalog(name: str, out, seed: int = 0, size: int = 128, views: int = 4) -> Path:
    """`views` catalog images of a held-out product into `out` (view<k>.png, masks in masks/), the
    folder train.dreampaint --images reads. Returns `out`."""
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for view in range(views):
        r = render_scene(catalog_scene(name, seed, view, size))
        atomic_write_bytes(out / f"view{view}.png", _png_bytes(r["image"], "RGB"))
        atomic_write_bytes(out / "masks" / f"view{view}.png", _png_bytes(r["mask"].astype(np.uint8) * 255, "L"))
    return out


def held_out_scene(name: str, seed: int, index: int, size: int = 128) -> tuple[dict, dict, dict]:
    """(scene, render_scene output, scene_regions) of insertion scene `index` for held-out product
    `name`: a scene of the training kind (sample_scene in its own seed namespace: walls, stands,
    patterns, light) whose product is replaced by the held-out one at the same place and height, on
    a wall and stand whose colours keep the product segmentable. "reference" is the context to insert
    into (the scene without product and shadow), "image" the truth, "mask" the true silhouette."""
    if name not in HELD_OUT_PRODUCTS:
        raise ValueError(f"unknown held-out product {name!r}; known: {', '.join(HELD_OUT_PRODUCTS)}")
    colours = HELD_OUT_PRODUCTS[name]["colors"]
    for attempt in range(200):
        scene = sample_scene(HELD_OUT_SEED + int(seed), index, size, attempt)
        bg, table = scene["background"], scene["table"]
        if bg["color"] in colours or table["color"] in colours:
            continue
        if not _separable(name, _scene_colours(bg["rgb"], bg["pattern"], table["color"])):
            continue
        old = scene["product"]
        rng = np.random.default_rng([HELD_OUT_SEED, int(seed), 2, list(HELD_OUT_PRODUCTS).index(name), int(index),
                                     attempt])
        product = _held_out_product(name, rng, old["height"], old["center_x"], old["base_y"], 0.5 * size)
        half = product["width"] / 2 + 2
        product["center_x"] = _r(min(max(product["center_x"], half), size - half))
        scene = {**scene, "product": product, "held_out": name}
        r = render_scene(scene)
        reg = scene_regions(scene, rendered=r)
        n = r["mask"].size
        if reg["wall"].sum() >= MIN_WALL_FRACTION * n and reg["table"].sum() >= max(16, MIN_TABLE_FRACTION * n):
            if attempt:
                scene["attempt"] = attempt
            return scene, r, reg
    raise RuntimeError(f"no measurable scene for held-out product {name}, seed {seed}, index {index}")


def held_out_prompt(scene: dict, identifier: str | None = None) -> str:
    """The English prompt of a held-out insertion scene: "a <identifier> <class noun> on ..." (the
    learned product) or, without an identifier, "a <class noun> on ..." (the class noun only)."""
    noun = HELD_OUT_PRODUCTS[scene["held_out"]]["class_noun"]
    words = f"a {identifier} {noun}" if identifier else f"{_a(noun)} {noun}"
    return scene_prompt(scene, (words, ""))[0]


# ---------------------------------------------------------------------------------------
# Writing


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    # Fixed settings (and no metadata) so the same pixels always give the same bytes.
    im = Image.fromarray(np.ascontiguousarray(array))
    if im.mode != mode:
        raise ValueError(f"expected a {mode} image, got {im.mode}")
    im.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _parse_splits(text) -> tuple[float, float, float]:
    if isinstance(text, str):
        try:
            parts = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--splits: expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    else:
        parts = [float(v) for v in text]
    if len(parts) != 3 or any(v < 0 for v in parts) or sum(parts) <= 0:
        raise ValueError(f"--splits: expected three non-negative fractions (train,val,test), got {text!r}")
    total = sum(parts)
    return tuple(v / total for v in parts)  # type: ignore[return-value]


def split_counts(count: int, splits) -> tuple[int, int, int]:
    """(train, val, test) sample counts: val and test rounded, train gets the rest."""
    fr = _parse_splits(splits)
    n_val = int(round(count * fr[1]))
    n_test = int(round(count * fr[2]))
    if n_val + n_test > count:
        n_test = count - n_val
    return count - n_val - n_test, n_val, n_test


def write_scenes(out, count: int, size: int = 128, seed: int = 0, splits="0.8,0.1,0.1",
                 chinese: bool = True, references: bool = True, progress: bool = False,
                 only: str | None = None, version: int = SCENE_VERSION) -> dict[str, Path]:
    """Draw `count` scenes into `out`; returns {"train": path, "val": path, "test": path, "info": path}.

    only="test" (or "train", "val") draws just that split's scenes, the same ones a full run draws
    (scene i depends only on seed and i), and returns {only: path, "info": path}."""
    out = Path(out)
    if count < 1:
        raise ValueError("count must be at least 1")
    if size < 32:
        raise ValueError("size must be at least 32 pixels")
    names = ("train", "val", "test")
    if only is not None and only not in names:
        raise ValueError(f"only: expected one of {names}, got {only!r}")
    counts = split_counts(count, splits)
    starts = dict(zip(names, (0, counts[0], counts[0] + counts[1])))
    first, last = (0, count) if only is None else (starts[only], starts[only] + dict(zip(names, counts))[only])
    for sub in ("images", "masks", "refs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lines: list[str] = [""] * count
    t0 = time.perf_counter()
    for i in range(first, last):
        sid = f"{i:06d}"
        scene, r, _ = make_scene(seed, i, size, version)
        atomic_write_bytes(out / "images" / f"{sid}.png", _png_bytes(r["image"], "RGB"))
        atomic_write_bytes(out / "masks" / f"{sid}.png", _png_bytes(r["mask"].astype(np.uint8) * 255, "L"))
        if references:
            atomic_write_bytes(out / "refs" / f"{sid}.png", _png_bytes(r["reference"], "RGB"))
        en, zh = scene_prompt(scene)
        ys, xs = np.nonzero(r["mask"])
        scene["product"]["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        rec: dict[str, Any] = {"id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "prompt": en}
        if chinese:
            rec["prompt_2"] = zh
        if references:
            rec["reference"] = f"refs/{sid}.png"
        rec["scene"] = scene
        lines[i] = json.dumps(rec, ensure_ascii=False, sort_keys=False)
        if progress and (i + 1 - first) % 500 == 0:
            rate = (i + 1 - first) / (time.perf_counter() - t0)
            print(f"{i + 1 - first}/{last - first} scenes ({rate:.0f}/s)", file=sys.stderr)

    paths: dict[str, Path] = {}
    for name, n in zip(names, counts):
        if only is not None and name != only:
            continue
        path = out / f"{name}.jsonl"
        start = starts[name]
        atomic_write_bytes(path, "".join(line + "\n" for line in lines[start : start + n]).encode("utf-8"))
        paths[name] = path
    info = {
        "generator": "train.synthetic", "scene_version": int(version), "seed": int(seed), "count": int(count),
        "size": [int(size), int(size)], "splits": dict(zip(("train", "val", "test"), counts)),
        "palette": {k: list(v) for k, v in PALETTE.items()}, "patterns": list(PATTERNS),
        "wall_tones": {k: list(v) for k, v in WALL_TONES.items()}, "tone_step": TONE_STEP,
        "product_shapes": list(PRODUCT_SHAPES), "stand_shapes": list(STAND_SHAPES),
    }
    if version >= 3:
        info["category_prior"] = {"probability": CATEGORY_PRIOR, "typical_looks": TYPICAL_LOOKS}
    paths["info"] = out / "dataset.json"
    atomic_write_bytes(paths["info"], (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return paths


# ---------------------------------------------------------------------------------------
# The older toy dataset (used by the training tests): one flat shape on a vertical gradient.

COLOURS = {
    "red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "pink": (240, 130, 180), "grey": (128, 128, 128),
}
SHAPES = ("ball", "box", "block")


def _sample(rng: np.random.Generator, w: int, h: int):
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    fg_name, bg_name = names[fg], names[bg]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    base = np.array(COLOURS[bg_name], np.float32)
    ramp = np.linspace(0.75, 1.15, h, dtype=np.float32)[:, None, None]
    background = np.clip(base[None, None, :] * ramp * np.ones((h, w, 1), np.float32), 0, 255).astype(np.uint8)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    r = rng.uniform(0.18, 0.28) * min(w, h)
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ball":
        d.ellipse(box, fill=255)
    elif shape == "box":
        d.rectangle(box, fill=255)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    m = np.array(mask) >= 128
    image = background.copy()
    image[m] = COLOURS[fg_name]
    prompt = f"a {fg_name} {shape} on a {bg_name} background"
    return Image.fromarray(image), mask, Image.fromarray(background), prompt


def write_synthetic_dataset(root, num: int = 8, size=(64, 64), seed: int = 0, references: bool = True,
                            name: str = "train.jsonl") -> Path:
    """The toy dataset: images, masks, references and one JSONL manifest under ``root``.

    Every prompt has the same number of words (equal token counts within batches). Returns
    the manifest path. For the richer scenes with ground truth use ``write_scenes``.
    """
    root = Path(root)
    for sub in ("img", "mask", "ref"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num):
        image, mask, background, prompt = _sample(rng, w, h)
        image.save(root / "img" / f"{i:04d}.png")
        mask.save(root / "mask" / f"{i:04d}.png")
        rec = {"id": f"{i:04d}", "image": f"img/{i:04d}.png", "mask": f"mask/{i:04d}.png", "prompt": prompt}
        if references:
            background.save(root / "ref" / f"{i:04d}.png")
            rec["reference"] = f"ref/{i:04d}.png"
        lines.append(json.dumps(rec))
    manifest = root / name
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def tiny_config(stage: int, model_dir, manifest, output_dir, overrides: list[str] | None = None):
    """configs/tiny_stage<N>.toml pointed at the given tiny model, manifest and output folder."""
    from .config import load_config

    base = [f"model.base={model_dir}", f"data.manifest={manifest}", f"checkpoint.output_dir={output_dir}"]
    return load_config(stage, REPO / "configs" / f"tiny_stage{stage}.toml", base + list(overrides or []))


# ---------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", "--num", dest="count", type=int, default=16, help="number of scenes (default 16)")
    p.add_argument("--size", type=int, default=128, help="square image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--no-chinese", action="store_true", help="leave out prompt_2")
    p.add_argument("--no-references", action="store_true", help="leave out the reference images")
    p.add_argument("--legacy", action="store_true",
                   help="write the older toy dataset (flat shapes; train.jsonl only) instead of scenes")
    p.add_argument("--scene-version", type=int, default=SCENE_VERSION, choices=SCENE_VERSIONS,
                   help=f"how scenes are drawn (default {SCENE_VERSION}: with the category prior; 2: without)")
    p.add_argument("--only", choices=("train", "val", "test"), default=None,
                   help="draw just this split (the same scenes a full run draws)")
    a = p.parse_args(argv)
    if a.legacy:
        print(write_synthetic_dataset(a.out, a.count, a.size, a.seed, not a.no_references))
        return 0
    try:
        t0 = time.perf_counter()
        paths = write_scenes(a.out, a.count, a.size, a.seed, a.splits, chinese=not a.no_chinese,
                             references=not a.no_references, progress=True, only=a.only, version=a.scene_version)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    n = split_counts(a.count, a.splits)
    print(f"{a.count} scenes in {dt:.1f} s ({a.count / max(dt, 1e-9):.0f}/s): "
          f"train {n[0]}, val {n[1]}, test {n[2]}")
    for name in ("train", "val", "test"):
        if name in paths:
            print(paths[name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
