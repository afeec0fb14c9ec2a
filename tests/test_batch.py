"""dreampainter_core.batch on the embedded miniature: every product x format x seed, broken items
recorded, a rerun skips what exists, a changed setting remakes only what it affects, reproduce."""

import json
import shutil

import pytest
from PIL import Image

from dreampainter_core import batch as B
from dreampainter_core.embedded import embedded_model
from dreampainter_core.prompts import load_presets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def catalog(tmp_path):
    demo = embedded_model().demo
    for name in ("product.png", "mask.png", "reference.png"):
        shutil.copy(demo / name, tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.new("L", (128, 128), 0).save(tmp_path / "empty_mask.png")
    lines = [
        {"id": "box", "image": "product.png", "mask": "mask.png", "prompt": "a blue box on a green table"},
        {"id": "box-ref", "image": "product.png", "mask": "mask.png", "name": "box", "category": "general",
         "reference": "reference.png", "seeds": [7]},
        {"id": "broken", "image": "broken.png", "mask": "mask.png", "prompt": "a red stand"},
        {"id": "empty", "image": "product.png", "mask": "empty_mask.png", "prompt": "a red stand"},
    ]
    manifest = tmp_path / "products.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return manifest


def _run(manifest, out, *extra):
    return B.main(["--manifest", str(manifest), "--out", str(out), "--formats", "1:1,4:5", "--seeds", "0,1",
                   "--steps", "2", "--dtype", "fp32", *extra])


def _bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_a_catalog_run_records_failures_and_resumes(catalog, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(catalog, out) == 1  # two items failed
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 2}
    assert "cannot identify image file" in report["items"]["broken"]["reason"]
    assert "mask for image 0 is empty" in report["items"]["empty"]["reason"]
    first = _bytes(out)
    assert sorted(first) == ["box-ref/1x1_7.png", "box-ref/4x5_7.png", "box/1x1_0.png", "box/1x1_1.png",
                             "box/4x5_0.png", "box/4x5_1.png"]
    with Image.open(out / "box" / "4x5_1.png") as im:
        assert im.size == (112, 128)  # 864x1088 at the miniature's 128 px scale, on its 16 px grid
        recipe = json.loads(im.text[B.RECIPE_KEY])
    assert recipe["seed"] == 1 and recipe["prompt"] == "a blue box on a green table"
    assert recipe["settings"]["steps"] == 2 and recipe["model"]["fingerprint"]
    with Image.open(out / "box-ref" / "1x1_7.png") as im:  # a name, no prompt: the prompt builder
        assert json.loads(im.text[B.RECIPE_KEY])["prompt"].startswith("box on ")

    assert _run(catalog, out) == 1  # nothing to make: every output is skipped, byte for byte the same
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 0, "skipped": 2, "failed": 2}
    assert _bytes(out) == first

    lines = catalog.read_text().splitlines()  # a changed setting on one item remakes only its images
    lines[0] = json.dumps({**json.loads(lines[0]), "cfg": 1.0})
    catalog.write_text("\n".join(lines) + "\n")
    assert _run(catalog, out) == 1
    again = _bytes(out)
    assert all(again[k] != first[k] for k in again if k.startswith("box/"))
    assert all(again[k] == first[k] for k in again if k.startswith("box-ref/"))
    assert not list(out.rglob("*.tmp*"))

    capsys.readouterr()
    assert B.main(["reproduce", str(out / "box" / "4x5_0.png"), "--out", str(tmp_path / "again.png"),
                   "--dtype", "fp32"]) == 0
    assert "identical pixels" in capsys.readouterr().out


def test_check_lists_every_bad_line_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "p.png").write_bytes(b"x")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"id": "ok", "image": "p.png", "mask": "p.png", "prompt": "x"}),
        "{not json",
        json.dumps({"id": "a/b", "image": "missing.png", "mask": "p.png"}),
        json.dumps({"id": "ok", "image": "p.png", "mask": "p.png", "name": "serum", "category": "garden"}),
        json.dumps({"id": "s", "image": "p.png", "mask": "p.png", "prompt": "x", "seeds": [-1], "steps": "many"}),
    ]) + "\n")
    assert B.main(["check", "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "line 2: not JSON" in err
    assert "line 3: id 'a/b'" in err and "line 3: image missing.png: file not found" in err
    assert "line 3: no prompt: give 'prompt'" in err
    assert "line 4: unknown category 'garden'" in err and "line 4: id 'ok' already used on line 1" in err
    assert "line 5: seeds must be" in err and "line 5: steps must be a number" in err


def test_a_name_gets_the_prompt_builders_prompt(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "sku1", "image": "p.png", "mask": "p.png", "name": "rose serum",
                                    "category": "cosmetics"}) + "\n")
    (item,) = B.read_batch_manifest(manifest)
    stands = [en for en, _ in load_presets().categories["cosmetics"].parts["stand"]]
    assert item.prompt.startswith("rose serum on ") and any(stand in item.prompt for stand in stands)
    assert item.prompt == B.read_batch_manifest(manifest)[0].prompt  # the same prompt on every run
