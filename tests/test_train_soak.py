"""A small, CI-sized run of bench/train_soak.py (the full one: 20 kill trials, in bench/): the stage-1
trainer on the tiny model, SIGKILLed three times in a row at random moments (each run resuming the
last) and then run to the end; and each kind of checkpoint damage, then run to the end. Every run
that ends matches a run that was never interrupted bit for bit (weights, EMA, optimizer, scheduler,
both exports, the CSV log) or fails with a clear error; none exits 0 with non-finite weights or
leaves a temporary file behind. Resumes run in this process (no interpreter start-up), the killed
runs in their own process groups."""

from __future__ import annotations

import os
import random

import pytest

from bench import train_soak as soak

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.memcap,  # tests/conftest.py; the subprocesses get OMP_NUM_THREADS=1
              pytest.mark.skipif(os.name == "nt", reason="kill -9 of a process group is POSIX")]


def test_kills_and_corruptions_resume_bit_identically_or_fail_clearly(tiny_model_dir, tmp_path):
    manifest = soak.prepare_data(tmp_path)
    straight = soak.run_in_process(soak.cli_args(tiny_model_dir, manifest, tmp_path / "straight"))
    assert straight.rc == 0, straight.stderr[-3000:]
    want = soak.snapshot(tmp_path / "straight")

    rng = random.Random(16)
    delays = [rng.uniform(0.1, 0.9) * straight.seconds for _ in range(3)]
    r = soak.kill_trial(tmp_path / "killed", tiny_model_dir, manifest, delays, want, finish=soak.run_in_process)
    print("kills:", [(k["delay_s"], k["killed"], k["checkpoints"], k["temp_left"]) for k in r["kills"]])
    assert not r["problems"] and r["identical"], r

    base = tmp_path / "stopped"
    soak.stopped_run(base, tiny_model_dir, manifest, soak.run_in_process)
    for i, kind in enumerate(soak.CORRUPTIONS):
        r = soak.corruption_trial(base, tmp_path / f"corrupt-{i}", kind, tiny_model_dir, manifest, want,
                                  runner=soak.run_in_process)
        print(f"{kind}: {r['message']}")
        assert not r["problems"] and r["identical"], r
    r = soak.all_damaged_trial(base, tmp_path / "corrupt-all", tiny_model_dir, manifest, runner=soak.run_in_process)
    assert not r["problems"] and r["clear_failure"], r
