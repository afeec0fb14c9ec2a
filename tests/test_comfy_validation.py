"""The nodes' validate_inputs on a real ComfyUI 0.3.75: a graph with an impossible setting is refused
by POST /prompt (HTTP 400, node_errors) before anything loads, with a message that names the input,
what was expected and what to do; linked widgets (values only known at run time) and the defaults
pass. Nothing here runs a model."""

import math
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402


def _refused(comfy, graph) -> dict:
    """node id -> the custom-validation messages of a prompt that must be refused."""
    status, body = comfy.queue(graph)
    assert status == 400, (status, body)
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    return {node: [e["details"] for e in err["errors"]] for node, err in body["node_errors"].items()}


def _one(errors: dict, node: str) -> str:
    """ComfyUI repeats a validate_inputs message once per input the method names ("<input> - <message>");
    all of them carry the same message."""
    assert node in errors, errors
    messages = {d.split(" - ", 1)[1] for d in errors[node] if " - " in d}
    assert len(messages) == 1, errors[node]
    return messages.pop()


def test_sampler_refuses_a_non_finite_cfg(comfy):
    # JSON NaN passes ComfyUI's own min/max check (nan < min is False)
    msg = _one(_refused(comfy, h.graph("nan", cfg=math.nan)), "7")
    assert msg.startswith("DreamPainter Sampler: cfg = nan is not a finite number"), msg
    assert "0.0..30.0" in msg


def test_sampler_still_checks_the_range_of_the_inputs_it_validates(comfy):
    # naming an input in validate_inputs turns ComfyUI's min/max check off for it: the node repeats it
    msg = _one(_refused(comfy, h.graph("big", attention_scale=2.5)), "7")
    assert msg == "DreamPainter Sampler: attention_scale = 2.5 is outside 0.0..2.0; set it within that range.", msg


def test_model_loader_refuses_block_swap_without_blocks(comfy):
    msg = _one(_refused(comfy, h.graph("swap0", memory_mode="block_swap", swap_blocks=0)), "1")
    assert "memory_mode is block_swap but swap_blocks is 0" in msg and "set memory_mode to gpu" in msg, msg


def test_model_loader_keeps_the_combo_check_for_memory_mode(comfy):
    msg = _one(_refused(comfy, h.graph("mm", memory_mode="cpu_offload")), "1")
    assert "memory_mode = 'cpu_offload' is not one of ['gpu', 'block_swap']" in msg, msg


def test_reference_resolution_must_be_a_multiple_of_16(comfy):
    errors = _refused(comfy, h.graph("ref40", reference={"resolution": 40}))
    msg = _one(errors, "10")
    assert msg.startswith("DreamPainter Reference: resolution 40 is not a multiple of 16 px") and "use 32 or 48" in msg


def _prep_graph(**prep) -> dict:
    inputs = {"image": ["1", 0], "mask": ["2", 0], "width": 0, "height": 0, "placement": "keep", "box_ratio": 0.6}
    inputs.update(prep)
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "product.png"}},
            "2": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
            "3": {"class_type": "DreamPainterProductPrep", "inputs": inputs},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}


def test_product_prep_refuses_canvas_sizes_no_model_accepts(comfy):
    msg = _one(_refused(comfy, _prep_graph(width=100)), "3")
    assert "width = 100 is not a canvas side the sampler accepts" in msg and "divisible by 16" in msg, msg
    # both sides set: the core's own size rule (dreampainter_core.pipeline.SizeRule), nearest size included
    msg = _one(_refused(comfy, _prep_graph(width=2048, height=2048)), "3")
    assert "exceeds 2097152" in msg and "nearest allowed size is" in msg, msg
    msg = _one(_refused(comfy, _prep_graph(placement="center", box_ratio=math.inf)), "3")
    assert "box_ratio = inf is not a finite number" in msg, msg


def test_composite_refuses_color_match_with_no_ring(comfy):
    g = _prep_graph()
    g["5"] = {"class_type": "DreamPainterComposite",
              "inputs": {"generated": ["3", 0], "product": ["3", 0], "mask": ["3", 1], "feather": 4,
                         "color_match": True, "color_ring": 0}}
    g["4"]["inputs"]["images"] = ["5", 0]
    msg = _one(_refused(comfy, g), "5")
    assert "color_match is on but color_ring is 0" in msg and "turn color_match off" in msg, msg


def test_auto_mask_refuses_a_non_finite_threshold(comfy):
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "bottle.png"}},
         "2": {"class_type": "DreamPainterAutoMask", "inputs": {"image": ["1", 0], "model": "u2netp",
                                                                 "threshold": math.nan}},
         "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    msg = _one(_refused(comfy, g), "2")
    assert msg.startswith("DreamPainter Auto Mask (rembg): threshold = nan is not a finite number"), msg


def test_defaults_and_linked_widgets_pass(comfy):
    """Only the loader's setting is wrong here: the sampler, whose cfg comes from another node (None at
    validation time) and whose other widgets are the test defaults, and all the other nodes pass."""
    g = h.graph("linked", memory_mode="block_swap", swap_blocks=0, reference={"resolution": 32}, reference_cfg=1.5)
    g["20"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 3.5}}
    g["7"]["inputs"]["cfg"] = ["20", 0]
    errors = _refused(comfy, g)
    assert set(errors) == {"1"}, errors


SAMPLER_FLOATS = ("cfg", "shift", "denoise", "lora_scale", "attention_scale", "reference_cfg", "guidance_end",
                  "harmonize", "reference_strength")


def test_every_sampler_float_refuses_json_nan_and_infinity_by_name(comfy):
    for name in SAMPLER_FLOATS:
        for value in (math.nan, -math.inf):
            g = h.graph(f"nan_{name}")
            g["7"]["inputs"][name] = value
            msg = _one(_refused(comfy, g), "7")
            assert msg.startswith(f"DreamPainter Sampler: {name} = {value} is not a finite number"), msg


def test_sampler_widgets_are_the_cores_limits(comfy):
    from dreampainter_core import options

    inputs = comfy.get("/object_info/DreamPainterSampler")["DreamPainterSampler"]["input"]
    widgets = {**inputs["required"], **inputs["optional"]}
    limits = {"seed": options.MAX_SEED, "steps": options.MAX_STEPS, "cfg": options.MAX_GUIDANCE,
              "reference_cfg": options.MAX_GUIDANCE, "shift": options.MAX_SHIFT, "batch_size": options.MAX_BATCH,
              "lora_scale": options.MAX_SCALE, "attention_scale": options.MAX_SCALE}
    assert {name: widgets[name][1]["max"] for name in limits} == limits


def test_sampler_refuses_a_schedule_longer_than_the_limit(comfy):
    # steps and denoise are each within their widget, their schedule (steps / denoise) is not
    msg = _one(_refused(comfy, h.graph("sched", steps=200, denoise=0.01)), "7")
    assert msg.startswith("DreamPainter Sampler: steps=200 with denoise=0.01 builds a 20000-step schedule"), msg
    assert "at most 10000" in msg


def test_text_encode_refuses_an_unpaired_surrogate_by_name(comfy):
    msg = _one(_refused(comfy, h.graph("surrogate", negative_prompt="blurry \ud83d")), "3")
    assert msg.startswith("DreamPainter Text Encode: negative_prompt has an unpaired surrogate at character 7"), msg
    msg = _one(_refused(comfy, h.graph("long", prompt="x" * 10_001)), "3")
    assert "prompt is 10001 characters long; at most 10000" in msg, msg


def test_reference_canvases_larger_than_the_sampler_takes_are_refused(comfy):
    msg = _one(_refused(comfy, h.graph("ref2048", reference={"resolution": 2048, "policy": "pad"})), "10")
    assert msg.startswith("DreamPainter Reference: resolution 2048 with policy pad makes a 2048x2048 reference"), msg
    assert "use 1440 or less" in msg, msg
    status, body = comfy.queue(h.graph("ref2048k", reference={"resolution": 2048, "policy": "keep_aspect"},
                                       memory_mode="block_swap", swap_blocks=0))
    assert status == 400 and set(body["node_errors"]) == {"1"}, body  # keep_aspect: only known at run time
