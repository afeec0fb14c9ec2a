"""The pack's public node interface: ids, inputs (in widget order) and outputs.

Workflows store node ids, input names and the order of widget values, so these are stable:
change them only together with workflows/ and the web extension. test_comfy_server.py checks
GET /object_info against this table.
"""

# node id: (required inputs, optional inputs, output types)
NODES = {
    "DreamPainterModelLoader": (
        ["transformer", "dreampainter_weights", "weight_dtype", "memory_mode", "swap_blocks"], [],
        ["DREAMPAINTER_MODEL"]),
    "DreamPainterTextEncoderLoader": (
        ["text_encoder", "tokenizer", "weight_dtype", "device"], [],
        ["DREAMPAINTER_TEXT_ENCODER"]),
    "DreamPainterPromptBuilder": (
        ["name", "category", "language", "style", "seed"], [],
        ["STRING"]),
    "DreamPainterTextEncode": (
        ["text_encoder", "prompt", "negative_prompt"], ["prompt_free", "background_token"],
        ["DREAMPAINTER_CONDITIONING"]),
    "DreamPainterBackgroundTokenLoader": (
        ["background_token"], [],
        ["DREAMPAINTER_TOKEN", "STRING"]),
    "DreamPainterVAELoader": (
        ["vae", "weight_dtype"], [],
        ["DREAMPAINTER_VAE"]),
    "DreamPainterReferenceEncode": (
        ["image", "resolution", "policy"], [],
        ["DREAMPAINTER_REFERENCE", "IMAGE"]),
    "DreamPainterProductPrep": (
        ["image", "mask", "width", "height", "placement", "box_ratio"], [],
        ["IMAGE", "MASK", "MASK"]),
    "DreamPainterMaskRefine": (
        ["mask", "close", "open", "dilate", "fill_holes", "min_area", "feather"], ["image"],
        ["MASK", "IMAGE"]),
    "DreamPainterAutoMask": (
        ["image", "model", "threshold"], [],
        ["MASK"]),
    "DreamPainterSampler": (
        ["model", "conditioning", "vae", "product", "mask", "seed", "steps", "cfg", "shift", "denoise",
         "batch_size", "lora_scale", "attention_scale", "mask_guidance", "paste_back"],
        ["reference", "reference_cfg", "guidance_end", "mode", "harmonize", "reference_strength",
         "training_free_reference", "shield_product"],
        ["IMAGE", "LATENT", "MASK"]),
    "DreamPainterComposite": (
        ["generated", "product", "mask", "feather", "color_match", "color_ring"], ["matte"],
        ["IMAGE"]),
    "DreamPainterProductLoRALoader": (
        ["product_lora"], [],
        ["DREAMPAINTER_PRODUCT", "STRING"]),
    "DreamPainterInsert": (
        ["model", "text_encoder", "vae", "context", "mask", "prompt", "negative_prompt", "seed", "steps", "cfg", "shift",
         "product_scale", "lora_scale", "harmonize", "mode", "paste_back", "feather"],
        ["product_lora"],
        ["IMAGE", "LATENT", "MASK"]),
}

CATEGORY = "DreamPainter"
# Add Node menu: one sub-category per role (nodes/sockets.py)
CATEGORIES = {
    "DreamPainterModelLoader": "DreamPainter/loaders",
    "DreamPainterTextEncoderLoader": "DreamPainter/loaders",
    "DreamPainterVAELoader": "DreamPainter/loaders",
    "DreamPainterPromptBuilder": "DreamPainter/conditioning",
    "DreamPainterTextEncode": "DreamPainter/conditioning",
    "DreamPainterReferenceEncode": "DreamPainter/conditioning",
    "DreamPainterProductPrep": "DreamPainter/image",
    "DreamPainterComposite": "DreamPainter/image",
    "DreamPainterMaskRefine": "DreamPainter/mask",
    "DreamPainterAutoMask": "DreamPainter/mask",
    "DreamPainterProductLoRALoader": "DreamPainter/loaders",
    "DreamPainterBackgroundTokenLoader": "DreamPainter/loaders",
    "DreamPainterInsert": "DreamPainter/sampling",
    "DreamPainterSampler": "DreamPainter/sampling",
}
