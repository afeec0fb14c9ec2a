"""Checkpoint integrity (issue 16): manifests, fsync order, verified resume with fallback, pruning
that never counts a damaged checkpoint, the non-finite loss/gradient guard, stale temp cleanup.

Unit tests use the trainer's own Optimization and write_checkpoint on a small nn.Linear; the
end-to-end ones run the stage-1 trainer on the tiny model (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.train_soak import make_legacy, nan_bits
from dreampainter_core import fileio
from train import checkpoint as ckpt
from train.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    list_checkpoints,
    load_checkpoint,
    load_newest_intact,
    prune,
    rng_state,
)
from train.config import ConfigError, OptimConfig, load_config
from train.synthetic import tiny_config, write_synthetic_dataset
from train.trainer import NonFiniteError, Optimization, Trainer, TrainingModule, main, write_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.memcap]  # tests/conftest.py


# ---------------------------------------------------------------------------------------
# helpers: a small model trained through the trainer's Optimization, checkpointed by write_checkpoint


def _optimization(**kw) -> tuple[torch.nn.Linear, Optimization]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, Optimization(model, dict(model.named_parameters()), OptimConfig(lr=1e-2), 100, **kw)


def _backward(model: torch.nn.Linear, step: int, nan: bool = False):
    def run():
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean() * (float("nan") if nan else 1.0)
        loss.backward()
        return loss.detach()
    return run


def _save(out: Path, model, opt: Optimization, step: int, keep_last: int = 10) -> Path:
    return write_checkpoint(out, step, opt, opt.gather(), [rng_state()], {}, keep_last)


def _train_and_save(out: Path, steps: list[int], keep_last: int = 10) -> list[Path]:
    model, opt = _optimization()
    paths = []
    for s in range(1, max(steps) + 1):
        opt.step(_backward(model, s))
        if s in steps:
            paths.append(_save(out, model, opt, s, keep_last))
    return paths


def _flip_one_bit(path: Path) -> None:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    data = bytearray(path.read_bytes())
    data[8 + n] ^= 0x01  # lowest mantissa bit of the first value: still finite
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------
# writing


def test_checkpoint_has_a_manifest_written_last_and_everything_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt, "fsync_file", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(ckpt, "fsync_dir", lambda p: events.append(("fsync_dir", Path(p).name)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a).name, Path(b).name)),
                                                     real_replace(a, b)))
    (path,) = _train_and_save(tmp_path, [2])
    monkeypatch.undo()

    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                            "rng.safetensors", "rng.json", "state.json", "manifest.json"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == ckpt.CHECKPOINT_FORMAT == 2
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (path / name).stat().st_size, "sha256": fileio.file_digest(path / name)}

    tmp_name, final = f".checkpoint-{2:08d}.tmp-{os.getpid()}", path.name
    rename = events.index(("rename", tmp_name, final))
    fsynced = [e[1] for e in events[:rename] if e[0] == "fsync"]
    assert sorted(fsynced) == files and fsynced[-1] == "manifest.json"  # every file, the manifest last
    assert events[rename - 1] == ("fsync_dir", tmp_name)  # the folder's entries before the rename
    assert events[rename + 1] == ("fsync_dir", tmp_path.name)  # the rename itself after it


def test_atomic_writes_fsync_the_file_then_the_folder(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(fileio, "fsync_file", lambda p: events.append(("file", Path(p).parent, Path(p).name)))
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: events.append(("dir", Path(p))))
    target = tmp_path / "out.bin"
    fileio.atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    assert events[0][0] == "file" and events[0][1] == tmp_path and events[0][2] != "out.bin"  # the temp file
    assert events[1] == ("dir", tmp_path) and len(events) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-write")
def test_a_kill_during_an_export_leaves_a_temp_file_that_the_next_run_removes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = os.fork()
    if pid == 0:  # a writer killed inside atomic_path, as a kill -9 during the export would
        with fileio.atomic_path(out / "dreampainter_stage1.safetensors") as tmp:
            tmp.write_bytes(b"half an export")
            os._exit(137)
    assert os.waitpid(pid, 0)[1] >> 8 == 137
    (stale,) = list(out.iterdir())
    assert stale.name.startswith(".dreampainter_stage1.safetensors.") and stale.name.endswith(".tmp")
    (out / ".checkpoint-00000003.tmp-4242").mkdir()  # a checkpoint save killed halfway
    (out / ".checkpoint-00000003.tmp-4242" / "trainable.safetensors").write_bytes(b"x")
    (out / "notes.tmp").write_text("the user's own file")  # not ours: stays

    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=2)
    said = []
    cfg = tiny_config(1, tiny_model_dir, manifest, out, ["train.max_steps=1", "validation.every=0",
                                                         "validation.probe_batches=0", "checkpoint.every=0"])
    t = Trainer(cfg, echo=said.append)
    try:
        t.setup()
    finally:
        t.close()
    assert not stale.exists() and not (out / ".checkpoint-00000003.tmp-4242").exists()
    assert (out / "notes.tmp").exists()
    assert any(str(stale) in m and "killed" in m for m in said)


# ---------------------------------------------------------------------------------------
# verification


DAMAGES = {
    "one flipped bit": (lambda p: _flip_one_bit(p / "trainable.safetensors"), "trainable.safetensors", "sha256"),
    "NaN bits": (lambda p: nan_bits(p / "trainable.safetensors", count=4), "trainable.safetensors", "sha256"),
    "truncated": (lambda p: (p / "optimizer.safetensors").write_bytes((p / "optimizer.safetensors").read_bytes()[:100]),
                  "optimizer.safetensors", "100 bytes"),
    "empty": (lambda p: (p / "rng.json").write_bytes(b""), "rng.json", "0 bytes"),
    "bad JSON": (lambda p: (p / "scheduler.json").write_text((p / "scheduler.json").read_text().replace("{", "[", 1)),
                 "scheduler.json", "sha256"),
    "missing RNG file": (lambda p: (p / "rng.safetensors").unlink(), "rng.safetensors", "missing"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json", "missing"),
    "bad manifest": (lambda p: (p / "manifest.json").write_text("{"), "manifest.json", "cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_kind_of_damage_is_found_and_named(tmp_path, damage):
    (path,) = _train_and_save(tmp_path, [1])
    assert checkpoint_problem(path) is None
    hurt, file, words = DAMAGES[damage]
    hurt(path)
    problem = checkpoint_problem(path)
    assert problem is not None and file in problem and words in problem, problem
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and file in str(e.value)


def test_checkpoints_without_a_manifest_load_with_a_warning_unless_damaged(tmp_path):
    a, b, c = _train_and_save(tmp_path, [1, 2, 3])
    for p in (a, b, c):
        make_legacy(p)
    said = []
    ck = load_checkpoint(a, said.append)
    assert ck["state"]["step"] == 1 and any("before checkpoints had a manifest" in m for m in said)

    # Damage a checkpoint without a manifest: what the structural and finite checks catch.
    (b / "optimizer.safetensors").write_bytes((b / "optimizer.safetensors").read_bytes()[:-10])
    assert "optimizer.safetensors" in checkpoint_problem(b)
    nan_bits(c / "trainable.safetensors", count=4)
    assert checkpoint_problem(c) is None  # nothing to compare the bytes with...
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors: tensor '.*' holds NaN or infinite"):
        load_checkpoint(c)  # ...but the weights are read and checked


def test_resume_falls_back_to_the_newest_intact_checkpoint_saying_which_and_why(tmp_path):
    a, b, c = _train_and_save(tmp_path, [1, 2, 3])
    (c / "rng.safetensors").unlink()
    nan_bits(b / "trainable.safetensors", count=4)
    said = []
    ck = load_newest_intact(tmp_path, said.append)
    assert ck["path"] == a and [p for p, _ in ck["skipped"]] == [c, b]
    assert "checkpoint-00000003" in said[0] and "rng.safetensors is missing" in said[0]
    assert "checkpoint-00000002" in said[1] and "trainable.safetensors" in said[1] and "sha256" in said[1]
    assert "resuming from checkpoint-00000001" in said[2]

    (a / "state.json").write_text("{")
    with pytest.raises(CheckpointError) as e:
        load_newest_intact(tmp_path)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and all(p.name in msg for p in (a, b, c))
    assert "Nothing was loaded or deleted" in msg and "checkpoint.resume=none" in msg
    assert list_checkpoints(tmp_path) == [a, b, c]
    assert load_newest_intact(tmp_path / "empty") is None  # no checkpoint at all: start afresh


def test_pruning_never_counts_a_damaged_checkpoint(tmp_path):
    """The issue: a damaged newest checkpoint got the good older ones pruned."""
    a, b, c = _train_and_save(tmp_path, [1, 2, 3])
    nan_bits(c / "trainable.safetensors", count=4)
    with pytest.raises(CheckpointError):
        load_checkpoint(c)  # found damaged (as a resume would)
    prune(tmp_path, keep_last=1)
    assert list_checkpoints(tmp_path) == [b, c]  # b: the newest intact one; c: newer, left for a re-save
    prune(tmp_path, keep_last=2)
    assert list_checkpoints(tmp_path) == [b, c]  # only one intact: nothing to delete

    # Damaged ones older than the kept intact ones are pruned like any other.
    d, e = _train_and_save(tmp_path / "second", [1, 2])
    (d / "rng.json").unlink()
    prune(tmp_path / "second", keep_last=1)
    assert list_checkpoints(tmp_path / "second") == [e]


# ---------------------------------------------------------------------------------------
# the non-finite guard (train.on_nonfinite, train.max_nonfinite_steps)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nonfinite_steps_are_never_applied_and_stop_the_run_after_k_in_a_row():
    model, opt = _optimization(ema=None, max_nonfinite_steps=3)
    for s in (1, 2):
        opt.step(_backward(model, s))
    after_2 = _weights(model)
    adam_state = {k: v.clone() for k, v in opt.optimizer.state[model.weight].items()}
    for s in (3, 4):
        loss, norm = opt.step(_backward(model, s, nan=True))
        assert torch.isnan(loss) and opt.skipped and f"step {s}" in opt.skipped
    assert all(torch.equal(after_2[k], v) for k, v in _weights(model).items())  # nothing applied
    assert all(torch.equal(adam_state[k], v) for k, v in opt.optimizer.state[model.weight].items())
    with pytest.raises(NonFiniteError) as e:
        opt.step(_backward(model, 5, nan=True))
    assert "steps 3-5" in str(e.value) and "weights are those after step 2" in str(e.value)
    assert "train.on_nonfinite=skip" in str(e.value)
    assert all(torch.equal(after_2[k], v) for k, v in _weights(model).items())

    # A finite step in between resets the count.
    model, opt = _optimization(max_nonfinite_steps=2)
    for s, nan in ((1, True), (2, False), (3, True), (4, False)):
        opt.step(_backward(model, s, nan))
    assert (opt.nonfinite_total, opt.nonfinite_in_a_row) == (2, 0)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_skip_mode_skips_nonfinite_gradients_and_counts_them(max_grad_norm):
    """A finite loss with a NaN gradient is caught too, with clipping on or off."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = Optimization(model, dict(model.named_parameters()), OptimConfig(lr=1e-2, max_grad_norm=max_grad_norm), 100,
                       on_nonfinite="skip", max_nonfinite_steps=1)

    def nan_grad(step):
        def run():
            loss = _backward(model, step)()
            model.bias.grad[0] = float("nan")
            return loss
        return run

    opt.step(_backward(model, 1))
    before = _weights(model)
    for s in range(2, 6):
        loss, norm = opt.step(nan_grad(s))
        assert torch.isfinite(loss) and norm != norm  # NaN norm
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert opt.nonfinite_total == 4 and opt.lr_scheduler.last_epoch == 5  # the schedule still advances
    opt.step(_backward(model, 6))
    assert not all(torch.equal(before[k], v) for k, v in _weights(model).items()) and opt.skipped is None


def test_nonfinite_counts_are_checkpointed_and_nothing_nonfinite_is_written(tmp_path):
    model, opt = _optimization(on_nonfinite="skip")
    opt.step(_backward(model, 1))
    opt.step(_backward(model, 2, nan=True))
    path = _save(tmp_path, model, opt, 2)
    state = json.loads((path / "state.json").read_text())
    assert (state["nonfinite_in_a_row"], state["nonfinite_total"]) == (1, 1)
    model2, opt2 = _optimization(on_nonfinite="skip")
    opt2.restore(load_checkpoint(path))
    assert (opt2.nonfinite_in_a_row, opt2.nonfinite_total) == (1, 1)

    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(Exception, match=r"refusing to write checkpoint-00000003.*'weight' holds NaN or infinite"):
        _save(tmp_path, model, opt, 3)
    assert list_checkpoints(tmp_path) == [path] and not list(tmp_path.glob(".checkpoint-*"))


def test_nonfinite_settings_are_typed_and_checked():
    cfg = load_config(1, overrides=["train.on_nonfinite=skip", "train.max_nonfinite_steps=5"])
    assert (cfg.train.on_nonfinite, cfg.train.max_nonfinite_steps) == ("skip", 5)
    assert (load_config(1).train.on_nonfinite, load_config(1).train.max_nonfinite_steps) == ("stop", 3)
    for override, words in (("train.on_nonfinite=ignore", "must be one of stop, skip"),
                            ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1"),
                            ("optim.lr=nan", "optim.lr must be a finite number"),
                            ("optim.betas=0.9,inf", "optim.betas must be a finite number")):
        with pytest.raises(ConfigError, match=words):
            load_config(1, overrides=[override])


# ---------------------------------------------------------------------------------------
# end to end: the trainer's command on the tiny model


RUN = ["train.batch_size=1", "train.grad_accum=1", "train.max_steps=9", "checkpoint.every=3", "checkpoint.keep_last=2",
       "optim.lr=2e-3", "validation.every=0", "validation.probe_batches=0", "log.every=1", "log.progress=false"]


def _cli(model_dir, manifest, out, extra=()) -> list[str]:
    return [f"--config={REPO / 'configs' / 'tiny_stage1.toml'}", f"model.base={model_dir}", f"data.manifest={manifest}",
            f"checkpoint.output_dir={out}", *RUN, *extra]


def _main(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(1, args)
    return rc, err.getvalue()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_issue_16_a_newest_checkpoint_with_flipped_bytes_is_not_resumed(tiny_model_dir, tmp_path, with_manifest):
    """The issue's finding: "A newest checkpoint with flipped bytes resumed and trained 20 steps of NaN loss.
    The run exited 0 with 'done', and pruning then deleted the good older checkpoints." Now the damaged
    checkpoint is found (by its manifest, or for a checkpoint without one by its NaN weights), named,
    passed over, and the run continues from the intact one before it, ending where a run that was never
    damaged ends."""
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    rc, _ = _main(_cli(tiny_model_dir, manifest, tmp_path / "straight"))
    assert rc == 0

    out = tmp_path / "damaged"
    rc, _ = _main(_cli(tiny_model_dir, manifest, out, ["train.stop_after=6"]))
    good, newest = out / "checkpoint-00000003", out / "checkpoint-00000006"
    assert rc == 0 and list_checkpoints(out) == [good, newest]
    if not with_manifest:
        make_legacy(good)
        make_legacy(newest)
    nan_bits(newest / "trainable.safetensors", count=64)

    rc, err = _main(_cli(tiny_model_dir, manifest, out))
    assert rc == 0, err
    assert "checkpoint-00000006 cannot be resumed from" in err and "trainable.safetensors" in err
    assert "resuming from checkpoint-00000003" in err and f"resumed from {good} at step 3" in err
    assert list_checkpoints(out) == [newest, out / "checkpoint-00000009"]
    for path in list_checkpoints(out):
        assert checkpoint_problem(path) is None
        assert all(torch.isfinite(t).all() for t in _tensors(path / "trainable.safetensors").values())
    want = _tensors(tmp_path / "straight" / "dreampainter_stage1.safetensors")
    got = _tensors(out / "dreampainter_stage1.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_explicit_resume_of_a_damaged_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    out = tmp_path / "run"
    assert _main(_cli(tiny_model_dir, manifest, out, ["train.stop_after=3"]))[0] == 0
    (out / "checkpoint-00000003" / "scheduler.json").write_text("{not json")
    for resume, words in ((out / "checkpoint-00000003", "checkpoint.resume names a checkpoint that cannot be resumed"),
                          ("auto", "no intact checkpoint to resume from")):
        rc, err = _main(_cli(tiny_model_dir, manifest, out, [f"checkpoint.resume={resume}"]))
        assert rc == 2 and words in err and "scheduler.json" in err and "Traceback" not in err
    assert list_checkpoints(out) == [out / "checkpoint-00000003"]


def _nan_from_step(monkeypatch, first: int, last: int = 10**9):
    """The trained module's loss is NaN in optimizer steps first..last (1-based)."""
    real, calls = TrainingModule.forward, [0]

    def forward(self, groups):
        calls[0] += 1
        per = real(self, groups)
        return per * float("nan") if first <= calls[0] <= last else per

    monkeypatch.setattr(TrainingModule, "forward", forward)


def test_nonfinite_loss_stops_the_run_with_an_error_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    out = tmp_path / "run"
    _nan_from_step(monkeypatch, 5)
    rc, err = _main(_cli(tiny_model_dir, manifest, out))
    assert rc == 2 and "Traceback" not in err and "done:" not in err
    assert "error: training stopped at step 7" in err and "steps 5-7" in err
    assert f"The newest checkpoint is {out / 'checkpoint-00000003'}" in err
    assert "step 5: NaN or infinite loss nan" in err and "step 6:" in err  # the skipped steps, as they happen
    assert "step 6: no checkpoint while steps are not applied (2 in a row)" in err
    assert list_checkpoints(out) == [out / "checkpoint-00000003"] and checkpoint_problem(out / "checkpoint-00000003") is None
    assert not (out / "dreampainter_stage1.safetensors").exists()


def test_skip_mode_finishes_with_the_count_and_finite_weights(tiny_model_dir, tmp_path, monkeypatch):
    manifest = write_synthetic_dataset(tmp_path / "data", num=4, size=64, seed=3)
    out = tmp_path / "run"
    _nan_from_step(monkeypatch, 4, 5)
    rc, err = _main(_cli(tiny_model_dir, manifest, out, ["train.on_nonfinite=skip", "train.max_steps=6"]))
    assert rc == 0, err
    assert "done: step 6" in err and "2 step(s) with a NaN or infinite loss or gradient skipped" in err
    ck3, ck6 = (_tensors(out / f"checkpoint-{s:08d}" / "trainable.safetensors") for s in (3, 6))
    assert all(torch.isfinite(t).all() for t in ck6.values())
    assert not all(torch.equal(ck3[k], ck6[k]) for k in ck3)  # step 6 was applied
    assert json.loads((out / "checkpoint-00000006" / "state.json").read_text())["nonfinite_total"] == 2
    rows = (out / "logs" / "train.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows].count("nan") == 2
