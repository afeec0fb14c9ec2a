"""The learned background token with Contrastive Background Alignment (Product2Img, issue 17).

    python -m train.background_token --config configs/background_token.toml [section.key=value ...]
    torchrun --standalone --nproc_per_node 8 -m train.background_token --config configs/background_token.toml
    python -m train.background_token --config configs/miniature/background_token.toml    # the miniature

Sellers have a product photo and its name, not a prompt. Product2Img learns one new word, ``<background>``,
appended to the name ("a red cup <background>"), whose meaning is "the background that suits this
product": the generation is then prompt-free (the text encoder node's prompt_free switch).

What trains: the token's embedding row (dreampainter_core.tokens: a copy of the tokenizer knows the word,
the row replaces its input embedding), initialised from the embedding of "background" (so, untrained,
"a red cup <background>" encodes exactly as "a red cup background"). GLM-4 stays frozen and bit-identical;
optionally ([text_lora] rank > 0, off by default: GLM-4-9B has 9B parameters) a LoRA on GLM's linear layers
trains too and travels in the token file. The DiT, its DreamPainter control branch and LoRA are frozen:
the token is learned on the model it will run with ([model] dreampainter_weights, a stage-1 or stage-2 file,
or the base alone).

Loss, per global batch of B samples (each: the product image, its mask, its name):

    L = L_diffusion + λ (L'cl(b, B) + L'cl(P, I))

* L_diffusion: the DreamPainter flow-matching loss in the sampler's convention (train/flow.py), the
  product kept by the control branch as at inference ([Z_f, Z_m] of the product on white), the text
  "<name> <token>";
* L'cl(x, y) = ½ (CE(s / τ, I) + CE(sᵀ / τ, I)) with s_ij = cos(x_i, y_j): the symmetrised InfoNCE over
  the batch (``info_nce``);
* b: GLM's hidden state (hidden_states[-2], what the DiT reads) at the token; B: an image feature of the
  sample's background region (its background reference when the manifest has one, else the image with
  the product filled by the mean colour of the rest); P: the name's sentence feature, the mean of the
  hidden states over the prompt's own positions (GLM is causal and CogView4 appends no end token, so
  the last position is the token itself: the mean is the nearest to CLIP's end-token pooling and, like
  it, sees the token); I: the same image feature of the whole image;
* image features ([contrastive] image_encoder): a CLIP vision tower when a folder is given (the paper's
  image encoder; frozen, train.metrics.ClipScorer), else the mean and standard deviation of the VAE
  latents over the region (the background: 1 - Z_m on the latent grid). The latter is the WEAKER choice:
  colour and brightness statistics only, no layout or semantics, and its projection learns from the
  batch alone. GLM's and the image's spaces are not aligned as CLIP's text and image towers are, so
  both sides get a small trainable projection (LayerNorm + linear; a two-layer MLP on the latent
  statistics) into a shared ``dim``-dimensional space; they train at ``head_lr_scale`` x optim.lr and
  are not part of the token file;
* λ = 0.01 and τ = 0.05 by default (the paper's). λ = 0 trains the token with the diffusion loss alone
  (the ablation); name_image = false drops L'cl(P, I).

Through the project's trainer: train.trainer.Optimization (AdamW, schedule, clipping, the non-finite
guard; the token learns at optim.lr, the heads and the text LoRA at their lr scales) and
train.trainer.train_steps (checkpoints in the trainer's format every train.checkpoint_every steps in
train.output_dir; a rerun resumes exactly, a rerun with other settings is refused). Every draw is keyed
by (seed, step, position in the global batch): global batches come from the stage trainer's
GlobalBatchSampler (one aspect-ratio bucket each), so a run's result does not depend on how the batch is
split over processes. Under torchrun each rank takes its slice of every global batch, the contrastive
features are all-gathered (with their gradients) so InfoNCE sees the whole global batch, and the
gradients are averaged; rank 0 writes the checkpoints and the token file. Latents are cached on disk
(train.cache.ConditionCache, <output_dir>/cache) so an epoch after the first reads no image.

The token file (dreampainter_core.tokens, a small safetensors file) records the token string, how it was
initialised (word:background), the base model and the text encoder's fingerprint (another text encoder
refuses it), and how it was trained (steps, λ, τ, image encoder, the DreamPainter file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dreampainter_core.errors import DreamPainterError, InputError
from dreampainter_core.prompts import PromptConfigError, check_name, name_with_token
from dreampainter_core.tokens import (LearnedToken, add_text_lora, check_token_string, init_token, save_learned_token,
                                      tokenizer_with)

from . import flow
from .buckets import DEFAULT_RATIOS
from .config import (ConfigError, OptimConfig, TrainConfig, claim_run_dir, explicit_values, override_tables,
                     read_config_file, read_table)

__all__ = ["BackgroundTokenConfig", "load_token_config", "info_nce", "latent_statistics", "prompt_features",
           "sample_names", "train_background_token", "main"]

TOKEN_FILE = "background_token.safetensors"
MADE_BY = "train.background_token"


# ----------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    base: str = ""  # a CogView4-architecture diffusers folder, or "embedded" (the pack's miniature)
    # The DreamPainter file the token is trained on (stage 1 or 2; frozen): the model it will run with.
    # "" = the base alone; with base "embedded", the embedded file unless "none".
    dreampainter_weights: str = ""
    base_model_name: str = ""  # recorded in the token file ("" = the base folder's name)
    dtype: str = "auto"  # frozen weights: auto (bf16 on a GPU, fp32 on the CPU) | bf16 | fp32
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    lora_scale: float = 1.0  # a stage-2 file's LoRA, as generation runs it by default
    gradient_checkpointing: bool = False  # through the DiT blocks (1024 px on CogView4-6B: on)


@dataclass
class DataSection:
    manifest: str = ""  # JSONL manifest (train.manifest); each line's product name: see name_field
    base_sizes: list[int] = field(default_factory=lambda: [1024])  # bucket areas (side^2); the miniature: [128]
    ratios: list[str] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    bucket_step: int = 32
    on_bad: str = "skip"  # skip (warn, serve the next good sample) | stop
    # The line's key holding the product's name ("rose face serum"); synthetic scenes (a "scene" entry)
    # without it use their product's words ("a red cup", train.synthetic.product_name).
    name_field: str = "name"


@dataclass
class TokenSection:
    token: str = "<background>"  # the word appended to the name
    init_word: str = "background"  # initialised from this word's embedding (the paper's)
    out: str = ""  # the token file ("" = <train.output_dir>/background_token.safetensors)


@dataclass
class ContrastiveSection:
    weight: float = 0.01  # λ (the paper's); 0 = the diffusion loss alone
    temperature: float = 0.05  # τ (the paper's)
    name_image: bool = True  # also the paper's name-to-image term L'cl(P, I)
    image_encoder: str = ""  # a local CLIP folder (CLIPModel.save_pretrained); "" = pooled VAE latents (weaker)
    dim: int = 64  # the shared space of the projections
    hidden: int = 128  # the latent statistics' MLP width
    head_lr_scale: float = 0.2  # the projections' lr = optim.lr x this


@dataclass
class TextLoraSection:
    rank: int = 0  # LoRA on GLM's linear layers; 0 = off (the default: GLM-4-9B has 9B parameters)
    alpha: float = 0.0  # 0 = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    lr_scale: float = 0.1  # its lr = optim.lr x this


@dataclass
class TrainSection:
    output_dir: str = "runs/background_token"
    cache_dir: str = ""  # the latent cache ("" = <output_dir>/cache); runs on the same data may share one
    steps: int = 1000
    batch_size: int = 8  # per process; the contrastive terms need a global batch of at least 2
    seed: int = 0
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    checkpoint_every: int = 100  # 0 = only at the end
    log_every: int = 10
    on_nonfinite: str = TrainConfig.on_nonfinite
    max_nonfinite_steps: int = TrainConfig.max_nonfinite_steps


@dataclass
class TokenOptimConfig(OptimConfig):
    """The token's optimizer: textual inversion's rate, no weight decay (it would pull the word to zero)."""

    lr: float = 5e-3
    weight_decay: float = 0.0


@dataclass
class BackgroundTokenConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    token: TokenSection = field(default_factory=TokenSection)
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)
    text_lora: TextLoraSection = field(default_factory=TextLoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: TokenOptimConfig = field(default_factory=TokenOptimConfig)

    @property
    def token_path(self) -> Path:
        return Path(self.token.out) if self.token.out else Path(self.train.output_dir) / TOKEN_FILE


CHOICES = {
    ("model", "dtype"): ("auto", "bf16", "fp32"),
    ("data", "on_bad"): ("skip", "stop"),
    ("train", "timestep_sampling"): ("logit_normal", "uniform"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("optim", "optimizer"): ("adamw", "adamw8bit"),
    ("optim", "scheduler"): ("constant", "cosine"),
}


def _check(cfg: BackgroundTokenConfig, source: str) -> BackgroundTokenConfig:
    problems = []
    for name, value, low in (("train.steps", cfg.train.steps, 1), ("train.batch_size", cfg.train.batch_size, 1),
                             ("train.log_every", cfg.train.log_every, 1), ("contrastive.dim", cfg.contrastive.dim, 1),
                             ("contrastive.hidden", cfg.contrastive.hidden, 1), ("text_lora.rank", cfg.text_lora.rank, 0),
                             ("train.checkpoint_every", cfg.train.checkpoint_every, 0),
                             ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps, 1)):
        if value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    for name, value in (("contrastive.weight", cfg.contrastive.weight), ("optim.lr", cfg.optim.lr),
                        ("contrastive.temperature", cfg.contrastive.temperature),
                        ("contrastive.head_lr_scale", cfg.contrastive.head_lr_scale),
                        ("text_lora.lr_scale", cfg.text_lora.lr_scale), ("model.lora_scale", cfg.model.lora_scale)):
        if not math.isfinite(value) or value < 0 or (value == 0 and name in ("optim.lr", "contrastive.temperature")):
            problems.append(f"{name} must be a finite number {'> 0' if name in ('optim.lr', 'contrastive.temperature') else '>= 0'}, got {value}")
    if not cfg.data.manifest:
        problems.append("data.manifest is not set (a JSONL manifest; see python -m train.data --help)")
    if not cfg.model.base:
        problems.append("model.base is not set (a CogView4 diffusers folder, or 'embedded')")
    try:
        check_token_string(cfg.token.token)
    except InputError as e:
        problems.append(f"token.token: {e}")
    if not cfg.token.init_word.strip():
        problems.append("token.init_word is empty (the paper initialises the token from 'background')")
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    return cfg


def load_token_config(path: str | Path | None = None, overrides: list[str] = ()) -> BackgroundTokenConfig:
    """The config file's tables (every key and value checked; unknown ones are errors that list the
    valid ones), with ``section.key=value`` overrides applied."""
    tables = read_config_file(path) if path is not None else {}
    for item in overrides:
        override_tables(tables, item, flag="override", create=True)
    source = str(path) if path is not None else "defaults"
    return _check(read_table(BackgroundTokenConfig, tables, source, choices=CHOICES), source)


# ----------------------------------------------------------------------------- the losses


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The symmetrised InfoNCE of matching rows: ½ (CE(s / τ, I) + CE(sᵀ / τ, I)), s_ij = cos(a_i, b_j)."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def latent_statistics(latents: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, 2C]: the weighted mean and standard deviation of latents [B, C, h, w] over a region
    (weight [B, 1, h, w], 0..1): the VAE-latent image feature of a region."""
    w = weight.float()
    total = w.sum(dim=(2, 3)).clamp_min(1e-6)
    mean = (latents.float() * w).sum(dim=(2, 3)) / total
    var = (((latents.float() - mean[..., None, None]) ** 2) * w).sum(dim=(2, 3)) / total
    return torch.cat([mean, var.clamp_min(0).add(1e-6).sqrt()], dim=1)


def prompt_features(hidden: torch.Tensor, ids: torch.Tensor, token_id: int, skip_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(the feature at the token, the prompt's sentence feature) of one encoded prompt: GLM's hidden
    states [1, T, D] averaged over the token's positions, and over every position that is neither
    padding nor a special prefix token (the name and the token)."""
    h, row = hidden[0].float(), ids[0]
    at = row == token_id
    if not bool(at.any()):
        raise InputError(f"the prompt's ids hold no learned token (id {token_id}): it was cut or not appended")
    own = torch.ones_like(row, dtype=torch.bool)
    for i in skip_ids:
        own &= row != i
    return h[at].mean(dim=0), h[own].mean(dim=0)


class _Heads(nn.Module):
    """The projections of the contrastive terms into their shared space (module docstring)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, hidden: int, mlp: bool):
        super().__init__()
        self.text = nn.Sequential(nn.LayerNorm(text_dim, elementwise_affine=False), nn.Linear(text_dim, dim))
        image = [nn.LayerNorm(image_dim, elementwise_affine=False)]
        image += [nn.Linear(image_dim, hidden), nn.GELU(), nn.Linear(hidden, dim)] if mlp else [nn.Linear(image_dim, dim)]
        self.image = nn.Sequential(*image)


class _Trained(nn.Module):
    """What Optimization names in checkpoints: the token's embedding, the projections, a text LoRA."""

    def __init__(self, embedding: nn.Parameter, heads: _Heads | None, text_lora: dict[str, nn.Parameter] | None):
        super().__init__()
        self.token_embedding = embedding
        if heads is not None:
            self.heads = heads
        if text_lora:
            self.text_lora = nn.ParameterDict({k.replace(".", "__"): v for k, v in text_lora.items()})


def _gather_rows(x: torch.Tensor, env) -> torch.Tensor:
    """Every rank's rows, in rank order, with gradients flowing back to each rank's own."""
    if not env.initialized:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


# ----------------------------------------------------------------------------- data


def sample_names(samples, name_field: str = "name") -> dict[int, str]:
    """{manifest line: the product's name} for (line, Sample) pairs (train.manifest): the line's
    ``name_field``, or a synthetic scene's product words. ConfigError listing the lines without one."""
    from .synthetic import product_name

    names, missing, bad = {}, [], []
    for line, sample in samples:
        name = sample.extra.get(name_field)
        scene = sample.extra.get("scene")
        if name is None and isinstance(scene, dict) and isinstance(scene.get("product"), dict):
            name = product_name(scene)[0]
        if name is None:
            missing.append(line)
            continue
        try:
            names[line] = check_name(name)
        except PromptConfigError as e:
            bad.append(f"line {line}: {e}")
    if missing or bad:
        lines = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        what = [f"{len(missing)} line(s) without a product name ({lines}): add \"{name_field}\": \"<the product's "
                f"name>\" to each"] if missing else []
        raise ConfigError("data.manifest: " + "; ".join(what + bad[:8]))
    return names


def _background_image(image: np.ndarray, mask: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """The sample's background region as an image: its reference (the scene without the product), else
    the image with the product filled by the mean colour of the rest."""
    if reference is not None:
        return reference
    out = image.copy()
    rest = image[~mask]
    out[mask] = rest.mean(axis=0) if rest.size else 0.5
    return out


# ----------------------------------------------------------------------------- training


def _resolve_model(cfg: BackgroundTokenConfig) -> tuple[Path, str | None, str]:
    """(base folder, DreamPainter file or None, the base's name)."""
    from .dreampaint import _resolve_base

    base, embedded_weights, name = _resolve_base(cfg.model.base)
    w = cfg.model.dreampainter_weights
    weights = (embedded_weights if not w else None if w == "none" else w)
    return base, weights, cfg.model.base_model_name or name


def _run_record(cfg: BackgroundTokenConfig, base: Path, weights: str | None, world: int, n: int) -> dict:
    settings = explicit_values(cfg)
    for key in ("checkpoint_every", "log_every", "on_nonfinite", "max_nonfinite_steps", "output_dir", "cache_dir"):
        settings.get("train", {}).pop(key, None)
    settings.get("model", {}).pop("device", None)
    return {"settings": settings, "base": str(base), "weights": weights, "samples": n,
            "global_batch": cfg.train.batch_size * world}


def train_background_token(cfg: BackgroundTokenConfig, echo: Callable[[str], None] = print) -> dict:
    """Train the token (module docstring) and write the token file; returns a report (steps, seconds,
    the log, the token file). Every check on the config and the manifest runs before a model loads."""
    from dreampainter_core.pipeline import DreamPainterPipeline, text_hidden_states

    from .cache import ConditionCache, files_identity
    from .dataset import ManifestDataset
    from .buckets import make_buckets
    from .distributed import init_distributed, sync_replicated_grads
    from .trainer import GlobalBatchSampler, Optimization, TrainingModule, condition_latents, train_steps

    env = init_distributed(cfg.model.device)
    say = echo if env.is_main else (lambda msg: None)
    t, c = cfg.train, cfg.contrastive
    global_batch = t.batch_size * env.world
    if c.weight > 0 and global_batch < 2:
        raise ConfigError("the contrastive terms compare the samples of a batch: train.batch_size x processes must be "
                          f">= 2 (got {global_batch}), or set contrastive.weight = 0")
    d = cfg.data
    dataset = ManifestDataset(d.manifest, make_buckets(d.base_sizes, d.bucket_step, d.ratios), on_bad=d.on_bad,
                              seed=t.seed, second_prompt_prob=0.0)
    names = sample_names(dataset.samples, d.name_field)
    sampler = GlobalBatchSampler(dataset, t.batch_size, env.world, env.rank, t.seed)
    base, weights, base_name = _resolve_model(cfg)
    out_dir = Path(t.output_dir)
    claim_run_dir(out_dir, _run_record(cfg, base, weights, env.world, len(dataset)), "background-token",
                  write=env.is_main)
    env.barrier()

    device = env.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.model.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    pipe = DreamPainterPipeline.from_pretrained(base, dreampainter_weights=weights, dtype=dtype, device=device)
    model, tokenizer, text_encoder = pipe.transformer, pipe.tokenizer, pipe.text_encoder
    model.requires_grad_(False)
    text_encoder.requires_grad_(False)
    model.eval()
    text_encoder.eval()
    if model.has_lora:
        model.set_lora_scale(cfg.model.lora_scale)
    model.gradient_checkpointing = bool(cfg.model.gradient_checkpointing)
    say(f"loaded {base} ({base_name}) + {weights or 'no DreamPainter file'} in {time.perf_counter() - t0:.0f} s; "
        f"{len(dataset)} samples, global batch {global_batch} ({env.world} process(es) x {t.batch_size})")

    token = init_token(tokenizer, text_encoder, cfg.token.token, init_word=cfg.token.init_word, base_model=base_name)
    token.embedding = nn.Parameter(token.embedding.to(device))
    lora_params = None
    if cfg.text_lora.rank > 0:
        add_text_lora(token, text_encoder, cfg.text_lora.rank, cfg.text_lora.targets, cfg.text_lora.alpha, seed=t.seed)
        lora_params = {k: nn.Parameter(v.to(device)) for k, v in token.text_lora.items()}
        token.text_lora = lora_params
    _, token_ids = tokenizer_with(tokenizer, [token.token])
    token_id = token_ids[token.token]
    skip_ids = {int(tokenizer.pad_token_id), *map(int, tokenizer("", add_special_tokens=True).input_ids),
                *map(int, tokenizer.all_special_ids)}

    # Image features of the contrastive terms.
    clip = None
    heads = None
    if c.weight > 0:
        if c.image_encoder:
            from .metrics import ClipScorer

            clip = ClipScorer(c.image_encoder, device=device)
            image_dim = int(clip.model.config.projection_dim)
        else:
            image_dim = 2 * int(model.in_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            heads = _Heads(int(text_encoder.config.hidden_size), image_dim, c.dim, c.hidden, mlp=clip is None).to(device)
    trained = _Trained(token.embedding, heads, lora_params)
    params = {n: p for n, p in trained.named_parameters()}
    scales = {n: (c.head_lr_scale if n.startswith("heads.") else cfg.text_lora.lr_scale) for n in params
              if n != "token_embedding"}
    opt = Optimization(trained, params, cfg.optim, t.steps, on_nonfinite=t.on_nonfinite,
                       max_nonfinite_steps=t.max_nonfinite_steps, any_rank=env.any, lr_scales=scales)

    cache = ConditionCache(Path(t.cache_dir) if t.cache_dir else out_dir / "cache",
                           files_identity([base / "vae"], {"dtype": str(dtype)}), "")
    clip_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def latents(idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        line, sample = dataset.samples[idx]
        key = cache.latent_key(sample, dataset.index_buckets[idx])
        got = cache.get_latents(key)
        if got is not None:
            return got[0], got[1], line
        item = dataset[idx]
        x0, control = condition_latents(pipe, item)
        if item["line"] == line:  # a bad sample is served another one: that is not cached under its key
            cache.put_latents(key, x0, control)
        return x0, control, item["line"]

    def clip_features(line: int) -> tuple[torch.Tensor, torch.Tensor]:
        if line not in clip_memo:
            from .manifest import load_sample

            sample = next(s for ln, s in dataset.samples if ln == line)
            loaded = load_sample(sample, with_reference=True, line=line)
            image = np.asarray(loaded.image.convert("RGB"), np.float32) / 255.0
            ref = None
            if loaded.reference is not None:
                ref = np.asarray(loaded.reference.convert("RGB").resize(loaded.image.size), np.float32) / 255.0
            both = torch.from_numpy(np.stack([_background_image(image, loaded.mask, ref), image]))
            feats = clip.image_embeds(both).cpu()
            clip_memo[line] = (feats[0], feats[1])
        return clip_memo[line]

    module = TrainingModule(model)
    nt = pipe.scheduler.config.num_train_timesteps
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 else contextlib.nullcontext
    stats = {"samples": 0}

    epochs: dict[int, list[list[int]]] = {}

    def step(i: int) -> dict[str, float]:
        epoch, k = divmod(i, sampler.num_batches)
        if epoch not in epochs:  # the epoch's global batches, (seed, epoch)-shuffled
            epochs.clear()
            epochs[epoch] = sampler.global_batches(epoch)
        batch = epochs[epoch][k]
        mine = batch[env.rank * t.batch_size:(env.rank + 1) * t.batch_size]
        texts, token_feats, name_feats, bg_feats, all_feats = [], [], [], [], []
        x0s, controls, noises, times = [], [], [], []
        for j, idx in enumerate(mine):
            x0, control, line = latents(idx)
            g = flow.sample_generator(t.seed, i, 0, env.rank * t.batch_size + j)
            s = flow.draw_time(g, t.timestep_sampling, t.logit_mean, t.logit_std)
            noises.append(torch.randn(x0.shape, generator=g, dtype=torch.float32))
            times.append(s)
            x0s.append(x0)
            controls.append(control)
            hidden, ids = text_hidden_states(tokenizer, text_encoder, [name_with_token(names[line], token.token)],
                                             tokens=[token], return_ids=True)
            texts.append(hidden[0])
            if heads is not None:
                tb, tp = prompt_features(hidden, ids, token_id, skip_ids)
                token_feats.append(tb)
                name_feats.append(tp)
                if clip is not None:
                    fb, fi = clip_features(line)
                    bg_feats.append(fb.to(device))
                    all_feats.append(fi.to(device))
        x0 = torch.stack(x0s).to(device)
        control = torch.stack(controls).to(device)
        seq_len = x0.shape[-2] * x0.shape[-1] // model.patch_size ** 2
        s = torch.cat(times).to(device)
        sigma = flow.shift_sigma(pipe.scheduler, s, flow.mu_for(pipe.scheduler, seq_len)).to(device)
        x_t, target = flow.flow_pair(x0, torch.stack(noises).to(device), sigma)
        H, W = x0.shape[-2] * pipe.vae_scale_factor, x0.shape[-1] * pipe.vae_scale_factor
        size = torch.tensor([[H, W]], dtype=model.dtype, device=device)
        groups, order = [], []
        by_length: dict[int, list[int]] = {}
        for j, text in enumerate(texts):
            by_length.setdefault(int(text.shape[0]), []).append(j)
        for idx in by_length.values():
            ix = torch.tensor(idx, device=device)
            groups.append({"x_t": x_t[ix].to(model.dtype), "text": torch.stack([texts[j] for j in idx]).to(model.dtype),
                           "timestep": (s[ix] * nt), "size": size.repeat(len(idx), 1),
                           "crop": torch.zeros(len(idx), 2, dtype=model.dtype, device=device),
                           "control": control[ix].to(model.dtype) if model.control is not None else None,
                           "reference": None, "target": target[ix], "weight": None})
            order += idx
        with autocast():
            per = module(groups)
        diffusion = per.sum() * env.world / global_batch  # averaged over the ranks: the global batch's mean
        loss = diffusion
        values = {}
        if heads is not None:
            if clip is None:
                region = 1.0 - control[:, -1:]  # Z_m is the product's coverage of each latent pixel
                bg = latent_statistics(x0, region)
                whole = latent_statistics(x0, torch.ones_like(region))
            else:
                bg, whole = torch.stack(bg_feats), torch.stack(all_feats)
            b = _gather_rows(heads.text(torch.stack(token_feats)), env)
            image_b = _gather_rows(heads.image(bg), env)
            cl_b = info_nce(b, image_b, c.temperature)
            contrastive = cl_b
            values["cl_background"] = float(cl_b.detach())
            if c.name_image:
                p = _gather_rows(heads.text(torch.stack(name_feats)), env)
                cl_p = info_nce(p, _gather_rows(heads.image(whole), env), c.temperature)
                contrastive = contrastive + cl_p
                values["cl_name"] = float(cl_p.detach())
            loss = loss + c.weight * contrastive
        loss.backward()
        sync_replicated_grads(list(params.values()), env)
        stats["samples"] += len(mine)
        mean = float(env.all_reduce_mean(per.detach().double().mean().cpu() if device.type != "cuda"
                                         else per.detach().double().mean()))
        total = mean + sum(c.weight * v for v in values.values())
        return {"loss": total, "diffusion": mean, **values}

    def row(means: dict, grad_norm) -> tuple[dict, str]:
        body = {**means, "grad_norm": grad_norm, "lr": opt.lr}
        return body, " ".join(f"{k} {v:.4f}" for k, v in means.items())

    try:
        rows, seconds = train_steps(out_dir, opt, t.steps, step, log_every=t.log_every, row=row,
                                    checkpoint_every=t.checkpoint_every, echo=echo, name="background-token",
                                    stats=stats, env=env)
    finally:
        env.barrier()
    result = LearnedToken(token.token, token.embedding.detach().to("cpu").clone(), token.init, token.text_encoder,
                          token.base_model,
                          {k: v.detach().to("cpu").clone() for k, v in lora_params.items()} if lora_params else None,
                          token.text_lora_alpha)
    info = {"made_by": MADE_BY, "trained_steps": str(t.steps), "dreampainter_weights": Path(weights).name if weights
            else "none", "manifest": Path(d.manifest).name, "samples": str(len(dataset)),
            "contrastive_weight": repr(c.weight), "temperature": repr(c.temperature),
            "name_image_term": str(c.name_image and c.weight > 0),
            "image_encoder": ("clip:" + Path(c.image_encoder).name) if c.image_encoder else "vae-latents",
            "global_batch": str(global_batch), "lr": repr(cfg.optim.lr), "seed": str(t.seed)}
    path = cfg.token_path
    if env.is_main:
        save_learned_token(result, path, info)
        say(f"token {token.token!r} written to {path}")
    env.barrier()
    report = {"steps": t.steps, "seconds": round(seconds, 1), "log": rows, "token_file": str(path),
              "samples_seen": stats["samples"], "world": env.world}
    env.shutdown()
    return report


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.background_token", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML or YAML config (configs/background_token.toml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. contrastive.weight=0)")
    a = p.parse_args(argv)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        cfg = load_token_config(a.config, a.overrides)
        if a.print_config:
            import json

            print(json.dumps(dataclasses.asdict(cfg), indent=1))
            return 0
        report = train_background_token(cfg, echo)
    except (DreamPainterError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    echo(f"done: {report['steps']} steps in {report['seconds']:.0f} s")
    print(report["token_file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
