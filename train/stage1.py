"""Stage 1: train the control branch (text-only control) with the base CogView4 frozen.

    python -m train.stage1 --config configs/stage1.toml [section.key=value ...]
    torchrun --standalone --nproc_per_node 8 -m train.stage1 --config configs/stage1.toml

Writes checkpoints to checkpoint.output_dir and, at the end, the DreamPainter weight file
``dreampainter_stage1.safetensors`` (control branch) that DreamPainterPipeline and the nodes
load directly. See train/trainer.py and train/README.md.
"""

from __future__ import annotations

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main(1, sys.argv[1:]))
