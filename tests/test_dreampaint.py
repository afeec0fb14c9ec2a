"""train.dreampaint: masked DreamBooth of one product on the tiny model, through the project's trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core.errors import InputError
from dreampainter_core.options import SamplingOptions
from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.product_lora import load_product_lora
from train import dreampaint
from train.config import ConfigError
from train.dreampaint import DreamPaintSettings, load_catalog, masked_mse, train_product
from train.trainer import Optimization

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIDE = 64


class Killed(Exception):
    pass


def _catalog_dir(root, n=3):
    """n views of a striped red box on white, at other places and sizes; masks in masks/."""
    (root / "masks").mkdir(parents=True)
    for k in range(n):
        img = np.full((80, 72, 3), 250, np.uint8)  # not square: the loader fits it
        mask = np.zeros((80, 72), bool)
        x0, y0, w, h = 10 + 8 * k, 14 + 4 * k, 24 - 3 * k, 36 - 4 * k
        mask[y0:y0 + h, x0:x0 + w] = True
        img[mask] = (200, 40, 40)
        img[y0:y0 + h:6, x0:x0 + w] = (40, 60, 200)
        Image.fromarray(img).save(root / f"view{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"view{k}.png")
    return root


def _settings(**kw):
    values = dict(class_noun="box", steps=6, rank=4, resolution=SIDE, checkpoint_every=3, log_every=2, lr=1e-3,
                  learn_token=True, prior_preservation=True, prior_images=2, prior_steps=2, prior_guidance=1.0)
    values.update(kw)
    return DreamPaintSettings(**values)


def test_the_catalog_is_checked_before_any_model(tmp_path):
    folder = _catalog_dir(tmp_path / "cat", n=3)
    catalog = load_catalog(folder, SIDE, echo=lambda m: None)
    assert [c.name for c in catalog] == ["view0.png", "view1.png", "view2.png"]
    assert catalog[0].image.shape == (SIDE, SIDE, 3) and catalog[0].mask.shape == (SIDE, SIDE)
    assert catalog[0].mask.any() and (catalog[0].image[:, :2] > 0.9).all()  # padded with its own white border
    for k in (1, 2):
        (folder / f"view{k}.png").unlink()
    with pytest.raises(InputError, match="1 catalog image.*at least 2"):
        load_catalog(folder, SIDE)
    folder = _catalog_dir(tmp_path / "nomask", n=2)
    (folder / "masks" / "view1.png").unlink()
    with pytest.raises(InputError, match="no mask for view1.png.*--auto-mask"):
        load_catalog(folder, SIDE)
    assert dreampaint.main(["--images", str(folder), "--class-noun", "box", "--out", str(tmp_path / "x.safetensors"),
                            "--base", str(tmp_path)]) == 2  # refused before looking for a model
    with pytest.raises(InputError, match="class-noun"):
        DreamPaintSettings(class_noun=" ").check()


def test_auto_mask_cuts_out_the_images_without_a_mask(tmp_path, monkeypatch):
    import dreampainter_core.auto_mask as auto_mask

    class Fake:  # rembg's masker: the non-white pixels
        def alpha(self, image):
            return ((np.asarray(image).min(axis=-1) < 240) * 255).astype(np.uint8)

    monkeypatch.setattr(auto_mask, "rembg_masker", lambda *a, **k: Fake())
    folder = _catalog_dir(tmp_path / "cat", n=2)
    (folder / "masks" / "view1.png").unlink()
    said = []
    catalog = load_catalog(folder, SIDE, auto_mask=True, mask_dir=tmp_path / "run" / "masks", echo=said.append)
    assert (tmp_path / "run" / "masks" / "view1.png").is_file() and "view1.png" in said[0]
    reference = load_catalog(_catalog_dir(tmp_path / "ref", n=2), SIDE, echo=lambda m: None)
    assert np.array_equal(catalog[1].mask, reference[1].mask)  # the product's pixels, as the drawn mask


def test_the_loss_counts_only_the_masked_latents():
    prediction, target = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    weight = torch.zeros(2, 1, 4, 4)
    weight[:, :, 1:3, 1:3] = 1.0
    weight[:, :, 0, 1] = 0.5  # a latent pixel half under the mask counts half
    outside = prediction.clone()
    outside[:, :, 3, :] += 5.0
    assert torch.equal(masked_mse(prediction, target, weight), masked_mse(outside, target, weight))
    err = ((prediction - target) ** 2 * weight).sum(dim=(1, 2, 3)) / (4.5 * 16)
    torch.testing.assert_close(masked_mse(prediction, target, weight), err)


def _train(pipe, catalog, run_dir, out, monkeypatch, kill_at=0):
    calls = [0]
    real = Optimization.step

    def step(self, backward):
        calls[0] += 1
        if calls[0] == kill_at:
            raise Killed
        return real(self, backward)

    with monkeypatch.context() as m:
        m.setattr(Optimization, "step", step)
        try:
            return train_product(pipe, catalog, _settings(), out, run_dir=run_dir, base_model="tiny",
                                 echo=lambda msg: None)
        except Killed:
            return None


def test_training_resumes_exactly_and_leaves_base_glm_and_dreampainter_file_bit_identical(
        tiny_model_dir, tiny_stage2_weights, tmp_path, monkeypatch):
    catalog = load_catalog(_catalog_dir(tmp_path / "cat"), SIDE, echo=lambda m: None)
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage2_weights)
    frozen = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    glm = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}

    product, report = _train(pipe, catalog, tmp_path / "a.run", tmp_path / "a.safetensors", monkeypatch)
    assert _train(pipe, catalog, tmp_path / "b.run", tmp_path / "b.safetensors", monkeypatch, kill_at=5) is None
    resumed, report_b = _train(pipe, catalog, tmp_path / "b.run", tmp_path / "b.safetensors", monkeypatch)

    a, b = load_product_lora(tmp_path / "a.safetensors"), load_product_lora(tmp_path / "b.safetensors")
    assert a.lora.keys() == b.lora.keys() and all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    assert torch.equal(a.token.embedding, b.token.embedding)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in report["log"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in report_b["log"]]
    assert report["mask_shares"] == report_b["mask_shares"]

    # Only the product trained: the base, the DreamPainter file's branch and LoRA, and GLM are as loaded.
    assert not pipe.transformer.has_product_adapter
    assert pipe.transformer.state_dict().keys() == frozen.keys()
    assert all(torch.equal(frozen[k], v) for k, v in pipe.transformer.state_dict().items())
    assert all(torch.equal(glm[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert any(v.abs().sum() > 0 for k, v in a.lora.items() if "lora_B" in k)  # it did learn
    assert not torch.equal(a.token.embedding, pipe.text_encoder.get_input_embeddings().weight[0])

    assert (a.identifier, a.class_noun, a.prompt, a.base["base_model"]) == ("sks", "box", "a sks box", "tiny")
    assert a.info["prior_preservation"] == "2 images, weight 1" and a.info["trained_steps"] == "6"
    context = torch.rand(1, SIDE, SIDE, 3)
    hole = torch.zeros(1, SIDE, SIDE)
    hole[:, 16:48, 16:40] = 1
    out = pipe.insert("a sks box on a table", context, hole, a, sampling=SamplingOptions(steps=2))
    assert torch.equal(out[0][hole[0] < 0.5], context[0][hole[0] < 0.5])

    with pytest.raises(ConfigError, match="other settings.*steps"):
        train_product(pipe, catalog, _settings(steps=7), tmp_path / "a.safetensors", run_dir=tmp_path / "a.run",
                      echo=lambda msg: None)
