"""Prompt composer: the paper's five prompt components, sampled by ratio and joined by a template.

DreamEcom-400K (paper, section 3, step 1) splits a scene into five components, in order:
product (category, count, colour), display stand (what the product touches), environment
elements (around it), distant background, and style (photography or 3D look). Each
component is included with its own probability ("sampling ratio") and its value is drawn
from a configured range. The paper then lets an LLM expand the combination; here a
template joins the parts into one sentence, and a second template gives Chinese::

    a red bottle on a white marble stand, surrounded by green leaves,
    in front of a soft beige wall, studio photography
    一个红色的瓶子放在白色大理石展台上，周围是绿叶，背景是柔和的米色墙面，影棚摄影

Config (TOML or JSON, see EXAMPLE_TOML): `[ratios]` per component (default 1.0; product
attributes as "product.colour"), `[components]` where a component is a list (uniform), a
table value -> weight, or a table {values, weights, zh}; the product may instead be a table
of attributes {count, colour, category} joined by the "product_phrase" template. Chinese
values come from a `zh` list parallel to the values (or a table English -> Chinese), inline
or in a top-level `[zh]` table. English category values may give a plural as "jar|jars",
used when the count is not one.
"""

from __future__ import annotations

import json
import random
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import DreamPainterError

__all__ = ["COMPONENTS", "PRODUCT_ATTRIBUTES", "Prompt", "PromptComposer", "PromptConfigError", "EXAMPLE_TOML",
           "PromptPresets", "build_prompt", "build_prompts", "load_presets", "check_name", "name_with_token", "MAX_PROMPT_CHARS", "prompt_problem"]

COMPONENTS = ("product", "stand", "environment", "background", "style")
PRODUCT_ATTRIBUTES = ("count", "colour", "category")

# Connectors put before each part; "product_phrase" builds a product from its attributes;
# "subject" stands in when the product is left out, so the sentence still has a subject.
EN_TEMPLATE = {
    "stand": " on {}",
    "environment": ", surrounded by {}",
    "background": ", in front of {}",
    "style": ", {}",
    "product_phrase": "{count} {colour} {category}",
    "subject": "a product",
}
ZH_TEMPLATE = {
    "stand": "放在{}上",
    "environment": "，周围是{}",
    "background": "，背景是{}",
    "style": "，{}",
    "product_phrase": "{count}{colour}{category}",
    "subject": "一件商品",
}
_SINGULAR_COUNTS = {"", "a", "an", "one", "a single", "single"}

EXAMPLE_TOML = """\
# Prompt components for `python -m train.data build --prompts prompts.toml`.
# ratios: probability that a component appears in a prompt (default 1.0).
[ratios]
product = 1.0
"product.colour" = 0.7
stand = 0.8
environment = 0.6
background = 0.9
style = 0.7

[components.product]
count = { values = ["a", "two", "three"], weights = [6, 3, 1], zh = ["一个", "两个", "三个"] }
colour = { values = ["red", "white", "matte black", "amber"], zh = ["红色的", "白色的", "哑光黑色的", "琥珀色的"] }
category = { values = ["bottle|bottles", "jar|jars", "perfume bottle|perfume bottles", "sneaker|sneakers"], zh = ["瓶子", "罐子", "香水瓶", "运动鞋"] }

[components.stand]
values = ["a white marble stand", "a wooden table", "a round stone pedestal", "a glossy acrylic block"]
zh = ["白色大理石展台", "木桌", "圆形石台", "光面亚克力块"]

[components.environment]
values = ["green leaves", "scattered rose petals", "soft water ripples", "floating bubbles"]
zh = ["绿叶", "散落的玫瑰花瓣", "柔和的水波纹", "漂浮的气泡"]

[components.background]
values = ["a soft beige wall", "a blurred city skyline at dusk", "a sunlit beach", "a minimalist pastel gradient"]
weights = [3, 1, 1, 2]
zh = ["柔和的米色墙面", "黄昏时模糊的城市天际线", "阳光明媚的海滩", "极简的柔和渐变"]

[components.style]
values = ["studio photography", "soft natural light photography", "3D render", "cinematic lighting"]
zh = ["影棚摄影", "柔和自然光摄影", "三维渲染", "电影感布光"]
"""


class PromptConfigError(DreamPainterError, ValueError):
    """The prompt component config is malformed; the message names the entry."""


@dataclass(frozen=True)
class _Choice:
    values: tuple[str, ...]
    weights: tuple[float, ...] | None
    zh: tuple[str, ...] | None

    def draw(self, rng: random.Random) -> int:
        n = len(self.values)
        if self.weights is None:
            return rng.randrange(n)
        return rng.choices(range(n), weights=self.weights)[0]


@dataclass(frozen=True)
class Prompt:
    en: str
    zh: str | None
    parts: dict[str, str | None]  # the English value drawn per component (None = left out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choice(name: str, spec: Any, zh: Any = None) -> _Choice:
    weights = None
    if isinstance(spec, Mapping) and "values" in spec:
        zh = spec.get("zh", zh)
        weights = spec.get("weights")
        spec = spec["values"]
    if isinstance(spec, Mapping):
        if not spec or not all(isinstance(k, str) and _is_number(w) for k, w in spec.items()):
            raise PromptConfigError(f"component '{name}': a table must map each value to a weight")
        values = list(spec.keys())
        weights = list(spec.values())
    elif isinstance(spec, (list, tuple)):
        values = list(spec)
    else:
        raise PromptConfigError(f"component '{name}': expected a list of values or a table value -> weight")
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise PromptConfigError(f"component '{name}': values must be non-empty strings")
    if weights is not None:
        if len(weights) != len(values) or not all(_is_number(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise PromptConfigError(f"component '{name}': need one non-negative weight per value, not all zero")
        weights = tuple(float(w) for w in weights)
    zh_values = None
    if zh is not None:
        if isinstance(zh, Mapping):  # English value -> Chinese
            missing = [v for v in values if v not in zh]
            if missing:
                raise PromptConfigError(f"component '{name}': no zh for {missing}")
            zh = [zh[v] for v in values]
        if not isinstance(zh, (list, tuple)) or len(zh) != len(values):
            raise PromptConfigError(f"component '{name}': zh must have one entry per value ({len(values)})")
        if not all(isinstance(z, str) for z in zh):
            raise PromptConfigError(f"component '{name}': zh entries must be strings")
        zh_values = tuple(zh)
    return _Choice(tuple(values), weights, zh_values)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _fix_article(text: str) -> str:
    # "a amber bottle" -> "an amber bottle": only the leading article, only by spelling.
    return re.sub(r"^a (?=[aeiouAEIOU])", "an ", text)


class PromptComposer:
    """Compose English (and, given zh values, Chinese) prompts from the five components.

    components: name -> list of values | {value: weight} | {"values", "weights", "zh"};
        "product" may instead be {count, colour, category} each of those forms.
    ratios: name (or "product.<attribute>") -> inclusion probability, default 1.0.
    zh: optional name -> list parallel to the values, or {English: Chinese}.
    Same seed -> same sequence of prompts; compose(key=...) is deterministic per key alone.
    """

    def __init__(
        self,
        components: Mapping[str, Any],
        ratios: Mapping[str, float] | None = None,
        seed: int | str = 0,
        zh: Mapping[str, Any] | None = None,
        template: Mapping[str, str] | None = None,
        zh_template: Mapping[str, str] | None = None,
    ):
        zh = dict(zh or {})
        unknown = [k for k in components if k not in COMPONENTS]
        if unknown:
            raise PromptConfigError(f"unknown component(s) {unknown}; known: {list(COMPONENTS)}")
        self.choices: dict[str, _Choice] = {}
        self.product_attributes: dict[str, _Choice] = {}
        for name, spec in components.items():
            if name == "product" and isinstance(spec, Mapping) and spec and set(spec) <= set(PRODUCT_ATTRIBUTES):
                pzh = zh.get("product") or {}
                if not isinstance(pzh, Mapping):
                    raise PromptConfigError("zh for an attribute product must be a table per attribute")
                if "category" not in spec:
                    raise PromptConfigError("component 'product': attributes need at least 'category'")
                for attr in PRODUCT_ATTRIBUTES:
                    if attr in spec:
                        self.product_attributes[attr] = _choice(f"product.{attr}", spec[attr], pzh.get(attr))
            else:
                self.choices[name] = _choice(name, spec, zh.get(name))

        self.ratios: dict[str, float] = {}
        known = set(COMPONENTS) | {f"product.{a}" for a in PRODUCT_ATTRIBUTES}
        for key, r in (ratios or {}).items():
            if key not in known:
                raise PromptConfigError(f"ratio for unknown component '{key}'; known: {sorted(known)}")
            if not _is_number(r) or not 0.0 <= r <= 1.0:
                raise PromptConfigError(f"ratio '{key}' must be a number in [0, 1], got {r!r}")
            self.ratios[key] = float(r)
        self.seed = seed
        self.template = {**EN_TEMPLATE, **(template or {})}
        self.zh_template = {**ZH_TEMPLATE, **(zh_template or {})}
        self._rng = random.Random(seed)

    # -- config files -----------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int | str | None = None) -> "PromptComposer":
        allowed = {"components", "ratios", "zh", "template", "template_zh", "seed"}
        extra = set(cfg) - allowed
        if extra:
            raise PromptConfigError(f"unknown top-level key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
        if "components" not in cfg:
            raise PromptConfigError("missing [components]")
        return cls(
            cfg["components"],
            cfg.get("ratios"),
            seed=cfg.get("seed", 0) if seed is None else seed,
            zh=cfg.get("zh"),
            template=cfg.get("template"),
            zh_template=cfg.get("template_zh"),
        )

    @classmethod
    def from_file(cls, path: str | Path, seed: int | str | None = None) -> "PromptComposer":
        """Load a .toml (tomllib) or .json config; `seed` overrides the file's seed."""
        path = Path(path)
        try:
            if path.suffix.lower() == ".json":
                cfg = json.loads(path.read_text(encoding="utf-8"))
            else:
                import tomllib

                cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise PromptConfigError(f"{path}: {e}") from None
        try:
            return cls.from_config(cfg, seed=seed)
        except PromptConfigError as e:
            raise PromptConfigError(f"{path}: {e}") from None

    # -- composing --------------------------------------------------------------------

    def ratio(self, key: str) -> float:
        return self.ratios.get(key, 1.0)

    @property
    def has_zh(self) -> bool:
        """True when every configured value has a Chinese form (needed for bilingual output)."""
        all_choices = list(self.choices.values()) + list(self.product_attributes.values())
        return all(c.zh is not None for c in all_choices)

    def _draw_product(self, rng: random.Random) -> tuple[str, str | None]:
        picked: dict[str, tuple[str, str | None]] = {}
        for attr in PRODUCT_ATTRIBUTES:
            ch = self.product_attributes.get(attr)
            if ch is None:
                continue
            # category is the noun: always there when the product is.
            if attr != "category" and rng.random() >= self.ratio(f"product.{attr}"):
                continue
            i = ch.draw(rng)
            picked[attr] = (ch.values[i], ch.zh[i] if ch.zh else None)
        count = picked.get("count", ("", ""))[0]
        singular, _, plural = picked["category"][0].partition("|")
        noun = (plural or singular) if count.strip().lower() not in _SINGULAR_COUNTS else singular
        en_fields = {a: picked.get(a, ("", ""))[0] for a in PRODUCT_ATTRIBUTES}
        en_fields["category"] = noun
        en = _fix_article(_clean(self.template["product_phrase"].format(**en_fields)))
        zh = None
        if all(z is not None for _, z in picked.values()):
            zh_fields = {a: picked.get(a, ("", ""))[1] for a in PRODUCT_ATTRIBUTES}
            zh = _clean(self.zh_template["product_phrase"].format(**zh_fields))
        return en, zh

    def compose(
        self, product: str | None = None, product_zh: str | None = None, key: str | None = None
    ) -> Prompt:
        """Draw one prompt.

        product/product_zh: a known product description (sidecar file, file name) that
        replaces the drawn product. key: draw from a generator seeded by (seed, key), so a
        sample's prompt does not depend on which other samples were composed before it.
        """
        rng = self._rng if key is None else random.Random(f"{self.seed}/{key}")
        parts: dict[str, str | None] = {}
        zh_parts: dict[str, str | None] = {}
        zh_ok = True
        for name in COMPONENTS:
            if name == "product" and product is not None:
                parts[name], zh_parts[name] = _clean(product), product_zh
                zh_ok &= product_zh is not None
                continue
            configured = name in self.choices or (name == "product" and self.product_attributes)
            if not configured or rng.random() >= self.ratio(name):
                parts[name] = zh_parts[name] = None
                continue
            if name == "product" and self.product_attributes:
                en, zh = self._draw_product(rng)
            else:
                ch = self.choices[name]
                i = ch.draw(rng)
                en, zh = ch.values[i], (ch.zh[i] if ch.zh else None)
            parts[name], zh_parts[name] = en, zh
            zh_ok &= zh is not None

        en_text = parts["product"] or self.template["subject"]
        zh_text = zh_parts["product"] or self.zh_template["subject"]
        for name in COMPONENTS[1:]:
            if parts[name]:
                en_text += self.template[name].format(parts[name])
                if zh_parts[name]:
                    zh_text += self.zh_template[name].format(zh_parts[name])
        return Prompt(en=en_text, zh=zh_text if zh_ok else None, parts=parts)


# ---------------------------------------------------------------------------------------
# Prompt text: what any prompt must be before it reaches a tokenizer

#: The longest prompt (and negative prompt) accepted, in characters. The text encoder reads at
#: most 1024 tokens (the rest is cut); this bounds the tokenizer's work before that cut.
MAX_PROMPT_CHARS = 10_000


def prompt_problem(text) -> str | None:
    """Why ``text`` cannot be a prompt, as the rest of a sentence that starts with its name
    ("prompt has ..."), or None. Cheap: run before any text encoder loads."""
    if not isinstance(text, str):
        return f"must be a string, got {reprlib.repr(text)}"
    if len(text) > MAX_PROMPT_CHARS:
        return (f"is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted (the text encoder reads "
                "at most 1024 tokens and cuts the rest): shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can carry one; no tokenizer takes it
        return (f"has an unpaired surrogate at character {exc.start} (a broken Unicode escape such as \\ud83d "
                "without its pair): fix the text's encoding")
    return None


# ---------------------------------------------------------------------------------------
# Category presets: a whole prompt from a product name (dreampainter_core/prompt_presets.toml)

PRESETS_FILE = Path(__file__).resolve().with_name("prompt_presets.toml")
LANGUAGES = ("en", "zh")
SCENE_COMPONENTS = ("stand", "environment", "background")
DEFAULT_RATIOS = {"stand": 1.0, "environment": 0.75, "background": 1.0, "style": 1.0}
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Category:
    key: str
    aliases: tuple[str, ...]
    styles: tuple[str, ...]
    parts: dict[str, tuple[tuple[str, str], ...]]  # component -> ((en, zh), ...)
    environment_ratio: float


@dataclass(frozen=True)
class PromptPresets:
    """Styles and categories, checked when loaded; ``load_presets`` reads and merges the files."""

    styles: dict[str, tuple[str, str]]
    categories: dict[str, Category]

    def category(self, name: str | None) -> Category:
        if name is None or not str(name).strip() or str(name).strip().lower() == "auto":
            return self.categories["general"] if "general" in self.categories else next(iter(self.categories.values()))
        wanted = str(name).strip().lower()
        for cat in self.categories.values():
            if wanted == cat.key or wanted in (a.lower() for a in cat.aliases):
                return cat
        raise PromptConfigError(f"unknown category {name!r}; known: {', '.join(sorted(self.categories))} "
                                "(or one of their aliases; add your own in a presets file)")

    def composer(self, category: Category, style: str | None, seed: int | str) -> PromptComposer:
        if style is not None and str(style).strip() and str(style).strip().lower() != "auto":
            key = str(style).strip().lower()
            if key not in self.styles:
                raise PromptConfigError(f"unknown style {style!r}; known: {', '.join(sorted(self.styles))}")
            style_keys = (key,)
        else:
            style_keys = category.styles
        components: dict[str, Any] = {
            name: {"values": [en for en, _ in pairs], "zh": [zh for _, zh in pairs]}
            for name, pairs in category.parts.items()
        }
        components["style"] = {"values": [self.styles[k][0] for k in style_keys],
                               "zh": [self.styles[k][1] for k in style_keys]}
        ratios = {**DEFAULT_RATIOS, "environment": category.environment_ratio}
        return PromptComposer(components, {k: v for k, v in ratios.items() if k in components}, seed=seed)


def _line_of(text: str, *patterns: str) -> str:
    """' (line N)' of the first line matching one of the regex patterns, or ''."""
    for pattern in patterns:
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(pattern, line):
                return f" (line {i})"
    return ""


def _pair(where: str, item: Any) -> tuple[str, str]:
    if not isinstance(item, Mapping) or set(item) != {"en", "zh"} or not all(
            isinstance(item[k], str) and item[k].strip() for k in ("en", "zh")):
        raise PromptConfigError(f"{where}: each entry must be {{ en = \"...\", zh = \"...\" }} with both texts, "
                                f"got {item!r}")
    return _clean(item["en"]), _clean(item["zh"])


def _parse_presets(cfg: Mapping[str, Any], text: str, source: str,
                   known_styles: Mapping[str, tuple[str, str]]) -> tuple[dict, dict]:
    extra = set(cfg) - {"styles", "categories"}
    if extra:
        line = _line_of(text, r"^\s*\[?" + re.escape(sorted(extra)[0]))
        raise PromptConfigError(f"{source}{line}: unknown top-level key(s) {sorted(extra)}; allowed: styles, "
                                "categories")
    styles = {}
    for key, item in (cfg.get("styles") or {}).items():
        line = _line_of(text, r"^\s*" + re.escape(key) + r"\s*=")
        styles[key.lower()] = _pair(f"{source}{line}: style '{key}'", item)
    all_styles = {**known_styles, **styles}
    categories = {}
    for key, spec in (cfg.get("categories") or {}).items():
        line = _line_of(text, r"^\s*\[categories\." + re.escape(key) + r"\]")
        where = f"{source}{line}: category '{key}'"
        if not isinstance(spec, Mapping):
            raise PromptConfigError(f"{where}: expected a table")
        allowed = {"aliases", "styles", "environment_ratio", *SCENE_COMPONENTS}
        unknown = set(spec) - allowed
        if unknown:
            raise PromptConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        missing = [c for c in ("stand", "background") if not spec.get(c)]
        if missing:
            raise PromptConfigError(f"{where}: needs at least one {' and one '.join(missing)}")
        parts = {}
        for comp in SCENE_COMPONENTS:
            items = spec.get(comp) or []
            if not isinstance(items, list):
                raise PromptConfigError(f"{where}: {comp} must be a list of {{ en, zh }} entries")
            if items:
                parts[comp] = tuple(_pair(f"{where}, {comp}", item) for item in items)
        style_keys = spec.get("styles") or sorted(all_styles)[:1]
        if not isinstance(style_keys, list) or not all(isinstance(s, str) for s in style_keys):
            raise PromptConfigError(f"{where}: styles must be a list of style keys")
        unknown_styles = [s for s in style_keys if s.lower() not in all_styles]
        if unknown_styles:
            raise PromptConfigError(f"{where}: unknown style(s) {unknown_styles}; known: {sorted(all_styles)}")
        aliases = spec.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise PromptConfigError(f"{where}: aliases must be a list of names")
        ratio = spec.get("environment_ratio", DEFAULT_RATIOS["environment"])
        if not _is_number(ratio) or not 0.0 <= ratio <= 1.0:
            raise PromptConfigError(f"{where}: environment_ratio must be a number in [0, 1], got {ratio!r}")
        categories[key.lower()] = Category(key.lower(), tuple(a.strip() for a in aliases),
                                           tuple(s.lower() for s in style_keys), parts, float(ratio))
    return styles, categories


def load_presets(*extra_files: str | Path) -> PromptPresets:
    """The built-in presets, then each extra file on top (a category or style of the same key
    replaces the earlier one). A malformed file raises PromptConfigError naming it and the line."""
    import tomllib

    styles: dict[str, tuple[str, str]] = {}
    categories: dict[str, Category] = {}
    for path in (PRESETS_FILE, *extra_files):
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            cfg = tomllib.loads(text)
        except OSError as e:
            raise PromptConfigError(f"{path}: cannot read the presets file ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:  # its message carries the line and column
            raise PromptConfigError(f"{path}: not valid TOML: {e}") from None
        new_styles, new_categories = _parse_presets(cfg, text, str(path), styles)
        styles.update(new_styles)
        categories.update(new_categories)
    if not categories:
        raise PromptConfigError("no categories in the presets files")
    return PromptPresets(styles, categories)


_BUILT_IN: PromptPresets | None = None


def _presets(presets) -> PromptPresets:
    global _BUILT_IN
    if isinstance(presets, PromptPresets):
        return presets
    if presets is None:
        if _BUILT_IN is None:
            _BUILT_IN = load_presets()
        return _BUILT_IN
    files = [presets] if isinstance(presets, (str, Path)) else list(presets)
    return load_presets(*files)


def build_prompts(name: str, category: str | None = None, style: str | None = None, seed: int = 0,
                  presets=None, name_zh: str | None = None) -> Prompt:
    """Both languages of ``build_prompt`` (the same draw: the Chinese is the English's parallel)."""
    name = check_name(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PromptConfigError(f"seed must be an integer, got {seed!r}")
    p = _presets(presets)
    cat = p.category(category)
    composer = p.composer(cat, style, seed)
    return composer.compose(product=name, product_zh=_clean(name_zh) if name_zh else name, key=f"{cat.key}/{name}")


def check_name(name) -> str:
    """A product's name as the prompt builder and the prompt-free mode take it, whitespace cleaned;
    PromptConfigError when it is empty, too long for a name (over MAX_NAME_CHARS) or not text."""
    if not isinstance(name, str) or not name.strip():
        raise PromptConfigError("name is empty: give the product's name (e.g. 'rose face serum' or '玫瑰精华液')")
    if len(name) > MAX_NAME_CHARS:
        raise PromptConfigError(f"name is {len(name)} characters; keep it under {MAX_NAME_CHARS} (a product name, "
                                "not a prompt: the scene is drawn from the category)")
    problem = prompt_problem(name)
    if problem:
        raise PromptConfigError(f"name {problem}")
    return _clean(name)


def name_with_token(name, token: str) -> str:
    """The prompt-free prompt (Product2Img): the product's name, then the learned token, e.g.
    "a red cup <background>"; the name is checked as check_name does."""
    return f"{check_name(name)} {token}"


def build_prompt(name: str, category: str | None = None, language: str = "en", style: str | None = None,
                 seed: int = 0, presets=None, name_zh: str | None = None) -> str:
    """A full background prompt from a product name: the name, then a display stand, maybe an
    environment element, a distant background and a style that suit the category.

    category: a key or alias of the presets (None or "auto": general); style: a style key (None or
    "auto": drawn from the category's); presets: extra presets file(s) on top of the built-in
    ones, or a PromptPresets. Deterministic by (seed, category, name); "en" and "zh" of the same
    arguments describe the same scene. name_zh: the name in the Chinese prompt (default: name).
    """
    if language not in LANGUAGES:
        raise PromptConfigError(f"language must be one of {LANGUAGES}, got {language!r}")
    prompt = build_prompts(name, category, style, seed, presets, name_zh)
    return prompt.en if language == "en" else prompt.zh
