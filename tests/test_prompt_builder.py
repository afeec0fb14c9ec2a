"""dreampainter_core.prompts.build_prompt: a whole prompt from a product name and a category."""

import pytest

from dreampainter_core.prompts import (
    PRESETS_FILE,
    PromptConfigError,
    build_prompt,
    build_prompts,
    load_presets,
)

CATEGORIES = ("cosmetics", "drinks", "electronics", "food", "shoes", "jewellery", "home", "fashion", "toys")


def test_the_built_in_presets_load_and_cover_the_usual_categories():
    presets = load_presets()
    assert set(CATEGORIES) | {"general"} <= set(presets.categories)
    for cat in presets.categories.values():
        assert cat.parts["stand"] and cat.parts["background"] and cat.styles


def test_deterministic_by_seed_and_different_across_seeds():
    a = [build_prompt("rose face serum", "cosmetics", seed=s) for s in range(12)]
    assert a == [build_prompt("rose face serum", "cosmetics", seed=s) for s in range(12)]
    assert len(set(a)) >= 6
    assert all(p.startswith("rose face serum on ") for p in a)


@pytest.mark.parametrize("category", CATEGORIES)
def test_english_and_chinese_describe_the_same_scene(category):
    presets = load_presets()
    pairs = {en: zh for comp in presets.categories[category].parts.values() for en, zh in comp}
    pairs.update(presets.styles.values())
    for seed in range(20):
        p = build_prompts("item", category, seed=seed, name_zh="商品")
        assert p.en == build_prompt("item", category, "en", seed=seed, name_zh="商品")
        assert p.zh == build_prompt("item", category, "zh", seed=seed, name_zh="商品")
        assert p.zh.startswith("商品放在")
        for part in ("stand", "environment", "background", "style"):
            en = p.parts[part]
            if en is None:
                assert part == "environment"  # the only component that may be left out
                continue
            assert en in p.en and pairs[en] in p.zh, (part, en, p.zh)


def test_aliases_in_any_language_pick_the_category_and_a_style_can_be_named():
    assert build_prompt("x", "护肤品", seed=4) == build_prompt("x", "cosmetics", seed=4)
    assert build_prompt("x", "Sneakers", seed=4) == build_prompt("x", "shoes", seed=4)
    assert build_prompt("x", None, seed=2) == build_prompt("x", "auto", seed=2) == build_prompt("x", "general", seed=2)
    assert build_prompt("x", "food", style="render", seed=1).endswith("clean 3D render")
    assert build_prompt("x", "food", "zh", style="render", seed=1).endswith("干净的三维渲染")


def test_bad_input_names_what_is_wrong():
    with pytest.raises(PromptConfigError, match="name is empty"):
        build_prompt("  ", "food")
    with pytest.raises(PromptConfigError, match=r"unknown category 'garden'; known: cosmetics, drinks"):
        build_prompt("x", "garden")
    with pytest.raises(PromptConfigError, match="unknown style 'neon'; known: cinematic"):
        build_prompt("x", "food", style="neon")
    with pytest.raises(PromptConfigError, match="language must be one of"):
        build_prompt("x", "food", "fr")
    with pytest.raises(PromptConfigError, match="a product name, not a prompt"):
        build_prompt("x" * 500, "food")


def test_a_user_file_adds_and_replaces_categories(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('[styles]\nneon = { en = "neon night photography", zh = "霓虹夜景摄影" }\n\n'
                    '[categories.garden]\naliases = ["园艺"]\nstyles = ["neon"]\n'
                    'stand = [{ en = "a mossy rock", zh = "长满苔藓的岩石" }]\n'
                    'background = [{ en = "a greenhouse", zh = "温室" }]\n\n'
                    '[categories.food]\nstand = [{ en = "a slate board", zh = "石板" }]\n'
                    'background = [{ en = "a dark kitchen", zh = "昏暗的厨房" }]\n')
    presets = load_presets(mine)
    assert build_prompt("spade", "园艺", presets=presets, seed=0) == \
        "spade on a mossy rock, in front of a greenhouse, neon night photography"
    assert build_prompt("bread", "food", presets=mine, seed=5).startswith("bread on a slate board")
    assert "cosmetics" in presets.categories  # the built-in ones stay


@pytest.mark.parametrize("text, phrase", [
    ('[categories.bad]\nstand = [{ en = "a" }]\nbackground = [{ en = "b", zh = "c" }]\n',
     r"line 1\): category 'bad', stand: each entry must be"),
    ('\n\n[categories.bad]\nstand = []\nbackground = [{ en = "b", zh = "c" }]\n', r"line 3\): category 'bad': needs"),
    ('[categories.bad]\nstand = [{ en = "a", zh = "b" }]\nbackground = [{ en = "b", zh = "c" }]\ncolour = 1\n',
     r"unknown key\(s\) \['colour'\]"),
    ('[categories.bad]\nstyles = ["vapor"]\nstand = [{ en = "a", zh = "b" }]\nbackground = [{ en = "b", zh = "c" }]\n',
     r"unknown style\(s\) \['vapor'\]"),
    ('[categories.bad\nstand = 1\n', r"not valid TOML: .*line 1"),
    ('[palette]\nx = 1\n', r"line 1\): unknown top-level key"),
])
def test_a_bad_presets_file_gets_an_error_with_its_line(tmp_path, text, phrase):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(PromptConfigError, match=phrase) as info:
        load_presets(bad)
    assert str(bad) in str(info.value)


def test_the_presets_file_is_the_one_documented():
    assert PRESETS_FILE.name == "prompt_presets.toml" and PRESETS_FILE.is_file()
    assert "models/dreampainter/prompt_presets/" in PRESETS_FILE.read_text(encoding="utf-8")
