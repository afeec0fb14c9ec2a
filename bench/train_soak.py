#!/usr/bin/env python
"""Kill-and-corruption soak of the trainer's checkpoints (stage 1, the tiny model, CPU, Linux/macOS).

    python bench/train_soak.py                       # 20 kill -9 trials + every corruption kind
    python bench/train_soak.py --kills 5 --seed 3 --work /tmp/soak --json soak.json

A straight run of ``STEPS`` steps (checkpoints every 3, keep_last 2, cosine LR with warmup,
gradient accumulation, EMA, text dropout: every piece of state an exact resume must restore) is
the reference. Then:

* kill trials: ``python -m train.stage1`` in its own process group, SIGKILLed (``kill -9``) at a
  random moment between the end of model setup and the time the straight run took to print
  "done:" (so kills land in steps, checkpoint writes, pruning and the export alike), then run
  again to the end;
* corruption trials: a run stopped after step 6 (checkpoints 3 and 6), its newest checkpoint
  damaged one way (CORRUPTIONS), then run to the end: it must name the damaged checkpoint and
  file, fall back to checkpoint 3, and finish. Each kind twice: with manifests, and with the
  checkpoints turned into what the trainer wrote before manifests (format 1);
* every checkpoint damaged: the run must refuse with a clear error and delete nothing.

Every run that ends must end bit-identical to the straight run (the last checkpoint's weights,
EMA, optimizer and scheduler state, both exported files and the CSV log's step/loss/lr/grad-norm
columns) or fail with a one-line "error:" and no traceback; no run may exit 0 with non-finite
weights; no stale temporary file may survive a completed run. tests/test_train_soak.py runs a
small version of this in CI (3 kills in a row, every corruption, resumes in-process).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors import safe_open  # noqa: E402

STEPS = 12
STOP_AT = 6  # the corruption trials' first run stops here (checkpoints 3 and 6)
MARKER = "stage 1: training"  # the trainer's line once the model is built: kills are timed from it
OVERRIDES = [
    "train.batch_size=1", "train.grad_accum=2", f"train.max_steps={STEPS}", "checkpoint.every=3",
    "checkpoint.keep_last=2", "optim.scheduler=cosine", "optim.warmup_steps=2", "optim.lr=2e-3", "ema.enabled=true",
    "ema.decay=0.9", "data.empty_prompt_prob=0.3", "validation.every=0", "validation.probe_batches=0", "log.every=1",
    "log.progress=false",
]
EXPORTS = ("dreampainter_stage1.safetensors", "dreampainter_stage1-raw.safetensors")
CSV_COLUMNS = ("step", "loss", "lr", "grad_norm", "epoch")


# ---------------------------------------------------------------------------------------
# runs


@dataclass
class Outcome:
    rc: int | None
    stderr: str
    killed: bool = False
    seconds: float = 0.0  # from the MARKER line (in-process: from the call) to the "done:" line, else to the exit


def prepare_data(work: Path) -> Path:
    """A 6-sample dataset (3 optimizer steps per epoch, so runs cross epochs) under `work`; its manifest."""
    from train.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(work / "data", num=6, size=64, seed=4)


def prepare_model(work: Path) -> Path:
    """The tiny random CogView4 (train.tiny, seed 0, as tests/conftest.py makes it) under `work`."""
    from train.tiny import write_tiny_model

    return write_tiny_model(work / "tiny-model", seed=0)


def cli_args(model_dir: Path, manifest: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [f"--config={REPO / 'configs' / 'tiny_stage1.toml'}", f"model.base={model_dir}",
            f"data.manifest={manifest}", f"checkpoint.output_dir={out}", *OVERRIDES, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_subprocess(args: list[str], kill_after: float | None = None, timeout: float = 600) -> Outcome:
    """``python -m train.stage1 ARGS``; with `kill_after`, SIGKILL its process group that many seconds
    after the MARKER line (unless it has exited by then)."""
    proc = subprocess.Popen([sys.executable, "-m", "train.stage1", *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    marked = threading.Event()
    marked_at, done_at = [0.0], [0.0]

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if MARKER in line and not marked.is_set():
                marked_at[0] = time.monotonic()
                marked.set()
            if line.startswith("done:"):
                done_at[0] = time.monotonic()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        if kill_after is not None and marked.wait(timeout):
            try:
                proc.wait(timeout=max(0.0, marked_at[0] + kill_after - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    seconds = (done_at[0] or time.monotonic()) - marked_at[0] if marked.is_set() else 0.0
    return Outcome(proc.returncode, "".join(lines), killed, seconds)


def run_in_process(args: list[str]) -> Outcome:
    """train.trainer.main(1, ARGS) in this process (no interpreter start-up: for CI)."""
    from train.trainer import main

    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        rc = main(1, args)
    return Outcome(rc, err.getvalue(), seconds=time.monotonic() - t0)


def make_legacy(ck: Path) -> None:
    """Turn checkpoint folder `ck` into what the trainer wrote before manifests: no manifest.json,
    state.json format 1 (loaded with structural and finite checks only)."""
    (ck / "manifest.json").unlink()
    state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
    state["format"] = 1
    (ck / "state.json").write_text(json.dumps(state), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# what a finished run left


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def snapshot(out: Path) -> dict:
    """The final state a run must reproduce exactly."""
    last = out / f"checkpoint-{STEPS:08d}"
    snap = {name: _tensors(last / name) for name in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors")}
    snap.update({name: _tensors(out / name) for name in EXPORTS})
    snap["scheduler.json"] = (last / "scheduler.json").read_text(encoding="utf-8")
    with open(out / "logs" / "train.csv", newline="", encoding="utf-8") as f:
        snap["train.csv"] = [tuple(row[c] for c in CSV_COLUMNS) for row in csv.DictReader(f)]
    return snap


def differences(want: dict, got: dict) -> list[str]:
    diffs = []
    for name, a in want.items():
        b = got.get(name)
        if isinstance(a, dict):
            if b is None or a.keys() != b.keys():
                diffs.append(f"{name}: other tensors")
            else:
                diffs += [f"{name}: {k} differs" for k in a if not torch.equal(a[k], b[k])][:3]
        elif a != b:
            diffs.append(f"{name} differs")
    return diffs


def nonfinite_files(out: Path) -> list[str]:
    """Weight files in `out` (exports, every checkpoint's tensors) that hold NaN or infinite values."""
    bad = []
    for path in sorted(out.glob("*.safetensors")) + sorted(out.glob("checkpoint-*/*.safetensors")):
        for k, t in _tensors(path).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{path.relative_to(out)}: {k}")
                break
    return bad


def stale_temps(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name
                  or ".old-" in p.name)


def clear_failure(o: Outcome) -> bool:
    """Exited non-zero with an "error:" line and no traceback."""
    return o.rc not in (0, None) and "error:" in o.stderr and "Traceback" not in o.stderr


def judge(out: Path, final: Outcome, want: dict) -> dict:
    """The verdict on a run that was meant to finish: bit-identical, or a clear failure."""
    verdict = {"rc": final.rc, "identical": False, "clear_failure": clear_failure(final), "problems": []}
    if final.rc == 0:
        verdict["problems"] += [f"exited 0 with non-finite weights: {b}" for b in nonfinite_files(out)]
        verdict["problems"] += [f"stale temporary file after a finished run: {s}" for s in stale_temps(out)]
        diffs = differences(want, snapshot(out))
        verdict["problems"] += diffs
        verdict["identical"] = not diffs
    elif not verdict["clear_failure"]:
        verdict["problems"].append(f"failed without a clear error (rc {final.rc}): {final.stderr[-1500:]}")
    return verdict


# ---------------------------------------------------------------------------------------
# kill trials


def _where(out: Path) -> dict:
    """What a killed run left: its newest checkpoint, last logged step, and temporary files."""
    ckpts = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    rows = []
    if (out / "logs" / "train.csv").is_file():
        rows = (out / "logs" / "train.csv").read_text(encoding="utf-8").splitlines()[1:]
    return {"checkpoints": ckpts, "last_logged_step": rows[-1].split(",")[0] if rows else None,
            "temp_left": stale_temps(out), "exported": (out / EXPORTS[0]).exists()}


def kill_trial(out: Path, model_dir: Path, manifest: Path, delays: list[float], want: dict,
               finish: Callable[[list[str]], Outcome] = run_subprocess) -> dict:
    """Run, SIGKILLed after each of `delays` seconds in turn (each run resuming the last), then run to
    the end with `finish`, and judge the result."""
    args = cli_args(model_dir, manifest, out)
    kills = []
    for delay in delays:
        o = run_subprocess(args, kill_after=delay)
        kills.append({"delay_s": round(delay, 3), "killed": o.killed, "rc": o.rc, **_where(out)})
        if not o.killed and o.rc != 0 and not clear_failure(o):
            return {"kills": kills, "rc": o.rc, "identical": False, "clear_failure": False,
                    "problems": [f"a run before the kill failed: {o.stderr[-1500:]}"]}
    return {"kills": kills, **judge(out, finish(args), want)}


# ---------------------------------------------------------------------------------------
# corruption trials


def _data_offset(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def nan_bits(path: Path, count: int = 16) -> None:
    """Flip the exponent bits of the first `count` float32 values of a safetensors file to ones: NaN or
    infinite values, the file's size unchanged."""
    data = bytearray(path.read_bytes())
    start = _data_offset(path)
    for i in range(count):
        data[start + 4 * i + 3] |= 0x7F
        data[start + 4 * i + 2] |= 0x80
    path.write_bytes(bytes(data))


def _nan_weights(ck: Path) -> str:
    nan_bits(ck / "trainable.safetensors")  # the case
    return "trainable.safetensors"


def _truncate(ck: Path) -> str:
    f = ck / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "optimizer.safetensors"


def _empty(ck: Path) -> str:
    (ck / "ema.safetensors").write_bytes(b"")
    return "ema.safetensors"


def _bad_json(ck: Path) -> str:
    f = ck / "scheduler.json"
    f.write_text(f.read_text(encoding="utf-8")[:40], encoding="utf-8")  # cut mid-document
    return "scheduler.json"


def _missing_rng(ck: Path) -> str:
    (ck / "rng.safetensors").unlink()
    return "rng.safetensors"


def _missing_manifest(ck: Path) -> str:
    (ck / "manifest.json").unlink()
    return "manifest.json"


#: kind -> damage(checkpoint folder) -> the file it damaged (which the run's message must name)
CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "flipped bits (NaN weights)": _nan_weights,
    "truncated file": _truncate,
    "empty file": _empty,
    "bad JSON": _bad_json,
    "missing RNG file": _missing_rng,
    "missing manifest": _missing_manifest,
}


def stopped_run(out: Path, model_dir: Path, manifest: Path, runner: Callable[[list[str]], Outcome]) -> None:
    """A run stopped after step STOP_AT: checkpoints 3 and 6 (and an export of step 6)."""
    o = runner(cli_args(model_dir, manifest, out, [f"train.stop_after={STOP_AT}"]))
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    if o.rc != 0 or names != [f"checkpoint-{3:08d}", f"checkpoint-{STOP_AT:08d}"]:
        raise RuntimeError(f"the stopped run did not leave checkpoints 3 and 6 (rc {o.rc}, {names}): {o.stderr[-2000:]}")


def corruption_trial(base: Path, out: Path, kind: str, model_dir: Path, manifest: Path, want: dict,
                     runner: Callable[[list[str]], Outcome] = run_subprocess, legacy: bool = False) -> dict:
    """Damage `base`'s newest checkpoint (a copy of it, at `out`; `legacy`: without manifests) the
    `kind` way, run to the end, judge."""
    shutil.copytree(base, out)
    if legacy:
        for ck in out.glob("checkpoint-*"):
            make_legacy(ck)
    newest = out / f"checkpoint-{STOP_AT:08d}"
    damaged = CORRUPTIONS[kind](newest)
    o = runner(cli_args(model_dir, manifest, out))
    verdict = judge(out, o, want)
    named = newest.name in o.stderr and damaged in o.stderr
    fell_back = f"resuming from checkpoint-{3:08d}" in o.stderr
    if not (named and fell_back):
        verdict["problems"].append(f"the damage was not reported (damaged checkpoint and {damaged} named: {named}, "
                                   f"fell back to checkpoint 3: {fell_back}): {o.stderr[-1500:]}")
    return {"kind": kind + (" (no manifest)" if legacy else ""), "file": damaged,
            "message": _report_line(o.stderr, f"{newest.name} cannot be resumed"), **verdict}


def all_damaged_trial(base: Path, out: Path, model_dir: Path, manifest: Path,
                      runner: Callable[[list[str]], Outcome] = run_subprocess) -> dict:
    """Every checkpoint damaged: the run must refuse clearly and leave them all in place."""
    shutil.copytree(base, out)
    before = sorted(p.name for p in out.glob("checkpoint-*"))
    _nan_weights(out / f"checkpoint-{STOP_AT:08d}")
    _missing_rng(out / f"checkpoint-{3:08d}")
    o = runner(cli_args(model_dir, manifest, out))
    after = sorted(p.name for p in out.glob("checkpoint-*"))
    problems = []
    if not clear_failure(o):
        problems.append(f"no clear failure (rc {o.rc}): {o.stderr[-1500:]}")
    if after != before:
        problems.append(f"checkpoints changed: {before} -> {after}")
    if not all(name in o.stderr for name in before):
        problems.append("the error does not name every damaged checkpoint")
    return {"kind": "every checkpoint damaged", "rc": o.rc, "clear_failure": clear_failure(o),
            "message": _report_line(o.stderr, "error:"), "problems": problems}


def _report_line(stderr: str, needle: str) -> str:
    return next((line.strip() for line in stderr.splitlines() if needle in line), "")


# ---------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/train_soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kill trials (one kill -9 each, then a run to the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", default=None, help="work folder (default: a fresh temporary one, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if os.name == "nt":
        print("error: the soak needs POSIX process groups (kill -9)", file=sys.stderr)
        return 2
    import tempfile

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="train-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    model_dir, manifest = prepare_model(work), prepare_data(work)
    straight = run_subprocess(cli_args(model_dir, manifest, work / "straight"))
    if straight.rc != 0:
        print(f"error: the straight run failed: {straight.stderr[-3000:]}", file=sys.stderr)
        return 1
    want = snapshot(work / "straight")
    print(f"straight run: {STEPS} steps, {straight.seconds:.2f} s from model setup to its done: line", flush=True)

    rng = random.Random(a.seed)
    results: dict = {"steps": STEPS, "straight_seconds": round(straight.seconds, 3), "kills": [], "corruptions": []}
    for i in range(a.kills):
        delay = rng.uniform(0.0, straight.seconds)
        r = kill_trial(work / f"kill-{i:02d}", model_dir, manifest, [delay], want)
        results["kills"].append(r)
        k = r["kills"][0]
        print(f"kill {i + 1:2d}/{a.kills} at +{delay:.2f} s: {'killed' if k['killed'] else 'had finished'}, left "
              f"{k['checkpoints']} (last logged step {k['last_logged_step']}, temp files {k['temp_left']}, exported "
              f"{k['exported']}) -> rc {r['rc']}, {'bit-identical' if r['identical'] else 'NOT identical'}"
              + (f"; PROBLEMS: {r['problems']}" if r["problems"] else ""), flush=True)

    base = work / "stopped"
    stopped_run(base, model_dir, manifest, run_subprocess)
    for legacy in (False, True):  # checkpoints with manifests, and as written before manifests existed
        for kind in CORRUPTIONS:
            if legacy and CORRUPTIONS[kind] is _missing_manifest:
                continue
            r = corruption_trial(base, work / f"corrupt-{len(results['corruptions'])}", kind, model_dir, manifest,
                                 want, legacy=legacy)
            results["corruptions"].append(r)
            print(f"corruption {r['kind']!r} ({r['file']}): rc {r['rc']}, "
                  f"{'bit-identical' if r['identical'] else 'NOT identical'}; said: {r['message']}"
                  + (f"; PROBLEMS: {r['problems']}" if r["problems"] else ""), flush=True)
    r = all_damaged_trial(base, work / "corrupt-all", model_dir, manifest)
    results["corruptions"].append(r)
    print(f"every checkpoint damaged: rc {r['rc']}, clear failure {r['clear_failure']}; said: {r['message']}"
          + (f"; PROBLEMS: {r['problems']}" if r["problems"] else ""), flush=True)

    landed = sum(k["killed"] for r in results["kills"] for k in r["kills"])
    identical = sum(r["identical"] for r in results["kills"])
    failed = [r for r in results["kills"] + results["corruptions"] if r["problems"]]
    results.update(kills_landed=landed, kill_trials_identical=identical, trials_with_problems=len(failed),
                   seconds=round(time.monotonic() - t0, 1))
    print(f"\n{a.kills} kill trials ({landed} kills landed before the run ended): {identical} bit-identical; "
          f"{len(results['corruptions']) - 1} corruption trials + every-checkpoint-damaged: "
          f"{sum(r.get('identical', False) for r in results['corruptions'])} bit-identical, "
          f"{sum(r['clear_failure'] for r in results['corruptions'])} clear failures; "
          f"{len(failed)} trials with problems; {results['seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
