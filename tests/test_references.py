"""train.data references: a background reference for every sample by product removal (tiny model)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter_core.errors import InputError
from dreampainter_core.masks import dilate
from train import data as data_cli
from train.manifest import load_sample, read_manifest
from train.references import RemovalSettings, make_references
from train.synthetic import write_scenes

from test_pipeline import base_pipe  # noqa: F401 (fixture)

SETTINGS = RemovalSettings(steps=3, guidance=1.0, dilate=4)


@pytest.fixture()
def scenes(tmp_path):
    paths = write_scenes(tmp_path / "scenes", 3, size=64, seed=5, splits="1,0,0", references=False)
    return paths["train"]


class _Counting:
    """The pipeline, counting inpaint calls (so a rerun can show it made nothing)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def inpaint(self, *args, **kwargs):
        self.calls += 1
        return self.pipe.inpaint(*args, **kwargs)


def test_references_remove_the_product_keep_the_rest_and_resume(scenes, tmp_path, base_pipe):
    out = tmp_path / "refs"
    pipe = _Counting(base_pipe)
    report = make_references(scenes, out, SETTINGS, pipe=pipe, echo=lambda *_: None)
    assert report["made"] == 3 and not report["failed"] and pipe.calls == 3
    made = read_manifest(out / "manifest.jsonl")
    assert len(made) == 3
    for line, sample in made:
        loaded = load_sample(sample, with_reference=True, line=line)  # paths resolve from the new manifest
        photo = np.asarray(loaded.image, np.int16)
        ref = np.asarray(loaded.reference, np.int16)
        hole = dilate(torch.from_numpy(loaded.mask.astype(np.float32)), 2 * 4 + 1).numpy() > 0.5
        assert ref.shape == photo.shape
        assert np.abs(ref - photo)[~hole].max() <= 1  # every pixel away from the product is the photo's
        assert np.abs(ref - photo)[loaded.mask].mean() > 5  # the product itself is painted over
    # a rerun makes nothing (the pipeline is not even needed) and writes the same manifest
    before = (out / "manifest.jsonl").read_bytes()
    again = make_references(scenes, out, SETTINGS, pipe=None, echo=lambda *_: None)
    assert again["made"] == 0 and again["skipped_existing"] == 3
    assert (out / "manifest.jsonl").read_bytes() == before
    # a lost file is remade on its own
    first = out / json.loads(before.splitlines()[0])["reference"]
    first.unlink()
    pipe.calls = 0
    assert make_references(scenes, out, SETTINGS, pipe=pipe, echo=lambda *_: None)["made"] == 1 and pipe.calls == 1
    assert first.is_file()
    with pytest.raises(InputError, match="other settings"):  # never a folder of two kinds
        make_references(scenes, out, RemovalSettings(steps=4, dilate=4), pipe=pipe, echo=lambda *_: None)


def test_a_broken_sample_is_reported_and_left_out_the_others_are_made(scenes, tmp_path, base_pipe):
    lines = scenes.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["mask"] = "masks/missing.png"
    scenes.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    out = tmp_path / "refs"
    report = make_references(scenes, out, SETTINGS, pipe=base_pipe, echo=lambda *_: None)
    assert report["made"] == 2 and list(report["failed"]) == ["2"] and "missing.png" in report["failed"]["2"]
    assert len(read_manifest(out / "manifest.jsonl")) == 2


def test_the_command_refuses_a_bad_manifest_before_loading_a_model(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png"}\nnot json\n')
    rc = data_cli.main(["references", "--manifest", str(manifest), "--out", str(tmp_path / "o"),
                        "--base", str(tmp_path / "no-model-here")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "m.jsonl line 1" in err and "missing key 'mask'" in err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_the_command_runs_on_a_model_folder(scenes, tmp_path, tiny_model_dir):
    out = tmp_path / "refs"
    rc = data_cli.main(["references", "--manifest", str(scenes), "--out", str(out), "--base", str(tiny_model_dir),
                        "--steps", "2", "--cfg", "1"])
    assert rc == 0
    refs = sorted((out / "references").glob("*.png"))
    assert len(refs) == 3 and Image.open(refs[0]).size == (64, 64)
    assert json.loads((out / "references" / "settings.json").read_text())["settings"]["steps"] == 2
