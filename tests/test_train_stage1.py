"""Stage 1 training on the tiny model: objective, config, overfitting, frozen base, export.

CPU, tiny random CogView4 (tests/conftest.py), synthetic shapes dataset written per test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreampainter_core.loading import load_transformer
from dreampainter_core.pipeline import DreamPainterPipeline
from dreampainter_core.transformer import DEFAULT_LORA_TARGETS
from train import flow
from train.config import ConfigError, apply_overrides, default_config, dump_toml, load_config, read_config_file
from train.synthetic import tiny_config, write_synthetic_dataset
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------
# the objective matches the sampler


def test_flow_convention_matches_sampler(tiny_model_dir):
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir)
    for seq_len in (16, 64, 4096):
        sched, timesteps = pipe.schedule(12, seq_len)
        mu = flow.mu_for(pipe.scheduler, seq_len)
        assert mu == pytest.approx(math.sqrt(seq_len / 256) * 0.75 + 0.25)
        s = timesteps / pipe.scheduler.config.num_train_timesteps  # the model sees timestep = 1000 * s
        sigma = flow.shift_sigma(pipe.scheduler, s, mu)
        torch.testing.assert_close(sigma, sched.sigmas[:-1], atol=2e-6, rtol=0)
    # With the exact velocity, each scheduler step lands on the training path's next point.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    sched, timesteps = pipe.schedule(6, 64)
    x = flow.flow_pair(x0, noise, sched.sigmas[:1])[0]
    for i, t in enumerate(timesteps):
        xt, v = flow.flow_pair(x0, noise, sched.sigmas[i : i + 1])
        torch.testing.assert_close(x, xt, atol=1e-5, rtol=0)
        x = sched.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
    # Per-sample randomness depends only on (seed, step, micro, position).
    a = flow.sample_generator(3, 10, 1, 5)
    b = flow.sample_generator(3, 10, 1, 5)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    assert not torch.equal(torch.randn(8, generator=flow.sample_generator(3, 10, 1, 6)),
                           torch.randn(8, generator=flow.sample_generator(3, 10, 1, 5)))


def test_high_noise_share_moves_that_share_of_times_into_the_top_band():
    times = [flow.draw_time(flow.sample_generator(0, k, 0, 0), "uniform") for k in range(4000)]
    moved = [flow.into_high_noise(flow.sample_generator(1, k, 0, 0), t, 0.5, 0.8) for k, t in enumerate(times)]
    top_before = sum(float(t) >= 0.8 for t in times) / len(times)
    top_after = sum(float(t) >= 0.8 for t in moved) / len(moved)
    # uniform: 20% in [0.8, 1); moving half of all times there: 0.5 + 0.5 * 0.2 = 60%
    assert abs(top_before - 0.2) < 0.03 and abs(top_after - 0.6) < 0.03
    assert all(0.0 < float(t) < 1.0 for t in moved)
    # off: the time and the generator's stream are untouched (runs without it stay reproducible)
    g, h = flow.sample_generator(2, 0, 0, 0), flow.sample_generator(2, 0, 0, 0)
    assert flow.into_high_noise(g, times[0], 0.0, 0.8) is times[0]
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=h))


# ---------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_papers():
    c1, c2 = default_config(1), default_config(2)
    assert c1.model.control_blocks == 6 and c1.model.injection_layers == [] and c1.optim.lr == 4e-5
    assert c1.optim.scheduler == "constant" and c1.data.reference_prob == 0.0 and c1.data.base_sizes == [800, 1024]
    assert c2.model.lora_rank == 256 and c2.model.lora_targets == list(DEFAULT_LORA_TARGETS)
    assert c2.optim.lr == 8e-5 and c2.optim.scheduler == "cosine" and c2.optim.warmup_steps > 0
    assert c2.data.reference_prob == 0.5 and c2.data.reference_sizes == [512, 800] and c2.data.reference_shift > 0
    for stage, name in ((1, "stage1"), (2, "stage2"), (1, "tiny_stage1"), (2, "tiny_stage2")):
        load_config(stage, REPO / "configs" / f"{name}.toml")
    real1, real2 = load_config(1, REPO / "configs/stage1.toml"), load_config(2, REPO / "configs/stage2.toml")
    assert real1.optim.lr == 4e-5 and real1.model.control_blocks == 6 and real1.model.dtype == "bf16"
    assert real2.optim.lr == 8e-5 and real2.model.lora_rank == 256 and real2.data.reference_prob == 0.5


def test_config_overrides_typed_and_errors(tmp_path):
    cfg = default_config(1)
    apply_overrides(cfg, ["optim.lr=1e-4", "train.batch_size=3", "train.gradient_checkpointing=false",
                          "data.base_sizes=512,768", 'data.ratios=["1:1", "4:3"]', "model.injection_layers=[0,5]",
                          "train.mu=1.5", "checkpoint.output_dir=/x y"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.train.batch_size, int) and cfg.train.batch_size == 3
    assert cfg.train.gradient_checkpointing is False and cfg.data.base_sizes == [512, 768]
    assert cfg.data.ratios == ["1:1", "4:3"] and cfg.model.injection_layers == [0, 5] and cfg.train.mu == "1.5"
    assert cfg.checkpoint.output_dir == "/x y"
    for bad, msg in (("optim.lrr=1", "unknown key optim.lrr"), ("optimm.lr=1", "unknown config section"),
                     ("train.batch_size=two", "expected an integer"), ("train.gradient_checkpointing=maybe", "true/false"),
                     ("optim.scheduler=linear", "must be one of constant, cosine"), ("lr=1", "section.key"),
                     ("optim.lr", "section.key=value")):
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(default_config(1), [bad])
    with pytest.raises(ConfigError, match="stage-2 config"):
        load_config(1, REPO / "configs/stage2.toml")
    with pytest.raises(ConfigError, match="reference_prob must be 0"):
        load_config(1, None, ["data.reference_prob=0.5"])
    with pytest.raises(ConfigError, match="model.dtype=bf16 needs"):
        load_config(1, None, ["train.mixed_precision=no"])
    with pytest.raises(ConfigError, match=r"train.high_noise_prob must be in \[0, 1\], got 1.5"):
        load_config(1, None, ["train.high_noise_prob=1.5"])
    with pytest.raises(ConfigError, match=r"train.high_noise_from must be in \[0, 1\), got 1.0"):
        load_config(1, None, ["train.high_noise_from=1"])
    y = tmp_path / "c.yaml"
    y.write_text("stage: 2\noptim:\n  lr: 2e-5\ntrain:\n  max_steps: 7\n")
    c = load_config(2, y)
    assert c.optim.lr == 2e-5 and c.train.max_steps == 7 and c.optim.scheduler == "cosine"
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch_sise = 2\n")
    with pytest.raises(ConfigError, match="unknown key train.batch_sise"):
        load_config(1, bad)
    # The dumped config (written next to every checkpoint) reads back to the same values.
    t = tmp_path / "dump.toml"
    t.write_text(dump_toml(c))
    assert load_config(2, t) == c and read_config_file(t)["stage"] == 2


# ---------------------------------------------------------------------------------------
# training


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_stage1_overfits_trains_only_the_branch_and_exports(tiny_model_dir, tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=1)
    out = tmp_path / "run"
    cfg = tiny_config(1, tiny_model_dir, manifest, out, [
        "train.fixed_batch=true", "train.max_steps=30", "train.batch_size=2", "optim.lr=2e-3",
        "validation.every=15", "checkpoint.every=10", "checkpoint.keep_last=2", "log.every=5",
    ])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert set(trainer.trainable) == {n for n in before if n.startswith("control.")}
    result = trainer.train()
    trainer.close()

    # Loss on the fixed batch with fixed noise/times (the probe) drops measurably.
    (s0, p0), (s1, p1) = result.probe_losses[0], result.probe_losses[-1]
    assert (s0, s1) == (0, 30)
    print(f"stage 1 probe loss: step 0 {p0:.4f} -> step 30 {p1:.4f} ({p1 / p0:.2%})")
    assert p1 < 0.8 * p0

    # Only control-branch parameters changed; the base is bit-identical to its files.
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(n.startswith("control.") for n in changed)
    assert changed == set(trainer.trainable)  # every branch tensor moved (gates first, then the rest)
    fresh = load_transformer(Path(tiny_model_dir) / "transformer")
    for n, p in fresh.named_parameters():
        assert torch.equal(p, after[f"base.{n}"].detach()), n

    # Checkpoints: keep-last-2 of every 10 steps; validation grids at 15 and 30.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000020", "checkpoint-00000030"]
    assert not list(out.glob(".checkpoint-*"))
    grids = [p.name for p in result.validation_images]
    assert grids == ["step_00000015.png", "step_00000030.png"]
    grid = Image.open(out / "validation" / "step_00000030.png")
    assert grid.size == (2 * 64, 2 * 64)  # 2 samples x (product, result) at 64 px cells
    rows = (out / "logs" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) > 5

    # Export: a stage-1 DreamPainter file equal to the trained branch, loadable by the pipeline.
    meta_path = result.export_path
    assert meta_path == out / "dreampainter_stage1.safetensors"
    with safe_open(str(meta_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["stage"] == "1" and meta["trained_steps"] == "30" and meta["base_model"] == "tiny-random-cogview4"
    saved = _tensors(meta_path)
    assert not any(k.startswith("lora.") for k in saved)
    for k, v in trainer.model.control_state_dict().items():
        assert torch.equal(saved[f"control.{k}"], v.detach()), k
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=meta_path)
    product = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    img = pipe("a red ball on a blue background", product, mask, steps=2, guidance_scale=1.0)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_stage1_bf16_autocast_checkpointing_and_8bit_message(tiny_model_dir, tmp_path):
    """bf16 storage + autocast + gradient checkpointing + accumulation run (2 steps); 8-bit Adam without
    bitsandbytes fails at setup with a message that says what to do."""
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=2)
    cfg = tiny_config(1, tiny_model_dir, manifest, tmp_path / "bf16", [
        "model.dtype=bf16", "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.grad_accum=2",
        "train.batch_size=1", "train.max_steps=2", "validation.every=0", "checkpoint.export_dtype=bf16",
    ])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    assert trainer.model.dtype == torch.bfloat16 and trainer.model.gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    result = trainer.train()
    assert result.step == 2 and all(math.isfinite(v) for _, v in result.losses)
    with safe_open(str(result.export_path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        cfg8 = tiny_config(1, tiny_model_dir, manifest, tmp_path / "b8", ["optim.optimizer=adamw8bit", "validation.every=0"])
        with pytest.raises(ConfigError, match="needs bitsandbytes.*optim.optimizer=adamw"):
            Trainer(cfg8, echo=lambda m: None).setup()


def test_mask_loss_weight_weights_the_product_region(tiny_model_dir, tmp_path):
    """train.mask_loss_weight = w: per-sample loss = mean(err * W), W = 1 + (w - 1) * Z_m normalised to
    mean 1 per sample (Z_m = the last control channel); w = 1 is the plain MSE (no weight at all)."""
    from train.dataset import collate

    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    cfg = tiny_config(1, tiny_model_dir, manifest, tmp_path / "w", ["train.mask_loss_weight=3", "validation.every=0"])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    with torch.no_grad():  # the gates start at zero: make the branch act so the weight matters
        for gate in trainer.model.control.gates:
            gate.weight.normal_(0, 0.05)
    batch = collate([trainer.dataset[i] for i in trainer.sampler.global_batches(0)[0]])
    groups = trainer._groups(batch, 0, 0)
    with torch.no_grad():
        weighted = trainer._call(groups, wrapped=False)
        plain, manual = [], []
        for g in groups:
            v = trainer.model(g["x_t"], g["text"], g["timestep"], g["size"], g["size"], g["crop"],
                              control_latents=g["control"])
            err = (v.float() - g["target"]) ** 2
            m = g["control"][:, -1:].float()
            assert 0 < float(m.mean()) < 1  # the shapes cover part of the latent grid
            w = 1 + 2 * m
            manual.append((err * w / w.mean(dim=(1, 2, 3), keepdim=True)).mean(dim=(1, 2, 3)))
            plain.append(err.mean(dim=(1, 2, 3)))
            torch.testing.assert_close(g["weight"].mean(dim=(1, 2, 3)), torch.ones(len(g["index"])))
    torch.testing.assert_close(weighted, torch.cat(manual))
    assert not torch.allclose(weighted, torch.cat(plain))
    trainer.close()

    trainer = Trainer(tiny_config(1, tiny_model_dir, manifest, tmp_path / "p", ["validation.every=0"]),
                      echo=lambda m: None).setup()
    assert all(g["weight"] is None for g in trainer._groups(batch, 0, 0))
    trainer.close()
    with pytest.raises(ConfigError, match="mask_loss_weight must be > 0"):
        tiny_config(1, tiny_model_dir, manifest, tmp_path / "z", ["train.mask_loss_weight=0"])
