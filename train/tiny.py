"""Tiny CogView4-shaped models with random weights, for tests, benchmarks and the miniature.

Every component is the real class (diffusers ``CogView4Transformer2DModel``, ``AutoencoderKL``,
``FlowMatchEulerDiscreteScheduler``; transformers ``GlmModel`` and ``PreTrainedTokenizerFast``)
with a small config that mirrors the structure of THUDM/CogView4-6B (16 latent channels, 8x VAE,
patch 2, two-stream blocks, GLM text encoder whose ``hidden_states[-2]`` feeds the DiT). Weights
are re-initialised from a seeded normal so that outputs are not ~0 and every block (including
its AdaLN modulation) actually does something. Nothing here touches the network.

Not part of what the node pack runs: ``train.miniature`` starts from these configs, tokenizer and
random text encoder (the shipped miniature then loads from its own config.json files), and the
tests and benchmarks build their models here.

CLI::

    python -m train.tiny --out DIR [--seed S] [--single-files DIR] [--with-dreampainter-weights]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dreampainter_core.loading import (
    COGVIEW4_SCHEDULER_CONFIG,
    COGVIEW4_TRANSFORMER_SETTINGS,
    COGVIEW4_VAE_SETTINGS,
    load_transformer,
)
from dreampainter_core.transformer import DreamPainterConfig, DreamPainterTransformer
from dreampainter_core.weights import save_dreampainter_weights

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

#: The tiny transformer's head width. It cannot be read from weight shapes (the loader assumes
#: CogView4's 128), so the tiny single files carry their config in their metadata.
TINY_TRANSFORMER_HEAD_DIM = 32
#: Same for the tiny GLM text encoder (GLM-4-9B uses 128).
TINY_GLM_HEAD_DIM = 16

DIFFUSERS_VERSION_TAG = "0.42.1"


def tiny_transformer_config() -> dict:
    """Config for a 4-block, 2-head x 32 CogView4Transformer2DModel (inner width 64)."""
    return dict(
        COGVIEW4_TRANSFORMER_SETTINGS,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=TINY_TRANSFORMER_HEAD_DIM,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=32,
        condition_dim=16,
        sample_size=16,
    )


def tiny_vae_config() -> dict:
    """Config for a 4-level AutoencoderKL (8x downsampling, 16 latent channels), same structure
    as CogView4-6B's VAE: no quant convs, no mid-block attention, scaling 1.0, shift 0.0."""
    return dict(
        COGVIEW4_VAE_SETTINGS,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 32, 32],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def tiny_text_encoder_config(vocab_size: int, pad_token_id: int) -> dict:
    """GlmConfig kwargs for a 2-layer GLM (hidden 32, 2 heads x 16, 1 kv head). Everything not
    named here keeps GlmConfig's defaults (which are GLM-4-9B's: partial rotary 0.5, rms eps,
    attention bias, ...), so a loader that infers the config from shapes gets the same model."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=TINY_GLM_HEAD_DIM,
        pad_token_id=pad_token_id,
    )


def tiny_scheduler_config() -> dict:
    """CogView4-6B's scheduler config (the tiny model uses the real one)."""
    return dict(COGVIEW4_SCHEDULER_CONFIG)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_EN_WORDS = """
a an the of on in at with and or by for to from under over near beside behind front top
bottom above below between around into onto its this that these those is are be very some
one two three four five six seven eight nine ten single pair set group few many several
red blue green white black yellow orange purple pink brown grey gray gold golden silver beige
cream ivory navy teal turquoise cyan magenta violet lavender mint olive maroon burgundy coral
peach tan khaki charcoal transparent clear colorful colourful pastel dark light bright pale deep
soft warm cool neutral matte glossy shiny metallic
wood wooden marble stone granite concrete glass metal steel aluminum aluminium brass copper
iron ceramic porcelain clay plastic acrylic leather fabric cloth linen cotton silk velvet wool
paper cardboard bamboo rattan wicker rope sand water ice snow moss grass terrazzo resin
round square rectangular circular oval cylindrical cylinder cube sphere arc arch curved flat
tall short low high small large big tiny wide narrow thin thick long tiered stepped geometric
bottle jar cup mug glass box package pack tube can bag handbag backpack wallet purse shoe shoes
sneaker sneakers boot boots heel watch ring necklace bracelet earring earrings jewelry perfume
lipstick cream lotion serum cosmetic cosmetics skincare makeup soap shampoo candle vase bowl
plate pot teapot kettle lamp chair sofa pillow cushion blanket towel phone smartphone laptop
headphones earphones speaker camera charger keyboard mouse toy doll ball book pen notebook
glasses sunglasses hat cap scarf shirt dress jacket coat sweater skirt jeans sock socks
food fruit apple orange lemon strawberry cake cookie chocolate coffee tea wine beer juice milk
snack honey bread flower flowers rose tulip leaf leaves plant plants tree trees branch
product products item object
stand podium pedestal platform table desk shelf counter tray display base block plinth step
steps stage cabinet drawer stool bench rack holder riser
background backdrop scene environment room interior studio kitchen bathroom bedroom living
office garden beach sea ocean lake river mountain mountains forest desert sky cloud clouds
sun sunlight sunset sunrise moon night day city street window wall floor ground curtain
shadow shadows reflection reflections light lighting lights spotlight glow bokeh blur blurred
mist fog rain splash drops droplets bubbles smoke fire waves rock rocks pebbles petals
style photo photograph photography realistic photorealistic commercial advertising advertisement
product minimalist minimal modern luxury luxurious elegant simple clean natural fresh rustic
vintage retro cozy cosy cute bold dramatic cinematic studio professional premium
quality detailed detail sharp focus closeup view angle side overhead
render rendering 3d illustration texture textured pattern striped dotted
placed standing sitting lying floating hanging surrounded decorated filled covered made
resting displayed arranged scattered reflected lit
""".split()

_CN_CHARS = list(
    "红蓝绿白黑黄橙紫粉棕灰金银色彩浅深亮暗透明"
    "桌台背景木大理石玻璃金属陶瓷塑料皮布纸竹水冰雪沙草花叶树枝"
    "圆方形长高低小大宽窄薄厚柱球立体"
    "瓶罐杯盒包鞋表戒指项链手镯耳环香水口红霜乳液化妆品护肤蜡烛花瓶碗盘壶灯椅沙发枕毯"
    "手机电脑耳机相机键盘鼠玩具书笔帽围巾衣裙裤袜食物水果苹橘柠檬莓蛋糕饼巧克力咖啡茶酒奶"
    "展架座底托盘柜凳"
    "室内外厨房浴卧客厅办公花园海滩湖河山森林沙漠天空云太阳光月夜晚白天城市街窗墙地面帘"
    "影子倒反射柔和阳日落出雾雨滴泡烟火浪岩鹅卵瓣"
    "风格照片摄影真实商业广告简约极现代奢华优雅自然新鲜复古温馨可爱专业高级质量细节清晰焦点"
    "特写视角侧俯渲染插画纹理图案条点"
    "一个两三四五六七八九十对套组些"
    "的子在上下中里旁边前后之间周围和与或是有被放置站坐躺漂浮挂满覆盖装饰摆着"
)

_PUNCT = list(",.;:!?'\"()-/&+%") + list("，。、；：！？（）")
_DIGITS = [str(i) for i in range(10)]

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
#: Prefix tokens, as GLM-4's tokenizer prepends ``[gMASK]<sop>`` (so an empty prompt, which the
#: pipeline uses as the default negative prompt, still gives a non-empty sequence).
PREFIX_TOKENS = ("[gMASK]", "<sop>")
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN) + PREFIX_TOKENS


def tiny_vocab() -> dict[str, int]:
    """Word -> id. [PAD] 0, [UNK] 1, [gMASK] 2, <sop> 3; English words lower-case; CJK one
    entry per character."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for t in _EN_WORDS + _DIGITS + _PUNCT + _CN_CHARS:
        t = t.lower()
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_tokenizer():
    """A WordLevel tokenizer wrapped in ``PreTrainedTokenizerFast`` (left padding).

    Normaliser NFKC + BERT (lower-case, spaces around every CJK character), BERT pre-tokenizer
    (splits on spaces and punctuation), so Chinese text becomes one token per character. With
    ``add_special_tokens=True`` (what the pipeline uses) ``[gMASK] <sop>`` is prepended."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True),
    ])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    a, b = PREFIX_TOKENS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{a} {b} $A", pair=f"{a} {b} $A $B", special_tokens=[(a, vocab[a]), (b, vocab[b])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=1024,
    )


def save_tokenizer_portable(tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` then rewrite ``tokenizer_config.json`` so that it names
    ``PreTrainedTokenizerFast`` (transformers 5 writes ``TokenizersBackend``, which
    transformers 4 cannot read), and write ``special_tokens_map.json`` for transformers 4."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("pad_token", tokenizer.pad_token)
    cfg.setdefault("unk_token", tokenizer.unk_token)
    cfg["padding_side"] = tokenizer.padding_side
    cfg.setdefault("model_max_length", tokenizer.model_max_length)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    stm = out_dir / "special_tokens_map.json"
    if not stm.exists():
        stm.write_text(
            json.dumps({"pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}, indent=2) + "\n",
            encoding="utf-8",
        )
    return out_dir


# --------------------------------------------------------------------------------------------
# Random init
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _reinit_(module: torch.nn.Module, seed: int, *, embed_std: float = 0.5, bias_std: float = 0.05,
             norm_std: float = 0.1, gain: float = 1.0) -> None:
    """Overwrite every parameter from a seeded normal (independent of the global RNG).

    Matrices / conv kernels: std = gain / sqrt(fan_in) (keeps activations O(1); between ~0.02
    and ~0.35 for these widths); biases: small normal; norm scales: 1 + small normal; embedding
    tables: ``embed_std``. Zero-initialised parts of the stock classes (none in diffusers 0.42's
    CogView4, but AdaLN-zero style layers elsewhere) get non-zero values too, so each block acts.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if isinstance(owner, torch.nn.Embedding) or "embed_tokens" in name:
            new = torch.randn(p.shape, generator=gen) * embed_std
        elif p.ndim == 1:
            is_norm = isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(owner).__name__.lower()
            if is_norm and leaf == "weight":
                new = 1.0 + torch.randn(p.shape, generator=gen) * norm_std
            else:
                new = torch.randn(p.shape, generator=gen) * (norm_std if is_norm else bias_std)
        else:
            fan_in = math.prod(p.shape[1:])
            new = torch.randn(p.shape, generator=gen) * (gain / math.sqrt(fan_in))
        p.copy_(new.to(p.dtype))


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def build_tiny_components(seed: int = 0) -> dict:
    """Tiny tokenizer, text_encoder, vae, transformer, scheduler (fp32, CPU, eval mode)."""
    from diffusers import AutoencoderKL, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tokenizer = build_tiny_tokenizer()
    glm_cfg = GlmConfig(**tiny_text_encoder_config(len(tokenizer), tokenizer.pad_token_id))
    glm_cfg.architectures = ["GlmModel"]
    text_encoder = GlmModel(glm_cfg)
    _reinit_(text_encoder, seed * 1009 + 1, embed_std=0.5)

    vae = AutoencoderKL(**tiny_vae_config())
    _reinit_(vae, seed * 1009 + 2, gain=1.0)

    transformer = CogView4Transformer2DModel(**tiny_transformer_config())
    _reinit_(transformer, seed * 1009 + 3, gain=1.0)

    scheduler = FlowMatchEulerDiscreteScheduler(**tiny_scheduler_config())
    for m in (text_encoder, vae, transformer):
        m.eval().requires_grad_(False)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def _config_json(model) -> str:
    """The component's config as JSON, with ``_class_name`` (as in diffusers config.json)."""
    cfg = dict(model.config) if not hasattr(model.config, "to_dict") else model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["_class_name"] = type(model).__name__
    return json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o))


def cogview4_model_index() -> dict:
    """model_index.json of a CogView4 diffusers folder (what CogView4Pipeline.from_pretrained reads)."""
    return {
        "_class_name": "CogView4Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION_TAG,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "GlmModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "CogView4Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_tiny_model(out_dir: str | Path, seed: int = 0, single_files_dir: str | Path | None = None) -> Path:
    """Write a diffusers-layout CogView4 folder (loadable by ``CogView4Pipeline.from_pretrained``)
    with safetensors weights; with ``single_files_dir`` also write ``transformer.safetensors``,
    ``vae.safetensors`` and ``text_encoder.safetensors`` there (config JSON in the safetensors
    metadata under ``"config"``). Returns ``out_dir`` as a Path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps = build_tiny_components(seed)

    comps["transformer"].save_pretrained(str(out / "transformer"), safe_serialization=True)
    comps["vae"].save_pretrained(str(out / "vae"), safe_serialization=True)
    comps["text_encoder"].save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    comps["scheduler"].save_pretrained(str(out / "scheduler"))
    save_tokenizer_portable(comps["tokenizer"], out / "tokenizer")

    (out / "model_index.json").write_text(json.dumps(cogview4_model_index(), indent=2) + "\n", encoding="utf-8")

    if single_files_dir is not None:
        sdir = Path(single_files_dir)
        sdir.mkdir(parents=True, exist_ok=True)
        for name in ("transformer", "vae", "text_encoder"):
            model = comps[name]
            sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            if name == "text_encoder":
                # only persistent entries (rotary buffers are not saved)
                sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
            save_file(sd, str(sdir / f"{name}.safetensors"), metadata={"config": _config_json(model), "format": "pt"})
    return out


def write_random_dreampainter_weights(base_dir, out_path, seed: int = 0, stage: int = 2,
                                      config: DreamPainterConfig | None = None) -> Path:
    """A DreamPainter file for tests and demos: random branch, NON-zero gates and LoRA so they have an effect."""
    base = load_transformer(Path(base_dir) / "transformer", dtype=torch.float32, device="cpu")
    num_layers = base.config.num_layers
    config = config or DreamPainterConfig(
        control_blocks=min(2, num_layers),
        lora_rank=4 if stage == 2 else 0,
    )
    model = DreamPainterTransformer(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in list(model.control.named_parameters()) + [
            (n, p) for n, p in model.base.named_parameters() if "lora_" in n
        ]:
            if "gates" in name or "lora_B" in name or "cond_embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return save_dreampainter_weights(model, out_path, base_model="tiny-random-cogview4")


def write_random_product_lora(base_dir, out_path, seed: int = 0, identifier: str = "sks", class_noun: str = "cup",
                              learn_token: bool = False, rank: int = 4, base_model: str = "tiny-random-cogview4") -> Path:
    """A DreamPaint product file (dreampainter_core.product_lora) for `base_dir` with random, NON-zero
    LoRA (and, with learn_token, an identifier embedding drawn at random): for tests and demos."""
    from dreampainter_core.loading import load_text_encoder, load_tokenizer
    from dreampainter_core.product_lora import DEFAULT_PRODUCT_TARGETS, ProductLoRA, base_identity, save_product_lora
    from dreampainter_core.tokens import init_token

    base = load_transformer(Path(base_dir) / "transformer", dtype=torch.float32, device="cpu")
    model = DreamPainterTransformer(base, with_control=False)
    model.add_product_adapter(rank, rank, DEFAULT_PRODUCT_TARGETS, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.product_parameters().items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    token = None
    if learn_token:
        token = init_token(load_tokenizer(Path(base_dir) / "tokenizer"), load_text_encoder(Path(base_dir) / "text_encoder"),
                           identifier, seed=seed, base_model=base_model)
    product = ProductLoRA(identifier, class_noun, model.product_state_dict(), rank, float(rank),
                          list(DEFAULT_PRODUCT_TARGETS), base_identity(model, base_model), token,
                          info={"trained_steps": "0", "made_by": "train.tiny.write_random_product_lora"})
    return save_product_lora(product, out_path)


def write_background_token(base_dir, out_path, base_model: str = "tiny-random-cogview4") -> Path:
    """A background token file (dreampainter_core.tokens) for `base_dir`'s text encoder, at its
    initialisation (the embedding of "background"), as train.background_token starts it: for tests and
    demos ("<name> <background>" then encodes exactly as "<name> background")."""
    from dreampainter_core.loading import load_text_encoder, load_tokenizer
    from dreampainter_core.tokens import init_token, save_learned_token

    token = init_token(load_tokenizer(Path(base_dir) / "tokenizer"), load_text_encoder(Path(base_dir) / "text_encoder"),
                       "<background>", init_word="background", base_model=base_model)
    return save_learned_token(token, out_path, {"trained_steps": "0", "made_by": "train.tiny.write_background_token"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-files", default=None, help="also write one safetensors file per component here")
    p.add_argument("--with-dreampainter-weights", action="store_true",
                   help="also write random DreamPainter weights to OUT/dreampainter_tiny.safetensors")
    a = p.parse_args(argv)
    out = write_tiny_model(a.out, seed=a.seed, single_files_dir=a.single_files)
    if a.with_dreampainter_weights:
        write_random_dreampainter_weights(base_dir=out, out_path=out / "dreampainter_tiny.safetensors", seed=a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
