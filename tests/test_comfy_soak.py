"""A short soak of the real ComfyUI (bench/comfy_soak.py runs the 200-prompt one): valid prompts mixed
with every bad kind of input of issue 16 and an interrupt. Every valid prompt succeeds, every bad
one gets a readable error naming what was wrong, and the server's memory does not grow."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import comfy_soak  # noqa: E402


def test_short_soak_every_valid_prompt_runs_every_bad_one_is_refused_readably(comfy):
    prompts = comfy_soak.WARM_VALID + 2 * len(comfy_soak.BAD_KINDS) + 8
    result = comfy_soak.soak(comfy, prompts=prompts, seed=1, minutes=8)
    summary = result.summary()
    assert not result.stopped_early, summary
    assert not result.failures(), [(o.kind, o.how, o.message[:300]) for o in result.failures()]
    seen = {o.kind for o in result.outcomes}
    assert set(comfy_soak.BAD_KINDS) <= seen and {"valid", "interrupt"} <= seen, seen
    assert result.rss_growth is not None and result.rss_growth <= comfy_soak.RSS_TOLERANCE, summary
