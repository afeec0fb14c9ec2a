"""Exponential moving average of the trained parameters (fp32 shadow, optional)."""

from __future__ import annotations

import torch

__all__ = ["EMA"]


class EMA:
    """shadow <- d * shadow + (1 - d) * param after every optimizer step.

    With ``warmup`` the decay is min(decay, (1 + n) / (10 + n)) for the n-th update, so early
    averages are not dominated by the initial weights. The shadow has the parameters'
    layout (plain tensors, or DTensors under FSDP), in float32.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange parameter values with the shadow (call twice to restore)."""
        for k, p in self.params.items():
            tmp = p.detach().clone()
            p.detach().copy_(self.shadow[k].to(p.dtype))
            self.shadow[k].copy_(tmp.float())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k, t in self.shadow.items():
            src = tensors[k]
            if hasattr(t, "device_mesh"):  # DTensor: take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.device_mesh.device_type), t.device_mesh, t.placements)
            t.copy_(src.to(t.device) if not hasattr(src, "device_mesh") else src)
        self.updates = int(updates)
