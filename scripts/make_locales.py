"""Writes locales/en/nodeDefs.json and locales/en/main.json from the node schemas, as the running
ComfyUI exposes them (GET /object_info), so the English file cannot drift from the code. The Chinese
files (locales/zh/) are written by hand; tests/test_comfy_locales.py checks that they cover every
node, input and output of the current schemas, and that the English files are what this script writes.

    .venv/bin/python scripts/make_locales.py            # starts the test host for /object_info
    .venv/bin/python scripts/make_locales.py --check    # exit 1 if the files are out of date

Format (ComfyUI 0.3.75 app/custom_node_manager.py serves locales/<lang>/main.json with nodeDefs.json
under the key "nodeDefs" at GET /i18n; the frontend 1.32.9 reads these keys):

    nodeDefs.<NodeId>.display_name / .description
    nodeDefs.<NodeId>.inputs.<input id>.name / .tooltip     (widget labels, socket names, tooltips)
    nodeDefs.<NodeId>.outputs.<index>.name / .tooltip
    nodeCategories.<category path segment>                   (in main.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCALES = REPO / "locales"
PREFIX = "DreamPainter"


def node_defs(object_info: dict) -> dict:
    """The English nodeDefs of the pack's nodes (in registration order), from /object_info."""
    out = {}
    for node_id, info in object_info.items():
        if not node_id.startswith(PREFIX):
            continue
        inputs = {}
        for kind in ("required", "optional"):
            for name in info.get("input_order", {}).get(kind, list(info["input"].get(kind, {}))):
                spec = info["input"][kind][name]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                entry = {"name": name}
                if opts.get("tooltip"):
                    entry["tooltip"] = opts["tooltip"]
                inputs[name] = entry
        outputs = {}
        tooltips = info.get("output_tooltips") or []
        for i, name in enumerate(info.get("output_name") or info["output"]):
            entry = {"name": name}
            if i < len(tooltips) and tooltips[i]:
                entry["tooltip"] = tooltips[i]
            outputs[str(i)] = entry
        out[node_id] = {"display_name": info["display_name"], "description": info["description"],
                        "inputs": inputs, "outputs": outputs}
    return out


def main_json(object_info: dict) -> dict:
    """main.json: the category path segments of the pack's nodes (English: the segments themselves)."""
    segments: list[str] = []
    for node_id, info in object_info.items():
        if node_id.startswith(PREFIX):
            for seg in info["category"].split("/"):
                if seg not in segments:
                    segments.append(seg)
    return {"nodeCategories": {seg: seg for seg in segments}}


def dumps(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def expected_files(object_info: dict) -> dict[Path, str]:
    return {LOCALES / "en" / "nodeDefs.json": dumps(node_defs(object_info)),
            LOCALES / "en" / "main.json": dumps(main_json(object_info))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "comfy"))
    import comfy_harness as h

    host = h.get_host()
    stale = []
    for path, text in expected_files(host.get("/object_info")).items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(("out of date: " if args.check else "wrote ") + str(path.relative_to(REPO)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
