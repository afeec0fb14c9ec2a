"""Loss logging (CSV always, TensorBoard when installed) and a progress display (tqdm or lines)."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

from dreampainter_core.fileio import atomic_path

__all__ = ["TrainLogger"]

FIELDS = ["step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "probe_loss", "epoch", "time"]


class TrainLogger:
    """Rank 0 only. CSV rows at ``<output_dir>/logs/train.csv``; on resume the rows after the
    resumed step (written by the run that was killed) are dropped, so the file has one row per step."""

    def __init__(self, output_dir: str | os.PathLike, resume_step: int, total: int, tensorboard: bool = True,
                 progress: bool = True, echo=None):
        self.dir = Path(output_dir) / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "train.csv"
        self._trim(resume_step)
        new = not self.csv_path.exists()
        self._file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
            self._file.flush()
        self.tb = None
        self.tensorboard_error = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=resume_step + 1)
            except Exception as e:  # not installed: the CSV is the log
                self.tensorboard_error = f"{type(e).__name__}: {e}"
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.bar = None
        self.total = total
        if progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=resume_step, desc="train", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None
        self.progress = progress

    def _trim(self, resume_step: int) -> None:
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        if len(kept) != len(rows):
            with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)

    def step(self, step: int, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, **values) -> None:
        row = {"step": step, "time": f"{time.time():.3f}", **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        self._csv.writerow(row)
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"train/{k}", v, step)
        text = " ".join(f"{k}={row[k]}" for k in ("loss", "lr", "grad_norm", "step_time_s", "probe_loss") if k in row)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        elif self.progress:
            self.echo(f"step {step}/{self.total} {text}")

    def message(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.echo(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self._file.close()
