"""DreamPainterSampler: the core pipeline's prepare_inputs + generate, with ComfyUI around it."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..dreampainter_core.options import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_SCALE,
    MAX_SEED,
    MAX_SHIFT,
    MAX_STEPS,
    MODES,
    TRAINING_FREE_REFERENCE,
    ControlOptions,
    OutputOptions,
    ReferenceOptions,
    SamplingOptions,
)
from ..dreampainter_core.pipeline import DreamPainterPipeline
from . import memory
from .progress import SamplerProgress, fit_preview_map, previews_enabled
from .schema_tools import core_problem, search_aliases, widget_problem, widget_values
from .sockets import (
    CATEGORY_SAMPLING,
    DreamPainterConditioningType,
    DreamPainterModelType,
    DreamPainterReferenceType,
    DreamPainterVAEType,
)

logger = logging.getLogger("DreamPainter")

# The widgets' ranges are the core's documented limits (dreampainter_core.options), so a value the
# widget offers is one the core takes.
SCALE_SLIDER = dict(default=1.0, min=0.0, max=MAX_SCALE, step=0.05, round=0.01, display_mode=io.NumberDisplay.slider)
LORA_SCALE_TIP = ("Strength of the stage-2 LoRA (reference following and harmonisation); 0 = the stage-1 model. "
                  "The paper finds quality collapses below about 0.4: to follow the reference less, lower "
                  "attention_scale instead.")
ATTENTION_SCALE_TIP = ("How strongly the image attends to the reference tokens: 1 = plain attention, > 1 follows the "
                       "reference more, lower values follow it less. The paper finds this stays coherent below 0.4 "
                       "(unlike lora_scale).")
REFERENCE_CFG_TIP = ("Guidance towards the reference image, separate from cfg (used only with a reference). 0 = same "
                     "as cfg: the reference is left out of the negative pass (2 model passes per step). 1 = the "
                     "reference in both passes (2 passes): follows it least. Higher follows it more; a value "
                     "other than 1 or cfg costs a third pass per step.")
GUIDANCE_END_TIP = ("Fraction of the steps, from the first, that use cfg; the rest run without the negative pass "
                    "(about half their cost). 1 = cfg on every step. Late steps only refine detail, so 0.6-0.8 "
                    "often looks the same, faster.")
MODE_TIP = ("How the product is kept. auto: the control branch when a DreamPainter file is loaded, else "
            "training_free. training_free: works with the public CogView4 alone: the product's latent is held on its "
            "own noised path at every step (blended latent diffusion) while the background is painted around it. "
            "The title badge shows which mode ran.")
HARMONIZE_TIP = ("training_free: share of the last steps that run without holding the product, so its edge and "
                 "contact shadow can blend in (paste_back restores the product pixels). 0 = held to the end.")
REFERENCE_STRENGTH_TIP = ("training_free with a reference (init): how much of the schedule repaints the product over the "
                          "reference, like denoise. Lower keeps more of the reference; 1 ignores it.")
TRAINING_FREE_REFERENCE_TIP = ("training_free with a reference: init = start from the product over the reference "
                               "(reference_strength); in_context = the reference beside the canvas as extra tokens, "
                               "attention_scale weighs it (experimental: in-context ability needs a large model).")
SHIELD_PRODUCT_TIP = ("Stage-2 models with a reference: the product's tokens do not attend to the reference, so the "
                      "reference shapes the background only (on the miniature: a sharper product, the reference's "
                      "look kept). No effect without a reference or in training_free mode.")
#: Before/after pairs the sampler sends to the web extension's compare slider (web/dreampainter.js).
COMPARE_KEY = "dreampainter_compare"
MODE_KEY = "dreampainter_mode"  # which mode ran, for the title badge
COMPARE_LIMIT = 8


def compare_previews(product: torch.Tensor, images: torch.Tensor, limit: int = COMPARE_LIMIT) -> dict:
    """Temp PNGs of (product, result) pairs for the compare slider; one pair per output image (first ``limit``)."""
    n = min(int(images.shape[0]), limit)
    product = product if product.dim() == 4 else product.unsqueeze(0)
    before = product[[i % product.shape[0] for i in range(n)]].float().cpu()
    if tuple(before.shape[1:3]) != tuple(images.shape[1:3]):
        return {}
    kw = dict(folder_type=io.FolderType.temp, cls=None, compress_level=1)
    saved_before = ui.ImageSaveHelper.save_images(before, filename_prefix="DreamPainter_before", **kw)
    saved_after = ui.ImageSaveHelper.save_images(images[:n].float().cpu(), filename_prefix="DreamPainter_after", **kw)
    return {COMPARE_KEY: [{"before": b, "after": a} for b, a in zip(saved_before, saved_after)]}


def sampler_options(seed, steps, cfg, shift, denoise, lora_scale, attention_scale, mask_guidance, paste_back,
                    reference=None, reference_cfg=0.0, guidance_end=1.0, mode="auto",
                    harmonize=ControlOptions.harmonize, reference_strength=ReferenceOptions.strength,
                    training_free_reference="init", shield_product=False) -> dict:
    """The node's widgets -> the core's option objects (each checks its values as it is built).
    The widgets' own conventions (0 = auto) are translated here and nowhere else."""
    image = None if reference is None else reference.image
    return dict(
        sampling=SamplingOptions(steps=steps, guidance_scale=cfg, seed=seed, shift=None if shift <= 0 else shift,
                                 denoise=denoise, guidance_end=guidance_end),
        reference=ReferenceOptions(image=image, size=None if image is None else (image.shape[2], image.shape[1]),
                                   lora_scale=lora_scale, attention_scale=attention_scale,
                                   guidance=None if reference_cfg <= 0 else reference_cfg,
                                   strength=reference_strength, training_free_method=training_free_reference,
                                   shield_product=shield_product),
        control=ControlOptions(mode=mode, mask_guidance=mask_guidance, harmonize=harmonize),
        output=OutputOptions(paste_back=paste_back, placement="keep"),
    )


def run_sampler(model, conditioning, vae, product, mask, batch_size, options: dict):
    """Returns the core's DreamPainterOutput. All inputs are checked before any model is loaded."""
    pipe = DreamPainterPipeline(None, None, vae.vae, model.transformer, model.scheduler)
    progress = SamplerProgress(options["sampling"].steps)
    request = pipe.prepare(product, mask, batch_size=None if batch_size <= 1 else batch_size, callback=progress,
                           **options)
    return run_loaded(model, vae, pipe, progress,
                      lambda: pipe.generate(request, conditioning.prompt_embeds, conditioning.negative_embeds))


def run_loaded(model, vae, pipe, progress: SamplerProgress, generate):
    """``generate()`` with the transformer and VAE loaded through ComfyUI and step previews set up."""
    memory.load(model.patcher, vae.patcher)
    try:
        if previews_enabled():
            if vae.preview_map is None:
                try:
                    vae.preview_map = fit_preview_map(pipe)
                except Exception as exc:  # noqa: BLE001 - previews are a nicety, never a reason to fail
                    logger.warning("DreamPainter: no step previews (fitting the latent->RGB map failed: %s)", exc)
                    vae.preview_map = False
            progress.preview_map = vae.preview_map or None
        return generate()
    finally:
        if model.swap is not None:
            model.swap.drop_all()  # after a cancel a swapped block may still sit on the GPU


class DreamPainterSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterSampler",
            display_name="DreamPainter Sampler",
            category=CATEGORY_SAMPLING,
            **search_aliases("sampler", "inpaint", "background", "product background", "KSampler", "生成背景"),
            description="Paints a new background around the product (kept through the control branch and, with "
                        "paste_back, pixel-exact). The output has the product image's size.",
            inputs=[
                DreamPainterModelType.Input("model"),
                DreamPainterConditioningType.Input("conditioning"),
                DreamPainterVAEType.Input("vae"),
                io.Image.Input("product", tooltip="The product on its canvas (e.g. Product Prep's foreground); "
                                                  "sets the output size."),
                io.Mask.Input("mask", tooltip="1 = product (kept), 0 = background (generated); same size as product."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS),
                io.Float.Input("cfg", default=3.5, min=0.0, max=MAX_GUIDANCE, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; <= 1 disables the negative prompt pass."),
                io.Float.Input("shift", default=0.0, min=0.0, max=MAX_SHIFT, step=0.05, round=0.01,
                               tooltip="Timestep shift (mu). 0 = auto: CogView4's resolution-dependent shift "
                                       "(3.25 at 1024x1024)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="< 1 starts from the product on its blank canvas instead of pure noise."),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH,
                             tooltip="Images per product (a batch of products gives one image each)."),
                io.Float.Input("lora_scale", tooltip=LORA_SCALE_TIP, **SCALE_SLIDER),
                io.Float.Input("attention_scale", tooltip=ATTENTION_SCALE_TIP, **SCALE_SLIDER),
                io.Boolean.Input("mask_guidance", default=False,
                                 tooltip="Let the control branch act on product tokens only (fights extra objects "
                                         "growing out of the product)."),
                io.Boolean.Input("paste_back", default=True,
                                 tooltip="Paste the original product pixels back (feathered edge)."),
                DreamPainterReferenceType.Input("reference", optional=True,
                                                tooltip="Optional reference image: a stage-2 model follows it through its LoRA; "
                                                        "without one, mode training_free follows it (see "
                                                        "training_free_reference)."),
                # Optional, so API-format prompts written before it existed still validate.
                io.Float.Input("reference_cfg", default=0.0, min=0.0, max=MAX_GUIDANCE, step=0.1, round=0.01, optional=True,
                               tooltip=REFERENCE_CFG_TIP),
                io.Float.Input("guidance_end", default=1.0, min=0.0, max=1.0, step=0.05, round=0.01, optional=True,
                               tooltip=GUIDANCE_END_TIP),
                io.Combo.Input("mode", options=list(MODES), default="auto", optional=True, tooltip=MODE_TIP),
                io.Float.Input("harmonize", default=ControlOptions.harmonize, min=0.0, max=1.0, step=0.05, round=0.01,
                               optional=True, tooltip=HARMONIZE_TIP),
                io.Float.Input("reference_strength", default=ReferenceOptions.strength, min=0.01, max=1.0, step=0.01,
                               optional=True, tooltip=REFERENCE_STRENGTH_TIP),
                io.Combo.Input("training_free_reference", options=list(TRAINING_FREE_REFERENCE), default="init",
                               optional=True, tooltip=TRAINING_FREE_REFERENCE_TIP),
                io.Boolean.Input("shield_product", default=False, optional=True, tooltip=SHIELD_PRODUCT_TIP),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent"),
                     io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def validate_inputs(cls, steps=None, cfg=None, shift=None, denoise=None, lora_scale=None, attention_scale=None,
                        reference_cfg=None, guidance_end=None, harmonize=None, reference_strength=None):
        # The FLOAT widgets (a JSON NaN passes ComfyUI's min/max), then what execute does with them:
        # sampler_options builds the core's option objects, which check their values as they are built
        # (steps too: steps / denoise, the schedule's length, is bounded).
        values = dict(steps=steps, cfg=cfg, shift=shift, denoise=denoise, lora_scale=lora_scale,
                      attention_scale=attention_scale, reference_cfg=reference_cfg, guidance_end=guidance_end,
                      harmonize=harmonize, reference_strength=reference_strength)
        return widget_problem(cls, **values) or core_problem(
            "DreamPainter Sampler", sampler_options, {"guidance_scale": "cfg", "reference_guidance": "reference_cfg"},
            **widget_values(cls, exclude=("batch_size",), **values)) or True

    @classmethod
    def execute(cls, model, conditioning, vae, product, mask, batch_size, **widgets) -> io.NodeOutput:
        out = run_sampler(model, conditioning, vae, product, mask, batch_size, sampler_options(**widgets))
        ui_data = {**compare_previews(product, out.images), MODE_KEY: [out.mode]}
        return io.NodeOutput(out.images, {"samples": out.latents.float().cpu()}, out.mask.float().cpu(), ui=ui_data)
