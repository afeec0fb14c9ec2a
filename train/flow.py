"""The flow-matching training objective, in exactly the convention DreamPainter's sampler uses.

The sampler (``DreamPainterPipeline.schedule``/``sample``, itself identical to diffusers'
``CogView4Pipeline``) walks a time ``s`` from 1 to 0 (``timesteps = linspace(1000, 1, N)``,
``s = timestep / 1000``) and hands the scheduler both: the scheduler SHIFTS the noise level,
``sigma = mu / (mu + (1 / s - 1))`` (CogView4's "linear" time shift, ``mu = sqrt(seq / 256) *
0.75 + 0.25`` for ``seq`` image tokens), while the transformer is conditioned on the
UNSHIFTED ``timestep = 1000 * s``. An Euler step is ``x <- x + (sigma_next - sigma) * v``.
So the training pairs are

    s ~ p(s)                                  (logit-normal or uniform on (0, 1))
    sigma = time_shift(mu(seq_len), s)        (the scheduler's own function and config)
    x_t = (1 - sigma) * x0 + sigma * noise
    target v = noise - x0
    model(x_t, timestep = 1000 * s) ~ v       (plain MSE, no loss weighting)

Note: ``timestep = 1000 * sigma`` would be the convention of a scheduler without dynamic
shifting; CogView4's pipeline passes its own unshifted timesteps, and the base model was
trained that way (CogView4's official fine-tuning code conditions on the unshifted t and
noises with the shifted sigma too), so this module does the same. ``tests/test_train_stage1``
checks it against the sampler's schedule.

Randomness is per sample and does not depend on global RNG state, the rank layout or
resuming: each sample's time, noise and text dropout come from a generator seeded by
(seed, step, micro-batch, position in the global batch).
"""

from __future__ import annotations

import numpy as np
import torch

from dreampainter_core.pipeline import calculate_shift

__all__ = ["sample_generator", "mu_for", "shift_sigma", "draw_time", "into_high_noise", "flow_pair", "PROBE_STEP"]

PROBE_STEP = 2**31 - 1  # the "step" used to seed the fixed probe-loss noise


def sample_generator(seed: int, step: int, micro: int, position: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one sample of one micro-batch of one step (world-size invariant)."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(position), int(salt), 0xD9EA])
    value = int(state.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator("cpu").manual_seed(value)


def mu_for(scheduler, image_seq_len: int, mu: str | float = "dynamic") -> float | None:
    """The shift the sampler uses for this many image tokens (None when the scheduler has no dynamic shift)."""
    cfg = scheduler.config
    if mu != "dynamic":
        return float(mu)
    if not cfg.get("use_dynamic_shifting", False):
        return None
    return calculate_shift(
        image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("base_shift", 0.25), cfg.get("max_shift", 0.75)
    )


def shift_sigma(scheduler, s: torch.Tensor, mu: float | None) -> torch.Tensor:
    """sigma for sampler time s, with the scheduler's own shift (as in its set_timesteps)."""
    s = s.double()
    if scheduler.config.get("use_dynamic_shifting", False) or mu is not None:
        if mu is None:
            raise ValueError("this scheduler shifts dynamically: give mu")
        sigma = scheduler.time_shift(mu, 1.0, s)
    else:
        shift = float(scheduler.config.get("shift", 1.0))
        sigma = shift * s / (1 + (shift - 1) * s)
    return sigma.float()


def draw_time(generator: torch.Generator, sampling: str, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """One sampler time s in (0, 1): logit-normal (SD3's choice) or uniform."""
    if sampling == "logit_normal":
        s = torch.sigmoid(torch.randn(1, generator=generator, dtype=torch.float64) * std + mean)
    elif sampling == "uniform":
        s = torch.rand(1, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}")
    return s.clamp(1e-5, 1.0).float()


def into_high_noise(generator: torch.Generator, s: torch.Tensor, prob: float, start: float) -> torch.Tensor:
    """With probability `prob`, map s from (0, 1) into [start, 1) (else keep it).

    On small latents the layout and colours are readable from x_t except near s = 1, so a
    condition that decides only them (the prompt's colours, the reference's look) pays off
    only there, and uniform times train it too rarely (train/README.md, "text warm-up").
    Draws nothing when prob is 0, so a run without it keeps its random stream.
    """
    if prob <= 0.0:
        return s
    if torch.rand(1, generator=generator).item() < prob:
        return start + (1.0 - start) * s
    return s


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for latents x0 [B, C, H, W], noise like x0, sigma [B]."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0
