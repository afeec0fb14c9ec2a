"""The latent / text-embedding cache: filled once, used without loading the encoders, invalidated
when a sample's files or the model's files change, and equivalent to training without it."""

from __future__ import annotations

import os

import numpy as np
import torch
import pytest
from PIL import Image

from train.synthetic import tiny_config, write_synthetic_dataset
from train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(cfg):
    t = Trainer(cfg, echo=lambda m: None)
    try:
        return t.train()
    finally:
        t.close()


def test_cache_used_skips_encoders_and_invalidates(tiny_model_dir, tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=7)
    cache = tmp_path / "cache"
    common = ["train.max_steps=3", "train.batch_size=2", "validation.every=0", "validation.probe_batches=0",
              "checkpoint.every=0", "log.every=1"]
    cached = common + ["cache.enabled=true", f"cache.dir={cache}"]

    plain = _run(tiny_config(1, tiny_model_dir, manifest, tmp_path / "plain", common))
    first = _run(tiny_config(1, tiny_model_dir, manifest, tmp_path / "r1", cached))
    s1 = first.stats
    assert s1["latents_computed"] == 4 and s1["texts_computed"] == 4
    assert s1["loaded"] == {"text_encoder": True, "vae": True}
    # Cached conditioning is exactly the uncached one: same losses, bit for bit.
    assert first.losses == plain.losses

    second = _run(tiny_config(1, tiny_model_dir, manifest, tmp_path / "r2", cached))
    s2 = second.stats
    assert s2["latents_computed"] == 0 and s2["texts_computed"] == 0
    assert s2["loaded"] == {"text_encoder": False, "vae": False}  # neither encoder is even loaded
    assert s2["cache"]["latent_hits"] == 3 * 2 and s2["cache"]["latent_misses"] == 0
    assert second.losses == plain.losses

    # A changed sample file misses (only that sample is re-encoded); prompts stay cached.
    img = manifest.parent / "img" / "0001.png"
    a = np.array(Image.open(img))
    Image.fromarray(255 - a).save(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = _run(tiny_config(1, tiny_model_dir, manifest, tmp_path / "r3", cached))
    assert third.stats["latents_computed"] == 1 and third.stats["texts_computed"] == 0
    assert third.stats["loaded"] == {"text_encoder": False, "vae": True}

    # A changed model file (the VAE's weights) invalidates every latent, not the text entries.
    vae_file = next((tiny_model_dir / "vae").glob("*.safetensors"))
    st = vae_file.stat()
    try:
        os.utime(vae_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        fourth = _run(tiny_config(1, tiny_model_dir, manifest, tmp_path / "r4", cached))
    finally:
        os.utime(vae_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # the model folder is shared by other tests
    assert fourth.stats["latents_computed"] == 4 and fourth.stats["texts_computed"] == 0


def test_cached_samples_are_not_decoded_and_uncached_ones_are(tiny_model_dir, tmp_path):
    # With the cache filled, a training item carries no image / mask (their latents are cached);
    # a sample the cache lacks is still decoded in full, and a batch mixing both keeps both.
    from train.dataset import collate

    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=8)
    cfg = tiny_config(1, tiny_model_dir, manifest, tmp_path / "run", [
        "train.batch_size=2", "validation.every=0", "checkpoint.every=0", "cache.enabled=true", f"cache.dir={tmp_path / 'c'}",
    ])
    trainer = Trainer(cfg, echo=lambda m: None).setup()
    try:
        ds = trainer.dataset
        assert len(ds.undecoded) == 4
        items = [ds[i] for i in range(4)]
        assert all(it["image"] is None and it["mask"] is None for it in items)
        x0, control = trainer._latents(collate(items))
        assert x0.shape[0] == control.shape[0] == 4

        ds.undecoded = frozenset(set(ds.undecoded) - {(items[1]["line"], tuple(items[1]["bucket"]))})
        mixed = collate([ds[0], ds[1]])
        assert isinstance(mixed["image"], list) and mixed["image"][0] is None and mixed["image"][1].shape[0] == 3
        # Cached or decoded, the conditioning of the first two samples is the same.
        x0b, controlb = trainer._latents(mixed)
        assert torch.equal(x0b, x0[:2]) and torch.equal(controlb, control[:2])
    finally:
        trainer.close()
