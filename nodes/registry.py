"""The pack's V3 extension: every node class, in menu order. Registration happens only here."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .image_nodes import (
    DreamPainterAutoMask,
    DreamPainterComposite,
    DreamPainterMaskRefine,
    DreamPainterProductPrep,
    DreamPainterReferenceEncode,
)
from .insert_nodes import DreamPainterInsert, DreamPainterProductLoRALoader
from .loaders import (
    DreamPainterBackgroundTokenLoader,
    DreamPainterModelLoader,
    DreamPainterTextEncode,
    DreamPainterTextEncoderLoader,
    DreamPainterVAELoader,
)
from .paths import register_model_folders
from .prompt_nodes import DreamPainterPromptBuilder
from .sampler import DreamPainterSampler

NODES: list[type[io.ComfyNode]] = [
    DreamPainterModelLoader,
    DreamPainterTextEncoderLoader,
    DreamPainterPromptBuilder,
    DreamPainterBackgroundTokenLoader,
    DreamPainterTextEncode,
    DreamPainterVAELoader,
    DreamPainterReferenceEncode,
    DreamPainterProductPrep,
    DreamPainterMaskRefine,
    DreamPainterAutoMask,
    DreamPainterSampler,
    DreamPainterComposite,
    DreamPainterProductLoRALoader,
    DreamPainterInsert,
]


class DreamPainterExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folders()  # ComfyUI 0.3.75 does not call on_load
        return list(NODES)
