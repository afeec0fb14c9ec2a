"""Process-group setup and the two data-parallel layouts (DDP, FSDP over the frozen base).

Launch with torchrun (or ``accelerate launch``, which sets the same environment):

    torchrun --standalone --nproc_per_node 8 -m train.stage1 --config configs/stage1.toml
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv-backend c10d \
             --rdzv-endpoint HOST:29500 -m train.stage1 --config configs/stage1.toml
    accelerate launch --num_processes 2 --cpu -m train.stage1 ...   (CPU, gloo)

The trainer reads RANK / WORLD_SIZE / LOCAL_RANK; without them it runs as one process.

* ``ddp``: every rank holds the whole model; the trained parameters are wrapped in
  DistributedDataParallel (the frozen ones are excluded from its buckets and from its
  initial broadcast: every rank loads the same files and builds the branch from the same seed).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each base DiT block (and,
  with ``distributed.shard_control``, each control block) across ranks: the frozen 6B base
  costs 1/world of its memory per GPU; in stage 2 the LoRA weights inside the blocks are
  sharded with them (their gradients are reduce-scattered by FSDP). The remaining parameters
  (patch/time embeddings, output head, and in stage 1 the control branch's embedding and
  gates, plus the blocks when not sharded) stay replicated; their gradients are all-reduced
  (averaged) by ``sync_replicated_grads`` before the optimizer step. Checkpoints are always
  written unsharded (full tensors), so a run can resume with another layout.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "is_dtensor", "full_tensor", "apply_fsdp", "sync_replicated_grads", "grad_norm", "clip_grad_norm"]


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def gather_objects(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        if not self.initialized:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def shutdown(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized = False


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)
    if world > 1:
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
            if backend == "nccl":
                kwargs["device_id"] = dev
            dist.init_process_group(**kwargs)
        env.initialized = True
    return env


def is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def apply_fsdp(model, shard_control: bool) -> list:
    """Shard the base blocks (and optionally the control blocks) with FSDP2; returns the sharded modules."""
    from torch.distributed.fsdp import fully_shard

    sharded = []
    for block in model.base.transformer_blocks:
        fully_shard(block)
        sharded.append(block)
    if shard_control and model.control is not None:
        for block in model.control.blocks:
            fully_shard(block)
            sharded.append(block)
    return sharded


def sync_replicated_grads(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Average the gradients of replicated (non-sharded) parameters over the ranks."""
    if not env.initialized:
        return
    grads = [p.grad for p in params if p.grad is not None and not is_dtensor(p)]
    if not grads:
        return
    # One flat buffer per dtype: few collectives, exact (sum then divide, like DDP).
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= env.world
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g.detach(), 2.0, dtype=torch.float32)
        if is_dtensor(n):
            n = n.full_tensor()
        norms.append(n.to(grads[0].device if not is_dtensor(grads[0]) else n.device))
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


@torch.no_grad()
def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """The global 2-norm of the parameters' gradients (0.0 when there are none), also when some are
    FSDP-sharded DTensors and some are plain (a collective then: every rank must call it). Non-finite
    when any gradient element is."""
    grads = [p.grad for p in params if p.grad is not None]
    return float(_total_norm(grads)) if grads else 0.0


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also works when some gradients are FSDP-sharded DTensors and some are
    plain (e.g. stage 1 with sharded control blocks and a replicated embedding/gates)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = _total_norm(grads)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for g in grads:
            g.detach().mul_(coef)
    return float(total)
