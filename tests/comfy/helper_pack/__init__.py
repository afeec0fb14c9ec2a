"""Test-only ComfyUI nodes (installed into the test host's custom_nodes, never shipped):
save exact tensors, and report which models ComfyUI's model management holds."""

import json
import os
import sys

import folder_paths
from safetensors.torch import save_file

import comfy.model_management as mm


class DPTestSaveTensors:
    """Writes IMAGE / MASK / LATENT exactly (float32 safetensors) to output/dp_tensors/<name>.safetensors."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "out"})},
                "optional": {"image": ("IMAGE",), "mask": ("MASK",), "latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, name, image=None, mask=None, latent=None):
        folder = os.path.join(folder_paths.get_output_directory(), "dp_tensors")
        os.makedirs(folder, exist_ok=True)
        tensors = {}
        if image is not None:
            tensors["image"] = image
        if mask is not None:
            tensors["mask"] = mask
        if latent is not None:
            tensors["latent"] = latent["samples"]
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"dp_tensors": [name]}}


class DPTestLoadedModels:
    """Writes output/dp_loaded/<name>.json: what comfy.model_management holds after its input ran."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "loaded"}), "image": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def report(self, name, image):
        models = []
        for lm in mm.current_loaded_models:
            patcher = lm.model
            if patcher is None:
                continue
            holder = patcher.model
            models.append({
                "children": [n for n, _ in holder.named_children()],
                "device": str(lm.device),
                "size": patcher.model_size(),
            })
        folder = os.path.join(folder_paths.get_output_directory(), "dp_loaded")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(models, fh)
        return {"ui": {"dp_loaded": [name]}}


class DPTestAutoMaskWithoutRembg:
    """Runs DreamPainterAutoMask as if rembg were not installed (to check its message)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, image):
        import nodes as comfy_nodes

        node = comfy_nodes.NODE_CLASS_MAPPINGS["DreamPainterAutoMask"]
        adapter = sys.modules[node.__module__].auto_mask  # the pack's dreampainter_core.auto_mask
        saved = {k: v for k, v in sys.modules.items() if k == "rembg" or k.startswith("rembg.")}
        maskers = dict(adapter._MASKERS)
        for k in saved:
            del sys.modules[k]
        sys.modules["rembg"] = None  # import rembg -> ImportError
        adapter._MASKERS.clear()
        try:
            node.execute(image=image, model="u2netp", threshold=0.5)
        finally:
            del sys.modules["rembg"]
            sys.modules.update(saved)
            adapter._MASKERS.update(maskers)
        return {}


NODE_CLASS_MAPPINGS = {"DPTestSaveTensors": DPTestSaveTensors, "DPTestLoadedModels": DPTestLoadedModels,
                       "DPTestAutoMaskWithoutRembg": DPTestAutoMaskWithoutRembg}
