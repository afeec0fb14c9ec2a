"""Stage 2 training on the tiny model: only LoRA trains, references dropped/resized/shifted, export.

CPU, tiny random CogView4; the stage-1 file is tests/conftest.py's tiny_stage1_weights (a
branch with non-zero gates, so the control branch matters).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreampainter_core.pipeline import DreamPainterPipeline
from train.synthetic import tiny_config, write_synthetic_dataset
from train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_stage2_trains_only_lora_with_reference_dropout_and_exports(tiny_model_dir, tiny_stage1_weights, tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=8, size=64, seed=3, references=True)
    out = tmp_path / "run"
    cfg = tiny_config(2, tiny_model_dir, manifest, out, [
        f"model.stage1_weights={tiny_stage1_weights}", "model.lora_rank=4",
        "train.max_steps=24", "train.batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=2",
        "data.reference_prob=0.5", "data.reference_sizes=32,48", "data.reference_shift=0.2",
        "validation.every=24", "validation.num=2", "checkpoint.every=0", "log.every=4",
    ])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.model.has_lora and set(trainer.trainable) == {n for n in before if "lora_" in n}
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    stage1 = _tensors(tiny_stage1_weights)
    for k, v in trainer.model.control_state_dict().items():  # the branch is the stage-1 file's
        assert torch.equal(v.detach(), stage1[f"control.{k}"]), k
    result = trainer.train()
    trainer.close()

    # Only LoRA changed: base weights and the control branch are bit-identical.
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    lora_b = [n for n in changed if "lora_B" in n]
    assert len(lora_b) == len([n for n in before if "lora_B" in n])  # B starts at 0 and every one moved
    for n in before:
        if "lora_" not in n:
            assert torch.equal(before[n], after[n].detach()), n

    # Reference dropout, random size and shift were all exercised.
    st = result.stats
    print(f"stage 2 references: {st['references_used']}/{st['samples']} used, sizes {st['reference_sizes']}, "
          f"{st['references_shifted']} shifted")
    assert st["samples"] == 24 * 2
    assert 0.25 * st["samples"] <= st["references_used"] <= 0.75 * st["samples"]
    assert set(st["reference_sizes"]) == {"32x32", "48x48"}
    assert st["references_shifted"] >= 0.75 * st["references_used"]

    (s0, p0), (s1, p1) = result.probe_losses[0], result.probe_losses[-1]
    print(f"stage 2 probe loss: step {s0} {p0:.4f} -> step {s1} {p1:.4f} ({p1 / p0:.2%})")
    assert (s0, s1) == (0, 24) and p1 < 0.9 * p0

    # Validation grid: product | text-only | reference | text + reference.
    assert [p.name for p in result.validation_images] == ["step_00000024.png"]

    # The stage-2 file carries the stage-1 branch plus the LoRA, and supports references.
    path = result.export_path
    saved = _tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["stage"] == "2" and meta["lora_rank"] == "4"
    for k, v in stage1.items():
        assert torch.equal(saved[k], v), k
    lora = {k: v for k, v in saved.items() if k.startswith("lora.")}
    assert lora and set(lora) == {f"lora.{k}" for k in trainer.model.lora_state_dict()}
    pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=path)
    assert pipe.transformer.supports_reference
    product = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 20:44] = 1
    reference = torch.rand(1, 48, 48, 3)
    args = dict(steps=2, guidance_scale=1.0, seed=5)
    with_ref = pipe("a red ball on a blue background", product, mask, reference=reference, reference_size=32, **args)
    text_only = pipe("a red ball on a blue background", product, mask, **args)
    assert with_ref.shape == (1, 64, 64, 3) and torch.isfinite(with_ref).all()
    assert not torch.equal(with_ref, text_only)
    # LoRA scale 0 gives back exactly the stage-1 model it started from.
    stage1_pipe = DreamPainterPipeline.from_pretrained(tiny_model_dir, dreampainter_weights=tiny_stage1_weights)
    assert torch.equal(pipe("a red ball on a blue background", product, mask, lora_scale=0.0, **args),
                       stage1_pipe("a red ball on a blue background", product, mask, **args))


def test_stage2_batch_encodes_references_per_size_as_one_by_one(tiny_model_dir, tiny_stage1_weights, tmp_path):
    # The trainer encodes a batch's references in one VAE call per size; each latent must be
    # the one encode_reference gives that reference alone, and land on its own sample.
    from train.dataset import collate

    manifest = write_synthetic_dataset(tmp_path / "data", num=8, size=64, seed=5, references=True)
    cfg = tiny_config(2, tiny_model_dir, manifest, tmp_path / "run", [
        f"model.stage1_weights={tiny_stage1_weights}", "model.lora_rank=4", "train.batch_size=8",
        "data.reference_prob=0.75", "data.reference_sizes=32,48", "data.reference_shift=0.2",
        "validation.every=0", "checkpoint.every=0",
    ])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    batch = collate([trainer.dataset[i] for i in range(8)])
    refs = batch["reference"]
    sizes = {tuple(r.shape[-2:]) for r in refs if r is not None}
    assert len(sizes) == 2 and any(r is None for r in refs)  # both sizes and a dropped one: a real mix
    groups = trainer._groups(batch, step=0, micro=0, probe=True)
    seen = set()
    for g in groups:
        for row, i in enumerate(g["index"]):
            seen.add(i)
            if refs[i] is None:
                assert g["reference"] is None
                continue
            alone = trainer.pipe.encode_reference(refs[i].permute(1, 2, 0)[None], (refs[i].shape[-1], refs[i].shape[-2]))[0]
            torch.testing.assert_close(g["reference"][row], alone, rtol=1e-3, atol=2e-4)  # conv batching order
    assert seen == set(range(8))
    trainer.close()


def test_shield_product_trains_as_the_sampler_shields(tiny_model_dir, tiny_stage1_weights, tmp_path):
    """train.shield_product: the product's tokens do not attend to the reference while training, the
    same tokens ReferenceOptions.shield_product shields when sampling (mask_to_token_grid of the pixel
    mask); samples without a reference get no shield; off, the groups carry no modulation at all."""
    from dreampainter_core.attention import AttentionModulation
    from dreampainter_core.masks import mask_to_token_grid
    from train.config import ConfigError
    from train.dataset import collate

    manifest = write_synthetic_dataset(tmp_path / "data", num=8, size=64, seed=5, references=True)
    common = [f"model.stage1_weights={tiny_stage1_weights}", "model.lora_rank=4", "train.batch_size=8",
              "data.reference_prob=0.75", "validation.every=0", "checkpoint.every=0"]
    trainer = Trainer(tiny_config(2, tiny_model_dir, manifest, tmp_path / "s", common + ["train.shield_product=true"]),
                      echo=lambda m: None).setup()
    batch = collate([trainer.dataset[i] for i in range(8)])
    groups = trainer._groups(batch, step=0, micro=0, probe=True)
    cell = trainer.pipe.vae_scale_factor * trainer.model.patch_size
    h, w = batch["mask"].shape[-2:]
    expected = mask_to_token_grid(batch["mask"][:, 0], h // cell, w // cell) > 0.5
    shielded_any = False
    with torch.no_grad():
        for g in groups:
            if g["reference"] is None:
                assert g["modulation"] is None
                continue
            shield = g["modulation"].shielded
            assert torch.equal(shield, expected[g["index"]])
            assert shield.any() and not shield.all(dim=1).any()  # some product tokens, never all
            shielded_any = True
            loss = trainer._call([g], wrapped=False)
            args = (g["x_t"], g["text"], g["timestep"], g["size"], g["size"], g["crop"])
            kw = {"control_latents": g["control"], "reference_latents": g["reference"]}
            with trainer._autocast():
                shielded = trainer.model(*args, **kw, modulation=AttentionModulation(shielded=expected[g["index"]]))
                plain = trainer.model(*args, **kw)
            torch.testing.assert_close(loss, ((shielded.float() - g["target"]) ** 2).mean(dim=(1, 2, 3)))
            assert not torch.allclose(loss, ((plain.float() - g["target"]) ** 2).mean(dim=(1, 2, 3)))
    assert shielded_any
    trainer.close()

    trainer = Trainer(tiny_config(2, tiny_model_dir, manifest, tmp_path / "p", common), echo=lambda m: None).setup()
    assert all(g["modulation"] is None for g in trainer._groups(batch, step=0, micro=0, probe=True))
    trainer.close()
    with pytest.raises(ConfigError, match="shield_product"):
        tiny_config(1, tiny_model_dir, manifest, tmp_path / "one", ["train.shield_product=true"])
