"""Loading CogView4 from a diffusers folder and from single safetensors files; clear errors."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreampainter_core.errors import InputError, ModelFilesError
from dreampainter_core.loading import (
    COGVIEW4_SCHEDULER_CONFIG,
    CogView4Components,
    default_scheduler,
    load_cogview4,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    resolve_dtype,
)

# Hostile inputs: a regression that allocates what one asks for fails instead of eating the machine.
pytestmark = pytest.mark.memcap  # tests/conftest.py



@pytest.fixture(scope="module")
def files(tiny_single_files):
    return tiny_single_files


@pytest.fixture(scope="module")
def folder_parts(files):
    return load_cogview4(files["folder"])


@pytest.fixture(scope="module")
def no_meta_dir(files, tmp_path_factory):
    """The single files re-saved without the 'config' metadata (as the real model's would be)."""
    out = tmp_path_factory.mktemp("nometa")
    for name in ("transformer", "vae", "text_encoder"):
        src = files["single"] / f"{name}.safetensors"
        save_file(load_file(str(src)), str(out / f"{name}.safetensors"))
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            assert "config" not in (f.metadata() or {})
    return out


@pytest.fixture(scope="module")
def real_widths(tmp_path_factory):
    """A tiny model with the real head widths (CogView4's and GLM-4's 128) and VAE widths that are
    multiples of CogView4's 32 norm groups, what shape inference assumes. "dir" holds its single
    files without 'config' metadata (as the real model's would be) and its tokenizer; the components
    are those files loaded with their true configs given (same files, so same bits: the reference
    for what inference must rebuild)."""
    from diffusers import AutoencoderKL, CogView4Transformer2DModel
    from transformers import GlmConfig, GlmModel

    from train.tiny import (_reinit_, build_tiny_tokenizer, save_tokenizer_portable, tiny_text_encoder_config,
                            tiny_transformer_config, tiny_vae_config)

    tokenizer = build_tiny_tokenizer()
    glm = tiny_text_encoder_config(len(tokenizer), tokenizer.pad_token_id)
    parts = {
        "transformer": CogView4Transformer2DModel(**dict(tiny_transformer_config(), num_attention_heads=1,
                                                         attention_head_dim=128)),
        "vae": AutoencoderKL(**dict(tiny_vae_config(), block_out_channels=[32, 32, 32, 32], norm_num_groups=32)),
        "text_encoder": GlmModel(GlmConfig(**dict(glm, num_attention_heads=1, num_key_value_heads=1, head_dim=128))),
    }
    out = tmp_path_factory.mktemp("real_widths")
    loaders = {"transformer": load_transformer, "vae": load_vae, "text_encoder": load_text_encoder}
    loaded = {}
    for i, (name, model) in enumerate(parts.items()):
        _reinit_(model, 100 + i)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
        save_file(sd, str(out / f"{name}.safetensors"))
        config = model.config.to_dict() if name == "text_encoder" else dict(model.config)
        loaded[name] = loaders[name](out / f"{name}.safetensors", config=config)
    return dict(loaded, tokenizer=tokenizer, tokenizer_dir=save_tokenizer_portable(tokenizer, out / "tokenizer"),
                dir=out)


_G = torch.Generator().manual_seed(123)
_X = torch.randn(1, 16, 8, 8, generator=_G)
_TEXT = torch.randn(1, 16, 32, generator=_G)
_Z = torch.randn(1, 16, 4, 4, generator=_G)
_SIZE = torch.tensor([[64.0, 64.0]])


@torch.no_grad()
def _transformer_out(tr):
    return tr(_X, _TEXT, timestep=torch.tensor([500.0]), original_size=_SIZE, target_size=_SIZE,
              crop_coords=torch.zeros(1, 2)).sample


@torch.no_grad()
def _vae_out(vae):
    return vae.decode(_Z).sample


@torch.no_grad()
def _te_out(te, tokenizer):
    ids = torch.tensor([tokenizer("一个红色瓶子 on a marble table").input_ids])
    return te(ids, output_hidden_states=True).hidden_states[-2]


def _assert_same_outputs(a: CogView4Components, b: CogView4Components):
    assert torch.equal(_transformer_out(a.transformer), _transformer_out(b.transformer))
    assert torch.equal(_vae_out(a.vae), _vae_out(b.vae))
    assert torch.equal(_te_out(a.text_encoder, a.tokenizer), _te_out(b.text_encoder, a.tokenizer))


def _copy_folder(files, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(files["folder"], dst)
    return dst


# ---- happy paths ------------------------------------------------------------------------------


def test_folder_loads_and_matches_diffusers(files, folder_parts):
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    c = folder_parts
    assert isinstance(c, CogView4Components)
    assert isinstance(c.scheduler, FlowMatchEulerDiscreteScheduler)
    for k, v in COGVIEW4_SCHEDULER_CONFIG.items():
        assert c.scheduler.config[k] == v, k
    for m in (c.transformer, c.vae, c.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    pipe = CogView4Pipeline.from_pretrained(files["folder"], local_files_only=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(c, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(_te_out(c.text_encoder, c.tokenizer), _te_out(pipe.text_encoder, pipe.tokenizer))
    assert c.tokenizer("红色 marble").input_ids == pipe.tokenizer("红色 marble").input_ids


def test_single_files_with_config_metadata_match_folder(files, folder_parts):
    s = files["single"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # config from metadata: no guessing, no warning
        c = load_cogview4(
            transformer_path=s / "transformer.safetensors",
            vae_path=s / "vae.safetensors",
            text_encoder_path=s / "text_encoder.safetensors",
            tokenizer_path=files["folder"] / "tokenizer",
        )
    _assert_same_outputs(folder_parts, c)
    assert c.scheduler.config["time_shift_type"] == "linear"  # CogView4's config, built in code


def test_single_files_without_metadata_infer_config(real_widths):
    d = real_widths["dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real widths: nothing guessed beyond CogView4's known values
        c = load_cogview4(
            transformer_path=d / "transformer.safetensors",
            vae_path=d / "vae.safetensors",
            text_encoder_path=d / "text_encoder.safetensors",
            tokenizer_path=real_widths["tokenizer_dir"],
        )
    _assert_same_outputs(CogView4Components(scheduler=None, **{k: real_widths[k] for k in (
        "tokenizer", "text_encoder", "vae", "transformer")}), c)
    t, ref = c.transformer.config, real_widths["transformer"].config
    for k in ("num_layers", "num_attention_heads", "attention_head_dim", "text_embed_dim", "time_embed_dim",
              "condition_dim", "in_channels", "out_channels", "patch_size"):
        assert t[k] == ref[k], k
    v, vref = c.vae.config, real_widths["vae"].config
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "use_quant_conv",
              "use_post_quant_conv", "mid_block_add_attention", "scaling_factor", "shift_factor"):
        assert list(v[k]) == list(vref[k]) if isinstance(v[k], (list, tuple)) else v[k] == vref[k], k
    g, gref = c.text_encoder.config, real_widths["text_encoder"].config
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "attention_bias"):
        assert getattr(g, k) == getattr(gref, k), k


def test_other_widths_without_metadata_ask_for_a_config(no_meta_dir):
    """The tiny model's widths (heads of 32 / 16, VAE widths 8..32) cannot be inferred: a clear
    error that says how to give the config, not a guess."""
    for load, name in ((load_transformer, "transformer"), (load_vae, "vae"), (load_text_encoder, "text_encoder")):
        with pytest.raises(ModelFilesError, match="metadata key 'config'") as info:
            load(no_meta_dir / f"{name}.safetensors")
        assert f"{name}.safetensors" in str(info.value) and "config.json" in str(info.value)


def test_single_files_with_comfy_style_prefixes(real_widths, tmp_path):
    d = real_widths["dir"]
    tr = load_file(str(d / "transformer.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in tr.items()}, str(tmp_path / "t.safetensors"))
    te = load_file(str(d / "text_encoder.safetensors"))
    te = {"model." + k: v for k, v in te.items()}
    te["lm_head.weight"] = torch.zeros(4, 4)  # a GlmForCausalLM export: lm_head is ignored
    save_file(te, str(tmp_path / "te.safetensors"))
    t = load_transformer(tmp_path / "t.safetensors")
    e = load_text_encoder(tmp_path / "te.safetensors")
    tok = real_widths["tokenizer"]
    assert torch.equal(_transformer_out(t), _transformer_out(real_widths["transformer"]))
    assert torch.equal(_te_out(e, tok), _te_out(real_widths["text_encoder"], tok))


def test_sharded_folder(files, folder_parts, tmp_path):
    sub = tmp_path / "transformer"
    sub.mkdir()
    shutil.copy(files["folder"] / "transformer" / "config.json", sub / "config.json")
    sd = load_file(str(files["folder"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(sub / name))
        weight_map.update({k: name for k in part})
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    t = load_transformer(sub)
    got, ref = t.state_dict(), folder_parts.transformer.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # Same weights; the outputs agree to rounding only: the shards' tensors lie at other memory
    # alignments (they are read in place from the files), which can change the CPU kernels' sums.
    torch.testing.assert_close(_transformer_out(t), _transformer_out(folder_parts.transformer), rtol=1e-5, atol=1e-5)
    (sub / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="00002-of-00002"):
        load_transformer(sub)


def test_override_one_part_and_skip_text_encoder(files, folder_parts):
    c = load_cogview4(files["folder"], transformer_path=files["single"] / "transformer.safetensors")
    assert torch.equal(_transformer_out(c.transformer), _transformer_out(folder_parts.transformer))
    c2 = load_cogview4(transformer_path=files["single"] / "transformer.safetensors",
                       vae_path=files["single"] / "vae.safetensors", load_text_encoder=False)
    assert c2.text_encoder is None and c2.tokenizer is None


def test_tokenizer_sources_and_round_trip(files, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(files["folder"] / "tokenizer")
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert load_tokenizer(files["folder"]).get_vocab() == tok.get_vocab()  # base folder -> tokenizer/
    assert load_tokenizer(files["folder"] / "tokenizer" / "tokenizer.json")("红").input_ids == tok("红").input_ids
    tok.save_pretrained(str(tmp_path / "again"))
    again = load_tokenizer(tmp_path / "again")
    text = "白色大理石台上的红色香水瓶, soft shadows"
    assert again(text).input_ids == tok(text).input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert ids[:4] == [tok.convert_tokens_to_ids(c) for c in "白色大理"]


def test_default_scheduler():
    s = default_scheduler()
    assert s.config.use_dynamic_shifting and s.config.base_shift == 0.25 and s.config.max_shift == 0.75


# ---- dtype --------------------------------------------------------------------------------------


def test_bf16_load(files):
    c = load_cogview4(files["folder"], dtype=torch.bfloat16)
    for m in (c.transformer, c.vae, c.text_encoder):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert load_vae(files["single"] / "vae.safetensors", dtype="bf16").dtype == torch.bfloat16


def test_fp16_refused_unless_allowed(files):
    with pytest.raises(InputError, match="black"):
        load_cogview4(files["folder"], dtype=torch.float16)
    with pytest.raises(InputError, match="float16"):
        load_transformer(files["folder"] / "transformer", dtype=torch.float16)
    with pytest.warns(UserWarning, match="black"):
        t = load_transformer(files["folder"] / "transformer", dtype=torch.float16, allow_fp16=True)
    assert t.dtype == torch.float16
    with pytest.raises(InputError):
        resolve_dtype(torch.int8)


# ---- errors -------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFilesError, match="does not exist") as info:
        load_cogview4(tmp_path / "nowhere")
    msg = str(info.value)
    assert "nowhere" in msg and "diffusers-layout" in msg and "THUDM/CogView4-6B" in msg
    with pytest.raises(ModelFilesError, match="nowhere"):
        load_transformer(tmp_path / "nowhere.safetensors")


def test_folder_missing_subfolder(files, tmp_path):
    model = _copy_folder(files, tmp_path)
    shutil.rmtree(model / "vae")
    shutil.rmtree(model / "tokenizer")
    with pytest.raises(ModelFilesError, match=r"vae/.*tokenizer/|tokenizer/.*vae/") as info:
        load_cogview4(model)
    assert "vae_path=" in str(info.value)
    (model / "transformer" / "config.json").unlink()
    with pytest.raises(ModelFilesError, match="config.json"):
        load_transformer(model / "transformer")


def test_no_base_requires_every_part(files):
    s = files["single"]
    with pytest.raises(InputError, match="tokenizer_path") as info:
        load_cogview4(transformer_path=s / "transformer.safetensors", vae_path=s / "vae.safetensors",
                      text_encoder_path=s / "text_encoder.safetensors")
    assert "no tokenizer" in str(info.value)
    with pytest.raises(ModelFilesError, match="holds no tokenizer"):
        load_tokenizer(s / "text_encoder.safetensors")
    with pytest.raises(ModelFilesError, match="is a file"):
        load_cogview4(s / "transformer.safetensors")


def test_truncated_safetensors(files, tmp_path):
    model = _copy_folder(files, tmp_path)
    f = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFilesError, match="truncated or corrupt") as info:
        load_cogview4(model)
    assert str(f) in str(info.value)
    assert info.value.__cause__ is not None  # the original error is chained
    f.write_bytes(data[:5])
    with pytest.raises(ModelFilesError, match="truncated"):
        load_vae(f)


def test_wrong_shape_missing_and_unexpected_keys(files, tmp_path):
    src = files["single"] / "transformer.safetensors"
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(src))

    bad = dict(sd)
    bad["proj_out.weight"] = torch.zeros(8, 64)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ModelFilesError, match="wrong shape") as info:
        load_transformer(tmp_path / "shape.safetensors")
    msg = str(info.value)
    assert "shape.safetensors" in msg and "proj_out.weight" in msg and "(64, 64)" in msg and "(8, 64)" in msg

    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn1.to_q.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ModelFilesError, match="missing key.*transformer_blocks.1.attn1.to_q.weight"):
        load_transformer(tmp_path / "missing.safetensors")

    extra = dict(sd, **{"some.other.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(ModelFilesError, match="unexpected key.*some.other.weight"):
        load_transformer(tmp_path / "extra.safetensors")

    # a wrong-shaped tensor inside a diffusers folder, through load_cogview4
    model = _copy_folder(files, tmp_path)
    f = model / "text_encoder" / "model.safetensors"
    te = load_file(str(f))
    te["layers.0.mlp.down_proj.weight"] = torch.zeros(32, 65)
    save_file(te, str(f))
    with pytest.raises(ModelFilesError, match=r"layers.0.mlp.down_proj.weight expected \(32, 64\) found \(32, 65\)"):
        load_cogview4(model)


def test_file_in_the_wrong_slot(files):
    s = files["single"]
    with pytest.raises(ModelFilesError, match="vae.safetensors"):
        load_transformer(s / "vae.safetensors")
    with pytest.raises(ModelFilesError, match="not a VAE.*looks like a GLM text encoder"):
        load_cogview4(transformer_path=s / "transformer.safetensors", vae_path=s / "text_encoder.safetensors",
                      load_text_encoder=False)


def test_pickle_formats_refused(files, tmp_path):
    sub = tmp_path / "transformer"
    sub.mkdir()
    shutil.copy(files["folder"] / "transformer" / "config.json", sub / "config.json")
    torch.save({"x": torch.zeros(1)}, sub / "diffusion_pytorch_model.bin")  # never loaded by us
    with pytest.raises(ModelFilesError, match="pickle") as info:
        load_transformer(sub)
    assert "safetensors" in str(info.value)
    with pytest.raises(ModelFilesError, match="convert them to .safetensors"):
        load_vae(sub / "diffusion_pytorch_model.bin")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelFilesError, match="pickle"):
        load_text_encoder(tmp_path / "model.ckpt")
    # a pickle renamed to .safetensors is recognised from its first bytes, not unpickled
    torch.save({"x": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    with pytest.raises(ModelFilesError, match="pickle"):
        load_transformer(tmp_path / "renamed.safetensors")


def test_bad_arguments():
    with pytest.raises(InputError, match="dtype"):
        resolve_dtype("int4")
    with pytest.raises(InputError, match="device"):
        load_cogview4("anything", device="not-a-device")


@pytest.mark.memcap(6)  # builds GLM-4-9B's real 2.5 GB input embedding on purpose
def test_shape_inference_recovers_the_real_cogview4_configs():
    """Built on meta (no memory): inferring from the real models' shapes gives their configs back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, CogView4Transformer2DModel
    from transformers import GlmConfig, GlmModel

    from dreampainter_core.loading import _infer_glm_config, _infer_transformer_config, _infer_vae_config

    real_t = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=28, attention_head_dim=128,
                  num_attention_heads=32, text_embed_dim=4096, time_embed_dim=512, condition_dim=256)
    real_v = dict(block_out_channels=[128, 512, 1024, 1024], layers_per_block=3, latent_channels=16,
                  norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    with init_empty_weights():
        t = CogView4Transformer2DModel(**real_t)
        v = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, **real_v)
        g = GlmModel(GlmConfig())

    def shapes(m):
        return {k: tuple(x.shape) for k, x in m.state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tiny-model fallback for the real widths
        ti = _infer_transformer_config(shapes(t), "t", "transformer")
        vi = _infer_vae_config(shapes(v), "v", "vae")
        gi = _infer_glm_config(shapes(g), "g", "text_encoder")
    assert {k: ti[k] for k in real_t} == real_t
    assert {k: vi[k] for k in real_v} == real_v
    ref = GlmConfig()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "attention_bias"):
        assert gi[k] == getattr(ref, k), k
    assert sum(x.numel() for x in t.parameters()) > 6.0e9  # it really is the 6B layout


# ---- hostile files: configs, shard indexes, dtypes, NaN weights (each under a memory cap) --------

from dreampainter_core.safetensors_io import FP8_READABLE  # noqa: E402
from forge import read_all  # noqa: E402
from memcap import run_capped  # noqa: E402

_LOADERS = """
import torch
from diffusers import AutoencoderKL, CogView4Transformer2DModel  # imported before the cap: their code is not
from transformers import GlmModel  # what is measured
from dreampainter_core.loading import load_text_encoder, load_transformer, load_vae
"""


def _forge_single(src, dst, *, changes=None, tensors=None, **metadata):
    """A copy of single file ``src`` with ``changes`` to its 'config' metadata JSON, other metadata
    (``config=`` replaces that JSON) and tensors."""
    data, meta = read_all(src)
    if changes is not None:
        meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    meta.update(metadata)
    save_file(tensors(data) if tensors else data, str(dst), metadata=meta)
    return dst


def _capped_outcomes(calls: dict[str, str], cap_mb: int = 1024) -> dict:
    """{case: {"error", "message"}} for each loader call (source text), in one capped child."""
    body = "result = {}\n" + "".join(f"result[{case!r}] = outcome(lambda: {call})\n" for case, call in calls.items())
    result = run_capped(body, imports=_LOADERS, cap_mb=cap_mb)
    assert result.error is None, result.output
    return result.value


def test_config_layer_counts_must_match_the_weights_before_anything_is_built(files, tmp_path):
    single = files["single"]
    t, v, g = single / "transformer.safetensors", single / "vae.safetensors", single / "text_encoder.safetensors"
    extra_block = {"transformer_blocks.999999999.norm1.linear.weight": torch.zeros(1)}
    forged = {  # case: (loader, file, fragment of the message)
        "transformer_layers": ("load_transformer", _forge_single(t, tmp_path / "t1.safetensors",
                                                                 changes=dict(num_layers=1_000_000)),
                               "sets num_layers = 1000000, but"),
        "transformer_layers_text": ("load_transformer", _forge_single(t, tmp_path / "t2.safetensors",
                                                                      changes=dict(num_layers="4")), "num_layers = '4'"),
        "transformer_key_name": ("load_transformer", _forge_single(t, tmp_path / "t3.safetensors",
                                                                   tensors=lambda d: {**d, **extra_block}),
                                 "at most 256 layers"),
        "vae_layers_per_block": ("load_vae", _forge_single(v, tmp_path / "v1.safetensors",
                                                           changes=dict(layers_per_block=100_000)), "layers_per_block"),
        "vae_levels": ("load_vae", _forge_single(v, tmp_path / "v2.safetensors",
                                                 changes=dict(block_out_channels=[8] * 100_000)), "block_out_channels"),
        "glm_layers": ("load_text_encoder", _forge_single(g, tmp_path / "g1.safetensors",
                                                          changes=dict(num_hidden_layers=1_000_000)),
                       "num_hidden_layers"),
        "glm_head_dim": ("load_text_encoder", _forge_single(g, tmp_path / "g2.safetensors",
                                                            changes=dict(head_dim=2**30)), "head_dim"),
        "config_not_json": ("load_transformer", _forge_single(t, tmp_path / "c1.safetensors",
                                                              config="{num_layers: 4"), "not valid JSON"),
        "config_nested": ("load_transformer", _forge_single(t, tmp_path / "c2.safetensors",
                                                            config="[" * 50_000 + "]" * 50_000), "not valid JSON"),
        "config_huge": ("load_transformer", _forge_single(t, tmp_path / "c3.safetensors",
                                                          config=json.dumps({"x": "a" * 2**21})), "at most"),
        "config_list": ("load_transformer", _forge_single(t, tmp_path / "c4.safetensors", config="[4]"),
                        "not a JSON object"),
    }
    got = _capped_outcomes({case: f"{loader}({str(path)!r})" for case, (loader, path, _) in forged.items()})
    for case, (_, path, fragment) in forged.items():
        assert got[case]["error"] == "ModelFilesError", (case, got[case])
        assert str(path) in got[case]["message"] and fragment in got[case]["message"], (case, got[case]["message"])


def test_shard_index_may_only_name_files_beside_it(files, tmp_path):
    src = files["folder"] / "transformer"
    outside = tmp_path / "outside.safetensors"  # a valid file the index points at
    shutil.copy(src / "diffusion_pytorch_model.safetensors", outside)
    keys = list(read_all(outside)[0])
    forged = {}
    for case, name in (("parent", "../outside.safetensors"), ("absolute", str(outside)),
                       ("subfolder", "sub/outside.safetensors"), ("backslash", "..\\outside.safetensors"),
                       ("not_a_name", 7)):
        folder = tmp_path / case / "transformer"
        folder.mkdir(parents=True)
        shutil.copy(src / "config.json", folder / "config.json")
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {k: name for k in keys}}))
        forged[case] = index
    (tmp_path / "parent" / "outside.safetensors").symlink_to(outside)  # "../" would find a valid file
    got = _capped_outcomes({case: f"load_transformer({str(index.parent)!r})" for case, index in forged.items()})
    for case, index in forged.items():
        assert got[case]["error"] == "ModelFilesError", (case, got[case])
        assert str(index) in got[case]["message"] and "plain file names" in got[case]["message"], got[case]


def test_dtypes_the_pack_cannot_run_are_refused_and_fp8_e4m3_loads(files, tmp_path):
    t, v = files["single"] / "transformer.safetensors", files["single"] / "vae.safetensors"
    key = "transformer_blocks.0.attn1.to_q.weight"

    def as_dtype(dtype, k=key):
        return lambda d: {**d, k: d[k].to(dtype)}

    refused = {"int32": ("load_transformer", t, torch.int32, key, "I32"),
               "bool": ("load_transformer", t, torch.bool, key, "BOOL"),
               "float64": ("load_transformer", t, torch.float64, key, "F64")}
    if FP8_READABLE:  # safetensors >= 0.4.2 writes and reads float8
        refused["e5m2"] = ("load_transformer", t, torch.float8_e5m2, key, "F8_E5M2")
        refused["vae_fp8"] = ("load_vae", v, torch.float8_e4m3fn, "decoder.conv_in.weight", "F8_E4M3")
    forged = {case: _forge_single(src, tmp_path / f"{case}.safetensors", tensors=as_dtype(dtype, k))
              for case, (_, src, dtype, k, _) in refused.items()}
    calls = {case: f"{refused[case][0]}({str(p)!r})" for case, p in forged.items()}
    if FP8_READABLE:
        fp8 = _forge_single(t, tmp_path / "fp8.safetensors", tensors=lambda d: {
            k: x.to(torch.float8_e4m3fn) if x.ndim == 2 else x for k, x in d.items()})
        calls["fp8"] = f"load_transformer({str(fp8)!r}, dtype='bf16')"
    got = _capped_outcomes(calls)
    for case, (*_, dtype) in refused.items():
        assert got[case]["error"] == "ModelFilesError", (case, got[case])
        assert dtype in got[case]["message"] and str(forged[case]) in got[case]["message"], got[case]
    if FP8_READABLE:  # fp8 e4m3fn checkpoints, as made for ComfyUI, load; every e4m3 value is exact in bf16
        assert got["fp8"]["error"] is None, got["fp8"]
        model = load_transformer(fp8, dtype=torch.bfloat16)
        assert torch.equal(model.state_dict()[key], read_all(fp8)[0][key].to(torch.bfloat16))


def test_non_finite_weights_are_refused_when_checked(files, tmp_path):
    key = "transformer_blocks.1.ff.net.2.weight"

    def with_inf(d):
        bad = d[key].clone()
        bad[0, 0] = float("inf")
        return {**d, key: bad}

    path = _forge_single(files["single"] / "transformer.safetensors", tmp_path / "inf.safetensors", tensors=with_inf)
    got = _capped_outcomes({"checked": f"load_transformer({str(path)!r}, check_finite=True)",
                            "unchecked": f"load_transformer({str(path)!r})"})
    assert got["checked"]["error"] == "ModelFilesError", got
    assert "NaN or infinite" in got["checked"]["message"] and key in got["checked"]["message"]
    assert str(path) in got["checked"]["message"]
    assert got["unchecked"]["error"] is None  # off by default in the core API (the nodes turn it on)
