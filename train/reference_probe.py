"""Does a stage-2 model use its reference? Flow-matching loss with the right, no and a wrong reference.

    python -m train.reference_probe --model runs/miniature/model \
        --weights runs/miniature/model/dreampainter.safetensors --manifest runs/miniature/data/val.jsonl

For each time s (the sampler's, unshifted) the loss on the background latent cells (outside the
product) is measured with each scene's own reference, with none, and with another scene's (the
references rolled by one), all from the same noise. Read it as:

- right < none: the reference adds what the prompt does not say (the more, the stronger its pull);
- shuffled >> right: the model reads the reference (a wrong one misleads it);
- right far above zero at high s while the background is the reference's: it does not copy it.

Needs a manifest whose samples have a reference and a mask (the training format). JSON goes to
stdout, or to --out (written atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dreampainter_core.errors import DreamPainterError
from dreampainter_core.fileio import atomic_write_bytes
from dreampainter_core.product import place_product

from . import flow
from .manifest import ManifestError

__all__ = ["reference_losses", "main"]

DEFAULT_TIMES = (0.99, 0.95, 0.9, 0.8, 0.6, 0.4)


@torch.no_grad()
def reference_losses(pipe, samples, times=DEFAULT_TIMES, seed: int = 0) -> dict[str, dict[str, float]]:
    """{f"{s:g}": {"right", "none", "shuffled"}}: mean squared velocity error on background cells."""
    with_refs = [s for s in samples if s.reference is not None]
    if len(with_refs) < 2:
        raise DreamPainterError("reference_probe needs at least 2 samples with a reference (one's is another's wrong one)")
    model = pipe.transformer
    if not model.supports_reference:
        raise DreamPainterError("this model has no reference support (a stage-1 file, or no DreamPainter weights)")
    dtype, device = model.dtype, pipe.device
    rows = []
    for s in with_refs:
        height, width = s.image.shape[1:3]
        x0 = pipe.encode_image(s.image)
        foreground, canvas_mask = place_product(s.image, s.mask, width, height, placement="keep")
        rows.append({
            "x0": x0,
            "control": pipe.prepare_control(foreground, canvas_mask).to(dtype),
            "background": 1.0 - pipe.latent_mask(s.mask).to(x0.device),
            "reference": pipe.encode_reference(s.reference, (width, height)).to(dtype),
            "text": pipe.encode_prompt([s.prompt]).to(dtype),
            "size": torch.tensor([[height, width]], dtype=dtype, device=device),
        })
    generator = torch.Generator("cpu").manual_seed(seed)
    noises = [torch.randn(r["x0"].shape, generator=generator) for r in rows]
    out: dict[str, dict[str, float]] = {}
    for s_value in times:
        sums = {"right": 0.0, "none": 0.0, "shuffled": 0.0}
        weight = 0.0
        for i, r in enumerate(rows):
            seq_len = r["x0"].shape[-2] * r["x0"].shape[-1] // model.patch_size**2
            mu = flow.mu_for(pipe.scheduler, seq_len)
            s = torch.tensor([float(s_value)])
            sigma = flow.shift_sigma(pipe.scheduler, s, mu).float()
            x_t, target = flow.flow_pair(r["x0"], noises[i].to(r["x0"].device), sigma.to(r["x0"].device))
            timestep = (s * pipe.scheduler.config.num_train_timesteps).to(device)
            wrong = rows[(i + 1) % len(rows)]["reference"]
            for name, ref in (("right", r["reference"]), ("none", None), ("shuffled", wrong)):
                v = model(x_t.to(dtype), r["text"], timestep, r["size"], r["size"], torch.zeros_like(r["size"]),
                          control_latents=r["control"], reference_latents=ref).float()
                sums[name] += float((((v - target) ** 2) * r["background"]).sum())
            weight += float(r["background"].sum()) * r["x0"].shape[1]
        out[f"{s_value:g}"] = {k: v / max(weight, 1e-12) for k, v in sums.items()}
    return out


def main(argv=None) -> int:
    from .evaluate import load_pipeline, load_samples

    ap = argparse.ArgumentParser(prog="python -m train.reference_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="CogView4 base folder (diffusers layout)")
    ap.add_argument("--weights", required=True, help="stage-2 DreamPainter weight file (.safetensors)")
    ap.add_argument("--manifest", required=True, help="JSONL manifest with references (e.g. the synthetic val.jsonl)")
    ap.add_argument("--limit", type=int, default=64, help="the first K samples")
    ap.add_argument("--times", default=",".join(f"{t:g}" for t in DEFAULT_TIMES), help="comma-separated s in (0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--out", default=None, help="JSON path (default: stdout)")
    a = ap.parse_args(argv)
    try:
        times = tuple(float(t) for t in a.times.split(",") if t.strip())
    except ValueError:
        print(f"error: --times must be comma-separated numbers, got {a.times!r}", file=sys.stderr)
        return 2
    if not times or any(not 0.0 < t <= 1.0 for t in times):
        print(f"error: --times must be in (0, 1], got {a.times!r}", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(a.model, a.weights, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
        samples = load_samples(Path(a.manifest), a.limit)
        losses = reference_losses(pipe, samples, times, a.seed)
    except (DreamPainterError, ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"model": a.model, "weights": a.weights, "manifest": a.manifest,
              "n": sum(s.reference is not None for s in samples),
              "seed": a.seed, "region": "background latent cells (outside the product mask)", "losses": losses}
    text = json.dumps(report, indent=2) + "\n"
    if a.out:
        atomic_write_bytes(Path(a.out), text.encode("utf-8"))
    for s_value, row in losses.items():
        print(f"s={s_value}: " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()), file=sys.stderr)
    if not a.out:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
