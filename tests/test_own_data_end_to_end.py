"""A user's own product photos, no references, to a stage-2 file, with the commands a user types:
train.data build -> train.data references -> train.stage1 -> train.stage2 (tiny model, CPU)."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dreampainter_core.pipeline import DreamPainterPipeline
from train import data as data_cli
from train.synthetic import write_scenes
from train.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_photos_to_references_to_stage1_to_stage2(tiny_model_dir, tmp_path, capsys):
    # "my photos": product shots and their masks in two folders, file names of the user's choosing
    scenes = write_scenes(tmp_path / "scenes", 4, size=64, seed=9, splits="1,0,0", references=False)["train"].parent
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), masks.mkdir()
    for i, img in enumerate(sorted((scenes / "images").glob("*.png"))):
        shutil.copy(img, photos / f"sku_{i}.png")
        shutil.copy(scenes / "masks" / img.name, masks / f"sku_{i}_mask.png")

    assert data_cli.main(["example-prompts"]) == 0
    (tmp_path / "prompts.toml").write_text(capsys.readouterr().out)
    built = tmp_path / "built" / "manifest.jsonl"
    assert data_cli.main(["build", "--images", str(photos), "--masks", str(masks), "--out", str(built),
                          "--prompts", str(tmp_path / "prompts.toml")]) == 0
    refs = tmp_path / "refs"
    assert data_cli.main(["references", "--manifest", str(built), "--out", str(refs), "--base", str(tiny_model_dir),
                          "--steps", "2", "--cfg", "1"]) == 0
    manifest = refs / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(lines) == 4 and all((refs / rec["reference"]).is_file() for rec in lines)
    assert data_cli.main(["check", str(manifest)]) == 0

    common = [f"model.base={tiny_model_dir}", f"data.manifest={manifest}", "train.max_steps=2", "train.batch_size=2",
              "validation.every=0", "checkpoint.every=0", "log.every=1"]
    assert train_main(1, ["--config", str(REPO / "configs/tiny_stage1.toml"), *common,
                          f"checkpoint.output_dir={tmp_path / 's1'}"]) == 0
    stage1 = tmp_path / "s1" / "dreampainter_stage1.safetensors"
    assert stage1.is_file()
    assert train_main(2, ["--config", str(REPO / "configs/tiny_stage2.toml"), *common, f"model.stage1_weights={stage1}",
                          "data.reference_prob=1", "data.reference_sizes=32",
                          f"checkpoint.output_dir={tmp_path / 's2'}"]) == 0
    stage2 = tmp_path / "s2" / "dreampainter_stage2.safetensors"
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=stage2)
    assert pipe.transformer.supports_reference  # the made references trained a stage-2 model
    ref = Image.open(refs / lines[0]["reference"])
    out = pipe("a product on a stand", Image.open(photos / "sku_0.png"), Image.open(masks / "sku_0_mask.png"),
               reference=ref, height=64, width=64, steps=2, guidance_scale=1.0)
    assert tuple(out.shape) == (1, 64, 64, 3)
