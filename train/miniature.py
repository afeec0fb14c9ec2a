"""The miniature DreamEcom: synthetic data, a tiny CogView4-architecture model trained from scratch
on CPU, both DreamPainter stages on top of it, and the paper's evaluation, in one command.

    python -m train.miniature --out runs/miniature [--budget-minutes 240] [--smoke] [--until PHASE]

Phases (configs/miniature/recipe.toml holds every setting, read into the typed ``Recipe`` with
train.config's checks; stage 1 and 2 use configs/miniature/stage1.toml / stage2.toml with the
project's own trainer, and the VAE and base phases step through that trainer's
``train.trainer.Optimization``: AdamW, its warmup + cosine LR schedule, gradient clipping, EMA):

1. ``data``: ``train.synthetic`` scenes (train / val / test manifests) in ``DIR/data``.
2. ``text``: the frozen, randomly initialised tiny GLM text encoder, its tokenizer (the synthetic
   vocabulary) and CogView4's scheduler, from ``train.tiny``, into ``DIR/model``.
3. ``vae``: a 16-channel AutoencoderKL with CogView4's structure (8x, no quant convs), trained
   on random crops with L1 + L2 (+ a small KL); the latent scale/shift measured on training
   images goes into its config (the pipeline applies ``scaling_factor`` / ``shift_factor``).
4. ``base``: a CogView4Transformer2DModel (64 image tokens at 128 px) trained from scratch by
   flow matching in the sampler's convention (train/flow.py: shifted sigma, unshifted
   timestep), with empty prompts for classifier-free guidance, on frozen GLM features of each
   prompt alone (exactly what ``encode_prompt`` gives at inference), EMA weights exported.
5. ``stage1`` / ``stage2``: ``train.trainer.run`` on the base (``DIR/stage1``, ``DIR/stage2``).
6. ``export``: the base folder ``DIR/model`` (diffusers layout) plus ``DIR/model/dreampainter.safetensors``
   (the stage-2 file, which carries the stage-1 branch), everything bf16, checked to load in
   ``DreamPainterPipeline`` and to fit ``export.max_mb``.
7. ``evaluate``: ``train.evaluate`` on the test split (``DIR/eval/report.json`` + PNGs) and the
   lora_scale / attention_scale sweeps (``DIR/eval/sweep.json``).

Every component is saved in bf16 as soon as it is trained and the later phases load those files
(as float32), so each phase trains against exactly the weights that ship.

Resume: a finished phase writes ``DIR/phases/<phase>.json`` (time, metrics, a fingerprint of its
settings and of the phases before it) and is skipped next time; a phase whose settings changed
stops the run with a message instead of silently mixing models. Inside a phase, the VAE and
base write the trainer's checkpoints to ``DIR/vae`` / ``DIR/base`` every ``checkpoint_every``
steps (dropped when the phase is done) and stage 1 / 2 the trainer's own to ``DIR/stage1`` /
``DIR/stage2``; an interrupted phase continues from its last one exactly, and only with the same
settings (``miniature_fingerprint.txt``). ``DIR/summary.json`` collects timings and numbers.

Budget: the step counts in the recipe are sized for ``budget_minutes`` (240 in the committed recipe) on 2 CPU cores;
``--budget-minutes B`` scales every training phase's steps by B / budget_minutes. Steps, not the clock, decide
what is trained, so a seed gives the same model whatever the machine's speed.

``--smoke`` merges the recipe's ``[smoke.*]`` tables (a few samples and steps per phase): the
whole pipeline in well under two minutes, for CI (tests/test_miniature.py).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dreampainter_core.errors import DreamPainterError
from dreampainter_core.fileio import atomic_write_bytes, atomic_write_text

from .config import ConfigError, OptimConfig, explicit_values, override_tables, read_config_file, read_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "configs" / "miniature" / "recipe.toml"
PHASES = ("data", "text", "vae", "base", "stage1", "stage2", "export", "evaluate")
WEIGHTS_NAME = "dreampainter.safetensors"
BASE_MODEL_NAME = "dreampainter-miniature-base"
RECIPE_VERSION = 1
_STAMP = "miniature_fingerprint.txt"

__all__ = ["PHASES", "Recipe", "load_recipe", "read_recipe", "Miniature", "main", "vae_config", "transformer_config"]


class RecipeError(ConfigError):
    pass


# ----------------------------------------------------------------------------- recipe
# The recipe's tables, typed (train.config.read_table checks every key and value as the trainer's
# config files are checked). A field without a default must be in the recipe.


@dataclass(kw_only=True)
class DataRecipe:
    count: int
    size: int
    splits: str
    # train.synthetic's scene version (2: no category prior): the export records it, so a model is
    # always measured on the kind of scenes it was trained on.
    scene_version: int = 2


@dataclass
class TextRecipe:
    """Nothing to set: the frozen text encoder is drawn from the seed."""


@dataclass(kw_only=True)
class TrainedRecipe:
    """What the VAE and base phases share: steps (at the recipe's budget) and the optimizer."""

    steps: int
    batch_size: int
    lr: float
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int  # at most a fifth of the steps
    min_lr_ratio: float  # cosine floor
    # Steps between checkpoints in DIR/<phase> (0: only at the end): an interrupted phase continues
    # from the last one exactly, so this does not change what is trained (nor the fingerprint).
    checkpoint_every: int = 250

    def optim(self, steps: int) -> OptimConfig:
        """The trainer's optimizer settings for a run of `steps`: AdamW, warmup, cosine."""
        return OptimConfig(lr=self.lr, betas=list(self.betas), weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, scheduler="cosine",
                           warmup_steps=min(self.warmup_steps, steps // 5), min_lr_ratio=self.min_lr_ratio)


@dataclass(kw_only=True)
class VaeRecipe(TrainedRecipe):
    block_out_channels: list[int]
    layers_per_block: int
    norm_num_groups: int
    sample_size: int = 128
    crop: int
    l1_weight: float
    l2_weight: float
    kl_weight: float
    source_probs: list[float]  # target scene, background reference, product on white
    # Decode a sample of the posterior while training (a VAE), or its mean (an autoencoder, sharper;
    # the KL term then only keeps the latents' scale in check).
    sample_posterior: bool = True
    # Weight of the product's pixels in the reconstruction loss (1 = plain): a product is a small part
    # of a scene, but what the pack must keep exactly; its edges are what a VAE blurs first.
    product_loss_weight: float = 1.0
    eval_images: int
    stats_images: int


@dataclass(kw_only=True)
class BaseRecipe(TrainedRecipe):
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    time_embed_dim: int
    ema_decay: float
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    text_warmup_steps: int = 0
    text_warmup_from: float = 0.9
    high_noise_prob: float = 0.0
    high_noise_from: float = 0.8
    empty_prompt_prob: float
    second_prompt_prob: float
    log_every: int
    eval_samples: int
    eval_steps: int
    checkpoint_every: int = 500


@dataclass(kw_only=True)
class StageRecipe:
    config: str
    overrides: list[str] = field(default_factory=list)
    validations: int = 1
    eval_samples: int = 0


@dataclass(kw_only=True)
class EvaluateRecipe:
    limit: int
    steps: int
    guidance: float
    reference_guidance: float | None = None
    # The reference LoRA's scale and ReferenceOptions.shield_product at which the model is measured
    # and the demo samples (miniature.json); the Fig. 8 sweeps vary lora_scale from 1 as trained.
    lora_scale: float = 1.0
    shield_product: bool = False
    sweep_limit: int = 0
    sweeps: list[str] = field(default_factory=list)
    sweep_values: str = ""
    plot: str = "auto"
    # Also measure the true test images through the VAE and back (mode "vae": every metric's ceiling).
    roundtrip: bool = False
    # Train-free mask guidance (seed 004) on the first N test scenes, paired with the main run's
    # (train.compare): the overcompletion it is for shows in object consistency. 0 = not measured.
    mask_guidance_limit: int = 0


@dataclass(kw_only=True)
class ExportRecipe:
    max_mb: float


@dataclass(kw_only=True)
class Recipe:
    seed: int = 0
    budget_minutes: float = 90.0
    precision: str = "bf16"
    training_attention: str = "math"
    data: DataRecipe
    text: TextRecipe = field(default_factory=TextRecipe)
    vae: VaeRecipe
    base: BaseRecipe
    stage1: StageRecipe
    stage2: StageRecipe
    evaluate: EvaluateRecipe
    export: ExportRecipe
    smoke: bool = False


_CHOICES = {("", "precision"): ("bf16", "fp32"), ("", "training_attention"): ("math", "auto"),
            ("base", "timestep_sampling"): ("logit_normal", "uniform"), ("evaluate", "plot"): ("auto", "pil", "matplotlib")}
_NOT_FINGERPRINTED = ("checkpoint_every",)


def _check(r: Recipe) -> None:
    """What each key's type allows but the recipe does not."""
    from dreampainter_core.options import MAX_SCALE

    from .synthetic import SCENE_VERSIONS

    checks = [("budget_minutes", r.budget_minutes > 0, "> 0"),
              ("data.scene_version", r.data.scene_version in SCENE_VERSIONS, f"one of {SCENE_VERSIONS}")]
    for name in ("vae", "base"):
        sec = getattr(r, name)
        checks += [(f"{name}.steps", sec.steps >= 1, ">= 1"), (f"{name}.batch_size", sec.batch_size >= 1, ">= 1"),
                   (f"{name}.lr", sec.lr > 0, "> 0"), (f"{name}.betas", len(sec.betas) == 2, "two numbers"),
                   (f"{name}.warmup_steps", sec.warmup_steps >= 0, ">= 0")]
    p, b = r.vae.source_probs, r.base
    checks += [("vae.source_probs", len(p) == 3 and min(p) >= 0 and sum(p) > 0,
                "three weights >= 0 (scene, reference, product on white)"),
               ("base.ema_decay", 0 < b.ema_decay < 1, "in (0, 1)"), ("base.log_every", b.log_every >= 1, ">= 1")]
    checks += [(f"base.{k}", 0 <= getattr(b, k) <= 1, "in [0, 1]")
               for k in ("empty_prompt_prob", "second_prompt_prob", "high_noise_prob")]
    checks += [(f"base.{k}", 0 <= getattr(b, k) < 1, "in [0, 1)") for k in ("high_noise_from", "text_warmup_from")]
    # Checked here, not hours later when the evaluation builds its ReferenceOptions.
    checks += [("evaluate.lora_scale", 0 <= r.evaluate.lora_scale <= MAX_SCALE, f"in [0, {MAX_SCALE:g}] (1 = as trained)")]
    problems = []
    for name, ok, what in checks:
        if not ok:
            section, _, key = name.rpartition(".")
            problems.append(f"{name} must be {what}, got {getattr(getattr(r, section) if section else r, key)}")
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))


def _merge(base: dict, over: dict) -> dict:
    """Deep merge; ``overrides`` lists are appended, other values replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif k == "overrides" and isinstance(v, list):
            out[k] = list(out.get(k, [])) + list(v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def recipe_override(tables: dict, item: str) -> None:
    """Apply one ``section.key=value`` to a recipe's tables, in place (config.override_tables): how an
    experiment varies one setting without copying the recipe."""
    try:
        override_tables(tables, item)
    except ConfigError as e:
        raise RecipeError(str(e).replace("the file has no table", "the recipe has no table")) from None


def load_recipe(path: str | os.PathLike | None = None, smoke: bool = False, overrides: list[str] = ()) -> dict:
    """The recipe file's tables (``smoke``: its ``[smoke.*]`` tables merged over the others) with
    ``overrides`` (``section.key=value``) applied, checked with and without the smoke tables;
    read_recipe (or Miniature) types them."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    try:
        recipe = read_config_file(path)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    for item in overrides:
        recipe_override(recipe, item)
    smoke_tables = recipe.pop("smoke", {})
    merged = {**_merge(recipe, smoke_tables), "smoke": True}
    recipe["smoke"] = False
    read_recipe(recipe, str(path))
    read_recipe(merged, f"{path} with its [smoke.*] tables")
    return merged if smoke else recipe


def read_recipe(tables: dict, source: str = "recipe") -> Recipe:
    """The typed Recipe of a recipe's tables; a bad value is a RecipeError naming its key."""
    try:
        recipe = read_table(Recipe, tables, source, choices=_CHOICES)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    _check(recipe)
    return recipe


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scaled(steps: int, scale: float) -> int:
    return max(1, int(round(steps * scale)))


# ----------------------------------------------------------------------------- small helpers


def _save_bf16_into_place(model, final: Path) -> None:
    """save_pretrained in bf16 into a temporary folder, then move it into place."""
    from .checkpoint import nonfinite_tensor

    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(torch.bfloat16)
    bad = nonfinite_tensor(model.state_dict())
    if bad is not None:
        raise RecipeError(f"refusing to write {final}: {bad!r} holds NaN or infinite values in bf16")
    model.save_pretrained(str(tmp), safe_serialization=True)
    _replace_dir(tmp, final)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _load_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8) > 127


def _psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in 0..1 (mask: [H, W] bool, channels broadcast)."""
    err = (a.float() - b.float()) ** 2
    if mask is not None:
        err = err[mask.expand_as(err)] if err.shape[-3:-2] != mask.shape else err[..., mask]
    mse = float(err.mean())
    return 100.0 if mse <= 0 else 10.0 * math.log10(1.0 / mse)


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _autocast(dtype: str):
    """bf16 autocast on the CPU (fast with AMX/AVX512-BF16) or nothing."""
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _training_attention(kind: str):
    """``"math"``: plain matmul-softmax attention while training. PyTorch's fused CPU attention
    (flash) is slow in the backward pass for these short sequences (96-160 tokens, head 32): it
    took ~45% of a base training step; the math kernel makes a step ~30% faster."""
    import contextlib

    if kind == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def vae_config(sec: VaeRecipe) -> dict:
    """The VAE's diffusers config: CogView4's structure (tiny.tiny_vae_config) at the recipe's widths."""
    from .tiny import tiny_vae_config

    cfg = tiny_vae_config()
    cfg.update(block_out_channels=list(sec.block_out_channels), layers_per_block=sec.layers_per_block,
               norm_num_groups=sec.norm_num_groups, sample_size=sec.sample_size)
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(cfg["block_out_channels"])
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(cfg["block_out_channels"])
    return cfg


def transformer_config(sec: BaseRecipe, text_dim: int, size: int) -> dict:
    from .tiny import tiny_transformer_config

    cfg = tiny_transformer_config()
    cfg.update(num_layers=sec.num_layers, num_attention_heads=sec.num_attention_heads,
               attention_head_dim=sec.attention_head_dim, time_embed_dim=sec.time_embed_dim,
               text_embed_dim=int(text_dim), sample_size=size // 8)
    return cfg


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- the recipe


class Miniature:
    def __init__(self, out: str | os.PathLike, recipe: Recipe | dict, budget_minutes: float | None = None,
                 echo: Callable[[str], None] | None = None):
        """`recipe`: a Recipe, or the tables of one (load_recipe)."""
        self.out = Path(out)
        self.recipe = recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)
        self.seed = recipe.seed
        self.budget = recipe.budget_minutes if budget_minutes is None else float(budget_minutes)
        if self.budget <= 0:
            raise RecipeError("--budget-minutes must be > 0")
        self.scale = 1.0 if recipe.smoke else self.budget / recipe.budget_minutes
        self.echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
        self.data_dir = self.out / "data"
        self.model_dir = self.out / "model"
        self.phase_dir = self.out / "phases"
        self.weights_path = self.model_dir / WEIGHTS_NAME
        self.fingerprints: dict[str, str] = {}
        self.precision = recipe.precision
        self.dtype = _DTYPES[self.precision]
        self.attention = recipe.training_attention

    # ---- bookkeeping -----------------------------------------------------------------
    def _phase_settings(self, phase: str) -> Any:
        r = self.recipe
        common = {"seed": self.seed, "version": RECIPE_VERSION, "precision": self.precision}
        if phase in ("base", "stage1", "stage2"):
            common["attention"] = self.attention
        if phase == "text":
            return common
        # The phase's table as written (explicit_values: a new key left at its default changes nothing)
        sec = explicit_values(getattr(r, phase))
        if phase in ("vae", "base"):
            sec = {k: v for k, v in sec.items() if k not in _NOT_FINGERPRINTED}
            return {**common, **sec, "steps": self.steps(phase)}
        if phase in ("stage1", "stage2"):
            sec["config_text"] = (REPO / sec["config"]).read_text(encoding="utf-8")
            sec["scale"] = self.scale
        if phase == "export":
            sec["sampling"] = self.sampling()
        return {**common, **sec}

    def steps(self, phase: str) -> int:
        """The VAE's or base's step count at this run's budget."""
        return _scaled(getattr(self.recipe, phase).steps, self.scale)

    def sampling(self) -> dict:
        """The sampler settings the evaluation runs at, written into the model's miniature.json: the
        demo (dreampainter_core.generate) uses them, so it shows the model as it was measured."""
        e = self.recipe.evaluate
        out = {"steps": e.steps, "guidance": e.guidance}
        if e.reference_guidance is not None:
            out["reference_guidance"] = e.reference_guidance
        if e.lora_scale != 1.0:  # only when set, so that earlier recipes keep their fingerprints
            out["lora_scale"] = e.lora_scale
        if e.shield_product:
            out["shield_product"] = True
        return out

    def fingerprint(self, phase: str) -> str:
        if phase not in self.fingerprints:
            i = PHASES.index(phase)
            prev = self.fingerprint(PHASES[i - 1]) if i else ""
            self.fingerprints[phase] = _fingerprint(phase, prev, self._phase_settings(phase))
        return self.fingerprints[phase]

    def marker(self, phase: str) -> Path:
        return self.phase_dir / f"{phase}.json"

    def done(self, phase: str) -> dict | None:
        path = self.marker(phase)
        if not path.is_file():
            return None
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("fingerprint") != self.fingerprint(phase):
            raise RecipeError(
                f"{path}: phase {phase!r} was made with other settings (or from other earlier phases) than this "
                f"run's. Use another --out, or delete {path} and the phases after it to redo them.")
        return rec

    def _claim(self, phase: str, out: Path) -> Path:
        """`out`, the folder of a phase that trains with checkpoints: the phase resumes from them, so
        only from a run with these very settings (stamped with the phase's fingerprint)."""
        stamp = out / _STAMP
        if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() != self.fingerprint(phase):
            raise RecipeError(f"{out} holds an unfinished {phase} run with other settings (or on other earlier phases); "
                              f"delete {out} to start this phase afresh.")
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.fingerprint(phase) + "\n", encoding="utf-8")
        return out

    def _release(self, phase: str) -> None:
        """The VAE or base phase is done (its marker follows): drop its checkpoints, so that redoing
        the phase trains it afresh."""
        from .checkpoint import list_checkpoints

        out = self.out / phase
        for ck in list_checkpoints(out):
            shutil.rmtree(ck)
        (out / _STAMP).unlink(missing_ok=True)

    def run(self, until: str | None = None) -> dict:
        until = until or PHASES[-1]
        if until not in PHASES:
            raise RecipeError(f"--until must be one of {', '.join(PHASES)}")
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {"recipe": explicit_values(self.recipe), "budget_minutes": self.budget, "step_scale": self.scale,
                   "threads": torch.get_num_threads(), "phases": {}}
        t_all = time.perf_counter()
        for phase in PHASES[: PHASES.index(until) + 1]:
            rec = self.done(phase)
            if rec is not None:
                self.echo(f"[{phase}] done before ({rec['seconds']:.0f} s): skipped")
                summary["phases"][phase] = {**rec, "skipped": True}
                continue
            self.echo(f"[{phase}] ...")
            t0 = time.perf_counter()
            metrics = getattr(self, f"phase_{phase}")()
            dt = time.perf_counter() - t0
            rec = {"phase": phase, "seconds": round(dt, 2), "metrics": metrics, "fingerprint": self.fingerprint(phase),
                   "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(self.marker(phase), json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
            summary["phases"][phase] = {**rec, "skipped": False}
            self.echo(f"[{phase}] {dt:.0f} s: " + json.dumps(_short(metrics), ensure_ascii=False))
        summary["seconds_this_run"] = round(time.perf_counter() - t_all, 2)
        summary["seconds_all_phases"] = round(sum(p["seconds"] for p in summary["phases"].values()), 2)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return summary

    # ---- 1. data ---------------------------------------------------------------------
    def phase_data(self) -> dict:
        from .synthetic import split_counts, write_scenes

        d = self.recipe.data
        tmp = self.out / ".data.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        write_scenes(tmp, d.count, size=d.size, seed=self.seed, splits=d.splits, version=d.scene_version)
        _replace_dir(tmp, self.data_dir)
        n = split_counts(d.count, d.splits)
        return {"train": n[0], "val": n[1], "test": n[2], "size": d.size}

    # ---- 2. text encoder, tokenizer, scheduler -----------------------------------------
    def phase_text(self) -> dict:
        from .tiny import build_tiny_components, cogview4_model_index, save_tokenizer_portable

        comps = build_tiny_components(self.seed)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        te = comps["text_encoder"].to(torch.bfloat16)
        for sub in ("text_encoder", "tokenizer", "scheduler"):
            if (self.model_dir / sub).exists():
                shutil.rmtree(self.model_dir / sub)
        te.save_pretrained(str(self.model_dir / "text_encoder"), safe_serialization=True)
        save_tokenizer_portable(comps["tokenizer"], self.model_dir / "tokenizer")
        comps["scheduler"].save_pretrained(str(self.model_dir / "scheduler"))
        atomic_write_text(self.model_dir / "model_index.json", json.dumps(cogview4_model_index(), indent=2) + "\n")
        return {"text_encoder_params": _n_params(te), "vocab": len(comps["tokenizer"]),
                "hidden_size": int(te.config.hidden_size)}

    # ---- 3. VAE -----------------------------------------------------------------------
    def _split(self, name: str) -> list[dict]:
        return [json.loads(line) for line in (self.data_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]

    def _images(self, records: list[dict], kinds=("image", "reference", "foreground")) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in kinds}
        masks = []
        for rec in records:
            img = _load_rgb(self.data_dir / rec["image"])
            m = _load_mask(self.data_dir / rec["mask"])
            masks.append(m)
            if "image" in kinds:
                out["image"].append(img)
            if "reference" in kinds:
                out["reference"].append(_load_rgb(self.data_dir / rec["reference"]))
            if "foreground" in kinds:
                out["foreground"].append(np.where(m[..., None], img, 255).astype(np.uint8))
        res = {k: np.stack(v) for k, v in out.items()}
        res["mask"] = np.stack(masks)
        return res

    def phase_vae(self) -> dict:
        from diffusers import AutoencoderKL

        from dreampainter_core.loading import load_vae

        from .trainer import Optimization

        sec = self.recipe.vae
        steps = self.steps("vae")
        bs = sec.batch_size
        train = self._images(self._split("train"))
        sources = ("image", "reference", "foreground")
        probs = np.asarray(sec.source_probs, np.float64)
        probs = probs / probs.sum()
        n, h, w = train["image"].shape[:3]
        crop = min(sec.crop, h, w)

        torch.manual_seed(self.seed * 1009 + 11)
        vae = AutoencoderKL(**vae_config(sec))
        vae.train()
        opt = Optimization(vae, dict(vae.named_parameters()), sec.optim(steps), steps)
        self.echo(f"[vae] {_n_params(vae):,} parameters; {steps} steps of {bs} crops of {crop} px on {n} scenes")

        def step(i: int) -> dict[str, float]:
            rng = np.random.default_rng([self.seed, 3, i])
            src = rng.choice(3, size=bs, p=probs)
            idx = rng.integers(n, size=bs)
            oy = rng.integers(0, h - crop + 1, size=bs)
            ox = rng.integers(0, w - crop + 1, size=bs)
            flip = rng.random(bs) < 0.5
            batch, weights = [], []
            for j in range(bs):
                a = train[sources[src[j]]][idx[j], oy[j] : oy[j] + crop, ox[j] : ox[j] + crop]
                m = train["mask"][idx[j], oy[j] : oy[j] + crop, ox[j] : ox[j] + crop]
                if sources[src[j]] == "reference":  # the scene without its product
                    m = np.zeros_like(m)
                batch.append(a[:, ::-1] if flip[j] else a)
                weights.append(m[:, ::-1] if flip[j] else m)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(batch))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            # per-pixel weights, mean 1 per crop (so the loss scale and the lr mean the same for any weight)
            w8 = 1.0 + (sec.product_loss_weight - 1.0) * torch.from_numpy(np.ascontiguousarray(np.stack(weights))).float()
            w8 = (w8 / w8.mean(dim=(1, 2), keepdim=True)).unsqueeze(1)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with _autocast(self.precision):
                post = vae.encode(x).latent_dist
                z = post.sample(generator=gen) if sec.sample_posterior else post.mode()
                y = vae.decode(z).sample.float()
            l1 = (y - x).abs().mean()
            l2 = ((y - x) ** 2).mean()
            kl = post.kl().mean()
            if sec.product_loss_weight != 1.0:
                loss = sec.l1_weight * ((y - x).abs() * w8).mean() + sec.l2_weight * ((y - x) ** 2 * w8).mean()
            else:  # (the plain mean: bit for bit what the recipe trained before the weight existed)
                loss = sec.l1_weight * l1 + sec.l2_weight * l2
            (loss + sec.kl_weight * kl).backward()
            return {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach())}

        def row(mean: dict, grad_norm) -> tuple[dict, str]:
            psnr = 10 * math.log10(4.0 / max(mean["l2"], 1e-12))
            return {**mean, "psnr_train": psnr}, f"l1 {mean['l1']:.4f} train-crop PSNR {psnr:.2f} dB kl {mean['kl']:.0f}"

        log_rows, train_seconds = self._train("vae", opt, steps, step, max(1, min(100, steps // 10)), row)
        vae.eval().requires_grad_(False)

        # Latent scale/shift (as SD3/Flux VAEs): the base then sees ~unit-variance latents.
        k = min(sec.stats_images, n)
        with torch.no_grad(), _autocast(self.precision):
            lat = torch.cat([vae.encode(torch.from_numpy(train["image"][i : i + 32]).permute(0, 3, 1, 2).float() / 127.5 - 1)
                             .latent_dist.mode().float() for i in range(0, k, 32)])
        shift, std = float(lat.mean()), float(lat.std())
        vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(1.0 / max(std, 1e-6), 6))
        del train

        _save_bf16_into_place(vae, self.model_dir / "vae")
        atomic_write_text(self.out / "vae" / "train_log.json", json.dumps(log_rows, indent=1) + "\n")

        # Held-out reconstruction with the shipped (bf16) weights, run in `precision` as inference does.
        shipped = load_vae(self.model_dir / "vae", dtype=self.dtype)
        val = self._images(self._split("val")[: sec.eval_images])
        psnr: dict[str, list[float]] = {"image": [], "foreground": [], "reference": [], "product": []}
        with torch.no_grad():
            for i in range(len(val["image"])):
                for kind in ("image", "foreground", "reference"):
                    x = torch.from_numpy(val[kind][i : i + 1]).permute(0, 3, 1, 2).float() / 255.0
                    xin = (x * 2 - 1).to(self.dtype)
                    y = (shipped.decode(shipped.encode(xin).latent_dist.mode()).sample.float() / 2 + 0.5).clamp(0, 1)
                    psnr[kind].append(_psnr(y, x))
                    if kind == "image":
                        m = torch.from_numpy(val["mask"][i])
                        psnr["product"].append(_psnr(y[0].permute(1, 2, 0)[m], x[0].permute(1, 2, 0)[m]))
        self._release("vae")
        return {
            "params": _n_params(shipped), "steps": steps, "batch_size": bs, "crop": crop,
            "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / steps, 3),
            "val_psnr_db": round(float(np.mean(psnr["image"])), 2),
            "val_psnr_foreground_db": round(float(np.mean(psnr["foreground"])), 2),
            "val_psnr_reference_db": round(float(np.mean(psnr["reference"])), 2),
            "val_psnr_product_db": round(float(np.mean(psnr["product"])), 2),
            "val_images": len(psnr["image"]), "latent_shift": round(shift, 5), "latent_std": round(std, 5),
            "last_log": log_rows[-1] if log_rows else None,
        }

    # ---- 4. base ----------------------------------------------------------------------
    def _pipeline(self, weights: Path | None = None):
        from dreampainter_core.pipeline import DreamPainterPipeline

        return DreamPainterPipeline.from_pretrained(self.model_dir, dreampainter_weights=weights, dtype=self.dtype)

    def phase_base(self) -> dict:
        from diffusers import CogView4Transformer2DModel

        from dreampainter_core.loading import _load_scheduler, load_text_encoder, load_tokenizer, load_vae
        from dreampainter_core.pipeline import DreamPainterPipeline
        from dreampainter_core.transformer import DreamPainterTransformer

        from . import flow
        from .config import EmaConfig
        from .trainer import Optimization

        sec = self.recipe.base
        steps = self.steps("base")
        bs = sec.batch_size
        size = self.recipe.data.size

        # The shipped (bf16) VAE and text encoder, run in `precision` (as the stage trainers and
        # inference run them).
        tokenizer = load_tokenizer(self.model_dir / "tokenizer")
        text_encoder = load_text_encoder(self.model_dir / "text_encoder", dtype=self.dtype)
        vae = load_vae(self.model_dir / "vae", dtype=self.dtype)
        scheduler = _load_scheduler(self.model_dir / "scheduler")

        torch.manual_seed(self.seed * 1009 + 13)
        cfg = transformer_config(sec, text_encoder.config.hidden_size, size)
        base = CogView4Transformer2DModel(**cfg)
        model = DreamPainterTransformer(base, with_control=False)  # the inference forward, base only
        model.train()
        pipe = DreamPainterPipeline(tokenizer, text_encoder, vae, model, scheduler)

        records = self._split("train")
        n = len(records)
        self.echo(f"[base] {_n_params(base):,} parameters; encoding {n} training images and their prompts")
        t_enc = time.perf_counter()
        x0_all = []
        with torch.no_grad():
            for i in range(0, n, 32):
                imgs = np.stack([_load_rgb(self.data_dir / r["image"]) for r in records[i : i + 32]])
                x0_all.append(pipe.encode_image(torch.from_numpy(imgs).float() / 255.0))
        x0_all = torch.cat(x0_all)
        prompts_en = [r["prompt"] for r in records]
        prompts_zh = [r.get("prompt_2") or r["prompt"] for r in records]
        texts: dict[str, torch.Tensor] = {}
        for p in sorted(set(prompts_en) | set(prompts_zh) | {""}):
            texts[p] = pipe.encode_prompt([p])[0].float()
        enc_seconds = time.perf_counter() - t_enc
        text_encoder.cpu()

        seq_len = (x0_all.shape[-2] // model.patch_size) * (x0_all.shape[-1] // model.patch_size)
        mu = flow.mu_for(scheduler, seq_len)
        nt = scheduler.config.num_train_timesteps
        size_t = torch.tensor([[size, size]], dtype=torch.float32)
        opt = Optimization(base, dict(base.named_parameters()), sec.optim(steps), steps,
                           EmaConfig(enabled=True, decay=sec.ema_decay, warmup=True))
        batches_per_epoch = max(1, n // bs)
        perms: dict[int, np.ndarray] = {}
        stats = {"empty_prompts": 0, "second_prompts": 0, "samples": 0}
        self.echo(f"[base] {steps} steps of {bs}; {seq_len} image tokens, mu {mu:.3f}; "
                  f"{len(texts)} prompts encoded in {enc_seconds:.0f} s")
        warm_steps = _scaled(sec.text_warmup_steps, self.scale) if not self.recipe.smoke else 0

        def step(i: int) -> dict[str, float]:
            nonlocal perms
            epoch, k = divmod(i, batches_per_epoch)
            if epoch not in perms:
                perms = {epoch: np.random.default_rng([self.seed, 4, epoch]).permutation(n)}
            idx = perms[epoch][k * bs : (k + 1) * bs]
            noises, times, prompts = [], [], []
            for j, r in enumerate(idx):
                g = flow.sample_generator(self.seed, i, 0, j)
                drop = torch.rand(1, generator=g).item() < sec.empty_prompt_prob
                second = torch.rand(1, generator=g).item() < sec.second_prompt_prob
                t = flow.draw_time(g, sec.timestep_sampling, sec.logit_mean, sec.logit_std)
                if i < warm_steps:  # text warm-up: only times where the prompt is all there is
                    t = sec.text_warmup_from + (1.0 - sec.text_warmup_from) * t
                else:  # a share into [high_noise_from, 1): see the recipe
                    t = flow.into_high_noise(g, t, sec.high_noise_prob, sec.high_noise_from)
                times.append(t)
                noises.append(torch.randn(x0_all.shape[1:], generator=g, dtype=torch.float32))
                prompts.append("" if drop else (prompts_zh[r] if second else prompts_en[r]))
                stats["empty_prompts"] += int(drop)
                stats["second_prompts"] += int(second and not drop)
            stats["samples"] += len(idx)
            s = torch.cat(times)
            sigma = flow.shift_sigma(scheduler, s, mu)
            x_t, target = flow.flow_pair(x0_all[idx], torch.stack(noises), sigma)
            groups: dict[int, list[int]] = {}
            for j, p in enumerate(prompts):
                groups.setdefault(texts[p].shape[0], []).append(j)
            total = 0.0
            for _, js in sorted(groups.items()):
                jx = torch.tensor(js)
                with _autocast(self.precision):
                    v = model(x_t[jx], torch.stack([texts[prompts[j]] for j in js]), s[jx] * nt,
                              size_t.repeat(len(js), 1), size_t.repeat(len(js), 1), torch.zeros(len(js), 2))
                per = ((v.float() - target[jx]) ** 2).mean(dim=(1, 2, 3))
                (per.sum() / len(idx)).backward()
                total += float(per.detach().sum())
            return {"loss": total / len(idx)}

        def row(mean: dict, grad_norm) -> tuple[dict, str]:
            return {"loss": mean["loss"], "grad_norm": grad_norm, "lr": opt.lr}, f"loss {mean['loss']:.4f}"

        with _training_attention(self.attention):
            log_rows, train_seconds = self._train("base", opt, steps, step, max(1, sec.log_every), row, stats)

        opt.ema.swap()  # export the EMA weights
        base.eval().requires_grad_(False)
        _save_bf16_into_place(base, self.model_dir / "transformer")
        atomic_write_text(self.out / "base" / "train_log.json", json.dumps(log_rows, indent=1) + "\n")
        metrics = {
            "params": _n_params(base), "steps": steps, "batch_size": bs, "image_tokens": seq_len,
            "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / steps, 3),
            "encode_seconds": round(enc_seconds, 1), "prompts": len(texts), **stats,
            "last_loss": log_rows[-1]["loss"] if log_rows else None,
        }
        if sec.eval_samples > 0:
            summary = self._quick_eval(None, sec.eval_samples, sec.eval_steps, "none")
            metrics["val_t2i"] = summary.get("t2i")
        self._release("base")
        return metrics

    # ---- the training loop of the VAE and base phases -------------------------------------
    def _train(self, phase: str, opt, steps: int, step: Callable[[int], dict], log_every: int,
               row: Callable[[dict, float | None], tuple[dict, str]], stats: dict | None = None) -> tuple[list, float]:
        """Train `phase` for `steps` with the stage trainer's loop (train.trainer.train_steps), its
        checkpoints in DIR/<phase> every ``checkpoint_every`` steps. Returns (log rows, training seconds)."""
        from .trainer import train_steps

        return train_steps(self._claim(phase, self.out / phase), opt, steps, step, log_every=log_every, row=row,
                           checkpoint_every=getattr(self.recipe, phase).checkpoint_every, echo=self.echo, name=phase,
                           stats=stats)

    def _quick_eval(self, weights: Path | None, limit: int, steps: int, mode: str) -> dict:
        """train.evaluate's measurements on the first `limit` val scenes, with the shipped files."""
        from .evaluate import evaluate, load_samples

        pipe = self._pipeline(weights)
        samples = load_samples(self.data_dir / "val.jsonl", limit)
        report, _ = evaluate(pipe, samples, steps=steps, guidance=self.recipe.evaluate.guidance,
                             seed=self.seed, reference_mode=mode, segmenter="color")
        keys = ("n", "prompt_adherence", "background_color", "table_color", "pattern", "quality", "object_consistency",
                "product_psnr_raw", "mask_iou", "reference_similarity", "reference_pixel_similarity")
        return {m: {k: body["summary"].get(k) for k in keys if body["summary"].get(k) is not None}
                for m, body in report["modes"].items()}

    # ---- 5. stage 1 and 2 ---------------------------------------------------------------
    def stage_config(self, stage: int):
        from .config import apply_overrides, load_config, validate

        sec: StageRecipe = getattr(self.recipe, f"stage{stage}")
        path = REPO / sec.config
        out = self.out / f"stage{stage}"
        overrides = [
            f"model.base={self.model_dir}",
            f"model.base_model_name={BASE_MODEL_NAME}",
            f"data.manifest={self.data_dir / 'train.jsonl'}",
            f"validation.manifest={self.data_dir / 'val.jsonl'}",
            f"checkpoint.output_dir={out}",
            f"cache.dir={self.out / 'cache'}",
            f"train.seed={self.seed}",
        ]
        if stage == 2:
            overrides.append(f"model.stage1_weights={self.out / 'stage1' / 'dreampainter_stage1.safetensors'}")
        # The budget scales the steps the recipe asks for: the stage file's, or the recipe's own override.
        cfg = load_config(stage, path, overrides + sec.overrides)
        steps = _scaled(cfg.train.max_steps, self.scale)
        cfg = apply_overrides(cfg, [f"train.max_steps={steps}"])
        derived = [
            f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps // 5)}",
            f"validation.every={max(1, steps // max(1, sec.validations))}",
            f"checkpoint.every={min(cfg.checkpoint.every, steps)}" if cfg.checkpoint.every > 0 else "checkpoint.every=0",
            "checkpoint.export_dtype=bf16",
            f"model.dtype={self.precision}",
            f"train.mixed_precision={'bf16' if self.precision == 'bf16' else 'no'}",
        ]
        return validate(apply_overrides(cfg, derived))

    def _stage(self, stage: int) -> dict:
        from .config import dump_toml
        from .trainer import run

        cfg = self.stage_config(stage)
        out = self._claim(f"stage{stage}", Path(cfg.checkpoint.output_dir))
        (out / "miniature_config.toml").write_text(dump_toml(cfg), encoding="utf-8")
        t0 = time.perf_counter()
        with _training_attention(self.attention):
            result = run(cfg, echo=lambda m: self.echo(f"[stage{stage}] {m}"))
        train_seconds = time.perf_counter() - t0
        if result.export_path is None or not Path(result.export_path).is_file():
            raise RecipeError(f"stage {stage} did not export a weight file")
        metrics = {
            "steps": result.step, "batch_size": cfg.train.batch_size, "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, result.step), 3),
            "trainable_params": result.stats.get("trainable_params"),
            "probe_loss": [[s, round(v, 5)] for s, v in result.probe_losses],
            "last_loss": result.losses[-1][1] if result.losses else None,
            "export": str(result.export_path), "validation_grids": [str(p) for p in result.validation_images],
        }
        if stage == 2:
            metrics["references_used"] = result.stats.get("references_used")
        limit = getattr(self.recipe, f"stage{stage}").eval_samples
        if limit > 0:
            metrics["val"] = self._quick_eval(Path(result.export_path), limit, self.recipe.evaluate.steps,
                                              "none" if stage == 1 else "both")
        return metrics

    def phase_stage1(self) -> dict:
        return self._stage(1)

    def phase_stage2(self) -> dict:
        return self._stage(2)

    # ---- 6. export ----------------------------------------------------------------------
    def phase_export(self) -> dict:
        from safetensors import safe_open

        src = self.out / "stage2" / "dreampainter_stage2.safetensors"
        tmp = self.weights_path.with_name(f".{WEIGHTS_NAME}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, self.weights_path)
        dtypes: dict[str, set] = {}
        for f in sorted(self.model_dir.rglob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                dtypes[str(f.relative_to(self.model_dir))] = {str(st.get_slice(k).get_dtype()) for k in st.keys()}
        not_bf16 = {k: sorted(v) for k, v in dtypes.items() if v != {"BF16"}}
        if not_bf16:
            raise RecipeError(f"weights not stored in bf16: {not_bf16}")
        files = {str(f.relative_to(self.model_dir)): f.stat().st_size for f in sorted(self.model_dir.rglob("*")) if f.is_file()}
        total = sum(files.values())
        limit = self.recipe.export.max_mb * 1e6
        if total > limit:
            raise RecipeError(f"{self.model_dir} holds {total / 1e6:.2f} MB, over the {limit / 1e6:g} MB limit")
        pipe = self._pipeline(self.weights_path)  # loads: base + DreamPainter file
        info = {
            "made_by": "python -m train.miniature", "recipe_version": RECIPE_VERSION, "seed": self.seed,
            "smoke": self.recipe.smoke, "budget_minutes": self.budget,
            "weights": WEIGHTS_NAME, "base_model_name": BASE_MODEL_NAME,
            "params": {"transformer": _n_params(pipe.transformer.base), "vae": _n_params(pipe.vae),
                       "text_encoder": _n_params(pipe.text_encoder),
                       "dreampainter": sum(v.numel() for v in pipe.transformer.control_state_dict().values())
                       + sum(v.numel() for v in pipe.transformer.lora_state_dict().values())},
            "resolution": self.recipe.data.size,
            "data": {"scene_version": self.recipe.data.scene_version, "count": self.recipe.data.count,
                     "splits": self.recipe.data.splits},
            "sampling": self.sampling(),
        }
        atomic_write_text(self.model_dir / "miniature.json", json.dumps(info, indent=2) + "\n")
        total += (self.model_dir / "miniature.json").stat().st_size
        return {"total_mb": round(total / 1e6, 3), "files_mb": {k: round(v / 1e6, 3) for k, v in files.items() if v > 10_000},
                "supports_reference": pipe.transformer.supports_reference, **info["params"]}

    # ---- 7. evaluate --------------------------------------------------------------------
    def phase_evaluate(self) -> dict:
        from .evaluate import main as evaluate_main, sampling_args

        e = self.recipe.evaluate
        eval_dir = self.out / "eval"
        sampling = self.sampling()  # what export wrote into miniature.json
        common = ["--model", str(self.model_dir), "--weights", str(self.weights_path),
                  "--manifest", str(self.data_dir / "test.jsonl"), "--steps", str(sampling["steps"]),
                  "--guidance", str(sampling["guidance"]), "--seed", str(self.seed), "--segmenter", "color",
                  "--dtype", self.precision, "--plot", e.plot]
        common += sampling_args(sampling)
        t0 = time.perf_counter()
        rc = evaluate_main(common + ["--out", str(eval_dir / "report.json"), "--limit", str(e.limit),
                                     "--reference-mode", "both"] + (["--roundtrip"] if e.roundtrip else []))
        if rc != 0:
            raise RecipeError(f"train.evaluate failed (exit {rc})")
        main_seconds = time.perf_counter() - t0
        report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
        metrics: dict[str, Any] = {"report": str(eval_dir / "report.json"), "seconds_main": round(main_seconds, 1),
                                   "n": report["n_samples"], "resolution": report["resolution"]}
        for mode, body in report["modes"].items():
            metrics[mode] = {k: v for k, v in body["summary"].items() if not k.endswith("_n")}
        if report.get("comparison"):
            metrics["comparison"] = report["comparison"]
        if e.sweeps and e.sweep_limit > 0:
            t1 = time.perf_counter()
            args = common + ["--out", str(eval_dir / "sweep.json"), "--limit", str(e.sweep_limit),
                             "--reference-mode", "manifest", "--sweep-values", e.sweep_values]
            for s in e.sweeps:
                args += ["--sweep", s]
            rc = evaluate_main(args)
            if rc != 0:
                raise RecipeError(f"train.evaluate (sweeps) failed (exit {rc})")
            sw = json.loads((eval_dir / "sweep.json").read_text(encoding="utf-8"))
            metrics["sweeps"] = {
                p: [{k: pt.get(k) for k in ("value", "reference_similarity", "quality", "prompt_adherence",
                                            "object_consistency", "wall_tone", "pattern_patterned")}
                    for pt in body["points"]]
                for p, body in sw["sweeps"].items()}
            metrics["seconds_sweeps"] = round(time.perf_counter() - t1, 1)
        if e.mask_guidance_limit > 0:
            from .compare import compare

            t1 = time.perf_counter()
            rc = evaluate_main(common + ["--out", str(eval_dir / "mask_guidance.json"), "--limit",
                                         str(e.mask_guidance_limit), "--reference-mode", "both", "--mask-guidance"])
            if rc != 0:
                raise RecipeError(f"train.evaluate (mask guidance) failed (exit {rc})")
            on = json.loads((eval_dir / "mask_guidance.json").read_text(encoding="utf-8"))
            metrics["mask_guidance"] = {mode: compare(report, on, mode) for mode in on["modes"]}
            metrics["seconds_mask_guidance"] = round(time.perf_counter() - t1, 1)
        return metrics


def _short(metrics: dict) -> dict:
    """The headline numbers of a phase for the log line."""
    keep = ("steps", "seconds_per_step", "val_psnr_db", "val_psnr_product_db", "last_loss", "total_mb", "train",
            "probe_loss", "val_t2i", "val", "t2i", "tr2i")
    out = {}
    for k in keep:
        if k in metrics:
            v = metrics[k]
            if k == "probe_loss" and isinstance(v, list) and v:
                v = [v[0], v[-1]]
            out[k] = v
    return out


def _demo_inputs(data_dir: Path, demo_dir: Path) -> dict:
    """Demo inputs from the held-out test split: test scene 0's photo and mask (the product), and a
    new background, the one of the first test scene with a patterned wall (stripes, checks or dots) and
    another background and stand colour (and a stand unlike the product):
    its reference image (the background without product) and a prompt naming it with scene 0's product."""
    from .synthetic import scene_prompt

    records = [json.loads(line) for line in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines() if line]
    product = records[0]
    scene_a = product["scene"]
    if len(records) < 2:
        raise RecipeError(f"{data_dir / 'test.jsonl'} needs at least two scenes for the demo inputs")

    def differs(r: dict) -> int:  # how many of the wanted differences the candidate background has
        sc = r["scene"]
        return (int(sc["background"]["color"] != scene_a["background"]["color"])
                + int(sc["table"]["color"] != scene_a["table"]["color"])
                + int(sc["table"]["color"] != scene_a["product"]["color"]))

    # A reference with a visible pattern, so the demo shows whether TR2I copies more than the colour.
    patterned = [r for r in records[1:] if r["scene"]["background"]["pattern"] in ("stripes", "checker", "dots")]
    other = max(patterned or records[1:], key=differs)  # the first such scene with the most differences
    scene = copy.deepcopy(other["scene"])
    scene["product"] = copy.deepcopy(scene_a["product"])
    en, zh = scene_prompt(scene)
    demo_dir.mkdir(parents=True, exist_ok=True)
    for src, name in ((product["image"], "product.png"), (product["mask"], "mask.png"), (other["reference"], "reference.png")):
        atomic_write_bytes(demo_dir / name, (data_dir / src).read_bytes())
    spec = {"made_by": "python -m train.miniature --embed (test split of its synthetic data)",
            "product": "product.png", "mask": "mask.png", "reference": "reference.png",
            "prompt": en, "prompt_zh": zh, "size": int(scene_a["size"][0]),
            "product_scene": product["id"], "background_scene": other["id"]}
    atomic_write_text(demo_dir / "demo.json", json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    return spec


def embed(run_dir, models_dir=None, docs_dir=None) -> dict:
    """Copy a finished run's model into the pack as the embedded default (dreampainter_core.embedded):
    the base folder, the DreamPainter file, demo inputs, and the evaluation report into docs/miniature/."""
    from dreampainter_core import embedded as E

    run_dir = Path(run_dir)
    models_dir = Path(models_dir) if models_dir is not None else E.MODELS_DIR
    docs_dir = Path(docs_dir) if docs_dir is not None else REPO / "docs" / "miniature"
    model_dir = run_dir / "model"
    if not (run_dir / "phases" / "evaluate.json").is_file():
        raise RecipeError(f"{run_dir} has not finished (no phases/evaluate.json): run the recipe to the end first")
    base_dst = models_dir / "diffusers" / E.BASE_NAME
    tmp = base_dst.with_name(f".{E.BASE_NAME}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns(WEIGHTS_NAME, ".*"))
    _replace_dir(tmp, base_dst)
    weights_dst = models_dir / "dreampainter" / E.WEIGHTS_NAME
    weights_dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights_dst, (model_dir / WEIGHTS_NAME).read_bytes())
    spec = _demo_inputs(run_dir / "data", models_dir / "miniature_demo")
    docs_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted((run_dir / "eval").glob("*")):
        if f.is_file() and f.suffix in (".json", ".png"):
            atomic_write_bytes(docs_dir / f.name, f.read_bytes())
            copied.append(f.name)
    atomic_write_bytes(docs_dir / "summary.json", (run_dir / "summary.json").read_bytes())
    size = sum(f.stat().st_size for f in base_dst.rglob("*") if f.is_file()) + weights_dst.stat().st_size
    return {"base": str(base_dst), "weights": str(weights_dst), "total_mb": round(size / 1e6, 3),
            "demo_prompt": spec["prompt"], "docs": copied}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.miniature", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (phases already done there are skipped)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="scale every training phase's steps by this / the recipe's budget_minutes (240)")
    p.add_argument("--smoke", action="store_true", help="a handful of samples and steps per phase (CI)")
    p.add_argument("--until", choices=PHASES, default=None, help="stop after this phase")
    p.add_argument("--recipe", default=None, help=f"recipe TOML (default {DEFAULT_RECIPE.relative_to(REPO)})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one recipe setting (TOML value), e.g. --set vae.steps=3000; repeatable")
    p.add_argument("--embed", action="store_true",
                   help="when finished, install the model as the pack's embedded default (models/, docs/miniature/)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        recipe = load_recipe(a.recipe, smoke=a.smoke, overrides=a.set)
        mini = Miniature(a.out, recipe, a.budget_minutes)
        summary = mini.run(a.until)
    except DreamPainterError as e:  # RecipeError, a stage's config, a training or checkpoint error
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(summary['phases'])} phases, {summary['seconds_all_phases']:.0f} s in all "
          f"({summary['seconds_this_run']:.0f} s this run); model: {mini.model_dir}; summary: {mini.out / 'summary.json'}")
    if a.embed:
        if a.until is not None or a.smoke:
            print("error: --embed needs a full run (no --until, no --smoke)", file=sys.stderr)
            return 2
        try:
            info = embed(mini.out)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"embedded: {info['base']} + {info['weights']} ({info['total_mb']} MB); report in docs/miniature/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
