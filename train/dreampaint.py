"""DreamPaint: learn one catalog product from its 3-10 catalog images (masked DreamBooth), for pipe.insert.

    python -m train.dreampaint --images DIR --class-noun "cup" --out products/cup.safetensors \\
        [--base CogView4-6B/ | --base embedded] [--weights dreampainter.safetensors] [--identifier sks]
        [--learn-token] [--steps 400] [--lr 1e-4] [--rank 16] [--prior-preservation] [--auto-mask]

The catalog: the images directly in DIR (png, jpg, webp, ...), each with its product mask in
DIR/masks/ (``<stem>.<ext>`` or ``<stem>_mask.<ext>``, as train.data build pairs them); images without
one are cut out with rembg when --auto-mask is given (dreampainter_core.auto_mask; the masks are written
to the run folder). Each image is scaled to fit the training square and padded with its own border
pixels. At least 2 images; 3-10 as in the paper.

Training (the paper's section 3.4, on this stack):

* prompt "a <identifier> <class noun>": a rare identifier before the class noun (DreamBooth);
* each step draws an image and an insertion mask over its product: a rectangle, an ellipse or the
  object's own (grown) silhouette, in equal shares (train.insertion_masks), and the flow-matching
  loss of the sampler's convention (train.flow) counts only the latents under that mask (weighted by
  the mask's coverage of each latent pixel). That is what the inpainting module asks of the model:
  the known-region sampler holds the rest of the image on its own noised path, an insertion branch
  (--weights with task insertion) sees it as its condition, which training feeds it the same way;
* trained: a LoRA on the DiT blocks (the peft adapter "product", beside a stage-2 LoRA, which stays
  on and frozen as insertion will run it) and, with --learn-token, the identifier's embedding
  (dreampainter_core.tokens) instead of fine-tuning the 9B text encoder. The base, the DreamPainter
  file's weights and GLM are frozen and stay bit-identical;
* no prior-preservation loss by default (the paper: it hurts on e-commerce items); with
  --prior-preservation the model first draws --prior-images images of "a <class noun>" itself, and
  each step adds their loss (whole image, weight --prior-weight) with that prompt.

Through the project's trainer: train.trainer.Optimization (AdamW, schedule, clipping) and
train.trainer.train_steps (checkpoints in the trainer's format every --checkpoint-every steps in the
run folder, default <out>.run/; a rerun with the same settings resumes exactly, other settings are
refused). Every draw is keyed by (seed, step), so a resumed run ends with the weights of one that was
never interrupted. The product file (dreampainter_core.product_lora) is written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from dreampainter_core.errors import DreamPainterError, InputError
from dreampainter_core.fileio import atomic_path, atomic_write_text
from dreampainter_core.product_lora import (DEFAULT_PRODUCT_TARGETS, ProductLoRA, base_identity, product_prompt,
                                            save_product_lora)
from dreampainter_core.tokens import check_token_string, init_token
from dreampainter_core.transformer import PRODUCT_ADAPTER

from . import flow
from .config import ConfigError, OptimConfig, claim_run_dir
from .data import AUTO_MASK_MODEL, _AUX_STEM, _auto_mask, _index_by_stem, _list_images, find_masks
from .insertion_masks import MASK_SHAPES, draw_insertion_hole
from .manifest import ManifestError, Sample, load_sample

__all__ = ["DreamPaintSettings", "CatalogImage", "load_catalog", "train_product", "masked_mse", "main"]

MIN_IMAGES = 2
PAPER_IMAGES = (3, 10)


@dataclass
class DreamPaintSettings:
    """Everything that decides the trained product (the run folder records it; resume needs the same)."""

    class_noun: str
    identifier: str = "sks"
    steps: int = 400
    lr: float = 1e-4
    rank: int = 16
    alpha: float = 0.0  # 0 = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_PRODUCT_TARGETS))
    learn_token: bool = False
    token_lr_scale: float = 50.0  # the token's lr = lr x this (textual inversion learns at ~5e-3)
    resolution: int = 0  # the training square's side; 0 = 1024 for CogView4-size models, 128 for small ones
    batch_size: int = 1
    prior_preservation: bool = False
    prior_images: int = 8
    prior_weight: float = 1.0
    prior_steps: int = 20
    prior_guidance: float = 3.5
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    max_grad_norm: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def check(self) -> "DreamPaintSettings":
        check_token_string(self.identifier)
        if not isinstance(self.class_noun, str) or not self.class_noun.strip():
            raise InputError("--class-noun: give the product's class, e.g. 'cup' or 'sofa' (the paper: 'a [V] couch')")
        for name, value, low in (("steps", self.steps, 1), ("rank", self.rank, 1), ("batch_size", self.batch_size, 1),
                                 ("prior_images", self.prior_images, 1), ("log_every", self.log_every, 1)):
            if value < low:
                raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if not self.lr > 0 or not self.token_lr_scale > 0 or self.prior_weight < 0:
            raise InputError("--lr and the token's lr scale must be > 0, --prior-weight >= 0")
        if self.resolution and self.resolution % 16:
            raise InputError(f"--resolution {self.resolution}: a multiple of 16 px (VAE 8 x patch 2)")
        return self

    @property
    def prompt(self) -> str:
        return product_prompt(self.identifier, self.class_noun.strip())

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun.strip()}"


# ---------------------------------------------------------------------------------------
# the catalog


@dataclass
class CatalogImage:
    name: str
    image: torch.Tensor  # [S, S, 3] 0..1, the training square
    mask: np.ndarray  # bool [S, S], the product


def _fit_square(image: Image.Image, mask: np.ndarray, side: int) -> tuple[torch.Tensor, np.ndarray]:
    """Scale the longer side to `side`, pad the rest with the image's own border pixels (catalog shots
    are mostly on a plain backdrop) and the mask with background."""
    w, h = image.size
    scale = side / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = np.asarray(image.resize((nw, nh), Image.LANCZOS), np.float32) / 255.0
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)) >= 128
    top, left = (side - nh) // 2, (side - nw) // 2
    pad = ((top, side - nh - top), (left, side - nw - left))
    img = np.pad(img, pad + ((0, 0),), mode="edge")
    return torch.from_numpy(img), np.pad(m, pad)


def load_catalog(images_dir, side: int, auto_mask: bool = False, mask_dir=None, echo=print) -> list[CatalogImage]:
    """The catalog images of a product folder with their masks, at the training square (module doc).
    Errors name the image and what to do; nothing loads a model."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise InputError(f"--images {folder}: not a folder (give the folder with the product's catalog images)")
    images = [p for p in _list_images(folder) if not _AUX_STEM.search(p.stem)]
    if len(images) < MIN_IMAGES:
        raise InputError(f"--images {folder}: {len(images)} catalog image(s); DreamPaint learns a product from at "
                         f"least {MIN_IMAGES} views (the paper uses {PAPER_IMAGES[0]}-{PAPER_IMAGES[1]}). Add images "
                         "of the product from other angles.")
    index = _index_by_stem(folder / "masks") if (folder / "masks").is_dir() else {}
    missing = [p for p in images if not find_masks(p.stem, index, p)]
    masker = None
    if missing and not auto_mask:
        raise InputError(f"no mask for {', '.join(p.name for p in missing)} in {folder / 'masks'} (<stem>.png or "
                         "<stem>_mask.png, white = product). Add the masks, or pass --auto-mask to cut the product out "
                         "with rembg.")
    if missing:
        from dreampainter_core.auto_mask import rembg_masker

        masker = rembg_masker(AUTO_MASK_MODEL, "--auto-mask", "Or put masks into DIR/masks/.")
        mask_dir = Path(mask_dir or folder / "masks")
        mask_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in images:
        masks = find_masks(path.stem, index, path)
        if not masks:
            written = mask_dir / f"{path.stem}.png"
            with atomic_path(written) as tmp:
                Image.fromarray(_auto_mask(masker, path).astype(np.uint8) * 255).save(tmp, format="PNG")
            echo(f"auto mask (rembg {AUTO_MASK_MODEL}) for {path.name}: {written}")
            masks = [written]
        sample = Sample(image=str(path), masks=tuple(str(m) for m in masks), prompt="catalog image")
        try:
            loaded = load_sample(sample, with_reference=False)
        except ManifestError as exc:
            raise InputError(f"catalog image {path.name}: {exc}") from None
        image, mask = _fit_square(loaded.image, loaded.mask, side)
        out.append(CatalogImage(path.name, image, mask))
    if not PAPER_IMAGES[0] <= len(out) <= PAPER_IMAGES[1]:
        echo(f"note: {len(out)} catalog images; the paper uses {PAPER_IMAGES[0]}-{PAPER_IMAGES[1]} views per product")
    return out


# ---------------------------------------------------------------------------------------
# the loss


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the latents under the mask: ``weight`` [B, 1, h, w] is each
    latent pixel's mask coverage (0 = not counted at all); [B]."""
    err = (prediction.float() - target) ** 2 * weight
    return err.sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)).clamp_min(1e-8) * prediction.shape[1])


class _Trained(nn.Module):
    """What Optimization names in checkpoints: the transformer (its product adapter trains) and the
    learned identifier's embedding, if any."""

    def __init__(self, transformer, token_embedding: nn.Parameter | None):
        super().__init__()
        self.transformer = transformer
        if token_embedding is not None:
            self.token_embedding = token_embedding


def _settings_record(settings: DreamPaintSettings, catalog: list[CatalogImage], base: str, weights: str | None) -> dict:
    images = [{"name": c.name, "sum": round(float(c.image.double().sum()), 6), "mask": int(c.mask.sum())} for c in catalog]
    return {"settings": asdict(settings), "base": str(base), "weights": weights, "catalog": images}


def _prior_latents(pipe, settings: DreamPaintSettings, side: int, echo) -> torch.Tensor:
    """The model's own images of "a <class noun>" (latents), for prior preservation."""
    from dreampainter_core.options import SamplingOptions

    cond = pipe.encode_prompt([settings.class_prompt])
    negative = pipe.encode_prompt([""])
    out = []
    for k in range(settings.prior_images):
        sampling = SamplingOptions(steps=settings.prior_steps, guidance_scale=settings.prior_guidance,
                                   seed=settings.seed * 1000 + k)
        shape = (1, pipe.transformer.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(sampling.seed))
        out.append(pipe.sample(noise, cond, negative, height=side, width=side, sampling=sampling))
    echo(f"prior preservation: {settings.prior_images} images of {settings.class_prompt!r} drawn by the model")
    return torch.cat(out).float()


def train_product(pipe, catalog: list[CatalogImage], settings: DreamPaintSettings, out, *, run_dir=None,
                  base_model: str = "", weights: str | None = None, base_source: str = "",
                  echo: Callable[[str], None] = print, autocast=None) -> tuple[ProductLoRA, dict]:
    """Train a product on `pipe` (a DreamPainterPipeline: its base, its DreamPainter file if any) from its
    `catalog` and write the product file `out`. Returns (the ProductLoRA, a report: steps, seconds, loss
    log, the mask shapes drawn)."""
    from .trainer import Optimization, train_steps

    settings.check()
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else out.with_suffix(".run")
    claim_run_dir(run_dir, _settings_record(settings, catalog, base_source or base_model, weights), "DreamPaint")
    model, device = pipe.transformer, pipe.device
    side = int(catalog[0].image.shape[0])
    autocast = autocast or (lambda: torch.autocast(device.type, enabled=False))
    use_branch = model.has_branch_for("insertion")

    # Frozen conditioning, computed once: the catalog's latents, the class prompt, the prior images.
    with torch.no_grad():
        x0 = torch.cat([pipe.encode_image(c.image[None].to(device)) for c in catalog])
        class_text = pipe.encode_prompt([settings.class_prompt])[0]
        fixed_text = None if settings.learn_token else pipe.encode_prompt([settings.prompt])[0]
        prior = _prior_latents(pipe, settings, side, echo) if settings.prior_preservation else None

    token = None
    if settings.learn_token:
        token = init_token(pipe.tokenizer, pipe.text_encoder, settings.identifier, init_word=settings.class_noun,
                           base_model=base_model)
        token.embedding = nn.Parameter(token.embedding.to(device))
    model.requires_grad_(False)  # the base, a DreamPainter file's branch and LoRA: frozen, bit-identical
    model.set_lora_scale(1.0)  # a stage-2 LoRA as insertion runs it by default
    with torch.random.fork_rng(devices=[]):  # peft draws LoRA A from the global generator: seed it
        torch.manual_seed(settings.seed)
        model.add_product_adapter(settings.rank, settings.alpha or settings.rank, settings.targets, torch.float32)
    model.set_active_adapters(model.resting_adapters() + [PRODUCT_ADAPTER])
    for param in model.product_parameters().values():
        param.requires_grad_(True)
    trained = _Trained(model, token.embedding if token is not None else None)
    params = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    optim = OptimConfig(lr=settings.lr, weight_decay=0.0, max_grad_norm=settings.max_grad_norm, scheduler="constant")
    opt = Optimization(trained, params, optim, settings.steps, lr_scales={"token_embedding": settings.token_lr_scale})

    scheduler = pipe.scheduler
    seq_len = (side // pipe.vae_scale_factor // model.patch_size) ** 2
    mu = flow.mu_for(scheduler, seq_len)
    nt = scheduler.config.num_train_timesteps
    size = torch.tensor([[side, side]], dtype=model.dtype, device=device)
    crop = torch.zeros(1, 2, dtype=model.dtype, device=device)
    n = len(catalog)
    stats = {"samples": 0, **{f"mask_{s}": 0 for s in MASK_SHAPES}}

    def velocity(x_t, text, s, control=None):
        with autocast():
            return model(x_t.to(model.dtype), text[None].to(model.dtype), (s * nt).to(device), size, size, crop,
                         control_latents=control)

    def step(i: int) -> dict[str, float]:
        epoch, k = divmod(i * settings.batch_size, n)
        order = np.random.default_rng([settings.seed, 7, epoch]).permutation(n)
        text = fixed_text
        if token is not None:
            from dreampainter_core.pipeline import text_hidden_states

            text = text_hidden_states(pipe.tokenizer, pipe.text_encoder, [settings.prompt], tokens=[token])[0]
        total, prior_total = 0.0, 0.0
        for j in range(settings.batch_size):
            c = order[(k + j) % n]
            g = flow.sample_generator(settings.seed, i, 0, j)
            hole, shape = draw_insertion_hole(catalog[c].mask, np.random.default_rng([settings.seed, i, j]))
            stats[f"mask_{shape}"] += 1
            stats["samples"] += 1
            hole_t = torch.from_numpy(hole).float()[None].to(device)
            s = flow.draw_time(g, "logit_normal", settings.logit_mean, settings.logit_std)
            sigma = flow.shift_sigma(scheduler, s, mu).to(device)
            noise = torch.randn(x0.shape[1:], generator=g)[None].to(device)
            x_t, target = flow.flow_pair(x0[c : c + 1], noise, sigma)
            control = None
            if use_branch:  # the insertion branch's condition, as pipe.fill_hole makes it
                keep = 1.0 - hole_t
                image = catalog[c].image[None].to(device)
                control = pipe.prepare_control(image * keep.unsqueeze(-1) + hole_t.unsqueeze(-1), keep)
            loss = masked_mse(velocity(x_t, text, s, control), target, pipe.latent_mask(hole_t).to(device))
            (loss.sum() / settings.batch_size).backward()
            total += float(loss.detach().sum())
            if prior is not None:
                gp = flow.sample_generator(settings.seed, i, 1, j)
                p = int(torch.randint(len(prior), (1,), generator=gp))
                sp = flow.draw_time(gp, "logit_normal", settings.logit_mean, settings.logit_std)
                noise_p = torch.randn(prior.shape[1:], generator=gp)[None].to(device)
                xp_t, target_p = flow.flow_pair(prior[p : p + 1], noise_p, flow.shift_sigma(scheduler, sp, mu).to(device))
                prior_loss = ((velocity(xp_t, class_text, sp).float() - target_p) ** 2).mean()
                (settings.prior_weight * prior_loss / settings.batch_size).backward()
                prior_total += float(prior_loss.detach())
        values = {"loss": total / settings.batch_size}
        if prior is not None:
            values["prior_loss"] = prior_total / settings.batch_size
        return values

    def row(mean: dict, grad_norm) -> tuple[dict, str]:
        body = {**mean, "grad_norm": grad_norm, "lr": opt.lr}
        return body, " ".join(f"{k} {v:.4f}" for k, v in mean.items())

    model.train()
    try:
        rows, seconds = train_steps(run_dir, opt, settings.steps, step, log_every=settings.log_every, row=row,
                                    checkpoint_every=settings.checkpoint_every, echo=echo, name="dreampaint",
                                    stats=stats)
        lora = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.product_state_dict().items()}
    finally:  # the pipeline goes back as it came (a killed run resumes from its checkpoint)
        model.eval()
        model.remove_product_adapter()
    info = {"trained_steps": str(settings.steps), "catalog_images": str(n), "resolution": str(side),
            "dreampainter_weights": weights or "none", "insertion_branch": str(use_branch),
            "prior_preservation": (f"{settings.prior_images} images, weight {settings.prior_weight:g}"
                                   if settings.prior_preservation else "off"),
            "lr": f"{settings.lr:g}", "seed": str(settings.seed), "made_by": "train.dreampaint"}
    if token is not None:
        token.embedding = token.embedding.detach().to("cpu").clone()
    product = ProductLoRA(settings.identifier, settings.class_noun.strip(), lora, settings.rank,
                          float(settings.alpha or settings.rank), list(settings.targets), base_identity(model, base_model),
                          token, info=info, source=str(out))
    save_product_lora(product, out)
    report = {"steps": settings.steps, "seconds": round(seconds, 1), "log": rows,
              "mask_shares": {s: stats[f"mask_{s}"] / max(1, stats["samples"]) for s in MASK_SHAPES},
              "out": str(out), "run_dir": str(run_dir)}
    echo(f"product {settings.prompt!r} written to {out}")
    return product, report


# ---------------------------------------------------------------------------------------
# CLI


def _resolve_base(base: str) -> tuple[Path, str | None, str]:
    """(base folder, the embedded model's DreamPainter file when base is "embedded", its name)."""
    if base == "embedded":
        from dreampainter_core.embedded import BASE_NAME, embedded_model

        model = embedded_model()
        return model.base, str(model.weights), BASE_NAME
    return Path(base), None, Path(base).resolve().name


def _default_side(base: Path) -> int:
    """The training square when --resolution is not given: 1024 for CogView4-size transformers (its
    makers' size), 128 for the small ones (the miniature's scenes), read from the transformer's config."""
    try:
        cfg = json.loads((Path(base) / "transformer" / "config.json").read_text(encoding="utf-8"))
        return 1024 if cfg["num_attention_heads"] * cfg["attention_head_dim"] >= 1024 else 128
    except (OSError, KeyError, ValueError):
        return 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.dreampaint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of the product's catalog images (masks in DIR/masks/)")
    p.add_argument("--class-noun", required=True, help="the product's class, e.g. cup (prompt: 'a sks cup')")
    p.add_argument("--out", required=True, help="the product file to write (.safetensors)")
    p.add_argument("--base", default="embedded",
                   help="CogView4 diffusers folder, or 'embedded' (the pack's miniature model; default)")
    p.add_argument("--weights", default=None,
                   help="a DreamPainter file to train with (a stage-2 LoRA stays on, frozen; an insertion branch "
                        "sees the context); with --base embedded its own file unless 'none'")
    p.add_argument("--identifier", default="sks", help="the rare word before the class noun (default sks)")
    p.add_argument("--learn-token", action="store_true",
                   help="also learn the identifier's embedding (GLM stays frozen); initialised from the class noun")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--resolution", type=int, default=0, help="training square side (0 = 1024, 128 on small models)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prior-preservation", action="store_true", help="DreamBooth's class prior loss (off: the paper)")
    p.add_argument("--prior-images", type=int, default=8)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--auto-mask", action="store_true", help="cut out products without a mask with rembg")
    p.add_argument("--run-dir", default=None, help="checkpoints and settings (default: <out>.run/)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="frozen weights' dtype (auto: bf16 on a GPU, fp32 on the CPU); the LoRA trains in fp32")
    a = p.parse_args(argv)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        settings = DreamPaintSettings(
            class_noun=a.class_noun, identifier=a.identifier, steps=a.steps, lr=a.lr, rank=a.rank,
            learn_token=a.learn_token, resolution=a.resolution, batch_size=a.batch_size,
            prior_preservation=a.prior_preservation, prior_images=a.prior_images, prior_weight=a.prior_weight,
            seed=a.seed, checkpoint_every=a.checkpoint_every).check()
        base, embedded_weights, base_name = _resolve_base(a.base)
        weights = embedded_weights if a.weights is None else (None if a.weights == "none" else a.weights)
        device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if a.device == "auto" else a.device))
        dtype = torch.bfloat16 if a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda") else torch.float32
        run_dir = Path(a.run_dir) if a.run_dir else Path(a.out).with_suffix(".run")
        side = settings.resolution or _default_side(base)
        catalog = load_catalog(a.images, side, auto_mask=a.auto_mask, mask_dir=run_dir / "masks", echo=echo)
        from dreampainter_core.pipeline import DreamPainterPipeline

        t0 = time.perf_counter()
        pipe = DreamPainterPipeline.from_pretrained(base, dreampainter_weights=weights, dtype=dtype, device=device)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 else None
        _, report = train_product(pipe, catalog, settings, a.out, run_dir=run_dir, base_model=base_name,
                                  weights=None if weights is None else Path(weights).name, base_source=str(base),
                                  echo=echo, autocast=autocast)
    except (DreamPainterError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shares = ", ".join(f"{k} {v:.0%}" for k, v in report["mask_shares"].items())
    echo(f"done: {report['steps']} steps in {time.perf_counter() - t0:.0f} s (masks: {shares})")
    print(report["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
