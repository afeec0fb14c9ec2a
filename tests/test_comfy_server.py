"""A real ComfyUI 0.3.75 starts with the pack: import, /object_info, model folders."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402
from node_spec import CATEGORIES, NODES  # noqa: E402


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


def test_pack_imports_cleanly(comfy):
    log = comfy.log().split("Starting server")[0]  # start-up only: later tests log execution errors on purpose
    line = [ln for ln in log.splitlines() if ln.rstrip().endswith(h.PACK_NAME) and "seconds" in ln]
    assert line, f"no import-time line for the pack in the log:\n{comfy.log_tail()}"
    assert "IMPORT FAILED" not in line[0]
    assert not re.search(rf"Cannot import .*{h.PACK_NAME}", log)
    tracebacks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+.*", log)
    ours = [t for t in tracebacks if h.PACK_NAME in t or "dreampainter" in t.lower()]
    assert not ours, ours[0]
    print(f"ComfyUI {h.COMFY_VERSION} ready in {comfy.startup_s:.1f} s")


def test_object_info_lists_every_node_with_its_inputs(object_info):
    for node_id, (required, optional, outputs) in NODES.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["category"] == CATEGORIES[node_id], (node_id, info["category"])
        assert list(info["input"]["required"]) == required, node_id
        assert list(info["input"].get("optional", {})) == optional, node_id
        assert info["output"] == outputs, node_id
        assert info["python_module"].startswith("custom_nodes."), info["python_module"]
    ours = sorted(k for k in object_info if k.startswith("DreamPainter"))
    assert ours == sorted(NODES), "node ids changed: update tests/comfy/node_spec.py, workflows and web/"


def test_scale_sliders(object_info):
    req = object_info["DreamPainterSampler"]["input"]["required"]
    for name in ("lora_scale", "attention_scale"):
        kind, opts = req[name]
        assert kind == "FLOAT"
        assert (opts["min"], opts["max"], opts["step"], opts["default"]) == (0.0, 2.0, 0.05, 1.0)
        assert opts["display"] == "slider"
    assert req["shift"][1]["default"] == 0.0
    assert req["seed"][1].get("control_after_generate") is True


def test_model_folders_and_dropdowns(comfy, object_info):
    folders = comfy.get("/models")
    assert "dreampainter" in folders
    assert {"checkpoints", "diffusion_models", "vae", "text_encoders", "diffusers"} <= set(folders)
    # the user's files first; the pack's embedded miniature model (dreampainter_core.embedded) after them
    mini, mini_weights = "[diffusers] dreampainter-miniature", "dreampainter_miniature.safetensors"
    assert comfy.get("/models/dreampainter") == sorted([h.STAGE1, h.STAGE2, mini_weights])

    def options(node, name):
        return object_info[node]["input"]["required"][name][1]["options"]

    assert options("DreamPainterModelLoader", "transformer") == [
        h.TINY, h.BROKEN, mini, "cogview4-tiny-transformer.safetensors"]
    assert options("DreamPainterModelLoader", "dreampainter_weights") == ["none"] + sorted(
        [h.STAGE1, h.STAGE2, mini_weights])
    assert options("DreamPainterTextEncoderLoader", "text_encoder") == [h.TINY, mini, "cogview4-tiny-glm.safetensors"]
    assert options("DreamPainterTextEncoderLoader", "tokenizer") == [
        "auto", h.TINY, mini, "cogview4-tiny-glm_tokenizer/"]
    assert options("DreamPainterVAELoader", "vae") == [h.TINY, mini, "cogview4-tiny-vae.safetensors"]
