"""The tiny CogView4 factory: real classes, deterministic, non-trivial, loadable by diffusers."""

import json

import pytest
import torch

from train.tiny import (
    PAD_TOKEN,
    UNK_TOKEN,
    build_tiny_components,
    build_tiny_tokenizer,
    main,
    save_tokenizer_portable,
    tiny_vocab,
)



@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def test_real_classes_and_configs(comps):
    from diffusers import AutoencoderKL, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmModel, PreTrainedTokenizerFast

    assert isinstance(comps["transformer"], CogView4Transformer2DModel)
    assert isinstance(comps["vae"], AutoencoderKL)
    assert isinstance(comps["text_encoder"], GlmModel)
    assert isinstance(comps["tokenizer"], PreTrainedTokenizerFast)
    assert isinstance(comps["scheduler"], FlowMatchEulerDiscreteScheduler)
    t = comps["transformer"].config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim, t.patch_size, t.in_channels) == (4, 2, 32, 2, 16)
    assert t.text_embed_dim == comps["text_encoder"].config.hidden_size
    v = comps["vae"].config
    assert len(v.block_out_channels) == 4 and v.latent_channels == 16
    assert (v.scaling_factor, v.shift_factor, v.force_upcast) == (1.0, 0.0, True)
    assert not v.use_quant_conv and not v.use_post_quant_conv and not v.mid_block_add_attention
    s = comps["scheduler"].config
    assert (s.base_shift, s.max_shift, s.base_image_seq_len, s.use_dynamic_shifting, s.time_shift_type) == (
        0.25, 0.75, 256, True, "linear")
    assert comps["text_encoder"].config.vocab_size == len(comps["tokenizer"])
    assert comps["text_encoder"].config.pad_token_id == comps["tokenizer"].pad_token_id


def test_deterministic_by_seed(comps):
    again = build_tiny_components(seed=0)
    other = build_tiny_components(seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        a, b, c = (x[name].state_dict() for x in (comps, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name


def test_weights_are_non_trivial(comps):
    for name in ("transformer", "vae", "text_encoder"):
        for k, p in comps[name].named_parameters():
            assert p.abs().max() > 0, f"{name}.{k} is all zero"
    # AdaLN modulation (incl. gates) is non-zero in every block
    for block in comps["transformer"].transformer_blocks:
        assert block.norm1.linear.weight.std() > 0.05


@torch.no_grad()
def test_vae_is_8x_and_outputs_are_not_tiny(comps):
    vae = comps["vae"]
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = vae.encode(img).latent_dist.mode()
    assert lat.shape == (1, 16, 8, 8)
    dec = vae.decode(lat).sample
    assert dec.shape == (1, 3, 64, 64)
    assert dec.std() > 0.1 and torch.isfinite(dec).all()


@torch.no_grad()
def test_transformer_and_text_encoder_respond(comps):
    tok, te, tr = comps["tokenizer"], comps["text_encoder"], comps["transformer"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)

    def embed(p):
        ids = torch.tensor([tok(p).input_ids])
        return te(ids, output_hidden_states=True).hidden_states[-2]

    e1, e2 = embed("a red bottle on a marble table"), embed("a blue cup on a wooden stand")
    assert e1.std() > 0.1
    size = torch.tensor([[64.0, 64.0]])
    kw = dict(timestep=torch.tensor([500.0]), original_size=size, target_size=size, crop_coords=torch.zeros(1, 2))
    y1 = tr(x, e1, **kw).sample
    y2 = tr(x, e2, **kw).sample
    assert y1.shape == x.shape and y1.std() > 0.3
    assert (y1 - y2).abs().mean() > 1e-3  # the text matters


def test_tokenizer_chinese_and_english():
    tok = build_tiny_tokenizer()
    vocab = tiny_vocab()
    unk = tok.convert_tokens_to_ids(UNK_TOKEN)
    ids = tok("红色的瓶子放在大理石桌上，白色背景", add_special_tokens=False).input_ids
    assert unk not in ids
    assert ids[:2] == [vocab["红"], vocab["色"]]
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["白", "色", "背", "景"]
    en = tok("A Red Bottle on a MARBLE table, soft light", add_special_tokens=False).input_ids
    assert unk not in en and en[:3] == [vocab["a"], vocab["red"], vocab["bottle"]]
    assert tok("zzzqqq", add_special_tokens=False).input_ids == [unk]
    # like GLM's [gMASK]<sop>: an empty prompt (the pipeline's default negative) is not empty
    assert tok("").input_ids == [vocab["[gMASK]"], vocab["<sop>"]]
    batch = tok(["红", "a red bottle"], padding="longest").input_ids
    assert batch[0][0] == tok.pad_token_id == vocab[PAD_TOKEN]  # left padding


def test_tokenizer_round_trip_and_portable_config(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = build_tiny_tokenizer()
    save_tokenizer_portable(tok, tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 cannot read TokenizersBackend
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    again = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for text in ["一个红色瓶子放在大理石桌上", "a red bottle on a marble table", ""]:
        assert again(text).input_ids == tok(text).input_ids
    assert again.padding_side == "left" and again.pad_token == PAD_TOKEN and len(again) == len(tok)


def test_written_folder_layout_and_size(tiny_single_files):
    folder, single = tiny_single_files["folder"], tiny_single_files["single"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "CogView4Pipeline"
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert index["text_encoder"] == ["transformers", "GlmModel"]
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    assert not list(folder.rglob("*.bin"))
    for name in ("transformer", "vae", "text_encoder"):
        assert (single / f"{name}.safetensors").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 5_000_000


@torch.no_grad()
def test_diffusers_pipeline_loads_bit_identical_and_generates(tiny_single_files, comps):
    from diffusers import CogView4Pipeline

    pipe = CogView4Pipeline.from_pretrained(tiny_single_files["folder"], local_files_only=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = comps[name].state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=3.5, output_type="pt")
    img = pipe("a red bottle on a marble table", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert img.std() > 0.05  # not a flat image
    assert ((img <= 0.0) | (img >= 1.0)).float().mean() < 0.5  # not saturated
    other = pipe("一个蓝色杯子在木桌上", generator=torch.Generator().manual_seed(0), **kw).images
    assert (img - other).abs().mean() > 1e-3


def test_cli_writes_folder_and_single_files(tmp_path):
    assert main(["--out", str(tmp_path / "m"), "--seed", "3", "--single-files", str(tmp_path / "s")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "s" / "transformer.safetensors").is_file()
