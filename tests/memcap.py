"""Run a piece of test code in a child process whose memory is capped, so that a loader which
regresses into allocating what a hostile file asks for fails the test instead of eating the machine.

``run_capped(body, imports=..., cap_mb=..., **values)``: a fresh Python runs ``imports`` without a
limit (torch alone maps ~1 GB of address space), then caps its address space (RLIMIT_AS) at what
it has mapped so far plus ``cap_mb``, then runs ``body`` with ``values`` as globals. The result
says whether ``body`` raised (exception type and message), what it left in its global ``result``
(anything JSON can carry: e.g. ``outcome(lambda: load(f))`` per hostile file when a test checks
many in one child)
and how much the peak RSS grew while it ran. A child killed by the cap, or running past ``timeout``, comes back as an error result too.
Linux only (RLIMIT_AS and /proc); the tests that use it skip elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAP_MB = 1024
_MARK = "@@memcap@@"

_DRIVER = r"""
import json, resource, sys, traceback
sys.path.insert(0, {repo!r})
{imports}

def _vm_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def outcome(call):  # {{"error": type name or None, "message": ...}} of call(), for bodies trying many files
    try:
        call()
        return {{"error": None, "message": None}}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {{"error": type(e).__name__, "message": str(e)}}

_rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_limit = (_vm_kb("VmSize") + {cap_mb} * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
_result = {{"error": None, "message": None}}
_globals = {{**globals(), **json.loads(sys.argv[1]), "result": None}}
try:
    exec(compile({body!r}, "<capped>", "exec"), _globals)
except BaseException as e:  # noqa: BLE001 - reported to the test
    _result = {{"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-3000:]}}
_result["value"] = _globals["result"]
_result["peak_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _rss0) / 1024
print({mark!r} + json.dumps(_result), flush=True)
"""


@dataclass
class CappedResult:
    error: str | None  # exception type name, None when body ran through
    message: str | None
    peak_growth_mb: float | None  # growth of the peak RSS while body ran
    output: str  # everything the child printed, for failure messages
    value: object = None  # what body left in its global ``result``

    def expect_error(self, error: str, *fragments: str) -> str:
        """Assert ``body`` raised ``error`` (a type name) with every fragment in its message."""
        assert self.error == error, f"expected {error}, got {self.error}: {self.message}\n{self.output[-3000:]}"
        for fragment in fragments:
            assert fragment in self.message, f"{fragment!r} not in: {self.message}"
        return self.message


def run_capped(body: str, *, imports: str = "", cap_mb: int = DEFAULT_CAP_MB, timeout: float = 300,
               **values) -> CappedResult:
    if not sys.platform.startswith("linux"):
        pytest.skip("the memory cap needs Linux (RLIMIT_AS, /proc)")
    driver = _DRIVER.format(repo=str(REPO), imports=textwrap.dedent(imports), cap_mb=int(cap_mb),
                            body=textwrap.dedent(body), mark=_MARK)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1")
    args = [sys.executable, "-c", driver, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                       for k, v in values.items()})]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        return CappedResult("Timeout", f"ran past {timeout} s", None, str(e.stdout or "") + str(e.stderr or ""))
    output = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            r = json.loads(line[len(_MARK):])
            return CappedResult(r["error"], r["message"], r["peak_growth_mb"], output + r.get("trace", ""), r["value"])
    return CappedResult("Crashed", f"child exited {proc.returncode} without a result (killed by the memory cap?)",
                        None, output)
