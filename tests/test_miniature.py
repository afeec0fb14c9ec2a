"""train.miniature --smoke: every phase of the miniature DreamEcom for a handful of steps (CPU).

The result must load in DreamPainterPipeline (base folder + DreamPainter file), be stored in bf16,
fit in 20 MB, and train.evaluate must have written its reports. A second run skips every phase; a
run with changed settings refuses to mix models; --budget-minutes scales the step counts.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from dreampainter_core.pipeline import DreamPainterPipeline
from train import miniature
from train.miniature import PHASES, Miniature, RecipeError, load_recipe


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("miniature") / "run"
        t0 = time.perf_counter()
        assert miniature.main(["--out", str(out), "--smoke"]) == 0
        print(f"miniature --smoke: {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(n)
    return out


def test_smoke_result_loads_is_bf16_small_and_evaluated(smoke_run):
    model = smoke_run / "model"
    weights = model / miniature.WEIGHTS_NAME
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / sub).is_dir(), sub
    assert (model / "model_index.json").is_file() and weights.is_file()

    # Every weight file in bf16; the whole folder under 20 MB.
    files = sorted(model.rglob("*.safetensors"))
    assert {f.relative_to(model).parts[0] for f in files} == {
        "transformer", "vae", "text_encoder", miniature.WEIGHTS_NAME}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"BF16"}, f
    total = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    assert total < 20e6

    with safe_open(str(weights), framework="pt") as st:
        meta = st.metadata()
    assert meta["stage"] == "2" and meta["base_model"] == miniature.BASE_MODEL_NAME

    # The VAE config carries the measured latent scale / shift; the pipeline applies them.
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 1.0 and vae_cfg["latent_channels"] == 16 and not vae_cfg["use_quant_conv"]

    pipe = DreamPainterPipeline.from_pretrained(model, dreampainter_weights=weights)
    assert pipe.transformer.control is not None and pipe.transformer.supports_reference
    assert pipe.transformer.control.blocks.__len__() == 4 and pipe.transformer.base.config.num_layers == 6
    product = torch.rand(1, 128, 128, 3)
    mask = torch.zeros(1, 128, 128)
    mask[:, 40:100, 50:80] = 1
    img = pipe("a red bottle on a white table, soft shadow, blue striped background", product, mask,
               reference=torch.rand(1, 128, 128, 3), steps=2, guidance_scale=2.0)
    assert img.shape == (1, 128, 128, 3) and torch.isfinite(img).all()
    assert torch.equal(img[mask.bool()], product[mask.bool()])  # paste-back

    report = json.loads((smoke_run / "eval" / "report.json").read_text())
    assert set(report["modes"]) == {"vae", "t2i", "tr2i"} and report["resolution"] == [128, 128]
    for body in report["modes"].values():
        assert body["summary"]["n"] == 2 and body["summary"]["product_exact_pasted"] == 1.0
    assert (smoke_run / "eval" / "report.png").is_file()
    sweep = json.loads((smoke_run / "eval" / "sweep.json").read_text())
    assert {p: [pt["value"] for pt in body["points"]] for p, body in sweep["sweeps"].items()} == {
        "lora_scale": [0.0, 1.0], "attention_scale": [0.0, 1.0]}

    summary = json.loads((smoke_run / "summary.json").read_text())
    assert list(summary["phases"]) == list(PHASES)
    assert summary["phases"]["stage1"]["metrics"]["steps"] == 2
    assert summary["phases"]["export"]["metrics"]["total_mb"] < 20


def test_second_run_skips_every_phase_and_changed_settings_are_refused(smoke_run):
    mtime = (smoke_run / "model" / miniature.WEIGHTS_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    summary = Miniature(smoke_run, load_recipe(smoke=True), echo=lambda m: None).run()
    assert time.perf_counter() - t0 < 10
    assert all(p["skipped"] for p in summary["phases"].values())
    assert (smoke_run / "model" / miniature.WEIGHTS_NAME).stat().st_mtime_ns == mtime

    recipe = load_recipe(smoke=True)
    recipe["base"]["lr"] = 5e-4  # the base phase (and everything after it) would differ
    with pytest.raises(RecipeError, match="phase 'base' was made with other settings"):
        Miniature(smoke_run, recipe, echo=lambda m: None).run()


def test_budget_scales_steps_and_stage_configs(tmp_path):
    recipe = load_recipe()
    full = Miniature(tmp_path, recipe)
    half = Miniature(tmp_path, recipe, budget_minutes=recipe["budget_minutes"] / 2)
    assert half.scale == pytest.approx(0.5)
    for phase in ("vae", "base"):
        assert half._phase_settings(phase)["steps"] == round(recipe[phase]["steps"] / 2)
    c1, h1 = full.stage_config(1), half.stage_config(1)
    assert h1.train.max_steps == round(c1.train.max_steps / 2)
    assert c1.model.base == str(tmp_path / "model") and c1.data.manifest == str(tmp_path / "data" / "train.jsonl")
    assert (c1.model.dtype, c1.train.mixed_precision, c1.checkpoint.export_dtype) == ("bf16", "bf16", "bf16")
    assert c1.train.mask_loss_weight > 1 and c1.cache.enabled and c1.data.empty_prompt_prob > 0
    c2 = full.stage_config(2)
    assert c2.model.stage1_weights == str(tmp_path / "stage1" / "dreampainter_stage1.safetensors")
    assert 0 < c2.data.reference_prob <= 1 and 128 in c2.data.reference_sizes
    assert c2.train.high_noise_prob > 0 and c2.train.high_noise_from < 1  # the reference pays at high noise
    # --smoke ignores the budget; every phase gets a handful of steps.
    smoke = Miniature(tmp_path, load_recipe(smoke=True), budget_minutes=45)
    assert smoke.scale == 1.0 and smoke.stage_config(1).train.max_steps == 2


def test_embed_installs_a_finished_run_as_the_embedded_model(smoke_run, tmp_path, monkeypatch):
    from dreampainter_core.embedded import embedded_model
    from dreampainter_core.generate import run_demo

    models, docs = tmp_path / "models", tmp_path / "docs"
    info = miniature.embed(smoke_run, models_dir=models, docs_dir=docs)
    model = embedded_model(models)
    assert not (model.base / miniature.WEIGHTS_NAME).exists(), "the DreamPainter file lives in models/dreampainter/"
    assert model.weights.read_bytes() == (smoke_run / "model" / miniature.WEIGHTS_NAME).read_bytes()
    assert info["total_mb"] <= 20 and {"report.json", "sweep.json", "summary.json"} <= {p.name for p in docs.iterdir()}
    spec = model.demo_spec()
    scenes = [json.loads(line) for line in (smoke_run / "data" / "test.jsonl").read_text().splitlines()]
    product_scene = next(s for s in scenes if s["id"] == spec["product_scene"])
    assert (model.demo / "product.png").read_bytes() == (smoke_run / "data" / product_scene["image"]).read_bytes()
    assert product_scene["scene"]["product"]["color"] in spec["prompt"]
    written = run_demo(tmp_path / "demo", steps=2, seed=0, models_dir=models)
    assert len(written) == 6 and all(p.is_file() for p in written)

    # The demo samples as the model was evaluated: the recipe's [evaluate] steps, guidance, LoRA
    # scale and shield, recorded in miniature.json; an explicit guidance wins.
    e = load_recipe(smoke=True)["evaluate"]
    sampling = model.sampling()
    assert sampling["steps"] == int(e["steps"]) and sampling["guidance"] == float(e["guidance"])
    assert sampling.get("reference_guidance") == e.get("reference_guidance")
    lora, shield = float(e.get("lora_scale", 1.0)), bool(e.get("shield_product", False))
    assert (sampling.get("lora_scale", 1.0), sampling.get("shield_product", False)) == (lora, shield)
    report = json.loads((docs / "report.json").read_text())
    assert (report["lora_scale"], report["shield_product"]) == (lora, shield)  # measured as sampled
    seen = []
    real_call = DreamPainterPipeline.__call__

    def spy(self, *a, **kw):
        assert (kw["lora_scale"], kw["shield_product"]) == (lora, shield)
        seen.append((kw["steps"], kw["guidance_scale"], kw["reference_guidance"]))
        return real_call(self, *a, **kw)

    monkeypatch.setattr(DreamPainterPipeline, "__call__", spy)
    run_demo(tmp_path / "demo2", steps=None, seed=0, models_dir=models)
    run_demo(tmp_path / "demo3", steps=1, seed=0, models_dir=models, guidance=1.25, reference_guidance=3.0)
    g_r = sampling.get("reference_guidance")
    assert seen == [(sampling["steps"], sampling["guidance"], None)] * 2 + [(sampling["steps"], sampling["guidance"], g_r)] \
        + [(1, 1.25, None)] * 2 + [(1, 1.25, 3.0)]
    miniature.embed(smoke_run, models_dir=models, docs_dir=docs)  # again: replaces in place
    assert embedded_model(models).weights.is_file()


def test_committed_recipe_has_the_fingerprints_of_the_committed_run():
    """The committed model's run (docs/miniature/summary.json) recorded each phase's fingerprint: the
    committed recipe must still give them, or rerunning it would retrain (and mix up) phases."""
    recorded = json.loads((miniature.REPO / "docs" / "miniature" / "summary.json").read_text())["phases"]
    mini = Miniature("unused", load_recipe())
    assert {p: mini.fingerprint(p) for p in PHASES} == {p: recorded[p]["fingerprint"] for p in PHASES}


def test_bad_recipe_values_are_refused_naming_the_key(tmp_path):
    text = miniature.DEFAULT_RECIPE.read_text()
    for old, new, msg in (
        ("lr = 1e-3\nwarmup_steps = 100", 'lr = "fast"\nwarmup_steps = 100', r"vae\.lr: expected a number, got 'fast'"),
        ("num_layers = 6", "num_layerz = 6", r"unknown key base\.num_layerz; keys of \[base\]: .*num_layers"),
        ("num_layers = 6", "", r"missing base\.num_layers"),
        ("[export]\nmax_mb = 20.0", "", r"missing \[export\]"),
        ('precision = "bf16"', 'precision = "fp16"', r"precision must be one of bf16, fp32; got 'fp16'"),
        ("empty_prompt_prob = 0.1", "empty_prompt_prob = 1.5", r"base\.empty_prompt_prob must be in \[0, 1\], got 1\.5"),
        ("source_probs = [0.5, 0.25, 0.25]", "source_probs = [0.5, 0.5]", r"vae\.source_probs must be three weights"),
        ("[smoke.vae]\nsteps = 2", "[smoke.vae]\nsteps = 2.5", r"vae\.steps: expected an integer, got 2\.5"),  # checked without --smoke too
        ("shield_product = true", "shield_product = true\nlora_scale = 5.0", r"evaluate\.lora_scale must be in \[0, 2\]"),
        ("shield_product = true", 'shield_product = "yes"', r"evaluate\.shield_product: expected"),
    ):
        assert text.count(old) == 1, old
        bad = tmp_path / "recipe.toml"
        bad.write_text(text.replace(old, new))
        with pytest.raises(RecipeError, match=msg):
            load_recipe(bad)
        assert miniature.main(["--out", str(tmp_path / "run"), "--recipe", str(bad)]) == 2
    assert not (tmp_path / "run").exists()
