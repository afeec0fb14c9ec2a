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
