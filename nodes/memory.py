"""Devices, dtypes and ComfyUI model management for the DreamPainter models.

* Every model is wrapped in ``comfy.model_patcher.ModelPatcher`` (through a plain ``nn.Module``
  holder: diffusers/transformers models have a read-only ``device`` property that ModelPatcher
  would overwrite) and loaded with ``comfy.model_management.load_models_gpu`` before use, so
  ComfyUI frees other models first and can offload ours later. Devices come from
  ``comfy.model_management``; nothing here names cuda.
* fp8_e4m3fn: the Linear weights of the transformer blocks are *stored* in float8 and upcast
  to the activation dtype (bf16) in ``forward`` (``Fp8Linear``); embeddings, norms, the output
  head and LoRA stay in bf16.
* Block swap: N transformer blocks stay on the CPU (pinned memory where possible) and are moved
  to the compute device by a forward pre-hook and dropped again by a forward hook, so only the
  other blocks count against the GPU. ModelPatcher only sees the resident part.
* A failed load frees what it had built (``frees_memory_on_failure``).
"""

from __future__ import annotations

import functools
import gc
import logging
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher

logger = logging.getLogger("DreamPainter")

WEIGHT_DTYPES = ("bf16", "fp32", "fp8_e4m3fn")
MEMORY_MODES = ("gpu", "block_swap")


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


def _works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.float32)
        b = a.to(dtype).to(torch.float32) if dtype.is_floating_point and dtype.itemsize == 1 else (a.to(dtype) @ a.to(dtype))
        return bool(torch.isfinite(b.float()).all())
    except Exception:  # noqa: BLE001 - any failure means "not supported here"
        return False


def choose_dtypes(requested: str, device: torch.device, what: str) -> tuple[torch.dtype, torch.dtype | None, list[str]]:
    """(load/compute dtype, storage dtype for block Linear weights or None, notes for the user).

    Unsupported choices fall back (fp8 -> bf16 -> fp32) with a logged message instead of failing;
    fp16 is never used (CogView4 overflows in fp16)."""
    notes = []
    if requested not in WEIGHT_DTYPES:
        raise ValueError(f"{what}: weight_dtype must be one of {WEIGHT_DTYPES}, got {requested!r}")
    storage = None
    if requested == "fp8_e4m3fn":
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if fp8 is None or device.type == "mps" or not _works(device, fp8):
            notes.append(f"{what}: fp8_e4m3fn weights are not supported on {device} with this PyTorch; using bf16 instead.")
        else:
            storage = fp8
        requested = "bf16"
    compute = torch.float32
    if requested == "bf16":
        if _works(device, torch.bfloat16):
            compute = torch.bfloat16
        else:
            notes.append(f"{what}: bf16 is not supported on {device}; using fp32 instead (fp16 is not offered: "
                         "CogView4 overflows in fp16).")
            storage = None
    for n in notes:
        logger.warning(n)
    return compute, storage, notes


class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is stored in float8 and upcast to the input's dtype per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)


@torch.no_grad()
def store_linears_in(module: nn.Module, dtype: torch.dtype) -> int:
    """Convert every plain nn.Linear inside ``module`` (LoRA A/B excluded) to float8 storage.
    Returns the number of converted layers."""
    count = 0
    for name, m in module.named_modules():
        if type(m) is nn.Linear and "lora_" not in name:
            m.weight.data = m.weight.data.to(dtype)
            m.__class__ = Fp8Linear
            count += 1
    return count


def keep_lora_unmerged(model) -> None:
    """Run this model's LoRA as a separate path instead of merging it for each generation.

    Merging cannot work on float8-stored weights, and with block swap it would merge (and
    back up) the swapped blocks on the CPU every run. The unmerged path costs ~2 x rank /
    width more FLOPs per layer."""
    model.merge_lora_at_inference = False


# ---------------------------------------------------------------------------------------------
# ModelPatcher wrapping
# ---------------------------------------------------------------------------------------------


class ModelHolder(nn.Module):
    """What ModelPatcher manages: the given modules (shared, not copied)."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)


def make_patcher(load_device, offload_device, **modules) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(ModelHolder(**modules), load_device=load_device, offload_device=offload_device)


def load(*patchers) -> None:
    """Load onto their devices through ComfyUI (frees other models as needed). Whole models only:
    our modules are not ComfyUI-castable, so partial (lowvram) loading is not used; block_swap is
    the way to fit a smaller GPU."""
    mm.load_models_gpu(list(patchers), force_full_load=True)


def unload(patcher) -> bool:
    """Take one model off its load device through ComfyUI's bookkeeping (what free_memory does)."""
    done = False
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            done = True
    if done:
        mm.soft_empty_cache()
    return done


def drop_frame_locals(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in the tracebacks of ``exc`` and of the
    exceptions it was raised from (their text, file names and line numbers stay)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # frames still running are skipped
        todo += [e.__cause__, e.__context__]


def frees_memory_on_failure(load):
    """Decorator for the loader nodes: a load that fails must not keep what it had built.

    ComfyUI holds the exception until it has reported it, and through its traceback every frame's
    locals (the base transformer loaded before the DreamPainter file failed, say); cycles among them
    wait for ComfyUI's next periodic gc. So the frames are cleared, the cycles collected and the
    device cache emptied now."""

    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except BaseException as exc:
            drop_frame_locals(exc)
            gc.collect()
            mm.soft_empty_cache()
            raise

    return wrapper


# ---------------------------------------------------------------------------------------------
# Interrupt checks inside the model
# ---------------------------------------------------------------------------------------------


def _interrupt_check(module, args):
    mm.throw_exception_if_processing_interrupted()


def add_interrupt_checks(blocks) -> None:
    """Check ComfyUI's cancel flag before every block, so a cancel lands within one block."""
    for b in blocks:
        if not getattr(b, "_dreampainter_interrupt_hook", False):
            b.register_forward_pre_hook(_interrupt_check)
            b._dreampainter_interrupt_hook = True


# ---------------------------------------------------------------------------------------------
# Block swap
# ---------------------------------------------------------------------------------------------


class BlockSwap:
    """Keep ``blocks`` on the CPU; each is moved to the device of its input right before its
    forward and dropped right after (weights never change, so nothing is copied back)."""

    def __init__(self, blocks: list[nn.Module], pin: bool | None = None):
        self.blocks = list(blocks)
        pin = torch.cuda.is_available() if pin is None else pin
        self.cpu_tensors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.bytes = 0
        for b in self.blocks:
            pairs = []
            for t in list(b.parameters()) + list(b.buffers()):
                cpu = t.data.to("cpu")
                if pin:
                    try:
                        cpu = cpu.pin_memory()
                    except Exception:  # noqa: BLE001 - pinning is an optimisation only
                        pass
                t.data = cpu
                pairs.append((t, cpu))
                self.bytes += cpu.numel() * cpu.element_size()
            self.cpu_tensors[id(b)] = pairs
            b.register_forward_pre_hook(self._bring)
            b.register_forward_hook(self._drop)
        self.moves = 0

    def _bring(self, module, args):
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
        if device is None or device.type == "cpu":
            return
        non_blocking = mm.device_supports_non_blocking(device)
        for t, cpu in self.cpu_tensors[id(module)]:
            t.data = cpu.to(device, non_blocking=non_blocking)
        self.moves += 1

    def _drop(self, module, args, output):
        for t, cpu in self.cpu_tensors[id(module)]:
            if t.data is not cpu:
                t.data = cpu

    def drop_all(self) -> None:
        for b in self.blocks:
            self._drop(b, (), None)
