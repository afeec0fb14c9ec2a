"""DreamPainter weight files: round trip, metadata, and rejection of wrong files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreampainter_core import ModelFilesError, WeightFormatError
from dreampainter_core.loading import load_transformer
from train.tiny import build_tiny_components
from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer
from dreampainter_core.weights import (
    FORMAT_VERSION,
    build_from_weights,
    load_dreampainter_weights,
    read_dreampainter_metadata,
    save_dreampainter_weights,
)

# Hostile inputs: a regression that allocates what one asks for fails instead of eating the machine.
pytestmark = pytest.mark.memcap  # tests/conftest.py


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_stage2_round_trip_is_bit_identical(tiny_model_dir, tiny_stage2_weights, tmp_path):
    model = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage2_weights)
    assert model.has_lora and model.supports_reference
    again = save_dreampainter_weights(model, tmp_path / "again.safetensors", base_model="tiny-random-cogview4")
    a, meta_a = _tensors(tiny_stage2_weights)
    b, meta_b = _tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b
    assert any(k.startswith("lora.") for k in a) and any(k.startswith("control.gates") for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "gates" in k)


def test_how_the_reference_enters_round_trips(tiny_model_dir, tiny_stage2_weights, tmp_path):
    """reference_timestep and reference_layout are part of the model: a file keeps them and the
    loaded model runs with them."""
    model = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage2_weights)
    model.config.reference_timestep, model.config.reference_layout = "clean", "beside"
    path = save_dreampainter_weights(model, tmp_path / "clean.safetensors", base_model="tiny-random-cogview4")
    again = build_from_weights(load_transformer(tiny_model_dir / "transformer"), path)
    assert (again.config.reference_timestep, again.config.reference_layout) == ("clean", "beside")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, again.base.config.text_embed_dim, generator=g)
    size, crop, t = torch.tensor([[64.0, 64.0]]), torch.zeros(1, 2), torch.tensor([500.0])
    ref = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(again(x, e, t, size, size, crop, reference_latents=ref),
                           model(x, e, t, size, size, crop, reference_latents=ref))


def test_metadata_describes_the_layout(tiny_stage2_weights, tiny_stage1_weights):
    meta = read_dreampainter_metadata(tiny_stage2_weights)
    assert meta["format"] == "dreampainter" and int(meta["format_version"]) == FORMAT_VERSION
    assert meta["stage"] == "2" and int(meta["lora_rank"]) > 0 and json.loads(meta["lora_targets"])
    assert json.loads(meta["injection_layers"]) == json.loads(meta["dreampainter_config"])["injection_layers"]
    assert int(meta["control_blocks"]) == len(json.loads(meta["injection_layers"]))
    meta1 = read_dreampainter_metadata(tiny_stage1_weights)
    assert meta1["stage"] == "1" and meta1["lora_rank"] == "0"
    tensors, _ = _tensors(tiny_stage1_weights)
    assert not any(k.startswith("lora.") for k in tensors)


def test_stage1_file_builds_model_without_reference_support(tiny_model_dir, tiny_stage1_weights):
    model = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage1_weights)
    assert model.control is not None and not model.has_lora and not model.supports_reference


def test_bf16_save_and_load_into_bf16_model(tiny_model_dir, tiny_stage2_weights, tmp_path):
    model = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage2_weights)
    path = save_dreampainter_weights(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    tensors, _ = _tensors(path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    bf16 = build_from_weights(load_transformer(tiny_model_dir / "transformer", dtype=torch.bfloat16), path)
    assert bf16.dtype == torch.bfloat16


def test_not_a_dreampainter_file_is_rejected(tiny_model_dir, tmp_path):
    base_file = tmp_path / "some_lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(base_file), metadata={"format": "pt"})
    with pytest.raises(WeightFormatError, match="not a DreamPainter weight file"):
        build_from_weights(load_transformer(tiny_model_dir / "transformer"), base_file)
    pickle_file = tmp_path / "weights.ckpt"
    pickle_file.write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightFormatError, match="safetensors"):
        read_dreampainter_metadata(pickle_file)
    with pytest.raises(ModelFilesError, match="not found"):
        read_dreampainter_metadata(tmp_path / "missing.safetensors")


def test_truncated_file_is_rejected(tiny_model_dir, tiny_stage2_weights, tmp_path):
    data = tiny_stage2_weights.read_bytes()
    for name, cut_at in (("header.safetensors", 20), ("body.safetensors", len(data) - 100)):
        cut = tmp_path / name
        cut.write_bytes(data[:cut_at])
        with pytest.raises(ModelFilesError, match=name):
            build_from_weights(load_transformer(tiny_model_dir / "transformer"), cut)


def test_file_for_another_base_is_rejected(tiny_stage2_weights):
    other = build_tiny_components(seed=0)["transformer"]
    bigger = type(other)(**{**other.config, "num_layers": 6})
    with pytest.raises(WeightFormatError, match="another base model"):
        build_from_weights(bigger, tiny_stage2_weights)


def test_file_for_another_layout_is_rejected(tiny_model_dir, tiny_stage2_weights):
    base = load_transformer(tiny_model_dir / "transformer")
    model = DreamPainterTransformer(base, DreamPainterConfig(control_blocks=1, lora_rank=4))
    with pytest.raises(WeightFormatError, match="control blocks"):
        load_dreampainter_weights(model, tiny_stage2_weights)


def test_tampered_file_is_rejected(tiny_model_dir, tiny_stage2_weights, tmp_path):
    tensors, meta = _tensors(tiny_stage2_weights)
    key = next(k for k in tensors if k.startswith("control.gates"))
    tensors[key] = torch.zeros(3, 3)
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightFormatError, match="wrong shapes"):
        build_from_weights(load_transformer(tiny_model_dir / "transformer"), bad)
    del tensors[key]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightFormatError, match="missing"):
        build_from_weights(load_transformer(tiny_model_dir / "transformer"), bad)


def test_newer_format_version_is_rejected(tiny_stage2_weights, tmp_path):
    tensors, meta = _tensors(tiny_stage2_weights)
    meta["format_version"] = str(FORMAT_VERSION + 1)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata=meta)
    with pytest.raises(WeightFormatError, match="Update ComfyUI-DreamPainter"):
        read_dreampainter_metadata(newer)


# ---- hostile files: refused from the header, before anything is built (each under a memory cap) ----

from dreampainter_core.safetensors_io import FP8_READABLE  # noqa: E402
from forge import read_all, raw_safetensors  # noqa: E402
from memcap import run_capped  # noqa: E402

_IMPORTS = """
import torch
from dreampainter_core.loading import load_transformer
from dreampainter_core.weights import build_from_weights, read_dreampainter_metadata
"""
_GEOMETRY = ("base_num_layers", "base_inner_dim", "base_in_channels", "base_patch_size")


def _forge(src, dst, *, config=None, drop=(), tensors=None, **metadata):
    """A copy of DreamPainter file ``src`` with changed metadata (``config``: changes to the
    dreampainter_config JSON), dropped metadata keys and changed tensors."""
    data, meta = read_all(src)
    if config is not None:
        meta["dreampainter_config"] = json.dumps({**json.loads(meta["dreampainter_config"]), **config})
    meta.update(metadata)
    for key in drop:
        meta.pop(key, None)
    save_file(tensors(data) if tensors else data, str(dst), metadata=meta)
    return dst


def _outcomes(files: dict, body_call: str, tiny_model_dir=None) -> dict:
    """{case: {"error", "message"}} of body_call(path) for every file, in one capped child."""
    result = run_capped(f"""
base_dir = {str(tiny_model_dir)!r}
result = {{case: outcome(lambda: {body_call}) for case, path in {json.dumps({k: str(v) for k, v in files.items()})}.items()}}
""", imports=_IMPORTS)
    assert result.error is None, result.output
    return result.value


def test_forged_block_count_and_rank_are_refused_before_anything_is_built(tiny_model_dir, tiny_stage2_weights,
                                                                          tmp_path):
    # The attack: a file under 1 MB whose metadata claims a huge branch or LoRA (the old loader
    # built it: > 4 GB with the tiny base, tens of GB on CogView4-6B).
    cases = {
        "blocks": (dict(config=dict(control_blocks=100_000, injection_layers=None, init_from=None),
                        control_blocks="100000", injection_layers="null"), "control_blocks"),
        "blocks_no_geometry": (dict(config=dict(control_blocks=200, injection_layers=None, init_from=None),
                                    control_blocks="200", injection_layers="null", drop=_GEOMETRY),
                               "'dreampainter_config.control_blocks' is 200; expected 1..4"),
        "rank": (dict(config=dict(lora_rank=1_000_000), lora_rank="1000000"), "lora_rank"),
        "rank_no_geometry": (dict(config=dict(lora_rank=4096), lora_rank="4096", drop=_GEOMETRY), "lora_rank"),
        # in range, but the tensors do not back it up
        "rank_in_range": (dict(config=dict(lora_rank=64), lora_rank="64"), "wrong shapes"),
        "blocks_in_range": (dict(config=dict(control_blocks=4, injection_layers=None, init_from=None),
                                 control_blocks="4", injection_layers="null"), "missing"),
    }
    files = {name: _forge(tiny_stage2_weights, tmp_path / f"{name}.safetensors", **kw) for name, (kw, _) in cases.items()}
    assert all(f.stat().st_size < 2**20 for f in files.values())
    result = run_capped(f"""
base = load_transformer({str(tiny_model_dir / "transformer")!r})
files = {json.dumps({k: str(v) for k, v in files.items()})}
result = {{case: outcome(lambda: build_from_weights(base, path)) for case, path in files.items()}}
""", imports=_IMPORTS, cap_mb=1024)
    assert result.error is None, result.output
    print(f"peak RSS growth while refusing {len(files)} forged files: {result.peak_growth_mb:.0f} MB")
    for name, (_, fragment) in cases.items():
        got = result.value[name]
        assert got["error"] == "WeightFormatError", (name, got)
        assert str(files[name]) in got["message"] and fragment in got["message"], (name, got["message"])


_MALFORMED = {  # case: (changes to the stage-2 file's metadata, field the message must name)
    "version_word": (dict(format_version="one"), "'format_version'"),
    "version_float": (dict(format_version="1.0"), "'format_version'"),
    "version_5000_digits": (dict(format_version="9" * 5000), "'format_version'"),
    "version_missing": (dict(drop=("format_version",)), "'format_version'"),
    "stage_3": (dict(stage="3"), "'stage'"),
    "geometry_word": (dict(base_num_layers="four"), "'base_num_layers'"),
    "config_not_json": (dict(dreampainter_config="{control_blocks: 2"), "'dreampainter_config'"),
    "config_a_list": (dict(dreampainter_config="[1, 2]"), "'dreampainter_config'"),
    "config_nested": (dict(dreampainter_config="[" * 30_000 + "]" * 30_000), "'dreampainter_config'"),
    "config_huge_string": (dict(dreampainter_config=json.dumps({"x": "a" * 100_000})), "'dreampainter_config'"),
    "unknown_key": (dict(config=dict(evil=1)), "unknown keys ['evil']"),
    "blocks_text": (dict(config=dict(control_blocks="2")), "'dreampainter_config.control_blocks'"),
    "blocks_bool": (dict(config=dict(control_blocks=True)), "'dreampainter_config.control_blocks'"),
    "blocks_float": (dict(config=dict(control_blocks=2.5)), "'dreampainter_config.control_blocks'"),
    "blocks_zero": (dict(config=dict(control_blocks=0)), "'dreampainter_config.control_blocks'"),
    "injection_short": (dict(config=dict(injection_layers=[0])), "'dreampainter_config.injection_layers'"),
    "injection_outside": (dict(config=dict(injection_layers=[0, 99])), "'dreampainter_config.injection_layers[1]'"),
    "init_from_nested": (dict(config=dict(init_from=[[0], [1]])), "'dreampainter_config.init_from[0]'"),
    "rank_negative": (dict(config=dict(lora_rank=-1)), "'dreampainter_config.lora_rank'"),
    "alpha_nan": (dict(config=dict(lora_alpha=float("nan"))), "'dreampainter_config.lora_alpha'"),
    "alpha_negative": (dict(config=dict(lora_alpha=-4.0)), "'dreampainter_config.lora_alpha'"),
    "alpha_text": (dict(config=dict(lora_alpha="4")), "'dreampainter_config.lora_alpha'"),
    "targets_string": (dict(config=dict(lora_targets="attn1.to_q")), "'dreampainter_config.lora_targets'"),
    "targets_path": (dict(config=dict(lora_targets=["../../x"])), "'dreampainter_config.lora_targets'"),
    "targets_65": (dict(config=dict(lora_targets=["attn1.to_q"] * 65)), "'dreampainter_config.lora_targets'"),
    "reference_scale": (dict(config=dict(reference_scale="huge")), "'dreampainter_config.reference_scale'"),
    "reference_timestep": (dict(config=dict(reference_timestep="zero")), "'dreampainter_config.reference_timestep'"),
    "copy_disagrees": (dict(control_blocks="3"), "'control_blocks'"),
    "copy_not_json": (dict(injection_layers="[0, 2"), "'injection_layers'"),
}


def test_malformed_metadata_is_a_weight_format_error_naming_file_and_field(tiny_stage2_weights, tmp_path):
    files = {name: _forge(tiny_stage2_weights, tmp_path / f"{name}.safetensors", **kw)
             for name, (kw, _) in _MALFORMED.items()}
    outcomes = _outcomes(files, "read_dreampainter_metadata(path)")
    for name, (_, field) in _MALFORMED.items():
        got = outcomes[name]
        assert got["error"] == "WeightFormatError", (name, got)
        assert str(files[name]) in got["message"] and field in got["message"], (name, got["message"])
        assert len(got["message"]) < 1000, (name, got["message"][:300])  # nothing echoed at length


def test_config_that_does_not_fit_the_base_is_refused_before_building(tiny_model_dir, tiny_stage2_weights, tmp_path):
    cases = {
        "target_not_linear": (dict(config=dict(lora_targets=["norm1"]), lora_targets='["norm1"]'), "not a Linear"),
        "target_missing": (dict(config=dict(lora_targets=["attn9.to_q"]), lora_targets='["attn9.to_q"]'),
                           "not a Linear"),
        "other_base": (dict(base_inner_dim="128"), "another base model"),
        "extra_tensor": (dict(tensors=lambda t: {**t, "control.extra": torch.zeros(2)}), "unexpected tensors"),
    }
    files = {name: _forge(tiny_stage2_weights, tmp_path / f"{name}.safetensors", **kw) for name, (kw, _) in cases.items()}
    result = run_capped(f"""
base = load_transformer({str(tiny_model_dir / "transformer")!r})
files = {json.dumps({k: str(v) for k, v in files.items()})}
result = {{case: outcome(lambda: build_from_weights(base, path)) for case, path in files.items()}}
result["base_untouched"] = not any("lora_" in n for n, _ in base.named_parameters())
""", imports=_IMPORTS)
    assert result.error is None, result.output
    for name, (_, fragment) in cases.items():
        got = result.value[name]
        assert got["error"] == "WeightFormatError" and fragment in got["message"], (name, got)
    assert result.value["base_untouched"]  # refused before LoRA was injected into the base


def test_unsupported_dtypes_and_non_finite_weights_are_refused(tiny_model_dir, tiny_stage2_weights, tmp_path):
    data, _ = read_all(tiny_stage2_weights)
    gate = next(k for k in data if k.startswith("control.gates") and k.endswith("weight"))
    lora = next(k for k in data if k.startswith("lora."))
    stored_as = {"int32": "I32", "bool": "BOOL", "float64": "F64"}
    if FP8_READABLE:  # safetensors >= 0.4.2 writes float8
        stored_as["float8_e4m3fn"] = "F8_E4M3"  # refused here: LoRA and gates are never stored in fp8
    files = {f"dtype_{d}": _forge(tiny_stage2_weights, tmp_path / f"{d}.safetensors",
                                  tensors=lambda t, d=d: {**t, gate: t[gate].to(getattr(torch, d))})
             for d in stored_as}

    def poison(value, key):
        def change(t):
            bad = t[key].clone()
            bad.view(-1)[3] = value
            return {**t, key: bad}
        return change

    files["nan_gate"] = _forge(tiny_stage2_weights, tmp_path / "nan.safetensors", tensors=poison(float("nan"), gate))
    files["inf_lora"] = _forge(tiny_stage2_weights, tmp_path / "inf.safetensors", tensors=poison(float("inf"), lora))
    result = run_capped(f"""
base_path = {str(tiny_model_dir / "transformer")!r}
files = {json.dumps({k: str(v) for k, v in files.items()})}
result = {{case: outcome(lambda: build_from_weights(load_transformer(base_path), path, check_finite=True))
          for case, path in files.items()}}
# the check is optional: off, the file loads (the caller asked for it)
result["nan_unchecked"] = outcome(lambda: build_from_weights(load_transformer(base_path), files["nan_gate"]))
""", imports=_IMPORTS)
    assert result.error is None, result.output
    v = result.value
    for d, dtype in stored_as.items():
        case = f"dtype_{d}"
        assert v[case]["error"] == "WeightFormatError", (case, v[case])
        assert dtype in v[case]["message"] and gate in v[case]["message"] and str(files[case]) in v[case]["message"]
    for case, key in (("nan_gate", gate), ("inf_lora", lora)):
        assert v[case]["error"] == "WeightFormatError", (case, v[case])
        assert "NaN or infinite" in v[case]["message"] and key in v[case]["message"], v[case]
    assert v["nan_unchecked"]["error"] is None, v["nan_unchecked"]


def test_header_is_bounded_and_checked_before_tensor_data(tmp_path):
    huge = raw_safetensors(tmp_path / "huge_header.safetensors", {}, declared_length=2**40)
    with open(huge, "r+b") as fh:  # a sparse file as long as its header claims: nothing is read
        fh.truncate(2**40 + 8)
    files = {
        "huge_header": huge,
        "not_json": raw_safetensors(tmp_path / "not_json.safetensors", b"{not json" + b" " * 8),
        "nested": raw_safetensors(tmp_path / "nested.safetensors", "{" + '"a":[' * 20_000 + "]" * 20_000 + "}"),
        "bad_shape": raw_safetensors(tmp_path / "bad_shape.safetensors",
                                     {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        # a shape the data does not back: safetensors' own check refuses it
        "shape_without_data": raw_safetensors(tmp_path / "lie.safetensors",
                                              {"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4]}},
                                              b"\0" * 4),
    }
    outcomes = _outcomes(files, "read_dreampainter_metadata(path)")
    for name, path in files.items():
        assert outcomes[name]["error"] == "ModelFilesError", (name, outcomes[name])
        assert str(path) in outcomes[name]["message"], outcomes[name]
    assert "at most" in outcomes["huge_header"]["message"]


def test_expected_layout_is_what_the_model_saves(tiny_model_dir, tiny_stage2_weights):
    # the layout checked against headers is computed without building: it must equal the real one
    from dreampainter_core.weights import dreampainter_tensors, expected_tensor_shapes

    base = load_transformer(tiny_model_dir / "transformer")
    model = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage2_weights)
    real = {k: tuple(v.shape) for k, v in dreampainter_tensors(model).items()}
    assert expected_tensor_shapes(base, model.config, with_lora=True) == real
    stage1 = {k: v for k, v in real.items() if k.startswith("control.")}
    assert expected_tensor_shapes(base, model.config, with_lora=False) == stage1
