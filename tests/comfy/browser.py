"""Headless Chromium driven over the DevTools protocol (CDP), for the browser test only.

A tiny client on aiohttp's websocket (already a ComfyUI dependency): no Playwright, no browser
download. Chromium is Debian's ``chromium`` (``apt-get install chromium``; scripts/setup.sh installs
it when CI=true). ``Browser`` starts it with a fresh profile; ``Page`` sends CDP commands and
collects console messages, uncaught exceptions and failed requests as they arrive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--no-default-browser-check",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    env = os.environ.get("DP_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for c in CHROMIUM_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


@contextlib.contextmanager
def user_settings(path: Path, **changes):
    """The ComfyUI user's comfy.settings.json (what the frontend reads at page load) with ``changes``
    for the duration, then exactly as it was, e.g. ``user_settings(path, **{"Comfy.Locale": "zh"})``."""
    before = path.read_text(encoding="utf-8") if path.is_file() else None
    settings = json.loads(before) if before else {}
    settings.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=4), encoding="utf-8")
    try:
        yield settings
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before, encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """``with Browser() as b: page_ws = b.page_ws_url`` — a headless Chromium with an empty profile."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self.executable = executable
        self.size = (width, height)
        self.port = _free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="dp-chromium-"))
        self.proc = None

    def __enter__(self) -> "Browser":
        cmd = [self.executable, *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
               "--remote-allow-origins=*", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.log_path = self.profile.with_suffix(".log")
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                targets = self._json("/json/list")
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    self.page_ws_url = pages[0]["webSocketDebuggerUrl"]
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"chromium's DevTools did not answer within 60 s:\n{self.log_tail()}")

    def _json(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        for _ in range(10):  # helper processes may still write into the profile for a moment
            shutil.rmtree(self.profile, ignore_errors=True)
            if not self.profile.exists():
                break
            time.sleep(0.2)
        try:
            self.log_path.unlink()
        except OSError:
            pass


class Page:
    """One page target over CDP. ``messages`` collects (kind, text) for console calls, log entries,
    uncaught exceptions and failed network requests."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.messages: list[tuple[str, str]] = []
        self.urls: dict[str, str] = {}

    async def __aenter__(self) -> "Page":
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())
        for domain in ("Runtime", "Log", "Page", "Network"):
            await self.send(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            self._event(data.get("method", ""), data.get("params", {}))

    def _event(self, method: str, p: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in p.get("args", []))
            self.messages.append((f"console.{p.get('type')}", text))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.messages.append(("exception", d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.messages.append((f"log.{e.get('level')}", f"{e.get('text', '')} {e.get('url', '')}".strip()))
        elif method == "Network.requestWillBeSent":
            self.urls[p.get("requestId")] = p.get("request", {}).get("url", "")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            url = self.urls.get(p.get("requestId"), "?")
            self.messages.append(("network.failed", f"{p.get('errorText')} {p.get('blockedReason', '')} {url}"))

    def errors(self, since: int = 0, ignore=lambda text: False) -> list[tuple[str, str]]:
        return [(k, t) for k, t in self.messages[since:]
                if k in ("console.error", "console.assert", "exception", "log.error", "network.failed")
                and not ignore(t)]

    async def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params or {}}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """Value of a JS expression (promises awaited; the value comes back as JSON)."""
        r = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                 "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"JS error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25):
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            try:
                last = await self.evaluate(expression)
                if last:
                    return last
            except RuntimeError as e:
                last = str(e)
            await asyncio.sleep(interval)
        raise TimeoutError(f"waited {timeout:.0f} s for {expression!r}; last value {last!r}")

    def requested(self, fragment: str) -> list[str]:
        """URLs the page requested so far that contain ``fragment``."""
        return [u for u in self.urls.values() if fragment in u]

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def mouse_move(self, x: float, y: float) -> None:
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    async def screenshot(self, path: Path) -> Path:
        r = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path
