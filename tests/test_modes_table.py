"""train.modes_table: each configuration's train.evaluate arguments (the evaluations themselves are
train.evaluate's, tested in test_evaluate.py)."""

import json

from train import modes_table as T


def _argv_per_configuration(tmp_path, monkeypatch, model):
    seen = {}

    def fake_evaluate(argv):
        out = argv[argv.index("--out") + 1]
        seen[out.rsplit("/", 1)[-1].removesuffix(".json")] = argv
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"modes": {}}, f)
        return 0

    monkeypatch.setattr(T.E, "main", fake_evaluate)
    for cfg in T.CONFIGURATIONS:
        T.run_configuration(cfg, model=str(model), weights="w.safetensors", manifest=tmp_path / "test.jsonl",
                            out=tmp_path, limit=2, steps=2, guidance=1.5)
    return seen


def _last(argv, flag):
    values = [argv[i + 1] for i, a in enumerate(argv) if a == flag]
    return values[-1] if values else None


def test_the_stage_rows_sample_as_the_model_was_measured(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "miniature.json").write_text(json.dumps({"sampling": {"steps": 20, "guidance": 1.5, "lora_scale": 0.8,
                                                                    "shield_product": True}}))
    seen = _argv_per_configuration(tmp_path, monkeypatch, model)
    assert _last(seen["stage2"], "--lora-scale") == "0.8" and "--shield-product" in seen["stage2"]
    assert _last(seen["stage1"], "--lora-scale") == "0"  # its own setting wins: exactly the stage-1 model
    for base_row in ("base_t2i_paste", "base_training_free", "base_in_context"):
        assert "--lora-scale" not in seen[base_row] and "--shield-product" not in seen[base_row]
        assert "--weights" not in seen[base_row]


def test_without_a_recorded_setting_the_stage_rows_run_as_trained(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    seen = _argv_per_configuration(tmp_path, monkeypatch, model)
    assert _last(seen["stage2"], "--lora-scale") is None and "--shield-product" not in seen["stage2"]
