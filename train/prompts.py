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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dreampainter_core.errors import DreamPainterError

__all__ = ["COMPONENTS", "PRODUCT_ATTRIBUTES", "Prompt", "PromptComposer", "PromptConfigError", "EXAMPLE_TOML"]

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
