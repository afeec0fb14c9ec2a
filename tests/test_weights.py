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
