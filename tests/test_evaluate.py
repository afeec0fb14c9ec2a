"""train.evaluate end to end on the tiny random model and a few synthetic scenes (CPU, 64 px, 2 steps)."""

import json

import pytest
from PIL import Image

from train.metrics import write_tiny_clip
from train import evaluate as ev
from train import synthetic as syn


def _strict_json(path):
    def bad(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_scenes")
    return syn.write_scenes(root, 3, size=64, seed=9, splits="0,0,1")["test"]


def test_evaluate_end_to_end_with_sweep_and_clip(tiny_model_dir, tiny_stage2_weights, scenes, tmp_path):
    clip_dir = write_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval" / "report.json"
    rc = ev.main([
        "--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(scenes),
        "--out", str(out), "--steps", "2", "--limit", "2", "--sweep", "attention_scale",
        "--sweep-values", "0,1", "--clip", str(clip_dir), "--plot", "pil",
    ])
    assert rc == 0
    report = _strict_json(out)
    assert report["n_samples"] == 2 and report["resolution"] == [64, 64] and report["steps"] == 2
    assert set(report["modes"]) == {"t2i", "tr2i"}
    for mode in ("t2i", "tr2i"):
        body = report["modes"][mode]
        summary, rows = body["summary"], body["samples"]
        assert summary["n"] == len(rows) == 2
        # Paste-back restores the product exactly; without it the random model does not.
        assert summary["product_exact_pasted"] == 1.0 and summary["product_psnr_pasted"] == ev.PSNR_CAP
        assert summary["product_psnr_raw"] < ev.PSNR_CAP
        for row in rows:
            assert row["segmenter"] == "color"
            assert row["object_consistency"] <= 1.0
            for key in ("background_color", "table_color", "pattern", "prompt_adherence"):
                assert isinstance(row[key], bool)
            assert isinstance(row.get("wall_tone", False), bool)
            assert 0.0 <= row["reference_similarity"] <= 1.0 and 0.0 <= row["quality"] <= 1.0
            assert -1.0 <= row["clip_t"] <= 1.0 and -1.0 <= row["clip_i"] <= 1.0
    assert "reference_similarity" in report["comparison"]
    # The paired difference pairs each scene's TR2I row with its own T2I row: with every scene
    # carrying a reference, its mean is the difference of the two summaries.
    for key in ("reference_similarity", "quality", "object_consistency"):
        entry = report["comparison"][key]
        paired = entry["paired"]
        assert paired["n"] == 2
        assert paired["mean_difference"] == pytest.approx(entry["tr2i_minus_t2i"], abs=2e-6)  # both rounded for JSON
        assert paired["ci"][0] <= paired["mean_difference"] <= paired["ci"][1]
        assert paired["b_ahead"] + paired["a_ahead"] <= 1.0
    sweep = report["sweeps"]["attention_scale"]
    assert [p["value"] for p in sweep["points"]] == [0.0, 1.0]
    assert all(p["n"] == 2 and p["reference_similarity"] is not None and p["quality"] is not None
               for p in sweep["points"])
    # each point has its interval, and the others their paired difference from the value 1
    sim = sweep["points"][0]["intervals"]["reference_similarity"]
    assert sim["ci"][0] <= sweep["points"][0]["reference_similarity"] <= sim["ci"][1]
    diff = sweep["points"][0]["vs_1"]["reference_similarity"]["mean_difference"]
    assert diff == pytest.approx(sweep["points"][0]["reference_similarity"] - sweep["points"][1]["reference_similarity"],
                                 abs=2e-6)  # each rounded for JSON
    assert "vs_1" not in sweep["points"][1]
    # attention_scale 1 is the plain TR2I run: same numbers as the tr2i mode
    assert sweep["points"][1]["reference_similarity"] == pytest.approx(
        report["modes"]["tr2i"]["summary"]["reference_similarity"])
    assert set(ev.DEFINITIONS) <= set(report["definitions"])
    assert report["plot_backend"] == "pil"
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[0] >= 640 and im.size[1] > 300
    with Image.open(out.with_name("report_samples.png")) as im:
        assert im.size == (64 * 4, 18 + 64 * 2)
    assert not list(out.parent.glob(".*.tmp"))


def test_reference_guidance_run_and_sweep(tiny_model_dir, tiny_stage2_weights, scenes, tmp_path):
    out = tmp_path / "rg.json"
    rc = ev.main([
        "--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(scenes),
        "--out", str(out), "--steps", "2", "--limit", "2", "--reference-mode", "manifest", "--sheet", "0",
        "--reference-guidance", "2", "--sweep", "reference_guidance", "--plot", "pil",
    ])
    assert rc == 0
    report = _strict_json(out)
    assert report["reference_guidance"] == 2.0
    sweep = report["sweeps"]["reference_guidance"]
    assert [p["value"] for p in sweep["points"]] == list(ev.REFERENCE_GUIDANCE_VALUES)
    assert sweep["fixed"] == "lora_scale=1, attention_scale=1"
    tr2i = report["modes"]["tr2i"]["summary"]["reference_similarity"]
    at_run_value = next(p for p in sweep["points"] if p["value"] == 2.0)
    assert at_run_value["reference_similarity"] == pytest.approx(tr2i)  # the sweep point is the run itself
    assert len({round(p["reference_similarity"], 6) for p in sweep["points"]}) > 1  # the knob acts


def test_guidance_end_and_the_shield_reach_the_sampler_and_the_report(tiny_model_dir, tiny_stage2_weights, scenes,
                                                                      tmp_path):
    """The recipe's sampler settings are what a report says it ran at, and each one changes the images."""
    common = ["--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(scenes),
              "--steps", "2", "--limit", "1", "--reference-mode", "manifest", "--sheet", "0", "--plot", "pil",
              "--guidance", "3"]
    runs = {"plain": [], "end": ["--guidance-end", "0.5"],
            "shield": ["--shield-product", "--sweep", "attention_scale", "--sweep-values", "1"]}
    reports = {}
    for name, extra in runs.items():
        assert ev.main(common + extra + ["--out", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = _strict_json(tmp_path / f"{name}.json")
    assert (reports["plain"]["guidance_end"], reports["end"]["guidance_end"]) == (1.0, 0.5)
    assert reports["shield"]["shield_product"] and not reports["plain"]["shield_product"]
    assert reports["shield"]["sweeps"]["attention_scale"]["fixed"].endswith("shield_product")
    psnr = {k: r["modes"]["tr2i"]["samples"][0]["product_psnr_raw"] for k, r in reports.items()}
    assert psnr["end"] != psnr["plain"] and psnr["shield"] != psnr["plain"], psnr


def test_text_only_evaluation_of_a_plain_manifest(tiny_model_dir, tiny_stage2_weights, tmp_path):
    # The toy dataset has no scene ground truth: no adherence, no segmenter without rembg.
    manifest = syn.write_synthetic_dataset(tmp_path / "toy", num=2, size=32, seed=0)
    out = tmp_path / "toy_report.json"
    rc = ev.main([
        "--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(manifest),
        "--out", str(out), "--steps", "1", "--reference-mode", "none", "--segmenter", "none", "--sheet", "0",
        "--sweep", "lora_scale", "--sweep-values", "0.5",
    ])
    assert rc == 0
    report = _strict_json(out)
    assert list(report["modes"]) == ["t2i"]
    summary = report["modes"]["t2i"]["summary"]
    assert "object_consistency" not in summary and "prompt_adherence" not in summary
    assert summary["product_exact_pasted"] == 1.0 and 0.0 <= summary["reference_similarity"] <= 1.0
    assert report["sweeps"]["lora_scale"]["points"][0]["value"] == 0.5
    assert out.with_suffix(".png").is_file() and not out.with_name("toy_report_samples.png").exists()


def test_reference_mode_manifest_needs_a_stage2_model(tiny_model_dir, scenes, tmp_path, capsys):
    rc = ev.main(["--model", str(tiny_model_dir), "--manifest", str(scenes), "--out", str(tmp_path / "r.json"),
                  "--steps", "1", "--reference-mode", "manifest"])
    assert rc == 1 and "stage-2" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_summary_and_png_from_a_report_dict(tmp_path):
    rows = [{"id": "a", "object_consistency": 1.0, "product_psnr_raw": float("inf"), "background_color": True},
            {"id": "b", "object_consistency": 0.5, "product_psnr_raw": 20.0, "background_color": False,
             "reference_similarity": None}]
    s = ev.summarize(rows)
    assert s["object_consistency"] == 0.75 and s["background_color"] == 0.5
    assert s["product_psnr_raw"] == pytest.approx((ev.PSNR_CAP + 20.0) / 2)
    assert "reference_similarity" not in s
    report = {"n_samples": 2, "resolution": [64, 64], "steps": 2, "guidance_scale": 1.0, "segmenter": "auto",
              "modes": {"t2i": {"summary": s}},
              "sweeps": {"lora_scale": {"fixed": "attention_scale=1", "points": [
                  {"value": v, "reference_similarity": v / 2, "quality": 1 - v / 3, "prompt_adherence": None,
                   "object_consistency": 1.0} for v in (0.0, 0.5, 1.0)]}}}
    assert ev.write_report_png(report, tmp_path / "t.png", backend="pil") == "pil"
    with Image.open(tmp_path / "t.png") as im:
        assert im.mode == "RGB"


def test_reference_probe_tells_right_none_and_wrong_references_apart(tiny_model_dir, tiny_stage2_weights, scenes,
                                                                      tmp_path):
    import dataclasses

    from train import reference_probe as rp

    pipe = ev.load_pipeline(str(tiny_model_dir), str(tiny_stage2_weights))
    samples = ev.load_samples(scenes, 3)
    losses = rp.reference_losses(pipe, samples, times=(0.95, 0.5))
    assert set(losses) == {"0.95", "0.5"}
    for row in losses.values():
        assert all(v > 0 for v in row.values())
        assert row["right"] != row["none"] and row["right"] != row["shuffled"]
    # With one reference for every scene, "another scene's" reference is the scene's own.
    same = [dataclasses.replace(s, reference=samples[0].reference) for s in samples]
    for row in rp.reference_losses(pipe, same, times=(0.95,)).values():
        assert row["right"] == row["shuffled"] != row["none"]
    # One scene has no other scene to borrow a wrong reference from: a clear error, not a torch trace.
    with pytest.raises(Exception, match="at least 2 samples"):
        rp.reference_losses(pipe, samples[:1])
    out = tmp_path / "probe.json"
    assert rp.main(["--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(scenes),
                    "--limit", "2", "--times", "0.9", "--dtype", "fp32", "--out", str(out)]) == 0
    report = _strict_json(out)
    assert report["n"] == 2 and set(report["losses"]) == {"0.9"}
    assert rp.main(["--model", str(tiny_model_dir), "--weights", str(tiny_stage2_weights), "--manifest", str(scenes),
                    "--times", "1.5"]) == 2


def test_where_evaluates_a_subset_with_the_seeds_of_the_whole_run(tiny_model_dir, scenes, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--manifest", str(scenes), "--steps", "2", "--reference-mode", "none",
              "--plot", "pil", "--sheet", "0"]
    whole, part = tmp_path / "whole.json", tmp_path / "part.json"
    assert ev.main(common + ["--out", str(whole)]) == 0
    rows = {r["id"]: r for r in _strict_json(whole)["modes"]["t2i"]["samples"]}
    lines = [json.loads(line) for line in scenes.read_text(encoding="utf-8").splitlines() if line.strip()]
    last = lines[-1]["scene"]["table"]["shape"]
    wanted = {str(item["id"]) for item in lines if item["scene"]["table"]["shape"] == last}
    assert len(wanted) < len(lines) or len(lines) == 1
    assert ev.main(common + ["--out", str(part), "--where", f"table.shape={last}"]) == 0
    subset = _strict_json(part)["modes"]["t2i"]["samples"]
    assert {r["id"] for r in subset} == wanted
    for r in subset:  # the same seed as in the whole run, so the same image and numbers
        assert r == rows[r["id"]]
    for r in rows.values():  # plain walls carry the grid measures, patterned ones none
        plain = "grid_energy" in r
        assert ("grid_excess" in r) == plain and ("wall_unevenness" in r) == plain
        if plain and r["wall_unevenness"] is not None:
            assert r["wall_unevenness"] >= 0.0
        # the tone mix where the wall's colour has several tones (white and black have one)
        colour = next(item["scene"]["background"]["color"] for item in lines if str(item["id"]) == r["id"])
        assert ("wall_tone_mix" in r) == (plain and len(syn.WALL_TONES[colour]) > 1)
        if "wall_tone_mix" in r and r["wall_tone_mix"] is not None:
            assert 0.0 <= r["wall_tone_mix"] <= 2 / 3
    assert ev.main(common + ["--out", str(part), "--where", "table.colour=red"]) == 1
    assert "no scene field 'table.colour'" in capsys.readouterr().err
    assert ev.main(common + ["--out", str(part), "--where", "table.shape"]) == 1
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_compare_pairs_two_reports_by_scene_and_refuses_unlike_runs(tmp_path):
    from train.compare import compare, main

    def report(values, seed=0):
        return {"seed": seed, "steps": 20, "guidance_scale": 1.5,
                "modes": {"tr2i": {"samples": [{"id": str(i), "wall_tone": v, "quality": 0.5} for i, v in values]}}}

    a = report([(0, False), (1, False), (2, True), (3, None)])
    b = report([(3, True), (2, True), (1, True), (0, True), (9, False)])  # another order, an extra scene
    out = compare(a, b, "tr2i", metrics=("wall_tone", "quality"))
    assert out["n_items"] == 4
    assert out["wall_tone"]["n"] == 3 and out["wall_tone"]["mean_difference"] == pytest.approx(2 / 3)
    assert out["quality"]["mean_difference"] == 0.0
    with pytest.raises(ValueError, match="seed"):
        compare(a, report([(0, True)], seed=1), "tr2i")
    with pytest.raises(ValueError, match="no mode 't2i'"):
        compare(a, b, "t2i")
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a)), pb.write_text(json.dumps(b))
    assert main([str(pa), str(pb), "--metrics", "wall_tone", "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["wall_tone"]["n"] == 3
    assert main([str(pa), str(pb), "--metrics", "nonsense"]) == 2
    # one report's mode against another of its modes, scene by scene (e.g. against the VAE round trip)
    both = {**a, "modes": {**a["modes"], "vae": {"samples": [{"id": str(i), "quality": 0.5 + 0.1 * i} for i in range(3)]}}}
    out = compare(both, both, "tr2i", metrics=("quality",), mode_a="vae")
    assert out["mode_a"] == "vae" and out["quality"]["n"] == 3
    assert out["quality"]["mean_difference"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="no mode 'nope'"):
        compare(both, both, "tr2i", mode_a="nope")


def test_compare_by_a_scene_field_pairs_within_each_group(tmp_path, capsys):
    from train.compare import main

    def report(values):
        return {"seed": 0, "steps": 20, "guidance_scale": 1.5,
                "modes": {"t2i": {"samples": [{"id": str(i), "wall_tone": v} for i, v in enumerate(values)]}}}

    pa, pb, manifest = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.jsonl"
    pa.write_text(json.dumps(report([False, False, True, True])))
    pb.write_text(json.dumps(report([True, True, True, False])))
    shapes = ["cup", "cup", "box", "box"]
    manifest.write_text("".join(json.dumps({"id": str(i), "scene": {"product": {"shape": s}}}) + "\n"
                                for i, s in enumerate(shapes)))
    out = tmp_path / "c.json"
    assert main([str(pa), str(pb), "--mode", "t2i", "--metrics", "wall_tone", "--manifest", str(manifest),
                 "--by", "product.shape", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["wall_tone"]["mean_difference"] == pytest.approx(0.25)  # +2 on cups, -1 on boxes, over 4
    groups = result["by"]["groups"]
    assert groups["cup"]["wall_tone"]["mean_difference"] == 1.0 and groups["cup"]["n_items"] == 2
    assert groups["box"]["wall_tone"]["mean_difference"] == -0.5
    assert "product.shape = box" in capsys.readouterr().out
    assert main([str(pa), str(pb), "--mode", "t2i", "--by", "product.shape"]) == 2  # no manifest
    assert "--by needs --manifest" in capsys.readouterr().err
    assert main([str(pa), str(pb), "--mode", "t2i", "--manifest", str(manifest), "--by", "product.colour"]) == 2
    assert "no 'product.colour'" in capsys.readouterr().err


def test_grid_probe_at_no_noise_is_the_vae_round_trip(tiny_model_dir, tiny_stage2_weights, tmp_path):
    from train.grid_probe import grid_probe, main

    root = tmp_path / "scenes"
    manifest = syn.write_scenes(root, 12, size=64, seed=9, splits="0,0,1")["test"]
    samples = ev.load_samples(manifest, None)
    plain = [s for s in samples if s.scene["background"]["pattern"] == "plain"]
    assert plain, "the seed must give at least one plain wall"
    pipe = ev.load_pipeline(str(tiny_model_dir), str(tiny_stage2_weights))
    result = grid_probe(pipe, samples, times=(1e-6, 0.9))
    assert result["n"] == len(plain)
    # At (almost) no noise the one-step prediction is the encoded truth itself: the round trip's grid.
    assert result["times"]["1e-06"]["sigma"] < 1e-4
    for k in ("grid_energy", "grid_excess", "wall_unevenness"):
        assert result["times"]["1e-06"][k] == pytest.approx(result["vae"][k], rel=0.05, abs=1e-7)
    assert result["times"]["0.9"]["grid_energy"] != pytest.approx(result["vae"]["grid_energy"], rel=0.05)  # the random model's
    with pytest.raises(Exception, match="no scene with a plain wall"):
        grid_probe(pipe, [s for s in samples if s not in plain] or samples[:0])
    assert main(["--model", str(tiny_model_dir), "--manifest", str(manifest), "--times", "0,0.5"]) == 2
    out = tmp_path / "g.json"
    assert main(["--model", str(tiny_model_dir), "--manifest", str(manifest), "--times", "0.5", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == len(plain)
