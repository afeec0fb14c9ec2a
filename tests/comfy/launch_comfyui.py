"""Start ComfyUI's main.py (test host only):
``python launch_comfyui.py COMFY_DIR SITE_DIR[:MORE_DIRS] [main.py args...]``.

SITE_DIR holds server-only packages, torchvision among them (``pip install --no-deps --target``),
kept out of the test venv because transformers imports torchvision whenever it is installed, and
this torchvision does not import on CPU torch (below), which would break every other test.

PyPI's torchvision wheels are CUDA builds; with the CPU torch used here ``import torchvision``
fails with "operator torchvision::nms does not exist" (its C ops are missing), and ComfyUI
imports torchvision. When (and only when) that happens, the two op schemas are defined so that
the import succeeds; torchvision's detection ops are not used by ComfyUI or this pack.
Real user installs have a matching torchvision and never run this file.
"""

import importlib
import os
import runpy
import sys

import torch

_keep = []


def _import_torchvision() -> None:
    try:
        importlib.import_module("torchvision")
        return
    except Exception as exc:  # noqa: BLE001 - only the known failure is handled
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep.append(lib)
    importlib.import_module("torchvision")


def main() -> None:
    comfy_dir = os.path.abspath(sys.argv[1])
    for site_dir in reversed(sys.argv[2].split(os.pathsep)):  # SITE_DIR[:FRONTEND_DIR]
        site_dir = os.path.abspath(site_dir)
        if os.path.isdir(site_dir):
            sys.path.insert(0, site_dir)
    _import_torchvision()
    sys.argv = [os.path.join(comfy_dir, "main.py")] + sys.argv[3:]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
