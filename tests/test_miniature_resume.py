"""train.miniature's VAE and base phases step through the stage trainer's train.trainer.Optimization
(its optimizer, LR schedule, clipping and EMA) and checkpoint as the trainer does: a run killed in
the middle of either phase continues from its last checkpoint and ends with the very weights of
a run that was never interrupted (tolerance 0, one CPU thread)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from train import miniature
from train.checkpoint import list_checkpoints
from train.miniature import Miniature, load_recipe, read_recipe
from train.trainer import Optimization, lr_lambda

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS, EVERY = 8, 3  # checkpoints after steps 3, 6 and 8


class Killed(Exception):
    pass


def _recipe() -> dict:
    r = load_recipe(smoke=True)  # 20 scenes, tiny batches
    r["smoke"] = False  # with the base's text warm-up, which --smoke leaves out
    r["vae"].update(steps=STEPS, checkpoint_every=EVERY, eval_images=1)
    r["base"].update(steps=STEPS, checkpoint_every=EVERY, log_every=2, text_warmup_steps=3, eval_samples=0)
    return r


def _run(out, monkeypatch, kill_at: int = 0) -> tuple[int, dict]:
    """Phases up to base; `kill_at`: raise in that optimizer step (counted over this run). Returns
    (optimizer steps entered, the fp32 state of every model a phase exported, by folder name)."""
    calls, exported = [0], {}
    real_step, real_save = Optimization.step, miniature._save_bf16_into_place

    def step(self, backward):
        calls[0] += 1
        if calls[0] == kill_at:
            raise Killed
        return real_step(self, backward)

    def save(model, final):
        exported[final.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real_save(model, final)

    with monkeypatch.context() as m:
        m.setattr(Optimization, "step", step)
        m.setattr(miniature, "_save_bf16_into_place", save)
        try:
            Miniature(out, _recipe(), echo=lambda msg: None).run("base")
        except Killed:
            pass
    return calls[0], exported


def _log(out, phase):
    return [{k: v for k, v in row.items() if k != "seconds"}
            for row in json.loads((out / phase / "train_log.json").read_text())]


def test_vae_and_base_resume_exactly_through_the_trainers_step(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Miniature(straight, _recipe(), echo=lambda msg: None).run("text")
    shutil.copytree(straight, resumed)  # the same data and text encoder

    n, want = _run(straight, monkeypatch)
    assert n == 2 * STEPS and set(want) == {"vae", "transformer"}

    # Killed in VAE step 5: resumes from the step-3 checkpoint (5 steps), then killed in base step 6.
    assert _run(resumed, monkeypatch, kill_at=5) == (5, {})
    n, got = _run(resumed, monkeypatch, kill_at=(STEPS - EVERY) + 6)
    assert n == (STEPS - EVERY) + 6 and set(got) == {"vae"}
    n, got2 = _run(resumed, monkeypatch)
    assert n == STEPS - EVERY and set(got2) == {"transformer"}  # the base resumed from step 3 too
    got.update(got2)

    for name in ("vae", "transformer"):
        assert want[name].keys() == got[name].keys()
        assert all(torch.equal(want[name][k], got[name][k]) for k in want[name]), name
    for phase in ("vae", "base"):
        assert _log(resumed, phase) == _log(straight, phase)
        assert not list_checkpoints(resumed / phase) and not list_checkpoints(straight / phase)  # done: dropped
    metrics = [json.loads((d / "phases" / "base.json").read_text())["metrics"] for d in (straight, resumed)]
    keys = ("empty_prompts", "second_prompts", "samples", "last_loss")
    assert [{k: m[k] for k in keys} for m in metrics] == [{k: metrics[0][k] for k in keys}] * 2
    assert metrics[0]["samples"] == STEPS * _recipe()["base"]["batch_size"]

    # The base's learning rate follows the trainer's schedule (warmup capped at a fifth of the steps).
    sec = read_recipe(_recipe()).base
    factor = lr_lambda(sec.optim(STEPS), STEPS)
    assert [row["lr"] for row in _log(straight, "base")] == [
        pytest.approx(sec.lr * factor(row["step"]), rel=1e-12) for row in _log(straight, "base")]
