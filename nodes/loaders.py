"""Loader nodes: DreamPainter transformer, GLM text encoder (+ text encode, the background token), CogView4 VAE."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from ..dreampainter_core.errors import ModelFilesError
from ..dreampainter_core.loading import (
    _load_scheduler,
    default_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)
from ..dreampainter_core.options import TextOptions
from ..dreampainter_core.pipeline import check_prompt, encode_prompt
from ..dreampainter_core.prompts import prompt_problem
from ..dreampainter_core.tokens import load_learned_token
from ..dreampainter_core.transformer import DreamPainterTransformer
from ..dreampainter_core.weights import build_from_weights, read_dreampainter_metadata
from . import memory, paths
from .schema_tools import search_aliases, widget_problem
from .sockets import (
    CATEGORY_CONDITIONING,
    CATEGORY_LOADERS,
    DreamPainterConditioning,
    DreamPainterConditioningType,
    DreamPainterModel,
    DreamPainterModelType,
    DreamPainterTextEncoder,
    DreamPainterTextEncoderType,
    DreamPainterTokenType,
    DreamPainterVAE,
    DreamPainterVAEType,
)

logger = logging.getLogger("DreamPainter")

AUTO = "auto"
TEXT_ENCODER_DEVICES = ("default", "cpu")
#: Refuse weights holding NaN/inf (one extra pass while they are read): a corrupt download would
#: otherwise paint black images with no word.
CHECK_FINITE = True


def _with_hint(load, *args, **kwargs):
    """Run a core loader; file errors get the "where to get it" hint if they lack one."""
    try:
        return load(*args, **kwargs)
    except ModelFilesError as exc:
        if paths.BASE_REPO in str(exc):
            raise
        raise ModelFilesError(f"{exc} {paths.BASE_HINT}") from exc


def _scheduler_for(entry: str):
    """The diffusers folder's scheduler config when there is one, else CogView4's."""
    if entry.startswith(paths.DIFFUSERS_PREFIX):
        folder = Path(paths.resolve_diffusers(entry, None, "scheduler")) / "scheduler"
        if (folder / "scheduler_config.json").is_file():
            return _load_scheduler(folder)
    return default_scheduler()


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------


def load_dreampainter_model(transformer: str, dreampainter_weights: str, weight_dtype: str = "bf16",
                            memory_mode: str = "gpu", swap_blocks: int = 0) -> DreamPainterModel:
    if memory_mode not in memory.MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {memory.MEMORY_MODES}, got {memory_mode!r}")
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    compute, storage, notes = memory.choose_dtypes(weight_dtype, device, "DreamPainter model")
    t_path = paths.resolve(transformer, "diffusion_models", "transformer", "DreamPainter model loader (transformer)")
    dp_path = paths.resolve_dreampainter(dreampainter_weights)
    if dp_path is not None:
        read_dreampainter_metadata(dp_path)  # fail fast, before loading the base model
    base = _with_hint(load_transformer, t_path, dtype=compute, device=offload, check_finite=CHECK_FINITE)
    if dp_path is not None:
        model = build_from_weights(base, dp_path, check_finite=CHECK_FINITE)
        stage = 2 if model.supports_reference else 1
    else:
        model = DreamPainterTransformer(base, with_control=False)
        stage = 0
        notes.append("no DreamPainter weights: the base model paints the whole canvas; the product comes back "
                     "only through paste-back")
    model.eval().requires_grad_(False)
    if storage is not None:
        memory.store_linears_in(base.transformer_blocks, storage)
        if model.control is not None:
            memory.store_linears_in(model.control.blocks, storage)
    blocks = list(base.transformer_blocks)
    memory.add_interrupt_checks(blocks)

    if storage is not None:
        memory.keep_lora_unmerged(model)  # a merged LoRA would not fit into float8 weights
    swap = None
    if memory_mode == "block_swap" and swap_blocks > 0:
        n = min(int(swap_blocks), len(blocks))
        resident_blocks, swapped = blocks[: len(blocks) - n], blocks[len(blocks) - n:]
        resident = {name: child for name, child in base.named_children() if name != "transformer_blocks"}
        resident["resident_blocks"] = torch.nn.ModuleList(resident_blocks)
        if model.control is not None:
            resident["control"] = model.control
        swap = memory.BlockSwap(swapped)
        memory.keep_lora_unmerged(model)  # never merge (and back up) the swapped blocks on the CPU
        patcher = memory.make_patcher(device, offload, **resident)
        notes.append(f"block_swap: {n} of {len(blocks)} transformer blocks stay on the CPU "
                     f"({swap.bytes / 2**30:.2f} GiB), streamed in per step")
    else:
        patcher = memory.make_patcher(device, offload, transformer=model)
    source = f"{transformer} + {dreampainter_weights} ({weight_dtype}, {memory_mode})"
    logger.info("DreamPainter model loaded: %s, stage %d; resident %.2f GiB", source, stage, patcher.model_size() / 2**30)
    return DreamPainterModel(transformer=model, patcher=patcher, scheduler=_scheduler_for(transformer), stage=stage,
                             weight_dtype=weight_dtype, memory_mode=memory_mode, swap=swap, notes=notes, source=source)


class DreamPainterModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterModelLoader",
            display_name="DreamPainter Model Loader",
            category=CATEGORY_LOADERS,
            **search_aliases("load model", "CogView4", "DreamPainter weights", "block swap", "fp8", "加载模型"),
            description="Loads the CogView4 transformer (a diffusers folder under models/diffusers or a single file "
                        "under models/diffusion_models) and a DreamPainter weight file from models/dreampainter.",
            inputs=[
                io.Combo.Input("transformer", options=paths.with_missing(
                    paths.diffusers_entries("transformer") + paths.file_entries("diffusion_models"), "CogView4 transformer"),
                    tooltip="[diffusers] <folder>: THUDM/CogView4-6B in models/diffusers; or a .safetensors file in "
                            "models/diffusion_models."),
                io.Combo.Input("dreampainter_weights", options=[paths.NONE] + paths.file_entries("dreampainter"),
                               default=paths.NONE,
                               tooltip="Stage-1 (control branch) or stage-2 (control branch + LoRA, needed for "
                                       "reference images) file from models/dreampainter. 'none' = base model only."),
                io.Combo.Input("weight_dtype", options=list(memory.WEIGHT_DTYPES), default="bf16",
                               tooltip="bf16 (default) or fp32; fp8_e4m3fn stores the block weights in 8 bits "
                                       "(half the memory) and computes in bf16. Falls back where unsupported (MPS)."),
                io.Combo.Input("memory_mode", options=list(memory.MEMORY_MODES), default="gpu",
                               tooltip="gpu: the whole model on the GPU. block_swap: swap_blocks transformer blocks "
                                       "stay on the CPU and are streamed in each step (slower, less VRAM)."),
                io.Int.Input("swap_blocks", default=20, min=0, max=64,
                             tooltip="block_swap only: how many of the transformer blocks stay on the CPU "
                                     "(CogView4-6B has 28, about 0.45 GiB each in bf16)."),
            ],
            outputs=[DreamPainterModelType.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, transformer=None, dreampainter_weights=None, memory_mode=None, swap_blocks=None):
        # transformer, dreampainter_weights: named so that ComfyUI's bare "Value not in list" leaves them
        # to the run, whose message names the folders searched and where to get the file.
        problem = widget_problem(cls, memory_mode=memory_mode, swap_blocks=swap_blocks)
        if problem:
            return problem
        if memory_mode == "block_swap" and swap_blocks == 0:  # would silently run as memory_mode gpu
            return ("DreamPainter Model Loader: memory_mode is block_swap but swap_blocks is 0, so every "
                    "transformer block would stay on the GPU. Set swap_blocks to how many blocks stay on the CPU "
                    "(CogView4-6B has 28, about 0.45 GiB each in bf16), or set memory_mode to gpu.")
        return True

    @classmethod
    @memory.frees_memory_on_failure
    def execute(cls, transformer, dreampainter_weights, weight_dtype, memory_mode, swap_blocks) -> io.NodeOutput:
        return io.NodeOutput(load_dreampainter_model(transformer, dreampainter_weights, weight_dtype, memory_mode, swap_blocks))


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def _tokenizer_path(text_encoder: str, te_path: str, tokenizer: str) -> str:
    what = "DreamPainter text encoder loader (tokenizer)"
    if tokenizer != AUTO:
        return paths.resolve(tokenizer, "text_encoders", "tokenizer", what)
    if text_encoder.startswith(paths.DIFFUSERS_PREFIX):
        return paths.resolve_diffusers(text_encoder, "tokenizer", what)
    candidates = []
    if os.path.isdir(te_path):
        candidates += [te_path, os.path.join(te_path, "tokenizer"), os.path.join(os.path.dirname(te_path), "tokenizer")]
    else:
        stem = os.path.splitext(te_path)[0]
        folder = os.path.dirname(te_path)
        candidates += [stem + "_tokenizer", stem, os.path.join(folder, "tokenizer")]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "tokenizer.json")):
            return c
    raise ModelFilesError(
        f"{what}: no tokenizer found for '{text_encoder}' (looked for tokenizer.json in "
        f"{', '.join(candidates)}). A single .safetensors file holds no tokenizer: pick the tokenizer input "
        f"(a [diffusers] folder, or a folder with tokenizer.json in models/text_encoders), e.g. the tokenizer/ "
        f"folder of {paths.BASE_REPO}."
    )


class DreamPainterTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterTextEncoderLoader",
            display_name="DreamPainter Text Encoder Loader (GLM-4)",
            category=CATEGORY_LOADERS,
            **search_aliases("GLM-4", "text encoder", "load text encoder", "tokenizer", "加载文本编码器"),
            description="Loads CogView4's GLM-4-9B text encoder and its tokenizer. It is moved onto the GPU "
                        "only while encoding.",
            inputs=[
                io.Combo.Input("text_encoder", options=paths.with_missing(
                    paths.diffusers_entries("text_encoder") + paths.folder_entries("text_encoders")
                    + paths.file_entries("text_encoders"), "GLM text encoder"),
                    tooltip="[diffusers] <folder> (uses its text_encoder/ and tokenizer/), a GLM folder or a "
                            ".safetensors file in models/text_encoders."),
                io.Combo.Input("tokenizer", options=[AUTO] + paths.diffusers_entries("tokenizer")
                               + paths.folder_entries("text_encoders", marker="tokenizer.json"), default=AUTO,
                               tooltip="auto: the [diffusers] folder's tokenizer/, the GLM folder itself, or a "
                                       "<file>_tokenizer folder next to a single file."),
                io.Combo.Input("weight_dtype", options=list(memory.WEIGHT_DTYPES), default="bf16",
                               tooltip="bf16 ~19 GB for GLM-4-9B; fp8_e4m3fn ~10 GB (computes in bf16)."),
                io.Combo.Input("device", options=list(TEXT_ENCODER_DEVICES), default="default",
                               tooltip="default: ComfyUI's GPU while encoding; cpu: encode on the CPU (slow, no VRAM)."),
            ],
            outputs=[DreamPainterTextEncoderType.Output(display_name="text_encoder")],
        )

    @classmethod
    def validate_inputs(cls, text_encoder=None, tokenizer=None):
        return True  # named to leave them to execute, whose message says where the files go

    @classmethod
    @memory.frees_memory_on_failure
    def execute(cls, text_encoder, tokenizer, weight_dtype, device) -> io.NodeOutput:
        what = "DreamPainter text encoder loader"
        load_device = torch.device("cpu") if device == "cpu" else mm.get_torch_device()
        offload = mm.text_encoder_offload_device()
        compute, storage, notes = memory.choose_dtypes(weight_dtype, load_device, "text encoder")
        te_path = paths.resolve(text_encoder, "text_encoders", "text_encoder", what)
        tok_path = _tokenizer_path(text_encoder, te_path, tokenizer)
        tok = _with_hint(load_tokenizer, tok_path)
        model = _with_hint(load_text_encoder, te_path, dtype=compute, device=offload, check_finite=CHECK_FINITE)
        if storage is not None:
            memory.store_linears_in(model.layers, storage)
        patcher = memory.make_patcher(load_device, offload, text_encoder=model)
        return io.NodeOutput(DreamPainterTextEncoder(tokenizer=tok, text_encoder=model, patcher=patcher, notes=notes,
                                                     source=f"{text_encoder} ({weight_dtype})"))


PROMPT_FREE_TIP = ("Prompt-free (Product2Img): the prompt box holds the product's name alone ('rose face serum') "
                   "and the text encoder reads it with the learned background token appended ('rose face serum "
                   "<background>'), so the model paints a background that suits the product without a prompt. "
                   "Needs background_token. Off: the prompt as written.")


class DreamPainterTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterTextEncode",
            display_name="DreamPainter Text Encode",
            category=CATEGORY_CONDITIONING,
            **search_aliases("prompt", "text encode", "background prompt", "negative prompt", "prompt-free",
                             "提示词"),
            description="Encodes the background prompt and a negative prompt with GLM-4; the text encoder "
                        "leaves the GPU afterwards. prompt_free: the product's name alone, with the learned "
                        "background token.",
            inputs=[
                DreamPainterTextEncoderType.Input("text_encoder"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The new background (the product itself is kept). With prompt_free: the "
                                        "product's name alone."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Used when cfg > 1; empty is fine."),
                io.Boolean.Input("prompt_free", default=False, optional=True, tooltip=PROMPT_FREE_TIP),
                DreamPainterTokenType.Input("background_token", optional=True,
                                            tooltip="From DreamPainter Background Token Loader: the learned "
                                                    "<background> word. prompt_free appends it to the name; "
                                                    "otherwise a prompt may use it as a word."),
            ],
            outputs=[DreamPainterConditioningType.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, negative_prompt=None, prompt_free=None):
        # An API prompt can carry what the text box cannot: an unpaired surrogate (JSON "\ud83d"), megabytes.
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            problem = None if text is None else prompt_problem(text)
            if problem:
                return f"DreamPainter Text Encode: {name} {problem}."
        if prompt_free and prompt is not None and not str(prompt).strip():
            return ("DreamPainter Text Encode: prompt_free is on and the prompt box is empty: write the product's "
                    "name there (e.g. 'rose face serum').")
        return True

    @classmethod
    def execute(cls, text_encoder, prompt, negative_prompt, prompt_free=False, background_token=None) -> io.NodeOutput:
        text = TextOptions(prompt_free=prompt_free, token=background_token)  # checked before GLM loads
        prompt = text.prompt(prompt)
        positive, negative = encode_prompts(text_encoder, prompt, negative_prompt, tokens=text.tokens)
        return io.NodeOutput(DreamPainterConditioning(positive, negative, prompt, negative_prompt or ""))


def encode_prompts(text_encoder: DreamPainterTextEncoder, prompt: str, negative_prompt: str | None,
                   tokens=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) GLM embeddings, float32 on ComfyUI's intermediate device (the samplers
    cast them to the transformer's dtype), with the text encoder on its device only meanwhile.
    ``tokens``: learned words the prompts may use (a DreamPaint product's identifier, the background
    token); one made for another text encoder is refused before the encoder moves."""
    check_prompt(prompt, "prompt")  # linked texts (e.g. the Prompt Builder's) are only known now
    check_prompt(negative_prompt or "", "negative_prompt")
    for token in tokens:
        token.check_fits(text_encoder.text_encoder)
    memory.load(text_encoder.patcher)
    try:
        tok, te, out = text_encoder.tokenizer, text_encoder.text_encoder, mm.intermediate_device()
        positive = encode_prompt(tok, te, [prompt], dtype=torch.float32, device=out, tokens=tokens)
        mm.throw_exception_if_processing_interrupted()
        negative = encode_prompt(tok, te, [negative_prompt or ""], dtype=torch.float32, device=out, tokens=tokens)
    finally:
        memory.unload(text_encoder.patcher)  # GLM-4-9B is ~19 GB: never keep it next to the DiT
    return positive, negative


class DreamPainterBackgroundTokenLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterBackgroundTokenLoader",
            display_name="DreamPainter Background Token Loader",
            category=CATEGORY_LOADERS,
            **search_aliases("background token", "prompt-free", "Product2Img", "learned token", "加载背景词"),
            description="Loads a learned <background> token from models/dreampainter_tokens (made by python -m "
                        "train.background_token): with Text Encode's prompt_free, the product's name alone "
                        "gives a background that suits the product.",
            inputs=[
                io.Combo.Input("background_token", options=paths.with_missing(
                    paths.file_entries("dreampainter_tokens"), "background token file"),
                    tooltip="A .safetensors token file from models/dreampainter_tokens. It belongs to the text "
                            "encoder it was trained with; another one refuses it."),
            ],
            outputs=[DreamPainterTokenType.Output(display_name="background_token"),
                     io.String.Output(display_name="token", tooltip="The token's word (e.g. <background>), for "
                                                                    "prompts that use it by hand")],
        )

    @classmethod
    def validate_inputs(cls, background_token=None):
        return True  # named to leave it to execute, whose message says where token files go

    @classmethod
    def execute(cls, background_token) -> io.NodeOutput:
        token = load_learned_token(paths.resolve_token(background_token))
        return io.NodeOutput(token, token.token)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


class DreamPainterVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamPainterVAELoader",
            display_name="DreamPainter VAE Loader (CogView4)",
            category=CATEGORY_LOADERS,
            **search_aliases("VAE", "load VAE", "CogView4 VAE", "加载 VAE"),
            description="Loads CogView4's 16-channel VAE (diffusers layout), which ComfyUI's own VAE loader cannot.",
            inputs=[
                io.Combo.Input("vae", options=paths.with_missing(
                    paths.diffusers_entries("vae") + paths.folder_entries("vae") + paths.file_entries("vae"),
                    "CogView4 VAE"),
                    tooltip="[diffusers] <folder> (uses its vae/), a diffusers vae folder or a .safetensors file "
                            "in models/vae."),
                io.Combo.Input("weight_dtype", options=["bf16", "fp32"], default="bf16"),
            ],
            outputs=[DreamPainterVAEType.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, vae=None):
        return True  # named to leave it to execute, whose message says where the files go

    @classmethod
    @memory.frees_memory_on_failure
    def execute(cls, vae, weight_dtype) -> io.NodeOutput:
        device, offload = mm.vae_device(), mm.vae_offload_device()
        compute, _, notes = memory.choose_dtypes(weight_dtype, device, "VAE")
        path = paths.resolve(vae, "vae", "vae", "DreamPainter VAE loader")
        model = _with_hint(load_vae, path, dtype=compute, device=offload, check_finite=CHECK_FINITE)
        patcher = memory.make_patcher(device, offload, vae=model)
        return io.NodeOutput(DreamPainterVAE(vae=model, patcher=patcher, notes=notes, source=f"{vae} ({weight_dtype})"))
