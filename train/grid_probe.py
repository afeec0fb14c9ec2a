"""At which noise level does a model draw the token-grid artifact? One-step predictions from the truth.

    python -m train.grid_probe --model runs/v3/model [--weights FILE] --manifest runs/v3/data/val.jsonl \\
        [--limit 100] [--times 0.05,0.1,0.2,0.4,0.7,0.95] [--out grid_probe.json]

For each synthetic scene with a plain wall, the true image is encoded, noised to each sampler time s
(sigma = the scheduler's shift of s, as the sampler and train.flow use it; flow matching: x_t =
(1 - sigma) x0 + sigma noise, a fixed noise per scene), and the model predicts
x0 in one step (x_t - sigma v, with the scene's prompt, no guidance). The prediction is decoded and
metrics.plain_wall_measures taken on the wall (grid energy, its part tied to the grid, unevenness), as
train.evaluate does on generated images; the VAE round trip is the floor. If the grid is already there
at low noise, the model's last denoising steps draw it (more training at low noise is the lever); if
only at high noise, the layout steps leave it and the low-noise steps fail to remove it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dreampainter_core.errors import DreamPainterError
from dreampainter_core.fileio import atomic_write_text

from . import flow
from . import metrics as M
from .evaluate import load_pipeline, load_samples

DEFAULT_TIMES = (0.05, 0.1, 0.2, 0.4, 0.7, 0.95)


@torch.no_grad()
def grid_probe(pipe, samples, times=DEFAULT_TIMES, seed: int = 0) -> dict:
    """{"vae": {measure: mean over the round trips}, "times": {s: {"sigma", measure: mean over the one-step
    x0s}}, "n": scenes}; the measures are metrics.PLAIN_WALL_MEASURES."""
    plain = [s for s in samples if s.scene is not None and s.scene["background"]["pattern"] == "plain"]
    if not plain:
        raise DreamPainterError("no scene with a plain wall among the samples: grid_probe needs train.synthetic "
                                "scenes (a manifest with 'scene' entries)")
    nt = pipe.scheduler.config.num_train_timesteps
    model = pipe.transformer
    dtype = next(model.parameters()).dtype
    use_control = model.has_branch_for("background")  # the control branch sees the product, as at inference
    rows: dict = {"vae": [], **{t: [] for t in times}}
    sigma_of: dict[float, torch.Tensor] = {}
    for s in plain:
        x0 = pipe.encode_image(s.image)
        if not sigma_of:  # the sampler's shift for this many image tokens (every scene has the same size)
            mu = flow.mu_for(pipe.scheduler, (x0.shape[-2] // model.patch_size) * (x0.shape[-1] // model.patch_size))
            sigma_of = {t: flow.shift_sigma(pipe.scheduler, torch.tensor([t]), mu) for t in times}
        region = s.regions["wall"]
        rows["vae"].append(M.plain_wall_measures(pipe.decode(x0)[0], s.image[0], region))
        embeds = pipe.encode_prompt([s.prompt])
        g = torch.Generator().manual_seed(seed + s.index)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.dtype)
        size = torch.tensor([[s.image.shape[1], s.image.shape[2]]], dtype=torch.float32)
        control_latents = None
        if use_control:
            foreground = torch.where(s.mask[..., None] > 0.5, s.image, torch.ones_like(s.image))
            control_latents = pipe.prepare_control(foreground, s.mask).to(dtype)
        for time in times:
            sig = sigma_of[time]
            x_t, _ = flow.flow_pair(x0.float(), noise.float(), sig)
            v = model(x_t.to(dtype), embeds.to(dtype), torch.tensor([time * nt]), size, size,
                      torch.zeros(1, 2), control_latents=control_latents)
            pred = x_t - sig.view(-1, 1, 1, 1) * v.float()
            rows[time].append(M.plain_wall_measures(pipe.decode(pred)[0], s.image[0], region))

    def means(measured):
        out = {}
        for k in M.PLAIN_WALL_MEASURES:
            vals = [m[k] for m in measured if m[k] is not None]
            out[k] = float(np.mean(vals)) if vals else None
        return out

    return {"n": len(plain), "vae": means(rows["vae"]),
            "times": {str(t): {"sigma": round(float(sigma_of[t]), 4), **means(rows[t])} for t in times}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.grid_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="CogView4 base folder (diffusers layout)")
    p.add_argument("--weights", default=None, help="DreamPainter file (its control branch sees the product)")
    p.add_argument("--manifest", required=True, help="a train.synthetic manifest (val.jsonl)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--times", default=",".join(str(s) for s in DEFAULT_TIMES), help="sampler times s in (0, 1]")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--out", default=None, help="write the result here (.json)")
    a = p.parse_args(argv)
    try:
        times = tuple(float(v) for v in a.times.split(","))
        if not all(0.0 < t <= 1.0 for t in times):
            raise DreamPainterError(f"--times must be in (0, 1], got {a.times}")
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        pipe = load_pipeline(a.model, a.weights, dtype=dtype)
        result = grid_probe(pipe, load_samples(Path(a.manifest), a.limit), times)
    except (DreamPainterError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(model=a.model, weights=a.weights, manifest=a.manifest, limit=a.limit)
    print(f"{result['n']} plain walls; grid energy / grid excess / wall unevenness of the VAE round trip: "
          f"{_triple(result['vae'])}; of the one-step x0 at")
    for k, v in result["times"].items():
        print(f"  s {k} (sigma {v['sigma']}): {_triple(v)}")
    if a.out:
        atomic_write_text(Path(a.out), json.dumps(result, indent=2) + "\n")
    return 0


def _triple(m: dict) -> str:
    return " / ".join("-" if m[k] is None else f"{m[k]:.2e}" for k in M.PLAIN_WALL_MEASURES)


if __name__ == "__main__":
    raise SystemExit(main())
