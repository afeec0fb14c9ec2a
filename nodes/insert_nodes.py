"""DreamPaint in ComfyUI: a product-LoRA loader and the insertion sampler (the core's prepare_insert +
generate_insert, with ComfyUI around them)."""

from __future__ import annotations

from comfy_api.latest import io

from ..dreampainter_core.errors import CapabilityError
from ..dreampainter_core.options import (MAX_GUIDANCE, MAX_SEED, MAX_SHIFT, MAX_STEPS, MODES, ControlOptions,
                                          OutputOptions, ReferenceOptions, SamplingOptions)
from ..dreampainter_core.pipeline import DreamPainterPipeline
from ..dreampainter_core.product_lora import load_product_lora, warn_missing_identifier
from ..dreampainter_core.prompts import prompt_problem
from . import paths
from .loaders import encode_prompts
from .progress import SamplerProgress
from .sampler import MODE_KEY, SCALE_SLIDER, compare_previews, run_loaded
from .schema_tools import core_problem, search_aliases, widget_problem, widget_values
from .sockets import (
    CATEGORY_LOADERS,
    CATEGORY_SAMPLING,
    DreamPainterModelType,
    DreamPainterProductType,
    DreamPainterTextEncoderType,
    DreamPainterVAEType,
)

PRODUCT_SCALE_TIP = ("Strength of the product LoRA: 1 = as trained, 0 = without it (the class noun alone, exactly). "
                     "Between 0.6 and 1.2 trades the product's look against fitting the scene.")
INSERT_LORA_SCALE_TIP = ("Strength of the stage-2 LoRA, when the DreamPainter file has one (train.dreampaint trains a "
                         "product with it on at 1, so keep 1); 0 = without it, exactly.")
INSERT_MODE_TIP = ("How the photo outside the mask is kept. auto: an insertion control branch when the model has one "
                   "(train.stage1 data.mask_policy=insertion), else training_free: the photo's latent is held on its own "
                   "noised path while the product is painted into the mask. The title badge shows which mode ran.")
INSERT_HARMONIZE_TIP = ("training_free: share of the last steps that run without holding the photo, so the product's "
                        "edge and shadow blend in (paste_back restores the photo outside the mask). 0 = held to the end.")


class DreamPainterProductLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterProductLoRALoader",
            display_name="DreamPainter Product LoRA Loader",
            category=CATEGORY_LOADERS,
            **search_aliases("DreamPaint", "product LoRA", "catalog product", "insert product", "加载商品"),
            description="Loads a DreamPaint product file from models/dreampainter_products (one catalog product, "
                        "learned from its catalog images by python -m train.dreampaint) for DreamPainter Insert. Its "
                        "identifier goes before the class noun in the prompt: 'a sks cup on ...'.",
            inputs=[
                io.Combo.Input("product_lora", options=paths.with_missing(
                    paths.file_entries("dreampainter_products"), "DreamPaint product file"),
                    tooltip="A .safetensors product file from models/dreampainter_products (made by python -m "
                            "train.dreampaint --images DIR --class-noun NOUN --out FILE)."),
            ],
            outputs=[DreamPainterProductType.Output(display_name="product_lora"),
                     io.String.Output(display_name="prompt", tooltip="'a <identifier> <class noun>': the words the "
                                                                     "product was trained with, to start a prompt")],
        )

    @classmethod
    def validate_inputs(cls, product_lora=None):
        return True  # named to leave it to execute, whose message says where product files go

    @classmethod
    def execute(cls, product_lora) -> io.NodeOutput:
        product = load_product_lora(paths.resolve_product(product_lora))
        return io.NodeOutput(product, product.prompt)


def insert_options(seed, steps, cfg, shift, product_scale, lora_scale, harmonize, mode, paste_back, feather) -> dict:
    """The node's widgets -> the core's option objects (each checks its values as it is built)."""
    return dict(
        sampling=SamplingOptions(steps=steps, guidance_scale=cfg, seed=seed, shift=None if shift <= 0 else shift),
        reference=ReferenceOptions(lora_scale=lora_scale, product_scale=product_scale),
        control=ControlOptions(mode=mode, harmonize=harmonize),
        output=OutputOptions(paste_back=paste_back, feather=feather),
    )


class DreamPainterInsert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterInsert",
            display_name="DreamPainter Insert (DreamPaint)",
            category=CATEGORY_SAMPLING,
            **search_aliases("DreamPaint", "insert product", "virtual try-on", "inpaint product", "放入商品"),
            description="Paints a catalog product (its product LoRA) into your photo where the mask is white; every "
                        "pixel outside the mask stays the photo's (exactly, with paste_back). The output has the "
                        "photo's size.",
            inputs=[
                DreamPainterModelType.Input("model"),
                DreamPainterTextEncoderType.Input("text_encoder"),
                DreamPainterVAEType.Input("vae"),
                io.Image.Input("context", tooltip="Your photo (a room, a desk, a person): kept outside the mask."),
                io.Mask.Input("mask", tooltip="1 (white) = where the product goes (generated), 0 = the photo kept; the "
                                              "same size as context. A rough box or ellipse is fine."),
                io.String.Input("prompt", multiline=True, default="a sks cup on a wooden desk",
                                tooltip="Name the product with its identifier before the class noun, as it was "
                                        "trained ('a sks cup ...'), then the scene."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Used when cfg > 1."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS),
                io.Float.Input("cfg", default=3.5, min=0.0, max=MAX_GUIDANCE, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; <= 1 disables the negative prompt pass."),
                io.Float.Input("shift", default=0.0, min=0.0, max=MAX_SHIFT, step=0.05, round=0.01,
                               tooltip="Timestep shift (mu). 0 = auto: CogView4's resolution-dependent shift."),
                io.Float.Input("product_scale", tooltip=PRODUCT_SCALE_TIP, **SCALE_SLIDER),
                io.Float.Input("lora_scale", tooltip=INSERT_LORA_SCALE_TIP, **SCALE_SLIDER),
                io.Float.Input("harmonize", default=ControlOptions.harmonize, min=0.0, max=1.0, step=0.05, round=0.01,
                               tooltip=INSERT_HARMONIZE_TIP),
                io.Combo.Input("mode", options=list(MODES), default="auto", tooltip=INSERT_MODE_TIP),
                io.Boolean.Input("paste_back", default=True,
                                 tooltip="Paste the photo's own pixels back outside the mask (bit-exact)."),
                io.Int.Input("feather", default=1, min=0, max=64,
                             tooltip="Pixels of the photo blended into the mask's edge at paste-back."),
                DreamPainterProductType.Input("product_lora", optional=True,
                                              tooltip="From DreamPainter Product LoRA Loader. Without it the mask is "
                                                      "filled from the prompt alone."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent"),
                     io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, negative_prompt=None, steps=None, cfg=None, shift=None, product_scale=None,
                        lora_scale=None, harmonize=None, mode=None, feather=None):
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            problem = None if text is None else prompt_problem(text)
            if problem:
                return f"DreamPainter Insert: {name} {problem}."
        values = dict(steps=steps, cfg=cfg, shift=shift, product_scale=product_scale, lora_scale=lora_scale,
                      harmonize=harmonize, mode=mode, feather=feather)
        return widget_problem(cls, **values) or core_problem(
            "DreamPainter Insert", insert_options, {"guidance_scale": "cfg"},
            **widget_values(cls, exclude=("prompt", "negative_prompt"), **values)) or True

    @classmethod
    def execute(cls, model, text_encoder, vae, context, mask, prompt, negative_prompt, product_lora=None,
                **widgets) -> io.NodeOutput:
        if product_lora is not None and model.swap is not None:
            raise CapabilityError("DreamPainter Insert: a product LoRA cannot be added to a model loaded with "
                                  "memory_mode block_swap (its swapped blocks live on the CPU); load the model with "
                                  "memory_mode gpu (weight_dtype fp8_e4m3fn halves its memory).")
        options = insert_options(**widgets)
        pipe = DreamPainterPipeline(None, None, vae.vae, model.transformer, model.scheduler)
        progress = SamplerProgress(options["sampling"].steps)
        request = pipe.prepare_insert(context, mask, product_lora, callback=progress, **options)
        if product_lora is not None:
            warn_missing_identifier([prompt], product_lora)
        positive, negative = encode_prompts(text_encoder, prompt, negative_prompt, tokens=request.tokens)
        out = run_loaded(model, vae, pipe, progress, lambda: pipe.generate_insert(request, positive, negative))
        ui_data = {**compare_previews(context, out.images), MODE_KEY: [out.mode]}
        return io.NodeOutput(out.images, {"samples": out.latents.float().cpu()}, out.mask.float().cpu(), ui=ui_data)
