"""dreampainter_core.batch on the embedded miniature: every product x format x seed, broken items
recorded, a rerun skips what exists, a changed setting remakes only what it affects, reproduce."""

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dreampainter_core import batch as B
from dreampainter_core.embedded import embedded_model
from dreampainter_core.prompts import load_presets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]


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
    """The outputs (<format>_<seed>.png), by path: not the contact sheets and review copies."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*_*.png"))}


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
    page = (out / "index.html").read_text()
    assert "cannot identify image file" in page and 'src="box/4x5_1.png"' in page and "box/review/mask.png" in page
    with Image.open(out / "box" / "contact.png") as sheet:  # product, mask; a row per format
        assert sheet.height > 3 * 192

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
        json.dumps({"id": "t", "image": "p.png", "mask": "p.png", "prompt": "x", "shield_product": "yes"}),
    ]) + "\n")
    assert B.main(["check", "--manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "line 2: not JSON" in err
    assert "line 3: id 'a/b'" in err and "line 3: image missing.png: file not found" in err
    assert "line 3: no prompt: give 'prompt'" in err
    assert "line 4: unknown category 'garden'" in err and "line 4: id 'ok' already used on line 1" in err
    assert "line 5: seeds must be" in err and "line 5: steps must be a number" in err
    assert "line 6: shield_product must be true or false, got 'yes'" in err


def test_shield_product_is_a_per_item_override_that_reaches_the_reference_options(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"sku{i}", "image": "p.png", "mask": "p.png", "prompt": "x", **extra}) + "\n"
                                for i, extra in enumerate(({"shield_product": True}, {}))))
    shielded, plain = B.read_batch_manifest(manifest)
    assert shielded.overrides == {"shield_product": True} and plain.overrides == {}
    settings = B.default_settings({})
    assert "shield_product" not in settings  # recipes made without it keep their hashes
    assert B.settings_options({**settings, **shielded.overrides})["reference"].shield_product is True
    assert B.settings_options(settings)["reference"].shield_product is False


def test_a_name_gets_the_prompt_builders_prompt(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "sku1", "image": "p.png", "mask": "p.png", "name": "rose serum",
                                    "category": "cosmetics"}) + "\n")
    (item,) = B.read_batch_manifest(manifest)
    stands = [en for en, _ in load_presets().categories["cosmetics"].parts["stand"]]
    assert item.prompt.startswith("rose serum on ") and any(stand in item.prompt for stand in stands)
    assert item.prompt == B.read_batch_manifest(manifest)[0].prompt  # the same prompt on every run


def _one_item(tmp_path, **extra):
    demo = embedded_model().demo
    for name in ("product.png", "mask.png"):
        shutil.copy(demo / name, tmp_path / name)
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"id": "box", "image": "product.png", "mask": "mask.png",
                                    "prompt": "a blue box on a green table", **extra}) + "\n")
    return manifest


def test_seeds_batched_together_resume_and_reproduce_bit_for_bit(tmp_path, capsys):
    manifest = _one_item(tmp_path)
    run = lambda out, *x: B.main(["--manifest", str(manifest), "--out", str(out), "--seeds", "0,1,2",  # noqa: E731
                                  "--steps", "2", "--dtype", "fp32", *x])
    assert run(tmp_path / "single") == 0
    assert run(tmp_path / "batched", "--batch-size", "2") == 0
    batched = _bytes(tmp_path / "batched")
    with Image.open(tmp_path / "batched" / "box" / "1x1_1.png") as im:
        recipe = json.loads(im.text[B.RECIPE_KEY])
        pixels = np.asarray(im).astype(int)
    assert recipe["batch"] == {"seeds": [0, 1], "index": 1}
    with Image.open(tmp_path / "single" / "box" / "1x1_1.png") as im:
        assert np.abs(np.asarray(im).astype(int) - pixels).max() <= 3  # the batch moves only the last bits

    # A run killed after seed 0 of the batch (0, 1): the resumed run renders the same batch again
    # and writes seed 1 byte for byte as the straight run did; seed 0 is not rewritten.
    (tmp_path / "batched" / "box" / "1x1_1.png").unlink()
    (tmp_path / "batched" / "box" / ".1x1_1.png.abcd.tmp").write_bytes(b"half a png")
    before = (tmp_path / "batched" / "box" / "1x1_0.png").stat().st_mtime_ns
    assert run(tmp_path / "batched", "--batch-size", "2") == 0
    assert _bytes(tmp_path / "batched") == batched
    assert (tmp_path / "batched" / "box" / "1x1_0.png").stat().st_mtime_ns == before
    assert not list((tmp_path / "batched").rglob("*.tmp"))
    report = json.loads((tmp_path / "batched" / "report.json").read_text())
    assert report["items"]["box"]["made"] == 1 and report["items"]["box"]["skipped"] == 2

    capsys.readouterr()
    assert B.main(["reproduce", str(tmp_path / "batched" / "box" / "1x1_1.png"), "--out", str(tmp_path / "r.png"),
                   "--dtype", "fp32"]) == 0
    assert "identical pixels" in capsys.readouterr().out


def test_a_rerun_with_nothing_to_make_never_loads_the_model(tmp_path, monkeypatch):
    manifest = _one_item(tmp_path)
    args = ["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--steps", "2", "--dtype", "fp32"]
    assert B.main(args) == 0
    from dreampainter_core.pipeline import DreamPainterPipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded for a run with nothing to make")

    monkeypatch.setattr(DreamPainterPipeline, "from_pretrained", no_load)
    assert B.main(args) == 0


def test_out_of_memory_is_retried_image_by_image_then_recorded(tmp_path, monkeypatch):
    from dreampainter_core.pipeline import DreamPainterPipeline

    manifest = _one_item(tmp_path)
    real = DreamPainterPipeline.generate
    calls = []

    def generate(self, request, *a, **k):
        calls.append(request.product.shape[0])
        if request.product.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, request, *a, **k)

    monkeypatch.setattr(DreamPainterPipeline, "generate", generate)
    args = ["--manifest", str(manifest), "--seeds", "0,1,2,3", "--steps", "2", "--dtype", "fp32", "--batch-size", "4"]
    assert B.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert calls == [4, 1, 1, 1, 1]  # batch 4 failed; each image alone
    with Image.open(tmp_path / "out" / "box" / "1x1_2.png") as im:
        assert json.loads(im.text[B.RECIPE_KEY])["batch"] == {"seeds": [2], "index": 0}

    def always_oom(self, request, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DreamPainterPipeline, "generate", always_oom)
    assert B.main([*args, "--out", str(tmp_path / "out2")]) == 1
    reason = json.loads((tmp_path / "out2" / "report.json").read_text())["items"]["box"]["reason"]
    assert reason.startswith("out of memory, also one image at a time")


def test_items_without_a_mask_get_the_auto_mask_and_a_decontaminated_edge(tmp_path, monkeypatch):
    from dreampainter_core import auto_mask

    demo = embedded_model().demo
    shutil.copy(demo / "product.png", tmp_path / "product.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "auto", "image": "product.png", "prompt": "a blue box"}) + "\n")
    args = ["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--steps", "2", "--dtype", "fp32"]

    if importlib.util.find_spec("rembg") is None:  # the real environment: a clear error before the model loads
        assert B.main(args) == 2
    with Image.open(demo / "mask.png") as m:  # a soft matte: the demo mask, blurred
        soft = np.asarray(m.convert("L").filter(ImageFilter.GaussianBlur(1.5)))

    class FakeMasker:
        def alpha(self, image):
            assert image.size == (128, 128)
            return soft

    asked = []
    monkeypatch.setattr(auto_mask, "require_rembg", lambda *a, **k: None)
    monkeypatch.setattr(auto_mask, "rembg_masker", lambda model, *a, **k: asked.append(model) or FakeMasker())
    assert B.main(args) == 0
    assert asked and asked[0] == "u2netp"
    with Image.open(tmp_path / "out" / "auto" / "1x1_0.png") as im:
        recipe = json.loads(im.text[B.RECIPE_KEY])
    assert recipe["inputs"]["mask"] is None
    assert recipe["settings"]["auto_mask"] == "u2netp" and recipe["settings"]["decontaminate"] is True
    assert B.main([*args[:3], str(tmp_path / "off"), *args[4:], "--decontaminate", "off"]) == 0
    on, off = (np.asarray(Image.open(tmp_path / d / "auto" / "1x1_0.png")).astype(int) for d in ("out", "off"))
    changed = torch.from_numpy((on != off).any(axis=-1))
    # Only the product's edge differs: the same generation, composited through the matte. The band: the
    # placed product's mask (as the batch placed it, 2.4x the photo: the 1.5 px blur becomes ~4 px, plus
    # the feather) grown and shrunk by 12 px; the product's middle and the far background must not change.
    from dreampainter_core.product import place_product

    with Image.open(demo / "product.png") as im:
        product = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255)[None]
    settings = recipe["settings"]
    _, placed = place_product(product, torch.from_numpy(soft.astype(np.float32) / 255)[None], 128, 128,
                              placement=settings.get("placement", "center"),
                              box_ratio=(settings["box_ratio"], settings["box_ratio"]))
    grow = lambda m, r: torch.nn.functional.max_pool2d(m[None], 2 * r + 1, 1, r)[0] > 0.5  # noqa: E731
    band = (grow(placed, 12) & grow(1 - placed, 12))[0]  # within 12 px of both the product and the background
    assert band.float().mean() < 0.6
    assert changed.any() and not (changed & ~band).any(), "decontamination changed pixels away from the edge"


def test_a_user_formats_file_adds_a_format_and_its_size_is_part_of_the_resume_key(tmp_path, capsys):
    manifest, out = _one_item(tmp_path), tmp_path / "out"
    presets = tmp_path / "formats.toml"
    presets.write_text('[formats]\n"2:3" = [832, 1248]\n')
    run = lambda *extra: B.main(["--manifest", str(manifest), "--out", str(out), "--formats", "1:1,2:3",  # noqa: E731
                                 "--formats-file", str(presets), "--steps", "1", "--dtype", "fp32", *extra])
    assert B.main(["--manifest", str(manifest), "--out", str(out), "--formats", "2:3"]) == 2  # unknown without the file
    assert "unknown ['2:3']" in capsys.readouterr().err
    assert run() == 0
    with Image.open(out / "box" / "2x3_0.png") as im:
        assert im.size == (96, 160)  # 832x1248 at 128 px scale on the miniature's 16 px grid
    square = (out / "box" / "1x1_0.png").read_bytes()
    presets.write_text('[formats]\n"2:3" = [768, 1280]\n')  # the user changes the preset: only 2:3 is remade
    assert run() == 0
    assert json.loads((out / "report.json").read_text())["items"]["box"]["made"] == 1
    assert (out / "box" / "1x1_0.png").read_bytes() == square
    with Image.open(out / "box" / "2x3_0.png") as im:
        assert im.size == (96, 160) and json.loads(im.text[B.RECIPE_KEY])["canvas"] == [768, 1280]
    for text, says in (('[formats]\n"2/3" = [832, 1248]\n', "format name '2/3'"),
                       ('[formats]\n"2:3" = [832]\n', "expected [width, height]"),
                       ('formats = ', "not TOML"), ('[sizes]\n', "expected a [formats] table")):
        presets.write_text(text)
        assert run() == 2
        err = capsys.readouterr().err
        assert str(presets) in err and says in err


def test_placement_keep_keeps_the_photos_layout_and_a_bad_one_is_a_manifest_error(tmp_path, capsys):
    out = tmp_path / "out"
    kept = _one_item(tmp_path, placement="keep")
    assert B.main(["--manifest", str(kept), "--out", str(out), "--steps", "1", "--dtype", "fp32"]) == 0
    recipe = B.read_recipe(out / "box" / "1x1_0.png")
    assert recipe["settings"]["placement"] == "keep"
    # keep: the photo (128 px square) fills the 128 px canvas as it is, so the product's pixels are
    # pasted back where the photo has them
    mask = np.asarray(Image.open(tmp_path / "mask.png").convert("L")) > 127
    made = np.asarray(Image.open(out / "box" / "1x1_0.png").convert("RGB"))
    photo = np.asarray(Image.open(tmp_path / "product.png").convert("RGB"))
    inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
    assert np.abs(made[inner].astype(int) - photo[inner]).max() <= 1
    centred = B.read_recipe(_run_one_default(tmp_path))
    assert centred["settings"]["placement"] == "center" and centred["hash"] != recipe["hash"]
    bad = _one_item(tmp_path, placement="left")
    assert B.main(["check", "--manifest", str(bad)]) == 2
    assert "placement must be one of keep, center, got 'left'" in capsys.readouterr().err


def _run_one_default(tmp_path):
    manifest, out = _one_item(tmp_path), tmp_path / "out-centre"
    assert B.main(["--manifest", str(manifest), "--out", str(out), "--steps", "1", "--dtype", "fp32"]) == 0
    return out / "box" / "1x1_0.png"


def test_the_ray_data_callable_class_paints_what_the_batch_command_paints(tmp_path):
    """CatalogPainter (for Ray Data's map_batches) called as Ray calls it, a dict of numpy columns:
    the same pixels as the batch command's files for the same product, format and seed."""
    manifest, out = _one_item(tmp_path), tmp_path / "out"
    assert B.main(["--manifest", str(manifest), "--out", str(out), "--formats", "1:1,4:5", "--seeds", "3",
                   "--steps", "2", "--dtype", "fp32"]) == 0
    photo = np.asarray(Image.open(tmp_path / "product.png").convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "mask.png").convert("L"))
    painter = B.CatalogPainter(dtype="fp32", device="cpu", steps=2)
    rows = painter({"id": np.array(["box", "box"]), "image": np.stack([photo, photo]), "mask": np.stack([mask, mask]),
                    "prompt": np.array(["a blue box on a green table"] * 2), "seed": np.array([3, 3]),
                    "format": np.array(["1:1", "4:5"])})
    assert list(rows["path"]) == ["box/1x1_3.png", "box/4x5_3.png"]
    for path, data in zip(rows["path"], rows["png"]):
        with Image.open(io.BytesIO(data)) as made, Image.open(out / path) as written:
            assert np.array_equal(np.asarray(made), np.asarray(written))
            assert json.loads(made.text[B.RECIPE_KEY])["seed"] == 3
    with pytest.raises(B.InputError, match="row 'x': format '7:1' unknown"):
        painter({"id": ["x"], "image": [photo], "prompt": ["p"], "format": ["7:1"]})
    with pytest.raises(B.InputError, match="row 'x': mask size 8x8"):
        painter({"id": ["x"], "image": [photo], "mask": [np.full((8, 8), 255, np.uint8)], "prompt": ["p"]})


def test_a_folder_of_photos_is_a_manifest(tmp_path):
    demo = embedded_model().demo
    (tmp_path / "masks").mkdir()
    shutil.copy(demo / "product.png", tmp_path / "blue_box.png")
    shutil.copy(demo / "mask.png", tmp_path / "masks" / "blue_box.png")
    shutil.copy(demo / "product.png", tmp_path / "rose serum.png")
    items = B.folder_manifest(tmp_path, None, "cosmetics")
    assert [i.id for i in items] == ["blue_box", "rose-serum"]
    assert items[0].mask == tmp_path / "masks" / "blue_box.png" and items[1].mask is None
    assert items[1].prompt.startswith("rose serum on ")
    assert [i.prompt for i in B.folder_manifest(tmp_path, "on marble", None)] == ["on marble", "on marble"]


def test_shards_are_disjoint_and_cover_every_item_once():
    items = list(range(11))
    shards = [B.Shard(r, 3).take(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7, 10]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_make_the_same_bytes_as_one(catalog, tmp_path):
    one = tmp_path / "one"
    common = ["--manifest", str(catalog), "--formats", "1:1", "--seeds", "0", "--steps", "2", "--dtype", "fp32"]
    assert B.main([*common, "--out", str(one)]) == 1
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                           "dreampainter_core.batch", *common, "--out", str(tmp_path / "two")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, done.stderr[-3000:]  # rank 0's items include a failure
    # torchrun prints its own trace for the failed rank; none comes from our code
    assert f'File "{REPO / "dreampainter_core"}' not in done.stderr, done.stderr[-3000:]
    # rank 0 (whose shard holds the failure) is the one torchrun reports; under load torchrun may also
    # list rank 1 as stopped when rank 0 exits first, so only rank 0 is asserted
    assert "local_rank: 0" in done.stderr
    assert _bytes(tmp_path / "two") == _bytes(one) and _bytes(one)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert list(report["items"]) == ["box", "box-ref", "broken", "empty"] and report["ranks"] == 2
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 2}
    assert not list((tmp_path / "two").glob(".report.rank*"))
    assert (tmp_path / "two" / "index.html").is_file()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_blank_or_broken_prompt_is_a_manifest_error(tmp_path):
    photo = embedded_model().demo / "product.png"
    lines = [json.dumps({"id": "a", "image": str(photo), "prompt": "   "}),
             '{"id": "b", "image": "%s", "prompt": "red \\ud800 box"}' % photo]
    with pytest.raises(B.BatchManifestError) as e:
        B.parse_manifest(lines, tmp_path, "m.jsonl")
    assert "line 1: prompt is blank" in str(e.value) and "line 2: prompt has an unpaired surrogate" in str(e.value)


def test_out_of_range_settings_are_manifest_and_command_line_errors(tmp_path, capsys):
    """cfg 1e30 or 10^7 steps in a manifest line (or on the command line) are refused by the
    pipeline's own range checks before any model loads, not at render time item by item."""
    photo = embedded_model().demo / "product.png"
    lines = [json.dumps({"id": "a", "image": str(photo), "prompt": "on marble", "cfg": 1e30}),
             json.dumps({"id": "b", "image": str(photo), "prompt": "on marble", "steps": 10**7}),
             json.dumps({"id": "c", "image": str(photo), "prompt": "on marble", "shift": 0})]
    with pytest.raises(B.BatchManifestError) as e:
        B.parse_manifest(lines, tmp_path, "m.jsonl")
    text = str(e.value)
    assert "line 1: guidance_scale must be >= 0 and <= 30" in text
    assert "line 2: steps must be an integer >= 1 and <= 10000" in text
    assert "line 3: shift must be > 0 and <= 20" in text
    manifest = tmp_path / "ok.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(photo), "prompt": "on marble"}) + "\n")
    for flags, phrase in ((["--cfg", "1e9"], "batch settings: guidance_scale must be"),
                          (["--seeds", "-1"], "batch settings: seed must be an integer >= 0"),
                          (["--batch-size", "65"], "--batch-size must be >= 1 and <= 64")):
        assert B.main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), *flags]) == 2
        assert phrase in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran
