"""The training loop shared by both DreamPainter stages.

    python -m train.stage1 --config configs/stage1.toml [section.key=value ...]
    python -m train.stage2 --config configs/stage2.toml model.stage1_weights=runs/stage1/dreampainter_stage1.safetensors

Stage 1 trains the control branch (condition embedding, copied blocks, zero-initialised
gates) with the base frozen and no reference. Stage 2 loads a stage-1 file, adds LoRA to
the base blocks, freezes base and branch, and trains only LoRA, with the sample's background
reference used with probability ``data.reference_prob`` (randomly resized/cropped to
``data.reference_sizes`` and randomly shifted by the dataset).

Conditioning goes through the pipeline's own functions (``encode_prompt``, ``encode_image``,
``prepare_control``, ``encode_reference``), so training sees exactly what inference feeds the
model; the objective is in train/flow.py (the sampler's convention).

Data order: the sampler cuts each epoch into GLOBAL batches of ``batch_size * world`` samples
(one bucket each, shuffled by (seed, epoch)); rank r takes positions
``[r * batch_size, (r + 1) * batch_size)`` of every global batch. Together with the
per-sample noise (flow.sample_generator) this makes a run independent of how the global batch
is split: 2 processes x batch 1 computes the same thing as 1 process x batch 2 (up to
floating-point summation order), and a resumed run continues the exact order. Short
global batches at the end of a bucket are dropped (drop_last), so every rank always has data.

A micro-batch is run as one model call per group of samples whose text length and reference
size agree (text embeddings are each prompt's own, as at inference; references come in two
sizes or not at all), and the per-sample MSE losses are averaged over the global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from dreampainter_core.attention import AttentionModulation
from dreampainter_core.errors import DreamPainterError
from dreampainter_core.fileio import atomic_write_text
from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer
from dreampainter_core.weights import read_dreampainter_metadata, save_dreampainter_weights

from . import flow
from .buckets import make_buckets
from .cache import ConditionCache, files_identity
from .checkpoint import (
    CheckpointError,
    CheckpointWriter,
    flatten_optimizer_state,
    load_checkpoint,
    load_newest_intact,
    nonfinite_tensor,
    read_checkpoint,
    remove_stale_temp,
    rng_state,
    set_rng_state,
)
from .config import Config, ConfigError, EmaConfig, OptimConfig, TrainConfig, dump_toml
from .dataset import BucketBatchSampler, ManifestDataset, collate
from .distributed import (
    DistEnv,
    apply_fsdp,
    clip_grad_norm,
    full_tensor,
    grad_norm,
    init_distributed,
    is_dtensor,
    sync_replicated_grads,
)
from .ema import EMA
from .logs import TrainLogger

log = logging.getLogger("train")

__all__ = ["Trainer", "TrainResult", "TrainingError", "NonFiniteError", "GlobalBatchSampler", "Optimization", "lr_lambda",
           "write_checkpoint", "train_steps", "condition_latents", "TrainingModule", "run", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage (gathered FSDP tensors can be views into padded buffers)."""
    return t.detach().to("cpu").contiguous().clone()


class TrainingError(DreamPainterError, RuntimeError):
    pass


class NonFiniteError(TrainingError):
    """train.max_nonfinite_steps optimizer steps in a row had a NaN or infinite loss or gradient."""


def _check_finite(what: str, *groups: dict | None) -> None:
    """The last guard before weights reach a file: never write NaN or infinite values."""
    for tensors in groups:
        bad = nonfinite_tensor(tensors)
        if bad is not None:
            raise TrainingError(f"refusing to write {what}: {bad!r} holds NaN or infinite values (nothing was written; "
                                "the checkpoints already on disk are untouched)")


def _all_finite(value: Any) -> bool:
    """Whether every number in `value` (a tensor, a number, or dicts/lists/tuples of them) is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _numbers_text(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"{float(value):.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_numbers_text(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return "?"


# ---------------------------------------------------------------------------------------
# data order


class GlobalBatchSampler(Sampler[list[int]]):
    """Global batches of ``per_device * world`` indices (BucketBatchSampler, drop_last); rank r
    yields its slice of each. ``fixed`` repeats the first global batch of epoch 0 forever."""

    def __init__(self, dataset, per_device: int, world: int, rank: int, seed: int, fixed: bool = False):
        self.inner = BucketBatchSampler(dataset, per_device * world, seed=seed, drop_last=True)
        self.per_device, self.rank, self.fixed = per_device, rank, fixed
        if self.inner.num_batches == 0:
            sizes = {k: len(v) for k, v in self.inner.groups.items()}
            raise TrainingError(
                f"no bucket has a full global batch of {per_device * world} samples (batch_size {per_device} x "
                f"{world} processes); bucket sizes: {sizes}. Lower train.batch_size or add data."
            )

    @property
    def num_batches(self) -> int:
        return self.inner.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch, start_batch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        return self.inner.epoch_batches(epoch)

    def _mine(self, batch: list[int]) -> list[int]:
        return batch[self.rank * self.per_device : (self.rank + 1) * self.per_device]

    def __iter__(self):
        if self.fixed:
            first = self._mine(self.inner.epoch_batches(0)[0])
            while True:
                yield list(first)
        for batch in self.inner:
            yield self._mine(batch)

    def __len__(self) -> int:
        return len(self.inner)


# ---------------------------------------------------------------------------------------
# the module that DDP wraps: all of a micro-batch's model calls in one forward


class TrainingModule(nn.Module):
    def __init__(self, model: DreamPainterTransformer):
        super().__init__()
        self.model = model

    def forward(self, groups: list[dict[str, Any]]) -> torch.Tensor:
        """Per-sample MSE between predicted and target velocity, in the groups' order."""
        losses = []
        for g in groups:
            v = self.model(
                g["x_t"], g["text"], g["timestep"], g["size"], g["size"], g["crop"],
                control_latents=g["control"], reference_latents=g["reference"], modulation=g.get("modulation"),
            )
            err = (v.float() - g["target"]) ** 2
            if g.get("weight") is not None:
                err = err * g["weight"]
            losses.append(err.mean(dim=(1, 2, 3)))
        return torch.cat(losses)


def condition_latents(pipe: DreamPainterPipeline, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset item's target latent [16, h, w] and control [Z_f, Z_m] [17, h, w] (float32), as the
    pipeline makes them at inference. No autocast: the encoders run in their weights' dtype."""
    x0 = pipe.encode_image(item["image"].permute(1, 2, 0)[None])
    control = pipe.prepare_control(item["foreground"].permute(1, 2, 0)[None], item["mask"][0][None])
    return x0[0].float(), control[0].float()


class _ExportView:
    """What save_dreampainter_weights needs, with full (gathered, or EMA) tensors."""

    def __init__(self, model: DreamPainterTransformer, control: dict, lora: dict):
        self.control = model.control
        self.has_lora = model.has_lora
        self.config = model.config
        self.base = model.base
        self.inner_dim = model.inner_dim
        self._control, self._lora = control, lora

    def control_state_dict(self):
        return self._control

    def lora_state_dict(self):
        return self._lora


@dataclass
class TrainResult:
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the global batch)
    probe_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, fixed-noise loss)
    export_path: Path | None = None
    checkpoint: Path | None = None
    validation_images: list[Path] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    resumed_from: Path | None = None


def lr_lambda(o: OptimConfig, total: int) -> Callable[[int], float]:
    """The LR factor of each step of a `total`-step run: linear warmup over ``o.warmup_steps``, then
    constant, or cosine down to ``o.min_lr_ratio`` at `total`."""
    warm = max(0, o.warmup_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Optimization:
    """The optimizer side of a training run and its step: AdamW (or 8-bit AdamW) over the trained
    parameters, the LR schedule (lr_lambda), the EMA when enabled, and their checkpoint state.

    ``step(backward)`` is one optimizer step: zero the gradients, run ``backward`` (the forward and
    backward passes of the step's micro-batches; its result, the loss, is returned), clip the
    gradients to ``optim.max_grad_norm`` (0 = off), step the optimizer and the schedule, update the
    EMA. The stage trainer (Trainer), the miniature recipe's VAE and base phases (train/miniature.py)
    and DreamPaint products (train/dreampaint.py) train through this.

    A step whose loss (any number in what `backward` returned, on any rank: `any_rank` is the
    trainer's all-reduce) or gradient norm is NaN or infinite is not applied: no optimizer step, no
    EMA update (the schedule still advances, so the step numbers stay). ``skipped`` then says so;
    with ``on_nonfinite="stop"``, the ``max_nonfinite_steps``-th such step in a row raises
    NonFiniteError instead. The counts go into checkpoints, so a resumed run counts on exactly.

    `module` names the parameters in checkpoints (its named_parameters); `params` are the trained ones.
    `lr_scales`: {parameter name: factor} for parameters that learn at another rate than ``optim.lr``
    (e.g. a learned token embedding); they get their own optimizer group, the schedule scales all alike.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], optim: OptimConfig, total_steps: int,
                 ema: EmaConfig | None = None, on_nonfinite: str = TrainConfig.on_nonfinite,
                 max_nonfinite_steps: int = TrainConfig.max_nonfinite_steps,
                 any_rank: Callable[[bool], bool] = lambda flag: flag, lr_scales: dict[str, float] | None = None):
        self.module, self.params, self.max_grad_norm = module, params, optim.max_grad_norm
        self.on_nonfinite, self.max_nonfinite_steps, self.any_rank = on_nonfinite, max_nonfinite_steps, any_rank
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.skipped: str | None = None  # why the last step was not applied (None: it was)
        kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in params.items():
            groups.setdefault(float((lr_scales or {}).get(name, 1.0)), []).append(param)
        if len(groups) > 1 or 1.0 not in groups:
            params_arg = [{"params": ps, "lr": optim.lr * scale} for scale, ps in groups.items()]
        else:
            params_arg = list(params.values())
        if optim.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ConfigError(
                    "optim.optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes; "
                    "it needs a CUDA GPU). Use optim.optimizer=adamw instead."
                ) from e
            self.optimizer = bnb.optim.AdamW8bit(params_arg, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(params_arg, **kwargs)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, total_steps))
        self.ema = EMA(params, ema.decay, ema.warmup) if ema is not None and ema.enabled else None

    def step(self, backward: Callable[[], Any]) -> tuple[Any, float]:
        """(what `backward` returned, the gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        out = backward()
        params = list(self.params.values())
        norm = clip_grad_norm(params, self.max_grad_norm) if self.max_grad_norm > 0 else grad_norm(params)
        if self.any_rank(not _all_finite(out)) or not math.isfinite(norm):
            self._skip(f"loss {_numbers_text(out)}, gradient norm {norm:.4g}")
            return out, norm
        self.nonfinite_in_a_row, self.skipped = 0, None
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return out, norm

    def _skip(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the non-finite gradients must not linger
        step = self.lr_scheduler.last_epoch + 1
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.on_nonfinite == "stop" and self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            first = step - self.nonfinite_in_a_row + 1
            steps = f"steps {first}-{step}" if first < step else f"step {step}"
            raise NonFiniteError(
                f"training stopped at step {step}: the loss or the gradient was NaN or infinite in "
                f"{self.nonfinite_in_a_row} step(s) in a row ({steps}; last: {what}). None of them was applied: the "
                f"weights are those after step {first - 1}, and nothing with non-finite values was saved. Likely "
                "causes: a learning rate too high (optim.lr), fp16/bf16 overflow, damaged data or weights. "
                "train.on_nonfinite=skip skips such steps and goes on; train.max_nonfinite_steps sets how many in a "
                "row stop the run.")
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.lr_scheduler.step()
        self.skipped = (f"step {step}: NaN or infinite {what}: step not applied ({self.nonfinite_in_a_row} in a row, "
                        f"{self.nonfinite_total} in all)")

    @property
    def worth_a_checkpoint(self) -> bool:
        """False during a run of non-finite steps under on_nonfinite="stop": weights that just gave a NaN
        loss may be diverging, and keep_last must not prune the checkpoints before them for a copy of them."""
        return self.on_nonfinite == "skip" or self.nonfinite_in_a_row == 0

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def gather(self) -> tuple[dict, dict, dict | None]:
        """(trained parameters, optimizer state keyed by parameter name, EMA shadow or None) as full
        CPU tensors: what write_checkpoint stores (a collective under FSDP: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = _state_options(cpu_offload=True, ignore_frozen_params=True)
        trainable = get_model_state_dict(self.module, options=opts)
        osd = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        ema = {k: _compact(full_tensor(v)) for k, v in self.ema.shadow.items()} if self.ema else None
        return {k: v for k, v in trainable.items() if k in self.params}, osd, ema

    def restore(self, ck: dict, rank: int = 0) -> None:
        """Load a checkpoint (read_checkpoint) into the parameters, optimizer, schedule, EMA and this
        rank's RNGs."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = ck["path"]
        missing = set(self.params) - set(ck["trainable"])
        if missing:
            raise ConfigError(f"{path} lacks trained parameters of this model, e.g. {sorted(missing)[:3]}")
        set_model_state_dict(self.module, ck["trainable"], options=_state_options(strict=False))
        set_optimizer_state_dict(self.module, self.optimizer, ck["optimizer"], options=_state_options())
        self.lr_scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None:
            if ck["ema"] is None:
                raise ConfigError(f"{path} has no EMA state but ema.enabled is true")
            self.ema.load(ck["ema"], ck["state"].get("ema_updates", 0))
        self.nonfinite_in_a_row = int(ck["state"].get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(ck["state"].get("nonfinite_total", 0))
        if rank in ck["rng"]:
            set_rng_state(*ck["rng"][rank])


def write_checkpoint(out: Path, step: int, optimization: Optimization, gathered: tuple, rngs: list, state: dict,
                     keep_last: int, config_text: str | None = None,
                     extra: Callable[[CheckpointWriter], None] | None = None) -> Path:
    """Write ``out/checkpoint-<step>`` (train/checkpoint.py) from ``optimization.gather()``'s tensors,
    every rank's rng_state() and the JSON `state` (step and whatever the loop needs to continue
    exactly); `extra(writer)` may add files. Returns the checkpoint folder."""
    trainable, osd, ema = gathered
    ot, ometa = flatten_optimizer_state(osd)
    _check_finite(f"checkpoint-{step:08d} in {out}", trainable, ema, ot)
    w = CheckpointWriter(out, step)
    try:
        w.tensors("trainable.safetensors", trainable)
        if ema is not None:
            w.tensors("ema.safetensors", ema)
        w.tensors("optimizer.safetensors", ot)
        w.json("optimizer.json", ometa)
        w.json("scheduler.json", optimization.lr_scheduler.state_dict())
        rt, rm = {}, {}
        for r, (tensors, meta) in enumerate(rngs):
            rt.update({f"rank{r}.{k}": v for k, v in tensors.items()})
            rm[f"rank{r}"] = meta
        w.tensors("rng.safetensors", rt)
        w.json("rng.json", rm)
        if config_text is not None:
            w.text("config.toml", config_text)
        if extra is not None:
            extra(w)
        counts = {"ema_updates": optimization.ema.updates if optimization.ema else 0,
                  "nonfinite_in_a_row": optimization.nonfinite_in_a_row, "nonfinite_total": optimization.nonfinite_total}
        return w.commit({"step": step, **counts, **state}, keep_last)
    except BaseException:
        w.abort()
        raise


def train_steps(out: Path, opt: Optimization, steps: int, step: Callable[[int], dict], *, log_every: int,
                row: Callable[[dict, float | None], tuple[dict, str]], checkpoint_every: int,
                echo: Callable[[str], None], name: str, stats: dict | None = None,
                env: DistEnv | None = None) -> tuple[list, float]:
    """Train for `steps` optimizer steps through ``opt.step`` (Optimization: its optimizer, LR schedule,
    gradient clipping and EMA), resuming exactly from the newest checkpoint in `out`: the loop of
    models trained on tensors already in memory (the miniature's VAE and base, a DreamPaint product,
    the background token).

    ``step(i)`` runs step i's forward and backward passes (its randomness keyed by seed and i, so a
    resumed run draws what an uninterrupted one would) and returns the numbers to average over each log
    interval; ``row(means, grad_norm)`` makes the log row of them and its message. Checkpoints in the
    trainer's format (write_checkpoint, the newest kept) go to `out` every ``checkpoint_every`` steps
    and at the end, with the log rows, the running averages and `stats` (counters that `step` keeps,
    restored on resume). Returns (log rows, training seconds).

    `env` (train.distributed, torchrun): every rank runs the loop and resumes from the same checkpoint
    (each restores its own generators); `step` does its rank's share and averages the gradients; rank 0
    alone logs and writes the checkpoints (with every rank's generator states), the others wait for it."""
    env = env or DistEnv()
    say = echo if env.is_main else (lambda msg: None)
    if env.is_main:
        for stale in remove_stale_temp(out):
            say(f"[{name}] removed {stale}, left by a run that was killed while writing it")
    env.barrier()
    start, rows, acc, acc_n, seconds = 0, [], {}, 0, 0.0
    ck = load_newest_intact(out, lambda msg: say(f"[{name}] {msg}"))
    if ck is not None:
        opt.restore(ck, env.rank)
        st = ck["state"]
        start, rows, acc, acc_n, seconds = st["step"], st["log_rows"], st["acc"], st["acc_n"], st["seconds"]
        if stats is not None:
            stats.update(st["stats"])
        say(f"[{name}] resumed from {ck['path']} at step {start}")
    t0 = time.perf_counter() - seconds
    for i in range(start, steps):
        values, grad_norm = opt.step(lambda: step(i))
        if opt.skipped:
            say(f"[{name}] {opt.skipped}")
        for k, v in values.items():
            acc[k] = acc.get(k, 0.0) + v
        acc_n += 1
        if (i + 1) % log_every == 0 or i + 1 == steps:
            el = time.perf_counter() - t0
            body, message = row({k: v / acc_n for k, v in acc.items()}, grad_norm)
            rows.append({"step": i + 1, **body, "seconds": round(el, 1)})
            say(f"[{name}] step {i + 1}/{steps} {message} ({el / (i + 1):.2f} s/step)")
            acc, acc_n = {}, 0
        if (checkpoint_every > 0 and (i + 1) % checkpoint_every == 0 and opt.worth_a_checkpoint) or i + 1 == steps:
            loop = {"phase": name, "log_rows": rows, "acc": acc, "acc_n": acc_n,
                    "seconds": time.perf_counter() - t0, "stats": stats or {}}
            gathered, rngs = opt.gather(), env.gather_objects(rng_state())
            if env.is_main:
                write_checkpoint(out, i + 1, opt, gathered, rngs, loop, keep_last=1)
            env.barrier()
    return rows, time.perf_counter() - t0


class Trainer:
    def __init__(self, cfg: Config, echo: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.stage = cfg.stage
        self.env: DistEnv = init_distributed(cfg.train.device, cfg.distributed.backend, cfg.distributed.timeout_minutes)
        self.device = self.env.device
        self.out = Path(cfg.checkpoint.output_dir)
        self._echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.result = TrainResult()
        self.stats: dict[str, Any] = {
            "samples": 0, "references_used": 0, "references_shifted": 0, "reference_sizes": {},
            "empty_prompts": 0, "latents_computed": 0, "texts_computed": 0, "nonfinite_steps": 0,
            "loaded": {"text_encoder": False, "vae": False},
        }
        self.result.stats = self.stats
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.logger: TrainLogger | None = None
        self._is_setup = False

    def say(self, msg: str) -> None:
        if self.env.is_main:
            if self.logger is not None:
                self.logger.message(msg)
            else:
                self._echo(msg)

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self._seed_everything(cfg.train.seed)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temp(self.out):
                self.say(f"removed {stale}, left by a run that was killed while writing it")
            atomic_write_text(self.out / "config.toml", dump_toml(cfg))
        self._build_data()
        self._plan_cache()
        self._load_components()
        self._build_model()
        self._build_pipeline()
        self._fill_cache()
        self._build_validation()
        self._release_encoders()
        self._wrap()
        self._build_optimizer()
        self._resume()
        self._is_setup = True
        return self

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _buckets(self):
        d = self.cfg.data
        return make_buckets(d.base_sizes, d.bucket_step, d.ratios, d.max_pixels or None)

    def _build_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        if not d.manifest:
            raise ConfigError("data.manifest is not set (a JSONL manifest; see python -m train.data --help)")
        self.buckets = self._buckets()
        self.dataset = ManifestDataset(
            d.manifest, self.buckets, on_bad=d.on_bad, reference_prob=d.reference_prob if self.stage == 2 else 0.0,
            reference_sizes=d.reference_sizes, reference_shift=d.reference_shift,
            reference_crop_scale=d.reference_crop_scale, seed=t.seed,
            second_prompt_prob=d.second_prompt_prob, mask_policy=d.mask_policy,
        )
        self.sampler = GlobalBatchSampler(self.dataset, t.batch_size, self.env.world, self.env.rank, t.seed, t.fixed_batch)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        self.say(f"data: {len(self.dataset)} samples, {self.sampler.num_batches} global batches of "
                 f"{t.batch_size * self.env.world} per epoch ({self.env.world} process(es) x {t.batch_size})")

    # ---- model files ------------------------------------------------------------------
    def _part(self, name: str) -> Path | None:
        m = self.cfg.model
        override = getattr(m, f"{name}_path")
        if override:
            return Path(override)
        if m.base:
            return Path(m.base) / name
        return None

    def _plan_cache(self) -> None:
        """Which entries the cache lacks: decides whether the text encoder / VAE must be loaded."""
        cfg = self.cfg
        self.cache = None
        self.latent_keys: dict[tuple[int, tuple[int, int]], str] = {}
        self.need_text = True
        self.need_vae = True
        v = cfg.validation
        self.validation_on = v.every > 0 or v.at_start
        prompts = set()
        for _, s in self.dataset.samples:
            prompts.add(s.prompt)
            if s.prompt_2 and cfg.data.second_prompt_prob > 0:
                prompts.add(s.prompt_2)
        if cfg.data.empty_prompt_prob > 0:
            prompts.add("")
        self._val_manifest = v.manifest or cfg.data.manifest
        if self.validation_on:
            prompts.add(v.negative_prompt)
            val_ds = ManifestDataset(self._val_manifest, self.buckets, on_bad="skip", second_prompt_prob=0.0)
            for i in range(min(v.num, len(val_ds))):
                prompts.add(val_ds[i]["prompt"])  # what ValidationSet will use (a bad sample's substitute included)
        self.prompts = sorted(prompts)
        if not cfg.cache.enabled:
            return
        dtype = cfg.model.dtype
        vae_src, te_src, tok_src = self._part("vae"), self._part("text_encoder"), self._part("tokenizer")
        vae_id = files_identity([p for p in (vae_src,) if p], {"dtype": dtype})
        text_id = files_identity([p for p in (te_src, tok_src) if p], {"dtype": dtype})
        root = Path(cfg.cache.dir) if cfg.cache.dir else self.out / "cache"
        self.cache = ConditionCache(root, vae_id, text_id)
        self._missing_latents = []
        for idx, (line, sample) in enumerate(self.dataset.samples):
            bucket = self.dataset.index_buckets[idx]
            key = self.cache.latent_key(sample, bucket)
            self.latent_keys[(line, tuple(bucket))] = key
            if not self.cache.has_latents(key):
                self._missing_latents.append(idx)
        self._missing_text = [p for p in self.prompts if not self.cache.has_text(self.cache.text_key(p))]
        self.need_text = bool(self._missing_text)
        self.need_vae = bool(self._missing_latents) or (self.stage == 2 and cfg.data.reference_prob > 0) or self.validation_on
        # Every rank must agree (a rank may see another's fresh entries late on a slow file system).
        self.need_text = self.env.any(self.need_text)
        self.need_vae = self.env.any(self.need_vae)
        self.say(f"cache {root}: {len(self.dataset.samples) - len(self._missing_latents)}/{len(self.dataset.samples)} "
                 f"latents, {len(self.prompts) - len(self._missing_text)}/{len(self.prompts)} prompts present")

    def _load_components(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from dreampainter_core.loading import default_scheduler, load_text_encoder, load_tokenizer, load_transformer, load_vae

        m = self.cfg.model
        dtype = _DTYPES[m.dtype]
        tr = self._part("transformer")
        if tr is None:
            raise ConfigError("model.base (a CogView4 diffusers folder) or model.transformer_path must be set")
        self.base = load_transformer(tr, dtype=dtype, device=self.device)
        self.vae = self.text_encoder = self.tokenizer = None
        if self.need_vae:
            src = self._part("vae")
            if src is None:
                raise ConfigError("model.base or model.vae_path must be set")
            self.vae = load_vae(src, dtype=dtype, device=self.device)
            self.stats["loaded"]["vae"] = True
        if self.need_text:
            te, tok = self._part("text_encoder"), self._part("tokenizer")
            if te is None or tok is None:
                raise ConfigError("model.base or model.text_encoder_path + model.tokenizer_path must be set")
            te_device = torch.device(m.text_encoder_device) if m.text_encoder_device else self.device
            self.text_encoder = load_text_encoder(te, dtype=dtype, device=te_device)
            self.tokenizer = load_tokenizer(tok)
            self.stats["loaded"]["text_encoder"] = True
        sched_dir = Path(m.base) / "scheduler" if m.base else None
        if sched_dir is not None and sched_dir.is_dir():
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(sched_dir))
        else:
            self.scheduler = default_scheduler()

    def _build_model(self) -> None:
        m, t = self.cfg.model, self.cfg.train
        trainable_dtype = _DTYPES[m.trainable_dtype]
        torch.manual_seed(t.seed)  # the branch's new layers: identical on every rank
        self.base.requires_grad_(False)
        if self.stage == 1:
            config = DreamPainterConfig(
                control_blocks=m.control_blocks,
                injection_layers=list(m.injection_layers) or None,
                init_from=list(m.init_from) or None,
                lora_rank=0,
                task="insertion" if self.cfg.data.mask_policy == "insertion" else "background",
            )
            model = DreamPainterTransformer(self.base, config)
            model.freeze_base()
            model.control.to(dtype=trainable_dtype)
            model.control.requires_grad_(True)
        else:
            from dreampainter_core.weights import build_from_weights

            if not m.stage1_weights:
                raise ConfigError("stage 2 starts from a stage-1 file: set model.stage1_weights")
            meta = read_dreampainter_metadata(m.stage1_weights)
            model = build_from_weights(self.base, m.stage1_weights)
            if meta.get("stage") == "2":
                self.say(f"{m.stage1_weights} is a stage-2 file: continuing its LoRA (its rank/targets are kept)")
            else:
                model.config.lora_rank = int(m.lora_rank)
                model.config.lora_alpha = float(m.lora_alpha or m.lora_rank)
                model.config.lora_targets = list(m.lora_targets)
                model.config.reference_timestep = m.reference_timestep
                model.config.reference_layout = m.reference_layout
                model.add_lora()
            model.requires_grad_(False)
            for name, p in model.base.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(trainable_dtype)
                    p.requires_grad_(True)
        model.gradient_checkpointing = bool(t.gradient_checkpointing)
        model.train()
        self.model = model
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        n_train = sum(p.numel() for p in self.trainable.values())
        n_all = sum(p.numel() for p in model.parameters())
        self.stats["trainable_params"] = n_train
        self.say(f"stage {self.stage}: training {n_train:,} of {n_all:,} parameters ({len(self.trainable)} tensors)")

    def _build_pipeline(self) -> None:
        self.pipe = DreamPainterPipeline(self.tokenizer, self.text_encoder, self.vae, self.model, self.scheduler)
        self.vae_scale = self.pipe.vae_scale_factor

    def _autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- cache --------------------------------------------------------------------------
    def _encode_latents(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return condition_latents(self.pipe, item)

    def _fill_cache(self) -> None:
        if self.cache is None:
            return
        env = self.env
        mine = self._missing_latents[env.rank :: env.world]
        for idx in mine:
            item = self.dataset[idx]
            line, _ = self.dataset.samples[idx]
            if item["line"] != line:
                continue  # a bad sample (served a substitute): it is skipped in training as well
            x0, control = self._encode_latents(item)
            self.cache.put_latents(self.latent_keys[(line, tuple(item["bucket"]))], x0, control)
            self.stats["latents_computed"] += 1
        for prompt in self._missing_text[env.rank :: env.world]:
            self.cache.put_text(self.cache.text_key(prompt), self.pipe.encode_prompt([prompt])[0])
            self.stats["texts_computed"] += 1
        env.barrier()
        # From here on the dataset need not decode the image and mask of a cached sample: on a
        # small model, decoding them every step was a tenth of a stage-1 step.
        missing = set(self._missing_latents)
        undecoded = set()
        for idx, (line, _) in enumerate(self.dataset.samples):
            pair = (line, tuple(self.dataset.index_buckets[idx]))
            if idx not in missing or self.cache.has_latents(self.latent_keys[pair]):
                undecoded.add(pair)
        self.dataset.undecoded = frozenset(undecoded)

    def _text_embeds(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's own embedding [T, D], as inference computes it for that prompt alone."""
        out, memo = [], {}
        for p in prompts:
            if p not in memo:
                emb = None
                if self.cache is not None:
                    emb = self.cache.get_text(self.cache.text_key(p))
                if emb is None:
                    if self.text_encoder is None:
                        raise TrainingError(f"prompt {p[:60]!r} is not in the text cache and the text encoder is not loaded")
                    emb = self.pipe.encode_prompt([p])[0]
                    if self.cache is not None:
                        self.cache.put_text(self.cache.text_key(p), emb)
                memo[p] = emb.to(device=self.device, dtype=self.model.dtype)
            out.append(memo[p])
        return out

    def _latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Target latents and [Z_f, Z_m] per sample (one VAE call each: the result does not depend
        on which samples share a batch, so cached, uncached and any data-parallel split agree)."""
        if self.cache is None:
            pairs = [self._encode_latents({k: batch[k][i] for k in ("image", "foreground", "mask")})
                     for i in range(batch["image"].shape[0])]
            return torch.stack([p[0] for p in pairs]).to(self.device), torch.stack([p[1] for p in pairs]).to(self.device)
        xs, cs = [], []
        bucket = tuple(batch["bucket"])
        for i, line in enumerate(batch["line"].tolist()):
            key = self.latent_keys.get((line, bucket))
            got = self.cache.get_latents(key) if key is not None else None
            if got is None:
                if batch["image"] is None or batch["image"][i] is None:
                    raise TrainingError(f"manifest line {line} at bucket {bucket}: its latent cache entry vanished during "
                                        f"training (was {self.cache.root} cleaned?); run again to refill the cache")
                if self.vae is None:
                    raise TrainingError(f"manifest line {line} at bucket {bucket} is not in the latent cache and the VAE is not loaded")
                item = {k: batch[k][i] for k in ("image", "foreground", "mask")}
                got = self._encode_latents(item)
            xs.append(got[0])
            cs.append(got[1])
        return torch.stack(xs).to(self.device), torch.stack(cs).to(self.device)

    # ---- validation ---------------------------------------------------------------------
    def _build_validation(self) -> None:
        self.validation = None
        if not self.validation_on:
            return
        from .validation import ValidationSet

        v = self.cfg.validation
        self.validation = ValidationSet(
            self._val_manifest, self.buckets, v.num, with_reference=self.stage == 2,
            embed_fn=lambda p: self._text_embeds([p])[0], negative_prompt=v.negative_prompt,
            mask_policy=self.cfg.data.mask_policy,
        )

    def _release_encoders(self) -> None:
        """With the cache, drop the text encoder (and the VAE when nothing needs it any more)."""
        if self.cache is None:
            return
        if self.text_encoder is not None:
            self.text_encoder = None
            self.pipe.text_encoder = None
            self.say("cache: text encoder unloaded for training")
        if self.vae is not None and not ((self.stage == 2 and self.cfg.data.reference_prob > 0) or self.validation_on):
            self.vae = None
            self.pipe.vae = None
            self.say("cache: VAE unloaded for training")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- parallel wrap / optimizer --------------------------------------------------------
    def _wrap(self) -> None:
        env, d = self.env, self.cfg.distributed
        self.module = TrainingModule(self.model)
        self.ddp = None
        self.fsdp_modules: list = []
        if env.world > 1 and d.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
            frozen += [f"model.{n}" for n, _ in self.model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.module, frozen)
            self.ddp = DDP(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=False, gradient_as_bucket_view=True,
            )
        elif env.world > 1 and d.strategy == "fsdp":
            self.fsdp_modules = apply_fsdp(self.model, d.shard_control)
            self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.replicated = [p for p in self.trainable.values() if not is_dtensor(p)]

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        self.optimization = Optimization(self.model, self.trainable, self.cfg.optim, t.max_steps, self.cfg.ema,
                                         t.on_nonfinite, t.max_nonfinite_steps, any_rank=self.env.any)
        self.optimizer, self.lr_scheduler, self.ema = (
            self.optimization.optimizer, self.optimization.lr_scheduler, self.optimization.ema)

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        gathered = self.optimization.gather()
        trainable, _, ema = gathered
        rngs = self.env.gather_objects(rng_state())
        path = None
        if self.env.is_main:
            export = None
            if self.cfg.checkpoint.export_every_checkpoint:
                export = lambda w: self._export_to(w.path("dreampainter.safetensors"), gathered=(trainable, ema))  # noqa: E731
            path = write_checkpoint(self.out, self.step, self.optimization, gathered, rngs, {
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "stage": self.stage,
                "world": self.env.world, "batch_size": self.cfg.train.batch_size,
                "global_batch": self.cfg.train.batch_size * self.env.world, "grad_accum": self.cfg.train.grad_accum,
                "stats": {k: v for k, v in self.stats.items() if k != "loaded"},
            }, self.cfg.checkpoint.keep_last, dump_toml(self.cfg), extra=export)
        elif self.cfg.checkpoint.export_every_checkpoint:
            self._export_to(None, gathered=(trainable, ema))
        self.env.barrier()
        self.result.checkpoint = path
        return path

    def _load_resume_checkpoint(self) -> dict | None:
        """The checkpoint to resume from (checkpoint.resume), verified; None to start afresh. Rank 0
        verifies (hashing every file once, not once per rank) and picks; the other ranks read its pick."""
        r = self.cfg.checkpoint.resume
        if r in ("none", ""):
            return None
        ck, error = None, None
        if self.env.is_main:
            try:
                if r == "auto":
                    ck = load_newest_intact(self.out, self.say)
                else:
                    ck = load_checkpoint(r, self.say)
            except CheckpointError as e:
                error = str(e) if r == "auto" else (
                    f"checkpoint.resume names a checkpoint that cannot be resumed from: {e}. Name another checkpoint "
                    "folder, or use checkpoint.resume=auto (the newest intact one in checkpoint.output_dir).")
        choice = self.env.gather_objects((None if ck is None else str(ck["path"]), error))[0]
        if choice[1] is not None:
            raise CheckpointError(choice[1])
        if not self.env.is_main and choice[0] is not None:
            ck = read_checkpoint(choice[0])
        return ck

    def _resume(self) -> None:
        ck = self._load_resume_checkpoint()
        if ck is None:
            return
        path, st = ck["path"], ck["state"]
        t = self.cfg.train
        if st.get("stage") != self.stage:
            raise ConfigError(f"{path} is a stage-{st.get('stage')} checkpoint; this is stage {self.stage}")
        global_batch = t.batch_size * self.env.world
        if st.get("global_batch") != global_batch or st.get("grad_accum") != t.grad_accum:
            raise ConfigError(
                f"{path} was trained with global batch {st.get('global_batch')} x {st.get('grad_accum')} accumulation; "
                f"this run has {global_batch} x {t.grad_accum}. The data order and the step semantics would change: "
                "resume with the same train.batch_size x processes and train.grad_accum (or checkpoint.resume=none)."
            )
        self.optimization.restore(ck, self.env.rank)
        self.step, self.epoch, self.batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
        for k, v in st.get("stats", {}).items():
            if k in self.stats and isinstance(v, (int, float)):
                self.stats[k] = v
            elif k == "reference_sizes":
                self.stats[k] = dict(v)
        self.result.resumed_from = path
        self.stats["nonfinite_steps"] = self.optimization.nonfinite_total
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # ---- export ------------------------------------------------------------------------
    def export_path(self) -> Path:
        name = self.cfg.checkpoint.export_name or f"dreampainter_stage{self.stage}.safetensors"
        return self.out / name

    def _gather_for_export(self) -> tuple[dict, dict | None]:
        trainable = {n: _compact(full_tensor(p.detach())) for n, p in self.trainable.items()}
        ema = {k: _compact(full_tensor(v)) for k, v in self.ema.shadow.items()} if self.ema else None
        return trainable, ema

    def _export_to(self, path: Path | None, gathered=None, use_ema: bool | None = None) -> Path | None:
        """Write a DreamPainter file (collective under FSDP; rank 0 writes)."""
        trainable, ema = gathered if gathered is not None else self._gather_for_export()
        if use_ema is None:
            use_ema = self.ema is not None and self.cfg.ema.export
        values = dict(trainable)
        if use_ema and ema is not None:
            values.update(ema)
        named = {}
        for n, p in self.model.named_parameters():
            if n in values:
                named[n] = values[n]
            elif n.startswith("control.") or "lora_" in n:
                named[n] = _compact(full_tensor(p.detach()))
        if not self.env.is_main or path is None:
            return None
        control = {k: named[f"control.{k}"] for k in self.model.control_state_dict()}
        lora = {}
        if self.model.has_lora:
            from dreampainter_core.transformer import LORA_ADAPTER

            for k in self.model.lora_state_dict():
                a, _, b = k.rpartition(".")  # "...lora_A.weight" -> param "...lora_A.<adapter>.weight"
                lora[k] = named[f"base.{a}.{LORA_ADAPTER}.{b}"]
        _check_finite(str(path), named)
        view = _ExportView(self.model, control, lora)
        meta = {"trained_steps": str(self.step), "ema": str(bool(use_ema and ema is not None))}
        return save_dreampainter_weights(view, path, base_model=self.cfg.model.base_model_name,
                                         dtype=_DTYPES[self.cfg.checkpoint.export_dtype], extra_metadata=meta)

    def export(self) -> Path | None:
        gathered = self._gather_for_export()
        path = self._export_to(self.export_path(), gathered)
        if self.ema is not None and self.cfg.ema.export:
            raw = self.export_path().with_name(self.export_path().stem + "-raw.safetensors")
            self._export_to(raw, gathered, use_ema=False)
        self.env.barrier()
        if path is not None:
            self.say(f"exported {path}")
        self.result.export_path = path
        return path

    # ---- one micro-batch ----------------------------------------------------------------
    def _groups(self, batch: dict, step: int, micro: int, probe: bool = False) -> list[dict]:
        cfg, t = self.cfg, self.cfg.train
        prompts = list(batch["prompt"])
        n = len(prompts)
        x0, control = self._latents(batch)
        W, H = batch["bucket"]
        seq_len = (H // self.vae_scale) * (W // self.vae_scale) // self.model.patch_size**2
        mu = flow.mu_for(self.scheduler, seq_len, t.mu)
        noises, times = [], []
        for i in range(n):
            g = flow.sample_generator(t.seed, step, micro, self.env.rank * t.batch_size + i)
            drop = torch.rand(1, generator=g).item() < cfg.data.empty_prompt_prob
            s = flow.draw_time(g, t.timestep_sampling, t.logit_mean, t.logit_std)
            s = flow.into_high_noise(g, s, t.high_noise_prob, t.high_noise_from)
            noises.append(torch.randn(x0.shape[1:], generator=g, dtype=torch.float32))
            times.append(s)
            if drop:
                prompts[i] = ""
                if not probe:
                    self.stats["empty_prompts"] += 1
        s = torch.cat(times).to(self.device)
        sigma = flow.shift_sigma(self.scheduler, s, mu).to(self.device)
        noise = torch.stack(noises).to(self.device)
        x_t, target = flow.flow_pair(x0, noise, sigma)
        timestep = s * self.scheduler.config.num_train_timesteps
        texts = self._text_embeds(prompts)

        refs: list[torch.Tensor | None] = [None] * n
        if batch.get("reference") is not None:
            # One VAE call per reference size, not per sample: a batch holds at most a few sizes.
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, r in enumerate(batch["reference"]):
                if r is None:
                    continue
                by_size.setdefault((int(r.shape[-1]), int(r.shape[-2])), []).append(i)
                if not probe:
                    self.stats["references_used"] += 1
                    size = f"{r.shape[-1]}x{r.shape[-2]}"
                    self.stats["reference_sizes"][size] = self.stats["reference_sizes"].get(size, 0) + 1
                    off = batch.get("reference_offset", [None] * n)[i]
                    if off is not None and tuple(off) != (0, 0):
                        self.stats["references_shifted"] += 1
            for wh, idx in by_size.items():
                stacked = torch.stack([batch["reference"][i].permute(1, 2, 0) for i in idx])
                for i, z in zip(idx, self.pipe.encode_reference(stacked, wh)):
                    refs[i] = z
        if not probe:
            self.stats["samples"] += n

        dtype = self.model.dtype
        size = torch.tensor([[H, W]], dtype=dtype, device=self.device)
        keys: dict[tuple, list[int]] = {}
        for i in range(n):
            keys.setdefault((texts[i].shape[0], None if refs[i] is None else tuple(refs[i].shape)), []).append(i)
        weight = None
        if t.mask_loss_weight != 1.0:
            # [B, 1, h, w]: 1 outside the product, mask_loss_weight inside (Z_m, the last control
            # channel, is the mask's area coverage on the latent grid), mean 1 per sample.
            region = control[:, -1:].float()
            if cfg.data.mask_policy == "insertion":  # the product is in the hole; Z_m is the kept scene
                region = 1.0 - region
            weight = 1.0 + (t.mask_loss_weight - 1.0) * region
            weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)
        shielded = None
        if t.shield_product:
            # The product's tokens as the sampler shields them (a token with any product pixel,
            # masks.mask_to_token_grid); binary masks make "any pixel" Z_m's area coverage > 0.
            shielded = (F.max_pool2d(control[:, -1:].float(), self.model.patch_size) > 0).flatten(1)
        groups = []
        for (_, ref_shape), idx in keys.items():
            ix = torch.tensor(idx, device=self.device)
            shield = None if shielded is None or ref_shape is None else shielded[ix]
            groups.append({
                "x_t": x_t[ix].to(dtype),
                "text": torch.stack([texts[i] for i in idx]),
                "timestep": timestep[ix],
                "size": size.repeat(len(idx), 1),
                "crop": torch.zeros(len(idx), 2, dtype=dtype, device=self.device),
                "control": control[ix],
                "reference": None if ref_shape is None else torch.stack([refs[i] for i in idx]).to(device=self.device),
                "target": target[ix],
                "weight": None if weight is None else weight[ix],
                "modulation": None if shield is None else AttentionModulation(shielded=shield),
                "index": idx,
            })
        return groups

    def _call(self, groups: list[dict], wrapped: bool = True) -> torch.Tensor:
        module = self.ddp if (wrapped and self.ddp is not None) else self.module
        with self._autocast():
            return module([{k: v for k, v in g.items() if k != "index"} for g in groups])

    # ---- probe loss -----------------------------------------------------------------------
    @torch.no_grad()
    def probe_loss(self) -> float | None:
        """Mean loss on the first ``validation.probe_batches`` global batches with fixed noise and times."""
        nb = self.cfg.validation.probe_batches
        if nb <= 0:
            return None
        batches = self.sampler.global_batches(0)[:nb]
        saved_epoch = self.dataset.epoch
        self.dataset.set_epoch(0)
        total, count = torch.zeros((), dtype=torch.float64), 0
        try:
            for j, gb in enumerate(batches):
                idx = self.sampler._mine(gb)
                batch = collate([self.dataset[i] for i in idx])
                per = self._call(self._groups(batch, flow.PROBE_STEP, j, probe=True), wrapped=False)
                total += per.double().sum().cpu()
                count += per.numel()
        finally:
            self.dataset.set_epoch(saved_epoch)
        value = self.env.all_reduce_mean((total / max(count, 1)).to(self.device if self.device.type == "cuda" else "cpu"))
        return float(value)

    def run_validation(self) -> Path | None:
        if self.validation is None:
            return None
        fsdp = bool(self.fsdp_modules)
        path = self.out / "validation" / f"step_{self.step:08d}.png"
        out = None
        if self.ema is not None:
            self.ema.swap()
        try:
            self.model.eval()
            if self.env.is_main or fsdp:  # FSDP: every rank takes part in each sharded block's all-gather
                out = self.validation.render(self.pipe, self.cfg.validation, path, self._autocast,
                                             shield_product=self.cfg.train.shield_product)
                if not self.env.is_main:
                    out = None
        finally:
            self.model.train()
            if self.ema is not None:
                self.ema.swap()
        self.env.barrier()
        if out is not None:
            self.result.validation_images.append(out)
            self.say(f"validation grid {out}")
        return out

    # ---------------------------------------------------------------------------- loop
    def _batches(self):
        epoch, start = self.epoch, self.batch_in_epoch
        while True:
            self.sampler.set_epoch(epoch, start_batch=start)
            k = start
            for batch in self.loader:
                yield epoch, k, batch
                k += 1
            epoch, start = epoch + 1, 0

    def _grad_sync_context(self, last: bool):
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        for m in self.fsdp_modules:
            m.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train(self) -> TrainResult:
        if not self._is_setup:
            self.setup()
        cfg, t = self.cfg, self.cfg.train
        stop_at = min(t.max_steps, t.stop_after) if t.stop_after > 0 else t.max_steps
        env = self.env
        if env.is_main:
            self.logger = TrainLogger(self.out, self.step, t.max_steps, cfg.log.tensorboard, cfg.log.progress, self._echo)
            if self.logger.tensorboard_error and cfg.log.tensorboard:
                self.say("tensorboard not available; logging to logs/train.csv")
        try:
            if self.step == 0 and self.validation_on and cfg.validation.at_start:
                self._validate_and_probe()
            elif self.step == 0:
                self._probe()
            batches = self._batches()
            per_step = t.batch_size * t.grad_accum
            def backward() -> torch.Tensor:  # the step's micro-batches; this rank's mean loss
                loss_sum = torch.zeros((), dtype=torch.float64)
                for micro in range(t.grad_accum):
                    epoch, k, batch = next(batches)
                    groups = self._groups(batch, self.step, micro)
                    last = micro == t.grad_accum - 1
                    with self._grad_sync_context(last):
                        per = self._call(groups)
                        loss = per.sum() / per_step
                        loss.backward()
                    loss_sum += per.detach().double().sum().cpu()
                    self.epoch, self.batch_in_epoch = epoch, k + 1
                if self.fsdp_modules:
                    sync_replicated_grads(self.replicated, env)
                return loss_sum / per_step

            while self.step < stop_at:
                t0 = time.perf_counter()
                try:
                    loss, grad_norm = self.optimization.step(backward)
                except NonFiniteError as e:
                    newest = self.result.checkpoint or self.result.resumed_from
                    note = f"The newest checkpoint is {newest}." if newest else "No checkpoint was written yet."
                    raise NonFiniteError(f"{e} {note}") from None
                self.step += 1
                if self.optimization.skipped:
                    self.stats["nonfinite_steps"] = self.optimization.nonfinite_total
                    self.say(f"{self.optimization.skipped} (train.on_nonfinite={t.on_nonfinite})")
                dt = time.perf_counter() - t0
                log_now = self.step % cfg.log.every == 0 or self.step == stop_at or self.step == 1
                if log_now:
                    mean = float(env.all_reduce_mean(loss.to(self.device if self.device.type == "cuda" else "cpu")))
                    self.result.losses.append((self.step, mean))
                    if self.logger is not None:
                        self.logger.log(self.step, loss=mean, lr=self.lr_scheduler.get_last_lr()[0],
                                        grad_norm=grad_norm, step_time_s=dt,
                                        samples_per_s=per_step * env.world / dt, epoch=self.epoch)
                if self.logger is not None:
                    self.logger.step(self.step)
                v = cfg.validation
                if v.every > 0 and self.step % v.every == 0:
                    self._validate_and_probe()
                every = cfg.checkpoint.every
                if (every > 0 and self.step % every == 0) or self.step == stop_at:
                    if self.step == stop_at or self.optimization.worth_a_checkpoint:
                        self.save_checkpoint()
                    else:
                        self.say(f"step {self.step}: no checkpoint while steps are not applied "
                                 f"({self.optimization.nonfinite_in_a_row} in a row)")
            if self.step >= stop_at:
                if not (cfg.validation.every > 0 and self.step % cfg.validation.every == 0):
                    self._probe()
                self.export()
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None
        self.result.step = self.step
        if self.cache is not None:
            self.stats["cache"] = dict(self.cache.stats)
        return self.result

    def _probe(self) -> None:
        p = self.probe_loss()
        if p is not None:
            self.result.probe_losses.append((self.step, p))
            if self.logger is not None:
                self.logger.log(self.step, probe_loss=p)

    def _validate_and_probe(self) -> None:
        self._probe()
        self.run_validation()

    def close(self) -> None:
        self.env.shutdown()


def run(cfg: Config, echo=None) -> TrainResult:
    trainer = Trainer(cfg, echo=echo)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(stage: int, argv: list[str] | None = None) -> int:
    import argparse

    from .config import load_config

    p = argparse.ArgumentParser(
        prog=f"python -m train.stage{stage}",
        description=f"DreamPainter stage {stage} training. Overrides: section.key=value (e.g. optim.lr=1e-4).",
    )
    p.add_argument("--config", default=None, help="TOML or YAML config (defaults: the paper's section 5.1)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(stage, a.config, a.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(dump_toml(cfg), end="")
        return 0
    try:
        result = run(cfg)
    except (ConfigError, TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.losses[-1] if result.losses else None
        skipped = result.stats.get("nonfinite_steps", 0)
        note = f", {skipped} step(s) with a NaN or infinite loss or gradient skipped" if skipped else ""
        print((f"done: step {result.step}, last loss {last[1]:.6g}" if last else f"done: step {result.step}") + note,
              file=sys.stderr)
        if result.export_path:
            print(result.export_path)
    return 0
