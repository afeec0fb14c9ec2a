#!/usr/bin/env bash
# The pack never touches the network at run time: the demo and one ComfyUI workflow run in a
# network namespace with no network at all (only loopback, for ComfyUI's own server on
# 127.0.0.1). CI runs this after the tests; where the machine cannot make a namespace, it says so
# and skips (exit 0), since that is the machine's limit, not the pack's.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! unshare -n true 2>/dev/null; then
  echo "offline check skipped: this machine cannot make a network namespace ('unshare -n' failed: needs root or user namespaces)"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
unshare -n bash -c '
  set -euo pipefail
  ip link set lo up 2>/dev/null || true
  if python3 -c "import socket; socket.create_connection((\"1.1.1.1\", 443), timeout=2)" 2>/dev/null; then
    echo "offline check: the namespace still reaches the network" >&2; exit 1
  fi
  .venv/bin/python -m dreampainter_core.generate --out-dir "$1/demo" > "$1/demo.log" 2>&1 \
    || { cat "$1/demo.log" >&2; exit 1; }
  ls "$1"/demo/*.png > /dev/null
  .venv/bin/python -m pytest -q -p no:cacheprovider "tests/test_comfy_workflows.py::test_workflow_runs_on_the_embedded_miniature_model[DreamPainter_2_TR2I_reference]"
' offline "$out"
echo "offline check passed: the demo and the TR2I workflow ran with no network"
