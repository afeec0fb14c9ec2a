"""Per-step progress, preview images and cancellation for the sampler.

Previews use a linear latent -> RGB map (like ComfyUI's latent2rgb previews). CogView4 has no
published factors, so the map is fitted once per VAE by least squares: a synthetic image of
random colour patches is VAE-encoded and the patch colours are regressed on the latents.
Previews follow ComfyUI's ``--preview-method`` (``none``: progress only) and ``--preview-size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

import comfy.model_management as mm
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args


def previews_enabled() -> bool:
    return args.preview_method != LatentPreviewMethod.NoPreviews


@torch.no_grad()
def fit_preview_map(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [C, 3], bias [3]) mapping a latent vector to RGB in -1..1 for ``pipe.vae``."""
    factor = pipe.vae_scale_factor
    cells = 16
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(1, cells, cells, 3, generator=gen)
    # each colour patch covers 2x2 latent cells, so interior latents see one flat colour
    image = colours.repeat_interleave(2 * factor, dim=1).repeat_interleave(2 * factor, dim=2)
    latents = pipe.encode_image(image).float().cpu()  # [1, C, 2*cells, 2*cells]
    target = F.interpolate(image.permute(0, 3, 1, 2) * 2 - 1, size=latents.shape[-2:], mode="area")
    x = latents[0].flatten(1).T  # [N, C]
    y = target[0].flatten(1).T  # [N, 3]
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    sol = torch.linalg.lstsq(x1.double(), y.double()).solution.float()
    return sol[:-1], sol[-1]


def latent_to_preview(latent: torch.Tensor, preview_map) -> Image.Image:
    weights, bias = preview_map
    x = latent.detach().float().cpu()  # [C, h, w]
    rgb = torch.einsum("chw,cr->hwr", x, weights) + bias
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    return Image.fromarray(rgb)


class SamplerProgress:
    """The pipeline's per-step callback: cancel check, progress bar, preview."""

    def __init__(self, total: int, preview_map=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.preview_map = preview_map

    def __call__(self, info) -> None:
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if self.preview_map is not None and info.denoised is not None:
            preview = ("JPEG", latent_to_preview(info.denoised[0], self.preview_map), args.preview_size)
        self.bar.update_absolute(info.step + 1, info.total, preview)
