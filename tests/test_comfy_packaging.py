"""Comfy Registry metadata and what the published package holds: pyproject.toml (read with tomllib and
with ComfyUI 0.3.75's own comfy_config parser), the registry's naming rule for [project] name, the
GPU/OS classifiers, the icon and banner files, and .comfyignore (gitignore syntax, as `comfy node
publish` applies it): tests and dev files out, everything ComfyUI needs at run time in."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
#: ComfyUI 0.3.75 comfy_config/config_parser.py: the accelerators it accepts (any other
#: "Environment ::" classifier makes it drop them all)
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


# ---------------------------------------------------------------------------------------------
# pyproject.toml
# ---------------------------------------------------------------------------------------------


def test_name_follows_the_registry_rules():
    """docs.comfy.org/registry/specifications: < 100 characters; letters, digits, '-', '_', '.'; no two
    special characters in a row; starts with a letter."""
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]


def test_classifiers_name_the_os_and_the_gpu():
    classifiers = PROJECT["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers
    accelerators = {c[len("Environment :: "):] for c in classifiers if c.startswith("Environment ::")}
    assert accelerators <= REGISTRY_ACCELERATORS, accelerators - REGISTRY_ACCELERATORS
    assert len(set(classifiers)) == len(classifiers)


def test_comfyuis_parser_reads_the_registry_fields():
    try:
        comfy_dir = h.fetch_comfyui()
    except h.HostUnavailable as exc:
        h.skip_or_fail(str(exc))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
            "from comfy_config.config_parser import extract_node_configuration as x;"
            "print(json.dumps(x(sys.argv[2]).model_dump()))")
    r = subprocess.run([sys.executable, "-c", code, str(comfy_dir), str(REPO)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    project = json.loads(r.stdout)["project"]
    assert project["supported_os"] == ["OS Independent"]
    assert project["supported_accelerators"] == ["GPU :: NVIDIA CUDA"]
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"] == ">=0.3.75"


def _raw_file(url: str) -> Path:
    """A raw.githubusercontent.com URL of this repository's main branch -> the file here."""
    repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert url.startswith(prefix), (url, prefix)
    return REPO / url[len(prefix):]


def test_icon_and_banner_are_files_of_the_repository():
    from PIL import Image

    icon = _raw_file(COMFY["Icon"])
    with Image.open(icon) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400, (im.format, im.size)
    banner = _raw_file(COMFY["Banner"])
    with Image.open(banner) as im:
        assert im.format == "PNG" and im.size == (1680, 720), (im.format, im.size)  # 21:9
        assert len(set(im.convert("RGB").resize((64, 27)).getdata())) > 200  # a picture, not a flat fill
    assert banner.stat().st_size < 1_000_000


# ---------------------------------------------------------------------------------------------
# .comfyignore
# ---------------------------------------------------------------------------------------------


def _repo_files() -> list[str]:
    if (REPO / ".git").exists() and shutil.which("git"):
        r = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, timeout=60, check=True)
        return [f for f in r.stdout.splitlines() if (REPO / f).is_file()]
    skip = {".git", ".venv", ".cache", "test-artifacts", "runs", "demo_out", "__pycache__"}
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [str(Path(root, f).relative_to(REPO)) for f in files if not f.endswith(".pyc")]
    return out


@pytest.fixture(scope="module")
def package():
    """(published files, left-out files): .comfyignore applied with git's own gitignore matching (the
    gitwildmatch rules `comfy node publish` uses through pathspec)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    files = sorted(set(_repo_files()))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "init", "-q", tmp], check=True, timeout=60)
        shutil.copyfile(REPO / ".comfyignore", Path(tmp) / ".gitignore")
        r = subprocess.run(["git", "-C", tmp, "check-ignore", "--no-index", "--stdin"], input="\n".join(files),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 1), r.stderr
    left_out = set(r.stdout.splitlines())
    return [f for f in files if f not in left_out], sorted(left_out)


def test_comfyignore_keeps_what_comfyui_needs(package):
    published, _ = package
    kept = set(published)
    for f in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "icon.png", "banner.png",
              "web/dreampainter.js", "locales/en/nodeDefs.json", "locales/zh/nodeDefs.json",
              "locales/en/main.json", "locales/zh/main.json", "configs/stage1.toml", "configs/stage2.toml"):
        assert f in kept, f
    everything = set(published) | set(package[1])
    for folder in ("nodes/", "dreampainter_core/", "models/", "web/", "locales/", "workflows/"):
        inside = [f for f in everything if f.startswith(folder)]
        assert inside and all(f in kept for f in inside), (folder, [f for f in inside if f not in kept][:5])
    # the embedded miniature model, whole
    assert any(f.startswith("models/diffusers/dreampainter-miniature/transformer/") for f in kept)
    assert "models/dreampainter/dreampainter_miniature.safetensors" in kept
    miniature_only = {"train/miniature.py", "train/modes_table.py", "train/removal_eval.py"}
    assert {f for f in everything if f.startswith("train/")} - kept == miniature_only


def test_comfyignore_leaves_out_tests_and_dev_files(package):
    published, left_out = package
    for prefix in ("tests/", "bench/", ".ci/", "scripts/", "docs/", "configs/miniature/", "configs/tiny_stage"):
        assert not [f for f in published if f.startswith(prefix)], prefix
    assert "requirements-dev.txt" not in published
    assert any(f.startswith("tests/") for f in left_out) and any(f.startswith("docs/miniature/") for f in left_out)


def test_published_code_imports_nothing_left_out(package):
    """What ships must not import what does not: tests, benchmarks, scripts, the miniature recipe."""
    published, _ = package
    bad = re.compile(r"^\s*(?:from|import)\s+(?:\.*(?:tests|bench|scripts)\b|(?:\.\.?|train\.)miniature\b)", re.M)
    offenders = [f for f in published if f.endswith(".py") and bad.search((REPO / f).read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_published_package_size(package):
    published, _ = package
    size = sum((REPO / f).stat().st_size for f in published)
    print(f"registry package: {len(published)} files, {size / 2**20:.1f} MiB")
    assert size < 40 * 2**20
