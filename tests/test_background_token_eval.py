"""train.background_token_eval --smoke on the tiny random model: trains both tokens, generates the five
settings on held-out v3 scenes, measures and writes its report, table and sample sheet."""

from __future__ import annotations

import json

import pytest

from dreampainter_core.prompts import build_prompt
from train import background_token_eval as ev
from train.evaluate import load_samples
from train.synthetic import TYPICAL_LOOKS, write_scenes

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_the_measure_reads_the_truths_look_and_the_presets_speak_the_miniatures_words(tmp_path):
    paths = write_scenes(tmp_path / "scenes", 12, size=128, seed=3, splits="0.5,0.25,0.25")
    for sample in load_samples(paths["train"], 6):
        row = ev.measure(sample.image[0], sample, ev.tone_palette())
        scene = sample.scene
        assert row["wall"] == scene["background"]["color"] and row["stand"] == scene["table"]["color"]
        look = TYPICAL_LOOKS[scene["product"]["shape"]]
        assert row["both_typical"] == (scene["background"]["color"] in look["walls"]
                                       and scene["table"]["color"] == look["stand"][1])
        assert row["quality"] > 0.9
    presets = ev.miniature_presets(tmp_path / "presets.toml")
    prompt = build_prompt("a red cup", "cup", seed=1, presets=presets)
    assert prompt.startswith("a red cup on a brown table, in front of a simple ") and ("orange" in prompt or "yellow" in prompt)
    assert build_prompt("a red cup", "杯子", "zh", seed=1, presets=presets).startswith("a red cup放在棕色的桌子上")


def test_smoke_run_writes_the_report_the_table_and_the_sample_sheet(tiny_model_dir, tiny_stage2_weights, tmp_path):
    paths = write_scenes(tmp_path / "scenes", 16, size=64, seed=0, splits="0.5,0.25,0.25")
    out = tmp_path / "eval"
    args = ["--base", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(paths["train"]),
            "--out", str(out), "--size", "64", "--budget-minutes", "0.2", "--smoke"]
    assert ev.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == set(ev.SETTINGS) and all(c["n"] == 4 for c in report["summary"].values())
    assert {f"{b} - {a}" for a, b in ev.COMPARISONS} == set(report["paired"])
    assert report["plan"]["steps"] == 2 and "seconds_per_step" in report["plan"]
    assert report["trained"]["token_cba"]["log"][0]["cl_background"] > 0
    assert "cl_background" not in report["trained"]["token_diffusion"]["log"][0]
    prompts = {r["setting"]: r["prompt"] for r in report["rows"] if r["scene"] == report["rows"][0]["scene"]}
    assert prompts["token_cba"] == prompts["name"] + " <background>" and len(prompts["prompt_builder"]) > len(prompts["name"])
    assert 0 <= report["reference"]["data"]["both_typical"] <= 1
    features = report["token_features"]
    assert set(features) >= {"token_init", "token_diffusion", "token_cba", "name_last_word"}
    assert all(0 < v["spread"] < 100 for k, v in features.items() if k != "names")
    assert (out / "samples.png").is_file() and "| token_cba (4) |" in (out / "table.md").read_text()
    # a rerun reuses the plan and the trained tokens
    assert ev.main(args) == 0
    assert json.loads((out / "report.json").read_text())["plan"] == report["plan"]
    assert ev.main(args[:-1] + ["--scenes", "500"]) == 2  # too few held-out scenes: said before anything runs
