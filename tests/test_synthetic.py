"""train.synthetic: procedurally drawn e-commerce scenes with ground truth (CPU, small sizes)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import synthetic as syn
from train.data import check_manifest
from train.data import main as data_main
from train.manifest import read_manifest


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "a"
    assert syn.main(["--out", str(root), "--count", "20", "--size", "64", "--seed", "5"]) == 0
    return root


def _samples(root: Path):
    return [s for name in ("train", "val", "test") for _, s in read_manifest(root / f"{name}.jsonl")]


def test_same_seed_gives_identical_files_and_other_seeds_differ(scenes, tmp_path):
    again = tmp_path / "b"
    assert syn.main(["--out", str(again), "--count", "20", "--size", "64", "--seed", "5"]) == 0
    assert _digest(scenes) == _digest(again)
    other = tmp_path / "c"
    syn.write_scenes(other, 20, size=64, seed=6)
    assert _digest(scenes)["images/000000.png"] != _digest(other)["images/000000.png"]


def test_a_larger_count_only_appends(scenes, tmp_path):
    more = tmp_path / "more"
    syn.write_scenes(more, 25, size=64, seed=5)
    a, b = _digest(scenes), _digest(more)
    for i in range(20):
        for sub in ("images", "masks", "refs"):
            key = f"{sub}/{i:06d}.png"
            assert a[key] == b[key]


def test_one_split_alone_is_the_same_as_in_a_full_run(scenes, tmp_path):
    alone = tmp_path / "test_only"
    paths = syn.write_scenes(alone, 20, size=64, seed=5, only="test")
    assert set(paths) == {"test", "info"} and not (alone / "train.jsonl").exists()
    assert (alone / "test.jsonl").read_bytes() == (scenes / "test.jsonl").read_bytes()
    full, part = _digest(scenes), _digest(alone)
    drawn = {k for k in part if k.startswith(("images/", "masks/", "refs/"))}
    assert drawn == {f"{sub}/{i:06d}.png" for sub in ("images", "masks", "refs") for i in (18, 19)}
    assert all(part[k] == full[k] for k in drawn)
    with pytest.raises(ValueError, match="only"):
        syn.write_scenes(alone, 20, size=64, seed=5, only="dev")


def test_the_command_draws_one_split_of_either_scene_version(tmp_path, capsys):
    for version in syn.SCENE_VERSIONS:
        cli, api = tmp_path / f"cli{version}", tmp_path / f"api{version}"
        assert syn.main(["--out", str(cli), "--count", "10", "--size", "64", "--only", "test",
                         "--scene-version", str(version)]) == 0
        syn.write_scenes(api, 10, size=64, only="test", version=version)
        assert (cli / "test.jsonl").read_bytes() == (api / "test.jsonl").read_bytes()
        assert not (cli / "train.jsonl").exists()
    assert (tmp_path / "cli2" / "test.jsonl").read_bytes() != (tmp_path / "cli3" / "test.jsonl").read_bytes()


def test_splits_are_disjoint_and_sized(scenes, tmp_path):
    counts = {n: len(read_manifest(scenes / f"{n}.jsonl")) for n in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2}
    ids = [s.id for s in _samples(scenes)]
    assert len(ids) == len(set(ids)) == 20
    info = json.loads((scenes / "dataset.json").read_text())
    assert info["splits"] == counts and info["seed"] == 5
    assert syn.split_counts(100, "0.8,0.1,0.1") == (80, 10, 10)
    assert syn.split_counts(10, "6,2,2") == (6, 2, 2)  # fractions are normalised
    assert syn.split_counts(7, "0,0,1") == (0, 0, 7)
    with pytest.raises(ValueError):
        syn.split_counts(10, "0.5,0.5")


def test_every_manifest_passes_train_data_check(scenes, capsys):
    for name in ("train", "val", "test"):
        report = check_manifest(scenes / f"{name}.jsonl")
        assert report["bad"] == [] and report["good"] == report["total"] > 0
        assert data_main(["check", str(scenes / f"{name}.jsonl")]) == 0


def test_masks_are_binary_and_exactly_the_product(scenes):
    for s in _samples(scenes):
        m = np.array(Image.open(s.mask_paths[0]))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        r = syn.render_scene(s.extra["scene"])
        assert np.array_equal(m == 255, r["mask"])
        # Every product pixel is a shade k * colour (k in the renderer's range), nothing else is.
        img = np.array(Image.open(s.image_path)).astype(np.float64)
        rgb = np.array(s.extra["scene"]["product"]["rgb"], np.float64)
        k = img[m == 255] @ rgb / (rgb @ rgb)
        lo, hi = syn.PRODUCT_SHADE
        assert k.min() >= lo - 0.02 and k.max() <= hi + 0.02
        assert np.abs(img[m == 255] - k[:, None] * rgb).max() <= 3.0  # rounding (and 255 clipping)
        x0, y0, x1, y1 = s.extra["scene"]["product"]["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_reference_is_the_scene_without_product_and_shadow(scenes):
    shadow_seen = 0
    for s in _samples(scenes):
        img = np.array(Image.open(s.image_path))
        ref = np.array(Image.open(s.reference_path))
        r = syn.render_scene(s.extra["scene"])
        untouched = ~r["mask"] & (r["shadow"] == 0)
        assert np.array_equal(img[untouched], ref[untouched])
        assert np.array_equal(ref, r["reference"]) and np.array_equal(img, r["image"])
        # The shadow darkens the reference (never lightens it) and is actually there.
        shadow = ~r["mask"] & (r["shadow"] > 0.05)
        assert (img[shadow].astype(int) <= ref[shadow].astype(int)).all()
        shadow_seen += int((img[shadow] < ref[shadow]).any())
        # The reference has no product: the product region shows the background layer.
        assert not np.array_equal(img[r["mask"]], ref[r["mask"]])
    assert shadow_seen == len(_samples(scenes))


def test_scene_ground_truth_describes_the_prompt(scenes):
    for s in _samples(scenes):
        sc = s.extra["scene"]
        assert sc["size"] == [64, 64] and sc["version"] == syn.SCENE_VERSION
        p, t, b = sc["product"], sc["table"], sc["background"]
        assert len({p["color"], t["color"], b["color"]}) == 3
        assert b["tone"] in syn.WALL_TONES[b["color"]]
        assert tuple(b["rgb"]) == syn.tone_rgb(syn.PALETTE[b["color"]], b["tone"])
        assert tuple(t["rgb"]) == syn.PALETTE[t["color"]]
        assert b["pattern"] in syn.PATTERNS and p["shape"] in syn.PRODUCT_SHAPES
        en, zh = syn.scene_prompt(sc)
        assert s.prompt == en and s.prompt_2 == zh
        assert en.split(",")[0].endswith(f"{p['color']} {p['shape']} on {'an' if t['color'][0] in 'aeiou' else 'a'} "
                                          f"{t['color']} {syn.STAND_WORDS[t['shape']][0]}")
        assert f"{b['color']} " in en.split(",")[2] and "background" in en.split(",")[2]
        assert syn.PALETTE_ZH[b["color"]] in zh and syn.PALETTE_ZH[p["color"]] in zh


def test_wall_tones_are_unnamed_visible_and_read_back_as_the_named_colour():
    from train import metrics as M

    # The rule behind WALL_TONES: a tone must stay its colour for the adherence metric ...
    for name, tones in syn.WALL_TONES.items():
        assert "plain" in tones
        for tone in tones:
            rgb = syn.tone_rgb(syn.PALETTE[name], tone)
            assert M.nearest_palette_color(rgb, syn.PALETTE)[0] == name, (name, tone)
    assert sum(len(t) for t in syn.WALL_TONES.values()) >= 2 * len(syn.PALETTE)  # most colours have tones
    with pytest.raises(ValueError, match="tone must be one of"):
        syn.tone_rgb((1, 2, 3), "pale")
    seen = set()
    for i in range(40):
        scene, r, reg = syn.make_scene(3, i, 64)
        b = scene["background"]
        seen.add(b["tone"])
        # ... the prompt never says which tone (only the reference shows it) ...
        en, zh = syn.scene_prompt(scene)
        assert "light" not in en and "deep" not in en and "tone" not in en
        # ... and the reference's wall really is in that tone (its most common colour).
        wall = r["reference"][reg["wall"]].reshape(-1, 3)
        colours, counts = np.unique(wall, axis=0, return_counts=True)
        if b["pattern"] != "gradient":
            assert tuple(int(v) for v in colours[counts.argmax()]) in (tuple(b["rgb"]), tuple(b["tint_rgb"]))
        # the tone palette scores the ground truth as a clean scene
        assert M.palette_fit(r["image"] / 255.0, syn.tone_palette(), reg["background"]) > 0.85
    assert seen == set(syn.TONES)


def test_every_prompt_word_is_in_the_tiny_tokenizer_vocabulary():
    from train.tiny import tiny_vocab

    vocab = tiny_vocab()
    seen_patterns, seen_styles = set(), set()
    for i in range(60):
        scene = syn.sample_scene(0, i, 64)
        en, zh = syn.scene_prompt(scene)
        words = en.replace(",", " ").split()
        assert [w for w in words if w not in vocab] == [], en
        assert [c for c in zh if c not in vocab] == [], zh
        seen_patterns.add(scene["background"]["pattern"])
        seen_styles.add(scene["style"])
    assert seen_patterns == set(syn.PATTERNS) and None in seen_styles and len(seen_styles) > 1


def test_scene_regions_are_measurable_and_disjoint():
    for i in range(12):
        scene, r, reg = syn.make_scene(1, i, 64)
        n = r["mask"].size
        assert reg["wall"].sum() >= syn.MIN_WALL_FRACTION * n and reg["table"].sum() >= 16
        assert not (reg["wall"] & reg["table"]).any()
        for key in ("wall", "table", "background"):
            assert not (reg[key] & r["mask"]).any() and not (reg[key] & (r["shadow"] > 0.1)).any()
        assert (r["labels"][reg["wall"]] == 0).all() and (r["labels"][reg["table"]] == 1).all()
        # probes: wall well above the product's base, stand top at the base's height
        assert reg["wall_probe"].sum() >= syn.MIN_WALL_FRACTION * n and reg["table_probe"].sum() >= 16
        rows = np.nonzero(reg["wall_probe"])[0]
        assert rows.max() + 0.5 < scene["product"]["base_y"] - 0.2 * 64
        assert (r["labels"][reg["table_probe"]] == 1).all() and not (reg["table_probe"] & r["mask"]).any()
        rows = np.nonzero(reg["table_probe"])[0] + 0.5
        assert np.abs(rows - scene["product"]["base_y"]).max() <= max(2.0, 0.03 * 64)


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert syn.main(["--out", str(tmp_path / "x"), "--count", "0"]) == 2
    assert syn.main(["--out", str(tmp_path / "x"), "--size", "16"]) == 2
    assert syn.main(["--out", str(tmp_path / "x"), "--splits", "a,b,c"]) == 2
    assert "error" in capsys.readouterr().err


def test_legacy_toy_dataset_still_available(tmp_path):
    manifest = syn.write_synthetic_dataset(tmp_path / "toy", num=3, size=32, seed=0)
    assert check_manifest(manifest)["bad"] == []
    assert syn.main(["--out", str(tmp_path / "toy2"), "--num", "2", "--size", "32", "--legacy"]) == 0
    assert (tmp_path / "toy2" / "train.jsonl").is_file()


def test_category_prior_draws_each_shapes_typical_look_at_its_rate_and_nothing_else():
    """Scenes carry a category prior (Product2Img): the typical look at CATEGORY_PRIOR, with the
    colours, stand and pattern otherwise as before; patterns stay independent of the shape."""
    scenes = [syn.sample_scene(0, i) for i in range(1500)]
    rate = sum(sc["typical"] for sc in scenes) / len(scenes)
    assert abs(rate - syn.CATEGORY_PRIOR) < 0.04
    for sc in scenes:
        look = syn.is_typical_look(sc["product"]["shape"], sc["background"]["color"], sc["table"]["color"])
        if sc["typical"]:
            assert look["both"] and sc["table"]["shape"] == syn.TYPICAL_LOOKS[sc["product"]["shape"]]["stand"][0]
    # the pattern does not reveal the category: each shape's pattern shares are near uniform
    for shape in syn.PRODUCT_SHAPES:
        pats = [sc["background"]["pattern"] for sc in scenes if sc["product"]["shape"] == shape]
        shares = [pats.count(p) / len(pats) for p in syn.PATTERNS]
        assert max(shares) - min(shares) < 0.15


# ---------------------------------------------------------------------------------------
# Held-out products (DreamPaint): drawn apart from the training scenes, which stay as they were

def test_the_training_scenes_are_bit_identical_to_before_the_held_out_products():
    """sha256 of versions 2 and 3, 40 scenes each (parameters and every rendered map), taken before the
    held-out products were added to the renderer."""
    h = hashlib.sha256()
    for version in (2, 3):
        for i in range(40):
            scene, r, _ = syn.make_scene(0, i, 128, version)
            assert scene["product"]["shape"] in syn.PRODUCT_SHAPES and "pattern" not in scene["product"]
            h.update(json.dumps(scene, sort_keys=True).encode())
            for key in ("image", "reference", "mask", "shadow", "labels"):
                h.update(r[key].tobytes())
    assert h.hexdigest() == "274574048ad2c402b5894e6e1a2894203dc73fcd28a86557ab5a9ea3c11adde3"
    assert not set(syn.HELD_OUT_PRODUCTS) & set(syn.PRODUCT_SHAPES)


def _two_colour_product(image, mask, name):
    """Every product pixel is a shade of one of the product's two colours, and both are there."""
    px = image[mask].astype(np.float64) / 255.0
    near = [syn.shade_distance(px, np.asarray(syn.PALETTE[c], np.float64) / 255.0) < 0.05
            for c in syn.HELD_OUT_PRODUCTS[name]["colors"]]
    assert (near[0] | near[1]).all() and near[0].mean() > 0.2 and near[1].mean() > 0.1


@pytest.mark.parametrize("name", list(syn.HELD_OUT_PRODUCTS))
def test_held_out_catalog_views_vary_and_insertion_scenes_know_the_silhouette(name, tmp_path):
    folder = syn.write_catalog(name, tmp_path / name, seed=0, size=128)
    views = [np.asarray(Image.open(folder / f"view{k}.png")) for k in range(4)]
    masks = [np.asarray(Image.open(folder / "masks" / f"view{k}.png")) > 127 for k in range(4)]
    assert len({tuple(v[0, 0]) for v in views}) == 4  # four backdrops
    assert len({int(m.sum()) for m in masks}) == 4 and len({np.nonzero(m)[1].min() for m in masks}) > 1
    for image, mask in zip(views, masks):
        _two_colour_product(image, mask, name)
    for index in range(3):
        scene, r, _ = syn.held_out_scene(name, 0, index)
        assert scene["held_out"] == name and r["mask"].any()
        _two_colour_product(r["image"], r["mask"], name)
        untouched = ~r["mask"] & (r["shadow"] == 0)
        assert (r["image"][untouched] == r["reference"][untouched]).all()  # the context is the scene without it
    noun = syn.HELD_OUT_PRODUCTS[name]["class_noun"]
    assert syn.held_out_prompt(scene, "sks").startswith(f"a sks {noun} on ")
    assert syn.held_out_prompt(scene).startswith(f"a {noun} on ")
