"""The Prompt Builder node on a real ComfyUI 0.3.75: it runs through POST /prompt and gives exactly
build_prompt's text (read back with ComfyUI's own Preview Any node), refuses an empty name before the
run, and picks up a user's presets file from models/dreampainter/prompt_presets/."""

import sys
from pathlib import Path


from dreampainter_core.prompts import build_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402


def _graph(**inputs) -> dict:
    values = {"name": "rose face serum", "category": "cosmetics", "language": "zh", "style": "auto", "seed": 3,
              **inputs}
    return {"1": {"class_type": "DreamPainterPromptBuilder", "inputs": values},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def test_the_node_gives_build_prompts_text(comfy):
    entry = comfy.run(_graph(), timeout=60)
    assert entry["status"]["status_str"] == "success", h.execution_error(entry)
    assert entry["outputs"]["2"]["text"] == [build_prompt("rose face serum", "cosmetics", "zh", seed=3)]


def test_an_empty_name_is_refused_before_the_run(comfy):
    status, body = comfy.queue(_graph(name="   "))
    assert status == 400, body
    details = " ".join(e["details"] for e in body["node_errors"]["1"]["errors"])
    assert "name is empty" in details


def test_a_users_presets_file_adds_a_category(comfy):
    folder = comfy.base / "models" / "dreampainter" / "prompt_presets"
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / "garden.toml"
    mine.write_text('[categories.garden]\nstand = [{ en = "a mossy rock", zh = "长满苔藓的岩石" }]\n'
                    'background = [{ en = "a greenhouse", zh = "温室" }]\n', encoding="utf-8")
    try:
        options = comfy.get("/object_info/DreamPainterPromptBuilder")["DreamPainterPromptBuilder"]["input"]
        assert "garden" in options["required"]["category"][1]["options"]
        entry = comfy.run(_graph(name="spade", category="garden", language="en"), timeout=60)
        assert entry["status"]["status_str"] == "success", h.execution_error(entry)
        assert entry["outputs"]["2"]["text"][0].startswith("spade on a mossy rock, in front of a greenhouse")
    finally:
        mine.unlink()
