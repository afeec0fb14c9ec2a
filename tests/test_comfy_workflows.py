"""workflows/*.json on a real ComfyUI: valid UI format, listed by the template browser's API, converted
to API format with /object_info and run to completion through POST /prompt on the tiny models.
Also: pyproject.toml as ComfyUI's own parser reads it, and the frontend pin."""

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402
from workflow_api import ui_to_api, widget_values  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
# DreamPaint: a product into the user's photo (DreamPainter Insert); the others paint backgrounds (Sampler)
INSERTING = [p for p in WORKFLOWS if '"DreamPainterInsert"' in p.read_text(encoding="utf-8")]
BACKGROUNDS = [p for p in WORKFLOWS if p not in INSERTING]
PRODUCT = "cup.safetensors"  # the product file the insertion workflow names (made by train.dreampaint)
TOKEN = "background_token.safetensors"  # the prompt-free workflow's token file (made by train.background_token)
README = (REPO / "README.md").read_text(encoding="utf-8")

# what the shipped workflows name (README "Where the weights go"); in the tests they run on the pack's
# embedded miniature model (dreampainter_core.embedded), which the pack lists in ComfyUI's dropdowns
BASE = "[diffusers] CogView4-6B"
TINY_WEIGHTS = {"dreampainter_stage1.safetensors": h.STAGE1, "dreampainter_stage2.safetensors": h.STAGE2}
MINIATURE = "[diffusers] dreampainter-miniature"
MINIATURE_WEIGHTS = "dreampainter_miniature.safetensors"  # stage 2: runs the stage-1 workflows too
SHRINK = 8  # 1024 -> 128 px canvases (the miniature's resolution), 512 -> 64 px references


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# The files themselves (no server)
# ---------------------------------------------------------------------------------------------


def test_the_four_workflows_are_there_with_thumbnails():
    assert len(WORKFLOWS) >= 4, NAMES
    kinds = " ".join(NAMES).lower()
    for kind in ("t2i", "tr2i", "auto_mask", "batch", "insert_product", "prompt_free"):
        assert kind in kinds, (kind, NAMES)
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.stat().st_size < 60_000, thumb
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.width <= 512
    images = list((WORKFLOW_DIR / "input").glob("*"))
    assert images and sum(p.stat().st_size for p in images) < 50_000  # the example inputs stay tiny


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_workflow_file_is_consistent_ui_format(path):
    wf = _load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, (n.get("id"), key)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:  # both ends agree with the link table
        assert link_id in (nodes[src]["outputs"][src_slot]["links"] or []), link_id
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, link_id
        assert typ == nodes[src]["outputs"][src_slot]["type"] or nodes[src]["type"] == "Reroute"
    used = {(n["id"], i) for n in wf["nodes"] for i, s in enumerate(n.get("inputs", [])) if s.get("link") is not None}
    assert len(used) == sum(1 for _ in wf["links"]), "every input link is in the link table"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    training_free = _weights(wf) == "none"  # the public base alone: no LoRA slider to explain
    words = ("training_free", "harmonize") if training_free else ("lora_scale", "0.4")
    if path in INSERTING:  # a product into a photo: how to make the product file, and its slider
        words += ("product_scale", "train.dreampaint", "models/dreampainter_products", "sks")
    else:
        words += ("attention_scale",)
    for word in words + ("models/diffusers/CogView4-6B", "models/dreampainter"):
        assert word in text, word


def _weights(wf: dict) -> str:
    return next(n for n in wf["nodes"] if n["type"] == "DreamPainterModelLoader")["widgets_values"][1]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_workflow_model_names_match_the_readme(path):
    wf = _load(path)
    assert "models/diffusers/CogView4-6B/" in README  # the README's "Where the weights go"
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    (model,), (te,), (vae,) = (by_type[t] for t in ("DreamPainterModelLoader", "DreamPainterTextEncoderLoader",
                                                   "DreamPainterVAELoader"))
    assert model["widgets_values"][0] == BASE and te["widgets_values"][0] == BASE and vae["widgets_values"][0] == BASE
    weights = model["widgets_values"][1]
    (sampler,) = by_type.get("DreamPainterSampler", []) + by_type.get("DreamPainterInsert", [])
    for loader in by_type.get("DreamPainterProductLoRALoader", []):
        assert loader["widgets_values"][0] == PRODUCT and PRODUCT in README
    for loader in by_type.get("DreamPainterBackgroundTokenLoader", []):
        assert loader["widgets_values"][0] == TOKEN and TOKEN in README
    (mode,) = {"auto", "training_free", "dreampainter"} & set(sampler["widgets_values"])  # the mode combo
    if weights == "none":  # the public base alone: only the training-free mode can keep the product
        assert mode in ("auto", "training_free"), mode
        return
    assert weights in TINY_WEIGHTS and weights in README, weights
    if "DreamPainterReferenceEncode" in by_type and mode != "training_free":
        assert weights == "dreampainter_stage2.safetensors", "a reference needs a stage-2 file"
    for n in by_type.get("LoadImage", []) + by_type.get("LoadImageMask", []):
        assert (WORKFLOW_DIR / "input" / n["widgets_values"][0]).is_file(), n["widgets_values"][0]


def test_converter_handles_reroutes_primitives_notes_muted_and_bypassed():
    info = {
        "Src": {"input": {"required": {"seed": ["INT", {}], "n": ["INT", {"control_after_generate": True}],
                                       "s": ["STRING", {}]}}, "output": ["IMAGE", "INT"]},
        "Dst": {"input": {"required": {"image": ["IMAGE"], "k": [["a", "b"]], "v": ["INT", {}]},
                          "optional": {"x": ["FLOAT", {"forceInput": True}]}}, "output": ["IMAGE"]},
    }
    wf = {"nodes": [
        {"id": 1, "type": "Src", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [5, "fixed", 7, "randomize", "t"]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "link": 1}], "outputs": []},
        {"id": 3, "type": "Dst", "mode": 0, "widgets_values": ["b", 0],
         "inputs": [{"name": "image", "link": 2}, {"name": "v", "link": 3, "widget": {"name": "v"}},
                    {"name": "x", "link": None}], "outputs": []},
        {"id": 4, "type": "PrimitiveNode", "mode": 0, "widgets_values": [42, "fixed"], "inputs": [], "outputs": []},
        {"id": 5, "type": "Note", "mode": 0, "widgets_values": ["hi"]},
        {"id": 6, "type": "Dst", "mode": 4, "widgets_values": ["a", 1], "outputs": [{"type": "IMAGE"}],
         "inputs": [{"name": "image", "type": "IMAGE", "link": 4}]},
        {"id": 7, "type": "Dst", "mode": 0, "widgets_values": ["a", 1], "inputs": [{"name": "image", "link": 5}]},
        {"id": 8, "type": "Dst", "mode": 2, "widgets_values": ["a", 1], "inputs": [{"name": "image", "link": 6}]},
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 4, 0, 3, 1, "INT"], [4, 1, 0, 6, 0, "IMAGE"],
                 [5, 6, 0, 7, 0, "IMAGE"], [6, 1, 0, 8, 0, "IMAGE"]]}
    assert widget_values(wf["nodes"][0], info["Src"]) == {"seed": 5, "n": 7, "s": "t"}
    api = ui_to_api(wf, info)
    assert sorted(api) == ["1", "3", "7"]
    assert api["3"]["inputs"] == {"image": ["1", 0], "k": "b", "v": 42}  # via reroute; primitive value
    assert api["7"]["inputs"]["image"] == ["1", 0]  # through the bypassed node


# ---------------------------------------------------------------------------------------------
# On the server
# ---------------------------------------------------------------------------------------------


def test_template_browser_lists_the_workflows(comfy):
    listing = comfy.get("/api/workflow_templates")
    assert sorted(listing.get(h.PACK_NAME, [])) == NAMES, listing  # once each
    for path in WORKFLOWS:
        served = comfy.get(f"/api/workflow_templates/{h.PACK_NAME}/{path.name}")
        assert served == _load(path)
        thumb = path.with_suffix(".jpg")  # the template browser asks for <name>.jpg
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{h.PACK_NAME}/{thumb.name}", timeout=10) as r:
            assert r.read() == thumb.read_bytes()


def _shrink(api: dict) -> None:
    """Point the graph at the embedded miniature model and shrink sizes and steps (1024 px -> 128 px)."""
    for node in api.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "DreamPainterModelLoader":
            assert inp["transformer"] == BASE and inp["dreampainter_weights"] in {*TINY_WEIGHTS, "none"}
            weights = "none" if inp["dreampainter_weights"] == "none" else MINIATURE_WEIGHTS  # base alone stays so
            inp.update(transformer=MINIATURE, dreampainter_weights=weights, weight_dtype="fp32")
        elif ct == "DreamPainterTextEncoderLoader":
            assert inp["text_encoder"] == BASE
            inp.update(text_encoder=MINIATURE, weight_dtype="fp32")
        elif ct == "DreamPainterVAELoader":
            assert inp["vae"] == BASE
            inp.update(vae=MINIATURE, weight_dtype="fp32")
        elif ct in ("DreamPainterSampler", "DreamPainterInsert"):
            inp["steps"] = 8
        elif ct == "DreamPainterProductLoRALoader":
            assert inp["product_lora"] == PRODUCT
            inp["product_lora"] = h.MINIATURE_PRODUCT
        elif ct == "DreamPainterBackgroundTokenLoader":
            assert inp["background_token"] == TOKEN
            inp["background_token"] = h.MINIATURE_TOKEN
        elif ct in ("LoadImage", "LoadImageMask") and (WORKFLOW_DIR / "input" / inp["image"]).is_file():
            with Image.open(WORKFLOW_DIR / "input" / inp["image"]) as im:
                if im.width >= 512:  # a photo at CogView4's size: the harness's quarter-size copy
                    inp["image"] = h.MINI_PREFIX + inp["image"]
        elif ct == "DreamPainterReferenceEncode":
            inp["resolution"] //= SHRINK
        for key in ("width", "height", "value"):
            if ct in ("DreamPainterProductPrep", "PrimitiveInt") and isinstance(inp.get(key), int):
                inp[key] //= SHRINK


def _canvas(api: dict, prep_id: str) -> tuple[int, int]:
    def value(v):
        return api[v[0]]["inputs"]["value"] if isinstance(v, list) else v

    inp = api[prep_id]["inputs"]
    return value(inp["height"]), value(inp["width"])


def _tap(api: dict, name: str, image, mask=None) -> None:
    api[f"tap_{name}"] = {"class_type": "DPTestSaveTensors",
                          "inputs": {"name": name, "image": image, **({"mask": mask} if mask else {})}}


def _products(api: dict, prep_id: str) -> int:
    """How many products reach the Product Prep node (LoadImages batched with ImageBatch)."""
    def count(link):
        node = api[link[0]]
        if node["class_type"] == "ImageBatch":
            return count(node["inputs"]["image1"]) + count(node["inputs"]["image2"])
        return 1

    return count(api[prep_id]["inputs"]["image"])


def test_embedded_miniature_model_is_listed_in_the_loaders(object_info):
    """The pack's own models/ folders come after the user's: the miniature is selectable with no download."""
    def options(node, name):
        spec = object_info[node]["input"]["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    assert MINIATURE in options("DreamPainterModelLoader", "transformer")
    assert MINIATURE_WEIGHTS in options("DreamPainterModelLoader", "dreampainter_weights")
    assert MINIATURE in options("DreamPainterTextEncoderLoader", "text_encoder")
    assert MINIATURE in options("DreamPainterVAELoader", "vae")


@pytest.mark.parametrize("path", BACKGROUNDS, ids=[p.stem for p in BACKGROUNDS])
def test_workflow_runs_on_the_embedded_miniature_model(comfy, object_info, path):
    name = path.stem
    api = ui_to_api(_load(path), object_info)
    assert not any(n["class_type"] in ("Note", "Reroute") for n in api.values())
    _shrink(api)
    preps = [k for k, n in api.items() if n["class_type"] == "DreamPainterProductPrep"]
    samplers = [k for k, n in api.items() if n["class_type"] == "DreamPainterSampler"]
    composites = [k for k, n in api.items() if n["class_type"] == "DreamPainterComposite"]
    saves = [k for k, n in api.items() if n["class_type"] == "SaveImage"]
    assert len(preps) == 1 and len(samplers) == 1 and saves
    checks = []  # (tap name, product tap) where the product must come back exactly
    for sid in samplers:
        s = api[sid]["inputs"]
        _tap(api, f"{name}_s{sid}", [sid, 0], s["mask"])
        _tap(api, f"{name}_s{sid}_product", s["product"])
        if s["paste_back"]:
            checks.append((f"{name}_s{sid}", f"{name}_s{sid}_product"))
    for cid in composites:
        c = api[cid]["inputs"]
        _tap(api, f"{name}_c{cid}", [cid, 0], c["mask"])
        _tap(api, f"{name}_c{cid}_product", c["product"])
        checks.append((f"{name}_c{cid}", f"{name}_c{cid}_product"))
    for sid in saves:
        _tap(api, f"{name}_save{sid}", api[sid]["inputs"]["images"])

    for n in api.values():  # the prompt-free workflow: the name alone, with the learned token
        if n["class_type"] == "DreamPainterTextEncode" and n["inputs"].get("prompt_free"):
            assert api[n["inputs"]["background_token"][0]]["class_type"] == "DreamPainterBackgroundTokenLoader"
            assert len(n["inputs"]["prompt"].split()) <= 6, "a product's name, not a prompt"

    entry = comfy.run(api, timeout=300)
    err = h.execution_error(entry)
    if err is not None and "needs the 'rembg' package" in err.get("exception_message", ""):
        h.skip_or_fail("rembg is not installed in the test host (tests/comfy/comfy_harness.py SITE_SPECS)")
    assert entry["status"]["status_str"] == "success", f"{err}\n{comfy.log_tail()}"

    height, width = _canvas(api, preps[0])
    batch = _products(api, preps[0]) * max(api[s]["inputs"]["batch_size"] for s in samplers)
    for sid in saves:
        out = comfy.tensors(f"{name}_save{sid}")["image"]
        assert tuple(out.shape) == (batch, height, width, 3), (sid, out.shape)
        assert torch.isfinite(out).all()
        saved = entry["outputs"][sid]["images"]
        assert len(saved) == batch and all(Path(comfy.base / "output" / i["subfolder"] / i["filename"]).is_file()
                                           for i in saved)
    assert checks, "every workflow pastes the product back (sampler or composite)"
    for result, product in checks:
        out, prod = comfy.tensors(result), comfy.tensors(product)["image"]
        hard = (out["mask"] > 0.5).unsqueeze(-1).expand_as(out["image"])
        assert hard.any()
        assert torch.equal(out["image"][hard], prod.expand_as(out["image"])[hard]), f"{result}: product changed"
        assert (out["image"][~hard] - prod.expand_as(out["image"])[~hard]).abs().mean() > 0.02  # background repainted
    if "DreamPainterMaskRefine" in {n["class_type"] for n in api.values()}:
        rid = next(k for k, n in api.items() if n["class_type"] == "DreamPainterMaskRefine")
        stats = entry["outputs"][rid]["dreampainter_mask"][0]  # for the web extension's caption
        assert 0 < stats["coverage"] < 1 and stats["width"] == 256
    compare = entry["outputs"][samplers[0]]["dreampainter_compare"]  # the web extension's compare slider
    assert len(compare) == batch and {"before", "after"} <= set(compare[0])


@pytest.mark.parametrize("path", INSERTING, ids=[p.stem for p in INSERTING])
def test_insertion_workflow_runs_on_the_embedded_miniature_model(comfy, object_info, path):
    """The photo, its mask through Mask Refine, a (random) product of the miniature: the photo comes back
    exactly outside the mask, the mask region is painted."""
    name = path.stem
    api = ui_to_api(_load(path), object_info)
    _shrink(api)
    (iid,) = [k for k, n in api.items() if n["class_type"] == "DreamPainterInsert"]
    saves = [k for k, n in api.items() if n["class_type"] == "SaveImage"]
    ins = api[iid]["inputs"]
    assert "product_lora" in ins and ins["paste_back"]
    _tap(api, f"{name}_out", [iid, 0], [iid, 2])
    _tap(api, f"{name}_photo", ins["context"])
    entry = comfy.run(api, timeout=300)
    assert entry["status"]["status_str"] == "success", f"{h.execution_error(entry)}\n{comfy.log_tail()}"
    out, photo = comfy.tensors(f"{name}_out"), comfy.tensors(f"{name}_photo")["image"]
    assert out["image"].shape == photo.shape == (1, 128, 128, 3) and saves
    kept = (out["mask"] < 0.5).unsqueeze(-1).expand_as(photo)
    assert kept.any() and (~kept).any()
    assert torch.equal(out["image"][kept], photo[kept]), "the photo changed outside the mask"
    assert (out["image"][~kept] - photo[~kept]).abs().mean() > 0.02  # the product's place was painted
    assert entry["outputs"][iid]["dreampainter_mode"] == ["training_free"]
    assert len(entry["outputs"][iid]["dreampainter_compare"]) == 1


# ---------------------------------------------------------------------------------------------
# Packaging: pyproject.toml through ComfyUI's own parser; the frontend pin
# ---------------------------------------------------------------------------------------------


def test_pyproject_parsed_by_comfyuis_config_parser():
    try:
        comfy_dir = h.fetch_comfyui()
    except h.HostUnavailable as exc:
        h.skip_or_fail(str(exc))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
            "from comfy_config.config_parser import extract_node_configuration as x;"
            "print(json.dumps(x(sys.argv[2]).model_dump()))")
    r = subprocess.run([sys.executable, "-c", code, str(comfy_dir), str(REPO)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads(r.stdout)
    project, comfy = cfg["project"], cfg["tool_comfy"]
    assert project["name"] == "comfyui-dreampainter"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"]["text"] or project["license"]["file"]
    assert project["urls"]["repository"].startswith("https://github.com/")
    assert project["supported_comfyui_version"].startswith(">=")
    assert comfy["publisher_id"] and comfy["display_name"] == "DreamPainter"
    assert comfy["icon"].startswith("https://")
    assert comfy["web"] is None, "the JS is served through WEB_DIRECTORY in __init__.py; declaring both serves it twice"
    urls = {m["location"]: m["model_url"] for m in comfy["models"]}
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        loc = f"/diffusers/CogView4-6B/{part}"
        assert urls.get(loc, "").startswith("https://huggingface.co/THUDM/CogView4-6B"), (part, urls)
    deps = project["dependencies"]
    assert deps == [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")], "pyproject dependencies = requirements.txt"


def test_frontend_pin_is_comfyuis():
    try:
        comfy_dir = h.fetch_comfyui()
    except h.HostUnavailable as exc:
        h.skip_or_fail(str(exc))
    reqs = (comfy_dir / "requirements.txt").read_text(encoding="utf-8").split()
    assert h.FRONTEND_SPEC in reqs, (h.FRONTEND_SPEC, [r for r in reqs if "frontend" in r])
