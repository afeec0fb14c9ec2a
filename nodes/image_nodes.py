"""Image and mask nodes: reference, product placement, mask refine, composite, auto mask."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..dreampainter_core import auto_mask
from ..dreampainter_core.errors import InputError
from ..dreampainter_core.images import REFERENCE_POLICIES, as_image_batch, as_mask_batch, mask_overlay, reference_canvas
from ..dreampainter_core.masks import refine_mask
from ..dreampainter_core.pipeline import SMALL_MODEL_SIZES
from ..dreampainter_core.product import PLACEMENTS, match_color, paste_back, place_product
from .schema_tools import search_aliases, widget_problem
from .sockets import (
    CATEGORY_CONDITIONING,
    CATEGORY_IMAGE,
    CATEGORY_MASK,
    DreamPainterReference,
    DreamPainterReferenceType,
)

REFERENCE_MULTIPLE = 16  # VAE 8x times patch 2: the reference must cover whole tokens


class DreamPainterReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterReferenceEncode",
            display_name="DreamPainter Reference",
            category=CATEGORY_CONDITIONING,
            **search_aliases("reference image", "style reference", "TR2I", "参考图"),
            description="Prepares a reference image (style/scene to follow) at the size the model sees it. "
                        "A stage-2 DreamPainter model follows it; without one, the sampler's training_free mode does.",
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
    def validate_inputs(cls, resolution=None, policy=None):
        problem = widget_problem(cls, resolution=resolution, policy=policy)
        if problem or resolution is None:
            return problem or True
        if resolution % REFERENCE_MULTIPLE:
            low = max(REFERENCE_MULTIPLE, resolution // REFERENCE_MULTIPLE * REFERENCE_MULTIPLE)
            return (f"DreamPainter Reference: resolution {resolution} is not a multiple of {REFERENCE_MULTIPLE} px "
                    f"(VAE 8x times patch 2: the reference must cover whole tokens); use {low} or "
                    f"{low + REFERENCE_MULTIPLE}.")
        # The sampler takes a reference of at most as many pixels as its largest output (the core's
        # reference_size limit, the same for every model's size rule). Square policies are known now;
        # keep_aspect's other side only when the image arrives (the sampler then checks it).
        limit = SMALL_MODEL_SIZES.max_pixels
        if policy not in (None, "keep_aspect") and resolution * resolution > limit:
            side = math.isqrt(limit) // REFERENCE_MULTIPLE * REFERENCE_MULTIPLE
            return (f"DreamPainter Reference: resolution {resolution} with policy {policy} makes a "
                    f"{resolution}x{resolution} reference ({resolution * resolution} pixels); the sampler takes at "
                    f"most {limit} (as many as its largest output): use {side} or less, or keep_aspect for a wide "
                    "image.")
        return True

    @classmethod
    def execute(cls, image, resolution, policy) -> io.NodeOutput:
        # The one resize: the sampler sees a reference already at its size and uses it as it is.
        canvas = reference_canvas(image, resolution, policy, multiple=REFERENCE_MULTIPLE)
        return io.NodeOutput(DreamPainterReference(image=canvas), canvas)


class DreamPainterProductPrep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterProductPrep",
            display_name="DreamPainter Product Prep",
            category=CATEGORY_IMAGE,
            **search_aliases("product", "place product", "canvas", "center product", "商品"),
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
            outputs=[io.Image.Output(display_name="foreground"), io.Mask.Output(display_name="mask"),
                     io.Mask.Output(display_name="matte",
                                    tooltip="The mask as given (soft, e.g. Auto Mask at threshold 0), placed like the "
                                            "product: connect it to Composite's matte to remove the backdrop fringe.")],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, box_ratio=None):
        problem = widget_problem(cls, width=width, height=height, box_ratio=box_ratio)
        if problem:
            return problem
        # The sampler's size rule for the smallest models (each model's own rule is checked when it runs;
        # CogView4-6B's is stricter: 512..2048, divisible by 32). 0 = the image's side, unknown until then.
        rule = SMALL_MODEL_SIZES
        if width and height:
            try:
                rule.check(width, height)
            except InputError as exc:
                return f"DreamPainter Product Prep: {exc}"
        for name, value in (("width", width), ("height", height)):
            if value and (not rule.min_side <= value <= rule.max_side or value % rule.multiple):
                return (f"DreamPainter Product Prep: {name} = {value} is not a canvas side the sampler accepts: use 0 "
                        f"(= the image's {name}) or {rule.min_side}..{rule.max_side} px, divisible by {rule.multiple}.")
        return True

    @classmethod
    def execute(cls, image, mask, width, height, placement, box_ratio) -> io.NodeOutput:
        image = as_image_batch(image, "image")
        width = width or int(image.shape[2])
        height = height or int(image.shape[1])
        foreground, canvas_mask, matte = place_product(image, mask, width, height, placement=placement,
                                                       box_ratio=(box_ratio, box_ratio), return_matte=True)
        return io.NodeOutput(foreground, canvas_mask, matte)


class DreamPainterMaskRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterMaskRefine",
            display_name="DreamPainter Mask Refine",
            category=CATEGORY_MASK,
            **search_aliases("mask cleanup", "grow mask", "feather mask", "fill holes", "遮罩"),
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
            category=CATEGORY_IMAGE,
            **search_aliases("paste back", "composite", "blend", "color match", "贴回"),
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
                io.Mask.Input("matte", optional=True,
                              tooltip="Optional soft mask (Product Prep's matte): colour decontamination. The "
                                      "product's soft edge is blended with its studio-backdrop colour removed, so a "
                                      "white backdrop leaves no light fringe; replaces feather."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, color_match=None, color_ring=None):
        problem = widget_problem(cls, color_ring=color_ring)
        if problem:
            return problem
        if color_match and color_ring == 0:  # match_color with ring 0 returns the image unchanged
            return ("DreamPainter Composite: color_match is on but color_ring is 0, so no colour would change. "
                    "Set color_ring to the width of the seam ring in px (8 is a good start), or turn color_match off.")
        return True

    @classmethod
    def execute(cls, generated, product, mask, feather, color_match, color_ring, matte=None) -> io.NodeOutput:
        if color_match:
            generated = match_color(generated, product, mask, ring=color_ring)
        return io.NodeOutput(paste_back(generated, product, mask, feather=feather, matte=matte))


WITHOUT_REMBG = "Or draw the mask yourself (Load Image alpha / mask editor) and clean it with DreamPainter Mask Refine."


class DreamPainterAutoMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterAutoMask",
            display_name="DreamPainter Auto Mask (rembg)",
            category=CATEGORY_MASK,
            **search_aliases("remove background", "rembg", "U2-Net", "salient object", "抠图"),
            description="A product mask from a product photo with rembg's U2-Net (salient object). Needs the "
                        "rembg package.",
            inputs=[
                io.Image.Input("image"),
                io.Combo.Input("model", options=list(auto_mask.MODELS), default=auto_mask.DEFAULT_MODEL),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Binarize at this level; 0 keeps rembg's soft mask."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def validate_inputs(cls, threshold=None):
        return widget_problem(cls, threshold=threshold) or True

    @classmethod
    def execute(cls, image, model, threshold) -> io.NodeOutput:
        from PIL import Image

        masker = auto_mask.rembg_masker(model, "DreamPainter Auto Mask", WITHOUT_REMBG, python="ComfyUI's Python")
        images = as_image_batch(image, "image")
        masks = []
        for item in images:
            pil = Image.fromarray((item.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
            m = torch.from_numpy(masker.alpha(pil).astype(np.float32) / 255.0)
            masks.append((m > threshold).float() if threshold > 0 else m)
        return io.NodeOutput(torch.stack(masks))
