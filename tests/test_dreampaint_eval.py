"""train.dreampaint_eval --smoke on the tiny random model: trains, inserts, measures and writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreampainter_core.transformer import DreamPainterConfig
from train import dreampaint_eval as ev
from train.insertion_masks import insertion_hole
from train.synthetic import held_out_scene
from train.tiny import write_random_dreampainter_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_measures_on_the_truth_and_the_paste_baseline():
    scene, r, _ = held_out_scene("star_vase", 0, 0, 128)
    context, truth = r["reference"] / 255.0, r["image"] / 255.0
    hole = insertion_hole(r["mask"], "rectangle", 0.1)
    perfect = ev.measure(torch.from_numpy(truth), context, truth, r["mask"], hole, "star_vase")
    assert perfect["iou"] > 0.95 and perfect["colour"] > 0.95 and perfect["both_colours"]
    assert perfect["seam"] < 1e-6 and perfect["pattern"] is True
    assert not perfect["context_exact"]  # the truth's shadow reaches past the mask: it is not the context there
    empty = ev.measure(torch.from_numpy(context), context, truth, r["mask"], hole, "star_vase")
    assert empty["iou"] == 0.0 and empty["colour"] < 0.05 and not empty["both_colours"] and empty["context_exact"]
    cut = np.zeros((64, 64, 3), np.float32)
    cut_mask = np.zeros((64, 64), bool)
    cut_mask[10:50, 20:40] = True
    cut[cut_mask] = (40 / 255, 80 / 255, 200 / 255)
    pasted = ev.paste_cutout(context.astype(np.float32), hole, cut, cut_mask).numpy()
    assert np.array_equal(pasted[~hole], context[~hole].astype(np.float32)) and (pasted[hole] != context[hole]).any()


def test_too_large_mask_keeps_a_frame_of_context_around_a_large_product():
    """The ablation's rectangle (0.9 x the product's size beyond it) around a large product would cover the
    whole image, which insert refuses (nothing to keep): it is clipped to leave the frame."""
    product = np.zeros((128, 128), bool)
    product[30:110, 40:90] = True
    grown = insertion_hole(product, "rectangle", ev.TOO_LARGE_MARGIN)
    assert grown.all()  # what failed the first full run on the dotted lamp
    clipped = ev._inside_frame(grown, ev.TOO_LARGE_FRAME)
    f = ev.TOO_LARGE_FRAME
    assert not clipped[:f].any() and not clipped[-f:].any() and not clipped[:, :f].any() and not clipped[:, -f:].any()
    assert clipped[f:-f, f:-f].all() and clipped[product].all()


def test_smoke_run_writes_the_report_and_the_sample_sheet(tiny_model_dir, tmp_path):
    branch = write_random_dreampainter_weights(tiny_model_dir, tmp_path / "insertion.safetensors", seed=3, stage=1,
                                               config=DreamPainterConfig(control_blocks=2, lora_rank=0,
                                                                         task="insertion"))
    out = tmp_path / "eval"
    assert ev.main(["--base", str(tiny_model_dir), "--weights", "none", "--insertion-weights", str(branch),
                    "--out", str(out), "--smoke"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"class_noun", "product", "paste", "prior", "too_large", "branch", "vae_ceiling"}
    assert all(cell["n"] == 3 for cell in report["summary"].values())
    assert all(row["context_exact"] for row in report["rows"] if row["setting"] != "paste")
    assert {"product - class_noun", "product - paste", "branch - product", "prior - product",
            "too_large - product"} == set(report["paired"])
    assert report["trained"]["star_vase"]["prior"]["steps"] == 2
    assert (out / "samples.png").is_file() and "| product |" in (out / "table.md").read_text()
    assert ev.main(["--base", str(tiny_model_dir), "--out", str(out), "--products", "teapot"]) == 2
