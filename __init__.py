"""ComfyUI-DreamPainter: the ComfyUI entry point.

ComfyUI imports this file as a package. Everything ComfyUI-specific is imported
lazily inside `comfy_entrypoint`, so that the model code (`dreampainter_core`) and
the training code (`train`) can be used and tested without ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.registry import DreamPainterExtension

    return DreamPainterExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
