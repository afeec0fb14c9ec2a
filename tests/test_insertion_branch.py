"""The insertion control branch: stage 1 with data.mask_policy = "insertion" (train.insertion_masks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core.options import SamplingOptions
from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.weights import read_dreampainter_metadata
from train.buckets import make_buckets
from train.config import ConfigError
from train.dataset import ManifestDataset
from train.insertion_masks import MASK_SHAPES, draw_insertion_hole, insertion_hole
from train.synthetic import tiny_config, write_synthetic_dataset
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _product(size=64):
    product = np.zeros((size, size), bool)
    product[20:44, 26:36] = True  # a tall bottle
    product[16:20, 29:33] = True  # its neck
    return product


def test_the_mask_policy_draws_the_three_shapes_in_equal_share_each_covering_the_product():
    product = _product()
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(MASK_SHAPES, 0)
    for _ in range(3000):
        hole, shape = draw_insertion_hole(product, rng)
        counts[shape] += 1
        assert hole[product].all() and not hole.all()
    # 1000 expected each; a binomial's standard deviation is 25.8, so +-100 is almost 4 of them.
    assert all(abs(n - 1000) <= 100 for n in counts.values()), counts
    rect, ellipse, obj = (insertion_hole(product, s, 0.1) for s in MASK_SHAPES)
    assert obj.sum() < rect.sum() < ellipse.sum()  # the silhouette is the tightest, the ellipse the loosest
    ys, xs = np.nonzero(rect)
    assert rect[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a rectangle is a box


def test_the_dataset_keeps_the_scene_around_the_hole(tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    plain = ManifestDataset(manifest, make_buckets([64], 16, ["1:1"]))
    ds = ManifestDataset(manifest, make_buckets([64], 16, ["1:1"]), mask_policy="insertion")
    shapes = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(ds)):
            item, product = ds[i], plain[i]
            keep = item["mask"][0] > 0.5
            assert not keep[product["mask"][0] > 0.5].any()  # the whole product lies in the hole
            assert torch.equal(item["foreground"][:, keep], item["image"][:, keep])
            assert (item["foreground"][:, ~keep] == 1.0).all()  # the hole is white, as at inference
            assert torch.equal(item["image"], product["image"])
            shapes.append(item["hole_shape"])
    assert set(shapes) == set(MASK_SHAPES)


def test_stage1_trains_an_insertion_branch_that_insert_uses(tiny_model_dir, tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=1)
    out = tmp_path / "run"
    cfg = tiny_config(1, tiny_model_dir, manifest, out, [
        "data.mask_policy=insertion", "train.max_steps=4", "train.batch_size=2", "validation.every=4",
        "checkpoint.every=4", "log.every=2"])
    trainer = Trainer(cfg, echo=lambda m: None)
    result = trainer.train()
    trainer.close()
    meta = read_dreampainter_metadata(result.export_path)
    assert meta["stage"] == "1" and meta["task"] == "insertion"
    grid = Image.open(out / "validation" / "step_00000004.png")
    assert grid.size == (2 * 64, 2 * 64)  # 2 samples x (scene with its hole, insertion)
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=result.export_path)
    context = torch.rand(1, 64, 64, 3)
    hole = torch.zeros(1, 64, 64)
    hole[:, 16:48, 20:40] = 1
    inserted = pipe.insert("a red ball", context, hole, sampling=SamplingOptions(steps=3), return_dict=True)
    assert inserted.mode == "dreampainter"
    assert torch.equal(inserted.images[0][hole[0] < 0.5], context[0][hole[0] < 0.5])
    with pytest.raises(ConfigError, match="encode once"):
        tiny_config(1, tiny_model_dir, manifest, out, ["data.mask_policy=insertion", "cache.enabled=true"])
    with pytest.raises(ConfigError, match="that is stage 1"):
        tiny_config(2, tiny_model_dir, manifest, out, ["data.mask_policy=insertion"])
