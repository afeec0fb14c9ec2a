"""Soak the real ComfyUI (0.3.75, the test host) with the pack, as a careless user or a hostile API
client on a shared server would: valid prompts mixed with every bad kind of input issue 16 lists,
and interrupts, all on 127.0.0.1.

    .venv/bin/python bench/comfy_soak.py [--prompts 200] [--seed 0] [--minutes 30] [--json OUT]

What it checks, per prompt:
- a valid prompt (random seed, steps, cfg, with or without a reference) succeeds;
- a bad one is refused with a readable message: HTTP 400 from POST /prompt with the node's error
  (refused when queued, before anything runs), or an execution error in /history that names what
  was wrong; never a Python traceback as the message, never a success;
- an interrupted long run ends as interrupted, and the server goes on serving;
and over the whole soak, that the server's resident memory after the soak is within 10% of its
value after the first valid prompts (models loaded once, nothing leaking per prompt).

Not among the bad kinds: a float given for an INT widget (batch_size 2.5). ComfyUI itself casts it
with int() when it validates the prompt, before any node sees it; the pack's Python API refuses it.

Bounded: --prompts prompts, and it stops early (and says so) after --minutes. The host is the
tests' (tests/comfy/comfy_harness.py): tiny random CogView4 models, made on the spot.
tests/test_comfy_soak.py runs a short soak in CI; this script runs the full one.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "comfy"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import comfy_harness as h  # noqa: E402

RSS_TOLERANCE = 0.10
WARM_VALID = 8  # valid prompts before the memory baseline is read (every model loaded once)


@dataclass
class Outcome:
    kind: str
    ok: bool
    how: str  # "success", "refused at queue", "execution error", "interrupted"
    message: str = ""
    seconds: float = 0.0


@dataclass
class SoakResult:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_warm_mb: float | None = None
    rss_end_mb: float | None = None
    stopped_early: bool = False

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_warm_mb or self.rss_end_mb is None:
            return None
        return self.rss_end_mb / self.rss_warm_mb - 1.0

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> dict:
        kinds: dict[str, dict] = {}
        for o in self.outcomes:
            k = kinds.setdefault(o.kind, {"n": 0, "ok": 0, "how": {}})
            k["n"] += 1
            k["ok"] += o.ok
            k["how"][o.how] = k["how"].get(o.how, 0) + 1
        return {"prompts": len(self.outcomes), "failures": len(self.failures()), "kinds": kinds,
                "rss_warm_mb": self.rss_warm_mb, "rss_end_mb": self.rss_end_mb,
                "rss_growth": self.rss_growth, "stopped_early": self.stopped_early,
                "examples": {o.kind: o.message[:300] for o in self.outcomes if o.message}}


def server_rss_mb(comfy) -> float:
    import psutil

    proc = psutil.Process(comfy.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


# ---------------------------------------------------------------------------------------------- files


def prepare_host(comfy) -> None:
    """Files the bad prompts need, made in the host's own folders: a forged DreamPainter file that
    claims a huge LoRA rank, one with a NaN weight, and an empty mask."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from forge import read_all

    folder = comfy.base / "models" / "dreampainter"
    tensors, meta = read_all(folder / h.STAGE2)
    forged = folder / "soak-forged-rank.safetensors"
    if not forged.exists():
        config = json.loads(meta["dreampainter_config"])
        config["lora_rank"] = 10**6
        save_file(tensors, str(forged), {**meta, "dreampainter_config": json.dumps(config), "lora_rank": str(10**6)})
    poisoned = folder / "soak-nan.safetensors"
    if not poisoned.exists():
        gate = next(k for k in tensors if k.startswith("control.gates."))
        bad = dict(tensors)
        bad[gate] = tensors[gate].clone()
        bad[gate].view(-1)[0] = float("nan")
        save_file(bad, str(poisoned), meta)
    empty = comfy.base / "input" / "soak_mask_empty.png"
    if not empty.exists():
        Image.fromarray(np.zeros((h.SIZE, h.SIZE), np.uint8)).save(empty)


# ---------------------------------------------------------------------------------------------- prompts


def _valid(rng: random.Random, name: str) -> dict:
    reference = {"resolution": 32} if rng.random() < 0.3 else None
    return h.graph(name, seed=rng.randrange(2**63), steps=rng.choice([1, 2, 3]), cfg=rng.choice([1.0, 3.5]),
                   lora_scale=rng.choice([0.6, 1.0]), reference=reference)


def _with(name: str, **kw) -> Callable[[random.Random, str], dict]:
    return lambda rng, n: h.graph(n, **kw)


def _widget(name: str, node: str, key: str, value) -> Callable[[random.Random, str], dict]:
    def make(rng, n):
        g = h.graph(n)
        g[node]["inputs"][key] = value
        return g
    return make


#: kind -> (graph maker, words one of which the error message must contain)
BAD_KINDS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "nan_cfg": (_widget("nan_cfg", "7", "cfg", math.nan), ("cfg",)),
    "huge_lora_scale": (_widget("huge_lora", "7", "lora_scale", 1e30), ("lora_scale",)),
    "negative_shift": (_widget("neg_shift", "7", "shift", -1.0), ("shift",)),
    "nan_shift": (_widget("nan_shift", "7", "shift", math.nan), ("shift",)),
    "huge_steps": (_widget("huge_steps", "7", "steps", 10**7), ("steps",)),
    "negative_seed": (_widget("neg_seed", "7", "seed", -1), ("seed",)),
    "huge_seed": (_widget("huge_seed", "7", "seed", 2**70), ("seed",)),
    "surrogate_prompt": (_with("surrogate", prompt="a bottle \ud800 on a table"), ("surrogate", "prompt")),
    "path_outside_models": (_with("outside", transformer="[diffusers] ../../outside"), ("transformer", "not")),
    "absolute_weights_path": (_with("absolute", weights="/etc/passwd"), ("dreampainter_weights", "weights", "not")),
    "forged_rank": (_with("forged", weights="soak-forged-rank.safetensors"), ("lora_rank",)),
    "nan_weights": (_with("nan_w", weights="soak-nan.safetensors"), ("NaN",)),
    "mask_size": (_with("mask_size", mask="mask_wrong_size.png"), ("mask size",)),
    "empty_mask": (_with("empty_mask", mask="soak_mask_empty.png"), ("empty",)),
    "reference_on_stage1": (_with("ref_stage1", weights=h.STAGE1, reference={"resolution": 32}), ("reference",)),
}


def _message_of(body) -> str:
    """The readable part of a refused /prompt (HTTP 400) body."""
    if not isinstance(body, dict):
        return str(body)
    parts = [str((body.get("error") or {}).get("message", ""))]
    for node in (body.get("node_errors") or {}).values():
        for err in node.get("errors", []):
            parts.append(f"{err.get('message', '')}: {err.get('details', '')}")
    return " | ".join(p for p in parts if p)


def run_bad(comfy, kind: str, graph: dict, words: tuple[str, ...], timeout: float) -> Outcome:
    t0 = time.monotonic()
    status, body = comfy.queue(graph)
    if status != 200:
        msg = _message_of(body)
        ok = status == 400 and any(w.lower() in msg.lower() for w in words) and "Traceback" not in msg
        return Outcome(kind, ok, "refused at queue", msg, time.monotonic() - t0)
    entry = comfy.wait(body["prompt_id"], timeout)
    err = h.execution_error(entry)
    if entry["status"]["status_str"] == "success" or err is None:
        return Outcome(kind, False, "success", "a bad prompt ran to success", time.monotonic() - t0)
    msg = str(err.get("exception_message", ""))
    ok = any(w.lower() in msg.lower() for w in words) and not msg.lstrip().startswith("Traceback")
    return Outcome(kind, ok, "execution error", f"{err.get('exception_type')}: {msg}", time.monotonic() - t0)


def run_valid(comfy, graph: dict, timeout: float) -> Outcome:
    t0 = time.monotonic()
    entry = comfy.run(graph, timeout)
    ok = entry["status"]["status_str"] == "success"
    err = h.execution_error(entry)
    return Outcome("valid", ok, "success" if ok else "execution error",
                   "" if ok else str((err or {}).get("exception_message", entry["status"])), time.monotonic() - t0)


def run_interrupted(comfy, name: str, timeout: float) -> Outcome:
    """A long run stopped by POST /interrupt once it has started: it must end interrupted, not hang."""
    g = h.graph(name, steps=5000, cfg=1.0)
    t0 = time.monotonic()
    status, body = comfy.queue(g)
    if status != 200:
        return Outcome("interrupt", False, "refused at queue", _message_of(body))
    pid = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # wait until it runs, then interrupt
        queue = comfy.get("/queue")
        if any(item[1] == pid for item in queue.get("queue_running", [])):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    comfy.post("/interrupt")
    entry = comfy.wait(pid, timeout)
    kinds = [k for k, _ in entry.get("status", {}).get("messages", [])]
    ok = "execution_interrupted" in kinds and entry["status"]["status_str"] != "success"
    return Outcome("interrupt", ok, "interrupted" if ok else entry["status"]["status_str"], "", time.monotonic() - t0)


def soak(comfy, prompts: int = 200, seed: int = 0, minutes: float = 30.0, share_valid: float = 0.45,
         share_interrupt: float = 0.05, echo=None) -> SoakResult:
    """Send `prompts` prompts: about `share_valid` valid ones, `share_interrupt` interrupted long
    runs, the rest spread over BAD_KINDS (each at least once when prompts allow); WARM_VALID valid
    prompts first, then the memory baseline."""
    echo = echo or (lambda m: None)
    prepare_host(comfy)
    rng = random.Random(seed)
    result = SoakResult()
    kinds = list(BAD_KINDS)
    plan = ["valid"] * WARM_VALID
    rest = prompts - len(plan)
    bad = kinds * max(1, round(rest * (1 - share_valid - share_interrupt) / len(kinds)))
    plan_rest = bad + ["interrupt"] * max(1, round(rest * share_interrupt))
    plan_rest += ["valid"] * max(0, rest - len(plan_rest))
    rng.shuffle(plan_rest)
    plan += plan_rest[:rest]
    t_end = time.monotonic() + minutes * 60
    for i, kind in enumerate(plan):
        if time.monotonic() > t_end:
            result.stopped_early = True
            echo(f"stopped after {i} prompts: --minutes {minutes:g} reached")
            break
        name = f"soak_{i}"
        if kind == "valid":
            out = run_valid(comfy, _valid(rng, name), timeout=120)
        elif kind == "interrupt":
            out = run_interrupted(comfy, name, timeout=120)
        else:
            make, words = BAD_KINDS[kind]
            out = run_bad(comfy, kind, make(rng, name), words, timeout=120)
        result.outcomes.append(out)
        if not comfy.alive():
            result.outcomes.append(Outcome("server", False, "died", comfy.log_tail()))
            break
        if i + 1 == WARM_VALID:
            result.rss_warm_mb = server_rss_mb(comfy)
        echo(f"{i + 1}/{len(plan)} {kind}: {'ok' if out.ok else 'FAILED'} ({out.how}, {out.seconds:.1f} s)"
             + ("" if out.ok else f" {out.message[:200]}"))
    # Follow-up: the server still serves after all that.
    result.outcomes.append(run_valid(comfy, _valid(rng, "soak_last"), timeout=120))
    result.rss_end_mb = server_rss_mb(comfy)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=30.0, help="stop early after this long")
    p.add_argument("--json", default=None, help="write the summary here")
    a = p.parse_args(argv)
    comfy = h.get_host()
    t0 = time.monotonic()
    result = soak(comfy, a.prompts, a.seed, a.minutes, echo=lambda m: print(m, flush=True))
    summary = {**result.summary(), "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    growth = result.rss_growth
    ok = not result.failures() and growth is not None and growth <= RSS_TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: {len(result.outcomes)} prompts, {len(result.failures())} failures, "
          f"RSS {result.rss_warm_mb:.0f} -> {result.rss_end_mb:.0f} MB ({(growth or 0) * 100:+.1f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
