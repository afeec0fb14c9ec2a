"""train.background_token: the <background> token with Contrastive Background Alignment (issue 17)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreampainter_core.errors import InputError, WeightFormatError
from dreampainter_core.loading import load_text_encoder, load_tokenizer
from dreampainter_core.options import TextOptions
from dreampainter_core.pipeline import encode_prompt
from dreampainter_core.tokens import (add_text_lora, init_token, load_learned_token, save_learned_token,
                                      text_encoder_identity)
from train import background_token as bt
from train.config import ConfigError
from train.synthetic import write_scenes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def text(tiny_model_dir):
    return load_tokenizer(tiny_model_dir / "tokenizer"), load_text_encoder(tiny_model_dir / "text_encoder")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """v3 scenes (the category prior), 64 px: 8 to train on."""
    return write_scenes(tmp_path_factory.mktemp("scenes"), 16, size=64, seed=0, splits="0.5,0.25,0.25")


def _encode(text, prompt, tokens=()):
    tokenizer, encoder = text
    return encode_prompt(tokenizer, encoder, [prompt], dtype=torch.float32, device="cpu", tokens=tokens)


# ----------------------------------------------------------------------------- the losses


def test_the_contrastive_loss_equals_the_hand_computed_value_on_three_samples():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    na = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    nb = b.numpy() / np.linalg.norm(b.numpy(), axis=1, keepdims=True)
    s = na @ nb.T / tau  # s[i, j] = cos(a_i, b_j) / tau

    def ce(rows):  # mean over i of -log(exp(rows[i, i]) / sum_j exp(rows[i, j]))
        return np.mean([-rows[i, i] + math.log(sum(math.exp(v) for v in rows[i])) for i in range(3)])

    expected = 0.5 * (ce(s) + ce(s.T))
    assert bt.info_nce(a, b, tau).item() == pytest.approx(expected, rel=1e-6)
    assert bt.info_nce(b, a, tau).item() == pytest.approx(expected, rel=1e-6)  # symmetrised
    # Perfectly matched pairs far apart from the others cost almost nothing at the paper's tau.
    eye = torch.eye(3)
    assert bt.info_nce(eye, eye, 0.05).item() < 1e-6


def test_latent_statistics_are_the_mean_and_spread_over_the_region():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    w = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    feats = bt.latent_statistics(x, w)
    assert torch.allclose(feats[:, 0], torch.tensor([0.5, 4.5]))  # the first row's mean
    assert torch.allclose(feats[:, 1], torch.full((2,), 0.5), atol=1e-5)  # its standard deviation


# ----------------------------------------------------------------------------- encoding


def test_the_untrained_token_encodes_as_the_word_background_and_prompt_free_off_changes_nothing(text):
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "<background>", init_word="background")
    free = TextOptions(prompt_free=True, token=token)
    assert free.prompt("  a red  cup ") == "a red cup <background>"
    assert torch.equal(_encode(text, free.prompt("a red cup"), free.tokens), _encode(text, "a red cup background"))
    prompt = "a red cup on a white table, blue striped background"
    off = TextOptions()
    assert off.prompt(prompt) == prompt and off.tokens == ()
    assert torch.equal(_encode(text, off.prompt(prompt), off.tokens), _encode(text, prompt))
    connected = TextOptions(prompt_free=False, token=token)  # a connected token is a word the prompt may use
    assert torch.equal(_encode(text, connected.prompt(prompt), connected.tokens), _encode(text, prompt))
    with pytest.raises(InputError, match="name is empty"):
        free.prompt("   ")
    with pytest.raises(InputError, match="prompt_free needs a learned background token"):
        TextOptions(prompt_free=True)


def test_a_text_lora_starts_as_a_no_op_travels_in_the_token_file_and_is_refused_elsewhere(text, tmp_path):
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "<background>", init_word="background", base_model="tiny")
    names = add_text_lora(token, encoder, 2, ["self_attn.q_proj", "self_attn.v_proj"], seed=1)
    assert len(names) == 4 and token.text_lora_rank == 2  # 2 layers x q, v
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert torch.equal(_encode(text, "a cup <background>", [token]), _encode(text, "a cup background"))
    for key in token.text_lora:
        if key.endswith("lora_B"):
            token.text_lora[key] = torch.full_like(token.text_lora[key], 0.05)
    moved = _encode(text, "a cup <background>", [token])
    assert (moved - _encode(text, "a cup background")).abs().max() > 1e-4
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # applied, never written
    loaded = load_learned_token(save_learned_token(token, tmp_path / "t.safetensors"))
    assert loaded.text_lora.keys() == token.text_lora.keys() and loaded.text_lora_alpha == 2.0
    assert all(torch.equal(loaded.text_lora[k], token.text_lora[k]) for k in token.text_lora)
    assert torch.equal(_encode(text, "a cup <background>", [loaded]), moved)
    with pytest.raises(InputError, match="match no linear layer"):
        add_text_lora(token, encoder, 2, ["mlp.nonexistent"])


# ----------------------------------------------------------------------------- training


def _config(tiny_model_dir, scenes, out: Path, *extra: str) -> bt.BackgroundTokenConfig:
    return bt.load_token_config(REPO / "configs" / "miniature" / "background_token.toml", [
        f"model.base={tiny_model_dir}", "model.dreampainter_weights=none", f"data.manifest={scenes['train']}",
        "data.base_sizes=[64]", f"train.output_dir={out}", "train.steps=4", "train.batch_size=3",
        "train.checkpoint_every=2", "train.log_every=1", *extra])


class Killed(Exception):
    pass


def test_training_moves_only_the_token_and_writes_its_file(tiny_model_dir, tiny_stage2_weights, scenes, tmp_path,
                                                           monkeypatch):
    from dreampainter_core.pipeline import DreamPainterPipeline

    pipes = []
    original = DreamPainterPipeline.from_pretrained.__func__

    def keep(cls, *args, **kwargs):  # the pipeline the trainer loads, to compare its weights afterwards
        pipe = original(cls, *args, **kwargs)
        pipes.append((pipe, {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
                      {k: v.clone() for k, v in pipe.transformer.state_dict().items()}))
        return pipe

    monkeypatch.setattr(DreamPainterPipeline, "from_pretrained", classmethod(keep))
    cfg = _config(tiny_model_dir, scenes, tmp_path / "run", f"model.dreampainter_weights={tiny_stage2_weights}")
    report = bt.train_background_token(cfg, echo=lambda m: None)
    (pipe, glm, dit), = pipes
    assert all(torch.equal(glm[k], v) for k, v in pipe.text_encoder.state_dict().items()), "GLM changed"
    assert all(torch.equal(dit[k], v) for k, v in pipe.transformer.state_dict().items()), "the DiT changed"
    assert [r["step"] for r in report["log"]] == [1, 2, 3, 4]
    assert {"diffusion", "cl_background", "cl_name"} <= set(report["log"][0])

    token = load_learned_token(report["token_file"])
    start = init_token(pipe.tokenizer, pipe.text_encoder, "<background>", init_word="background")
    assert (token.token, token.init) == ("<background>", "word:background")
    assert token.text_encoder == text_encoder_identity(pipe.text_encoder) and token.text_lora is None
    assert not torch.equal(token.embedding, start.embedding)  # it learned
    with safe_open(report["token_file"], framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["embedding"]
    assert meta["format"] == "dreampainter-token" and meta["made_by"] == "train.background_token"
    assert meta["contrastive_weight"] == "0.01" and meta["temperature"] == "0.05"
    assert meta["image_encoder"] == "vae-latents" and meta["dreampainter_weights"] == Path(tiny_stage2_weights).name
    # The file holds the checkpoint's embedding bit for bit, and round-trips bit for bit.
    with safe_open(str(tmp_path / "run" / "checkpoint-00000004" / "trainable.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("token_embedding"), token.embedding)
    again = save_learned_token(token, tmp_path / "again.safetensors", {k: meta[k] for k in meta
                                                                      if k not in ("format", "format_version")})
    with safe_open(str(again), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("embedding"), token.embedding)
    assert load_learned_token(again).embedding.numpy().tobytes() == token.embedding.numpy().tobytes()


def test_resume_after_a_kill_is_exact_and_other_settings_are_refused(tiny_model_dir, scenes, tmp_path, monkeypatch):
    straight = bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "a"), echo=lambda m: None)
    adamw_step, calls = torch.optim.AdamW.step, [0]

    def die_in_step_3(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise Killed
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", die_in_step_3)
    with pytest.raises(Killed):
        bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "b"), echo=lambda m: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_step)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-00000002"]
    messages = []
    resumed = bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "b"), echo=messages.append)
    assert any("resumed from" in m and "checkpoint-00000002" in m for m in messages)
    a, b = load_learned_token(straight["token_file"]), load_learned_token(resumed["token_file"])
    assert a.embedding.numpy().tobytes() == b.embedding.numpy().tobytes()  # bit-identical
    with safe_open(straight["token_file"], framework="pt") as fa, safe_open(resumed["token_file"], framework="pt") as fb:
        assert fa.metadata() == fb.metadata()
    def timeless(log):  # wall-clock seconds differ between runs (CI saw 0.0 against 0.1 under load)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in log]

    assert timeless(resumed["log"]) == timeless(straight["log"])  # the killed run's logged steps are kept
    with pytest.raises(ConfigError, match=r"other settings \(settings.contrastive.weight\)"):
        bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "b", "contrastive.weight=0"),
                                  echo=lambda m: None)


def test_a_clip_vision_tower_gives_the_image_features(tiny_model_dir, scenes, tmp_path):
    from train.metrics import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    report = bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "run", f"contrastive.image_encoder={clip}",
                                               "train.steps=2"), echo=lambda m: None)
    with safe_open(report["token_file"], framework="pt") as f:
        assert f.metadata()["image_encoder"] == "clip:clip"
    assert all(math.isfinite(r["cl_background"]) and math.isfinite(r["cl_name"]) for r in report["log"])


def test_an_optional_text_lora_trains_and_travels_in_the_token_file(tiny_model_dir, scenes, tmp_path):
    report = bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "run", "text_lora.rank=2",
                                               "train.steps=2", "text_lora.lr_scale=1.0"), echo=lambda m: None)
    token = load_learned_token(report["token_file"])
    assert token.text_lora_rank == 2 and len(token.text_lora) == 8  # 2 layers x (q, v) x (A, B)
    assert any(v.abs().max() > 0 for k, v in token.text_lora.items() if k.endswith("lora_B"))  # B left zero


def test_bad_input_is_refused_before_any_model_loads(tiny_model_dir, scenes, tmp_path, text):
    lines = Path(scenes["train"]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(x) for x in lines[:3]]
    for r in rows:
        r.pop("scene")
        r["image"] = str(Path(scenes["train"]).parent / r["image"])
        r["mask"] = str(Path(scenes["train"]).parent / r["mask"])
        r.pop("reference", None)
    rows[0]["name"] = "   "
    rows[1]["name"] = "a red cup"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ConfigError, match=r"1 line\(s\) without a product name \(3\).*line 1: name is empty"):
        bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "r", f"data.manifest={bad}"))
    with pytest.raises(ConfigError, match=r"train.batch_size x processes must be >= 2"):
        bt.train_background_token(_config(tiny_model_dir, scenes, tmp_path / "r", "train.batch_size=1"))
    with pytest.raises(ConfigError, match=r"unknown key contrastive.lambda; keys of \[contrastive\]: weight"):
        _config(tiny_model_dir, scenes, tmp_path / "r", "contrastive.lambda=0.1")
    with pytest.raises(ConfigError, match="token.token: a learned token must be one word"):
        _config(tiny_model_dir, scenes, tmp_path / "r", "token.token='two words'")
    assert not (tmp_path / "r").exists()  # nothing was claimed or written
    # A token file of another text encoder: the encoder that should read it says so.
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "<background>", init_word="background", base_model="tiny")
    other = load_text_encoder(tiny_model_dir / "text_encoder")
    with torch.no_grad():
        other.get_input_embeddings().weight[0] += 1.0
    with pytest.raises(WeightFormatError, match="another text encoder"):
        _encode((tokenizer, other), "a cup <background>", [token])


def test_the_cli_trains_and_prints_the_token_file(tiny_model_dir, scenes, tmp_path, capsys):
    args = ["--config", str(REPO / "configs" / "miniature" / "background_token.toml"), f"model.base={tiny_model_dir}",
            "model.dreampainter_weights=none", f"data.manifest={scenes['train']}", "data.base_sizes=[64]",
            f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "train.batch_size=2"]
    assert bt.main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "background_token.safetensors")
    assert bt.main(args + ["train.steps=0"]) == 2
    assert "train.steps must be >= 1" in capsys.readouterr().err


def test_two_processes_match_one_process(tiny_model_dir, scenes, tmp_path):
    """torchrun with 2 x batch 2 against 1 process x batch 4: the same global batches, noise and
    contrastive terms over the whole global batch (features all-gathered with their gradients)."""
    common = ["--config", str(REPO / "configs" / "miniature" / "background_token.toml"), f"model.base={tiny_model_dir}",
              "model.dreampainter_weights=none", f"data.manifest={scenes['train']}", "data.base_sizes=[64]",
              "train.steps=3", "train.checkpoint_every=0", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "train.background_token", *common, f"train.output_dir={tmp_path / 'two'}",
                           "train.batch_size=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = bt.train_background_token(bt.load_token_config(common[1], common[2:] + [
        f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4"]), echo=lambda m: None)
    a = load_learned_token(tmp_path / "two" / "background_token.safetensors").embedding
    b = load_learned_token(one["token_file"]).embedding
    start = init_token(load_tokenizer(tiny_model_dir / "tokenizer"), load_text_encoder(tiny_model_dir / "text_encoder"),
                       "<background>", init_word="background").embedding
    assert (a - b).norm() / (b - start).norm() < 1e-3, ((a - b).norm(), (b - start).norm())
    with safe_open(str(tmp_path / "two" / "checkpoint-00000003" / "trainable.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("token_embedding"), a)
