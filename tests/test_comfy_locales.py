"""The pack's translations and help pages against the node schemas of a real ComfyUI 0.3.75:
locales/{en,zh}/ (nodeDefs.json, main.json) cover every node, input and output, the English files
are what scripts/make_locales.py writes from /object_info, ComfyUI serves them at /i18n, and every
node has web/docs/<NodeId>/en.md and zh.md, served where the frontend (1.32.9) fetches them."""

import importlib.util
import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402
from node_spec import NODES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCALES = REPO / "locales"
DOCS = REPO / "web" / "docs"
LANGS = ("en", "zh")
CJK = re.compile(r"[\u4e00-\u9fff]")


def _make_locales():
    spec = importlib.util.spec_from_file_location("make_locales", REPO / "scripts" / "make_locales.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json(lang: str, name: str) -> dict:
    return json.loads((LOCALES / lang / name).read_text(encoding="utf-8"))  # fails on invalid JSON


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


@pytest.fixture(scope="module")
def ours(object_info):
    return {k: v for k, v in object_info.items() if k.startswith("DreamPainter")}


def _inputs(info: dict) -> list[str]:
    return [name for kind in ("required", "optional") for name in info["input"].get(kind, {})]


# ---------------------------------------------------------------------------------------------
# locales/
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_locale_files_are_valid_json_objects(lang):
    for name in ("main.json", "nodeDefs.json"):
        data = _json(lang, name)
        assert isinstance(data, dict) and data, (lang, name)


def test_english_locale_is_generated_from_the_schemas(object_info):
    """scripts/make_locales.py writes exactly these files: rerun it after changing a schema."""
    for path, text in _make_locales().expected_files(object_info).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} is out of date: run .venv/bin/python scripts/make_locales.py")


@pytest.mark.parametrize("lang", LANGS)
def test_locale_covers_every_node_input_and_output(ours, lang):
    defs = _json(lang, "nodeDefs.json")
    assert sorted(defs) == sorted(ours) == sorted(NODES), (lang, sorted(set(defs) ^ set(ours)))
    en = _json("en", "nodeDefs.json")
    for node_id, info in ours.items():
        entry = defs[node_id]
        assert entry.get("display_name") and entry.get("description"), (lang, node_id)
        assert sorted(entry["inputs"]) == sorted(_inputs(info)), (lang, node_id, sorted(entry["inputs"]))
        for name, item in entry["inputs"].items():
            assert item.get("name"), (lang, node_id, name)
            # a tooltip exactly where the schema has one
            assert bool(item.get("tooltip")) == bool(en[node_id]["inputs"][name].get("tooltip")), (lang, node_id, name)
        assert sorted(entry["outputs"], key=int) == [str(i) for i in range(len(info["output"]))], (lang, node_id)
        assert all(o.get("name") for o in entry["outputs"].values()), (lang, node_id)


def test_chinese_locale_is_chinese():
    """Hand-written, not copied: every display name, description, input name and tooltip has Chinese
    characters; the names stay short enough for a widget label."""
    for node_id, entry in _json("zh", "nodeDefs.json").items():
        texts = [entry["display_name"], entry["description"]]
        texts += [v for item in entry["inputs"].values() for v in item.values()]
        for text in texts:
            assert CJK.search(text), (node_id, text)
        for name, item in entry["inputs"].items():
            assert len(item["name"]) <= 16, (node_id, name, item["name"])
        assert "DreamPainter" in entry["display_name"], node_id  # the search still finds "DreamPainter"


def test_main_json_names_every_category_segment(ours):
    segments = {seg for info in ours.values() for seg in info["category"].split("/")}
    for lang in LANGS:
        cats = _json(lang, "main.json")["nodeCategories"]
        assert set(cats) == segments, (lang, sorted(cats))
    zh = _json("zh", "main.json")["nodeCategories"]
    # the frontend's own Chinese names for its core categories (comfyui-frontend-package 1.32.9): ours
    # must not rename them for every other pack
    assert {k: zh[k] for k in ("loaders", "conditioning", "image", "mask", "sampling")} == {
        "loaders": "加载器", "conditioning": "条件", "image": "图像", "mask": "遮罩", "sampling": "采样"}


def test_comfyui_serves_the_translations_at_i18n(comfy):
    """The format ComfyUI 0.3.75 loads (app/custom_node_manager.py): main.json at the top, nodeDefs.json
    under "nodeDefs", one entry per language folder."""
    served = comfy.get("/i18n")
    for lang in LANGS:
        assert served[lang]["nodeDefs"]["DreamPainterSampler"] == _json(lang, "nodeDefs.json")["DreamPainterSampler"]
        assert served[lang]["nodeCategories"]["DreamPainter"] == "DreamPainter"
    assert served["zh"]["nodeDefs"]["DreamPainterSampler"]["display_name"] == "DreamPainter 采样器"


# ---------------------------------------------------------------------------------------------
# web/docs/
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_every_node_has_a_help_page(ours, lang):
    """web/docs/<NodeId>/<lang>.md: titled with the node's (translated) name, and naming every input and
    output of the current schema, so a renamed or new input cannot go undocumented."""
    names = _json(lang, "nodeDefs.json")
    for node_id, info in ours.items():
        page = DOCS / node_id / f"{lang}.md"
        assert page.is_file(), f"missing help page {page.relative_to(REPO)}"
        text = page.read_text(encoding="utf-8")
        assert text.splitlines()[0] == f"# {names[node_id]['display_name']}", (node_id, lang, text.splitlines()[0])
        for name in _inputs(info) + list(info["output_name"]):
            assert f"`{name}`" in text, f"{page.relative_to(REPO)} does not mention `{name}`"
        if lang == "zh":
            assert len(CJK.findall(text)) > 80, node_id
    assert sorted(p.name for p in DOCS.iterdir() if p.is_dir()) == sorted(ours)


def test_the_sampler_pages_carry_the_papers_advice():
    en = (DOCS / "DreamPainterSampler" / "en.md").read_text(encoding="utf-8")
    zh = (DOCS / "DreamPainterSampler" / "zh.md").read_text(encoding="utf-8")
    assert "below about 0.4" in en and "`attention_scale`" in en and "`paste_back`" in en
    assert "0.4 以下" in zh and "`attention_scale`" in zh and "`paste_back`" in zh
    loader = (DOCS / "DreamPainterModelLoader" / "en.md").read_text(encoding="utf-8")
    assert "`block_swap`" in loader and "fp8_e4m3fn" in loader


@pytest.mark.parametrize("lang", LANGS)
def test_help_pages_are_served_where_the_frontend_looks(comfy, ours, lang):
    """The 1.32.9 frontend fetches /extensions/<pack folder>/docs/<NodeId>/<locale>.md (then
    docs/<NodeId>.md); the pack's WEB_DIRECTORY (web/) is served at /extensions/<pack folder>/."""
    for node_id in ours:
        url = f"{comfy.url}/extensions/{h.PACK_NAME}/docs/{node_id}/{lang}.md"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
            assert r.read().decode("utf-8") == (DOCS / node_id / f"{lang}.md").read_text(encoding="utf-8")
    assert f"/extensions/{h.PACK_NAME}/dreampainter.js" in comfy.get("/extensions")
