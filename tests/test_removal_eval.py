"""train.removal_eval: made references measured against the true product-free scene; the stage-1
file inside a stage-2 file."""

import json

import pytest
import torch

from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.weights import read_dreampainter_metadata
from train.references import RemovalSettings
from train.removal_eval import PSNR_CAP, measure, stage1_from_stage2, summarize
from train.synthetic import write_scenes

from test_pipeline import PROMPT, _product  # noqa: F401


def test_measure_scores_a_perfect_removal_at_the_ceiling_and_the_photo_below_it(tmp_path):
    truth = write_scenes(tmp_path / "scenes", 6, size=64, seed=2, splits="1,0,0")["train"]
    rows = measure(truth, truth, RemovalSettings(dilate=3))  # "made" = the true references
    assert len(rows) == 6
    for r in rows:
        assert r["psnr_made"] == PSNR_CAP and r["psnr_photo"] < 40  # the photo still shows the product
        assert r["product_left"] == 0.0
        assert r.get("wall_tone_made") == r.get("wall_tone_true")
    # the photo as its own "reference": nothing removed, the product is all there
    photo_as_ref = tmp_path / "photo_as_ref.jsonl"
    lines = [json.loads(line) for line in truth.read_text().splitlines()]
    photo_as_ref.write_text("\n".join(json.dumps({**rec, "image": str(truth.parent / rec["image"]),
                                                   "mask": str(truth.parent / rec["mask"]),
                                                   "reference": str(truth.parent / rec["image"])})
                                      for rec in lines) + "\n")
    bad = measure(truth, photo_as_ref, RemovalSettings(dilate=3))
    assert all(b["psnr_made"] == b["psnr_photo"] for b in bad)
    assert sum(b["product_left"] for b in bad) / len(bad) > 0.8
    s = summarize(rows)
    assert s["n"] == 6 and s["psnr_made_minus_photo"]["mean_difference"] > 0


def test_the_stage1_file_inside_a_stage2_file_is_the_stage2_model_at_lora_scale_0(
        tiny_model_dir, tiny_stage2_weights, tmp_path):
    stage1 = stage1_from_stage2(tiny_stage2_weights, tmp_path / "s1.safetensors")
    meta = read_dreampainter_metadata(stage1)
    assert meta["stage"] == "1" and meta["lora_rank"] == "0"
    one = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=stage1)
    two = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage2_weights)
    assert not one.transformer.has_lora and not one.transformer.supports_reference
    product, mask = _product()
    kw = dict(steps=2, guidance_scale=1.0, seed=3, paste_back=False)
    a = one(PROMPT, product, mask, **kw)
    b = two(PROMPT, product, mask, lora_scale=0.0, **kw)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, two(PROMPT, product, mask, **kw), atol=1e-4)  # the LoRA matters
