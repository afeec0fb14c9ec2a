"""DreamPainter Insert and the Product LoRA Loader on a real ComfyUI (tiny model): the node equals the core's
pipe.insert, keeps the photo outside the mask, and refuses bad inputs with the reason."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402

PROMPT = "a sks cup on a white marble table"


def _insert_graph(name, product=h.TINY_PRODUCT, mask="mask.png", prompt=PROMPT, **widgets):
    values = dict(seed=5, steps=3, cfg=2.0, shift=0.0, product_scale=1.0, lora_scale=1.0, harmonize=0.2, mode="auto",
                  paste_back=True, feather=1)
    values.update(widgets)
    g = {
        "1": {"class_type": "DreamPainterModelLoader",
              "inputs": {"transformer": h.TINY, "dreampainter_weights": "none", "weight_dtype": "fp32",
                         "memory_mode": "gpu", "swap_blocks": 0}},
        "2": {"class_type": "DreamPainterTextEncoderLoader",
              "inputs": {"text_encoder": h.TINY, "tokenizer": "auto", "weight_dtype": "fp32", "device": "default"}},
        "4": {"class_type": "DreamPainterVAELoader", "inputs": {"vae": h.TINY, "weight_dtype": "fp32"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "product.png"}},
        "6": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "7": {"class_type": "DreamPainterInsert",
              "inputs": {"model": ["1", 0], "text_encoder": ["2", 0], "vae": ["4", 0], "context": ["5", 0],
                         "mask": ["6", 0], "prompt": prompt, "negative_prompt": "", **values}},
        "8": {"class_type": "DPTestSaveTensors",
              "inputs": {"name": name, "image": ["7", 0], "latent": ["7", 1], "mask": ["7", 2]}},
    }
    if product is not None:
        g["9"] = {"class_type": "DreamPainterProductLoRALoader", "inputs": {"product_lora": product}}
        g["7"]["inputs"]["product_lora"] = ["9", 0]
    return g


def _load(comfy, name):
    return torch.from_numpy(np.array(Image.open(comfy.base / "input" / name)).astype(np.float32) / 255.0)[None]


def test_insert_node_equals_the_core_and_keeps_the_photo(comfy):
    from dreampainter_core import DreamPainterPipeline
    from dreampainter_core.options import ReferenceOptions, SamplingOptions

    entry = comfy.run(_insert_graph("insert"))
    assert entry["status"]["status_str"] == "success", f"{h.execution_error(entry)}\n{comfy.log_tail()}"
    got = comfy.tensors("insert")
    models = comfy.base / "models"
    pipe = DreamPainterPipeline.from_pretrained(models / "diffusers" / "cogview4-tiny")
    context, mask = _load(comfy, "product.png"), _load(comfy, "mask.png")
    direct = pipe.insert(PROMPT, context, mask, models / "dreampainter_products" / h.TINY_PRODUCT,
                         sampling=SamplingOptions(steps=3, guidance_scale=2.0, seed=5),
                         reference=ReferenceOptions(), return_dict=True)
    assert torch.equal(got["image"], direct.images) and torch.equal(got["latent"], direct.latents.float())
    kept = (got["mask"] < 0.5).unsqueeze(-1).expand_as(context)
    assert torch.equal(got["image"][kept], context[kept])
    assert entry["outputs"]["7"]["dreampainter_mode"] == ["training_free"]


def test_insert_node_names_bad_inputs(comfy):
    for graph, expected in ((_insert_graph("wrong_size", mask="mask_wrong_size.png"), "does not match the context"),
                            (_insert_graph("other_base", product=h.MINIATURE_PRODUCT),
                             "another base model (dreampainter-miniature)")):
        entry = comfy.run(graph)
        assert entry["status"]["status_str"] == "error"
        assert expected in h.execution_error(entry)["exception_message"]
    status, body = comfy.queue(_insert_graph("scale", product_scale=float("nan")))  # refused before it runs
    assert status == 400 and "product_scale" in str(body)
