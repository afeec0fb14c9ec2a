"""Test-only ComfyUI nodes (installed into the test host's custom_nodes, never shipped):
save exact tensors, report which models ComfyUI's model management holds, and whether a failed
model load leaves its model alive."""

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


class DPTestFailedLoad:
    """Runs DreamPainterModelLoader on ``weights`` (meant to fail after the base transformer has loaded)
    and writes output/dp_failed_load/<name>.json: the error, and whether the base transformer is
    still alive while the exception is held (as ComfyUI holds it to report it). The garbage collector
    is off meanwhile: only the node itself may collect. Done twice: through the node's execute, and
    through the function it wraps (no release), which shows the leak the release prevents."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "failed_load"}),
                             "transformer": ("STRING", {"default": ""}), "weights": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, name, transformer, weights):
        import gc
        import weakref

        import nodes as comfy_nodes

        node = comfy_nodes.NODE_CLASS_MAPPINGS["DreamPainterModelLoader"]
        loaders = sys.modules[node.__module__]  # the pack's nodes.loaders
        real = loaders.load_transformer
        built = []

        def tracked(*args, **kwargs):
            model = real(*args, **kwargs)
            built.append(weakref.ref(model))
            built.append(weakref.ref(next(model.parameters())))  # a tensor of it, too
            return model

        def attempt(execute):
            built.clear()
            try:
                execute(node, transformer=transformer, dreampainter_weights=weights, weight_dtype="fp32",
                        memory_mode="gpu", swap_blocks=0)
            except Exception as exc:  # noqa: BLE001 - held while looking, as ComfyUI holds it
                held = exc
                return {"error": type(held).__name__, "message": str(held), "tracked": len(built),
                        "alive": sum(ref() is not None for ref in built)}
            return {"error": None, "tracked": len(built)}

        loaders.load_transformer = tracked
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            report = {"released": attempt(node.execute.__func__),
                      "unreleased": attempt(node.execute.__func__.__wrapped__)}
        finally:
            loaders.load_transformer = real
            if was_enabled:
                gc.enable()
            gc.collect()
        folder = os.path.join(folder_paths.get_output_directory(), "dp_failed_load")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        return {}


NODE_CLASS_MAPPINGS = {"DPTestSaveTensors": DPTestSaveTensors, "DPTestLoadedModels": DPTestLoadedModels,
                       "DPTestAutoMaskWithoutRembg": DPTestAutoMaskWithoutRembg, "DPTestFailedLoad": DPTestFailedLoad}
