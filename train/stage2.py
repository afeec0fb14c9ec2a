"""Stage 2: train reference-aware LoRA on the base blocks; base and control branch frozen.

    python -m train.stage2 --config configs/stage2.toml model.stage1_weights=runs/stage1/dreampainter_stage1.safetensors
    torchrun --standalone --nproc_per_node 8 -m train.stage2 --config configs/stage2.toml

The sample's background reference is used with probability data.reference_prob (paper: 0.5),
randomly resized/cropped to data.reference_sizes (512, 800) and randomly shifted. The
exported ``dreampainter_stage2.safetensors`` carries the stage-1 branch and the LoRA: one file.
"""

from __future__ import annotations

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main(2, sys.argv[1:]))
