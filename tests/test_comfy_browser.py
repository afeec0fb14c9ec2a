"""The real ComfyUI frontend (comfyui-frontend-package, ComfyUI 0.3.75's pin) in headless Chromium:
every workflow in workflows/ loads without console errors and survives a load/save round trip, the
pack's JS (web/dreampainter.js) is active, and two workflows run from the browser so that the
extension's compare slider and mask caption get real data. Screenshots go to test-artifacts/.

Needs Debian's chromium (scripts/setup.sh installs it when CI=true) and the frontend package
(comfy_harness.fetch_frontend). Without them the tests skip, and fail under CI=true.
"""

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402
from browser import Browser, Page, find_chromium, user_settings  # noqa: E402
from node_spec import NODES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
ARTIFACTS = REPO / "test-artifacts"
#: the Chinese UI for the README; written there only with DP_SCREENSHOTS=1 (always to test-artifacts/)
ZH_SCREENSHOT = REPO / "docs" / "screenshots" / "comfy_zh.png"
ZH_DEFS = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
TR2I = next((p for p in WORKFLOWS if "TR2I" in p.stem), None)
AUTO_MASK = next((p for p in WORKFLOWS if "auto_mask" in p.stem), None)
TRAINING_FREE = next((p for p in WORKFLOWS if "training_free" in p.stem), None)
TRAINING_FREE_SCREENSHOT = REPO / "docs" / "screenshots" / "training_free_executed.png"
INSERT = next((p for p in WORKFLOWS if "insert_product" in p.stem), None)
INSERT_SCREENSHOT = REPO / "docs" / "screenshots" / "insert_executed.png"
PROMPT_FREE = next((p for p in WORKFLOWS if "prompt_free" in p.stem), None)
PROMPT_FREE_SCREENSHOT = REPO / "docs" / "screenshots" / "prompt_free_executed.png"
VIEW = (1600, 1000)

LOAD_JS = """(async (wf, name) => {
  const app = window.comfyAPI.app.app;
  const missing = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 600));
  app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const s = app.graph.serialize();
  return {
    missing,
    nodes: s.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? null, size: n.size})),
    links: s.links,
    enhanced: app.graph.nodes.filter(n => n.__dreampainter).map(n => n.type),
    toasts: [...document.querySelectorAll('.p-toast-message')].map(e => e.innerText),
    dialogs: [...document.querySelectorAll('.p-dialog')].map(e => e.innerText.slice(0, 300)),
  };
})"""

# Point a loaded graph at the embedded miniature model and shrink it to its 128 px (as test_comfy_workflows
# does for the API format),
# then queue it from the UI (app.queuePrompt: the frontend's own graph -> prompt conversion).
RUN_JS = """(async (target) => {
  const app = window.comfyAPI.app.app;
  const set = (type, name, f) => app.graph.nodes.filter(n => n.type === type).forEach(n => {
    const w = n.widgets.find(w => w.name === name); w.value = f(w.value); });
  set("DreamPainterModelLoader", "transformer", () => target.model);
  set("DreamPainterModelLoader", "dreampainter_weights", v => target.weights[v]);
  for (const t of ["DreamPainterModelLoader", "DreamPainterTextEncoderLoader", "DreamPainterVAELoader"])
    set(t, "weight_dtype", () => "fp32");
  set("DreamPainterTextEncoderLoader", "text_encoder", () => target.model);
  set("DreamPainterVAELoader", "vae", () => target.model);
  set("DreamPainterProductPrep", "width", v => v / target.shrink);
  set("DreamPainterProductPrep", "height", v => v / target.shrink);
  set("DreamPainterReferenceEncode", "resolution", v => v / target.shrink);
  set("DreamPainterSampler", "steps", () => target.steps);
  set("DreamPainterSampler", "lora_scale", () => target.lora_scale);
  if (target.token) set("DreamPainterBackgroundTokenLoader", "background_token", () => target.token);
  window.__dreampainter.compareReady = 0;
  window.__dreampainter.lastMaskStats = null;
  await app.queuePrompt(0, 1);
  return true;
})"""

COMPARE_RECT_JS = """(() => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.nodes.find(n => n.type === "DreamPainterSampler");
  const w = node.__dreampainter.compare;
  if (!w.rect) return null;
  const [dx, dy, dw, dh] = w.rect;
  const toPage = (x, y) => {
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
    const r = app.canvas.canvas.getBoundingClientRect();
    return [r.left + cx, r.top + cy];
  };
  return {a: toPage(dx + 0.25 * dw, dy + dh / 2), split: w.split, pairs: w.pairs.length};
})()"""


# Select a node and press the selection toolbox's info button (what a user does): the node library's help
# panel opens with the node's page from web/docs/<NodeId>/<locale>.md (frontend: /extensions/<pack>/docs/...).
HELP_JS = """(async (type) => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.nodes.find(n => n.type === type);
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  app.canvas.deselectAll?.();
  app.canvas.selectNode(node);
  app.canvas.setDirty(true, true);
  const t0 = Date.now();
  let button = null;
  while (!(button = document.querySelector('[data-testid="info-button"]')) && Date.now() - t0 < 15000) await sleep(200);
  if (!button) return {error: "no info button in the selection toolbox"};
  button.click();
  while (Date.now() - t0 < 30000) {
    const el = document.querySelector('.node-help-content');
    if (el && el.innerText.trim().length > 100) { app.canvas.deselectAll?.(); return {text: el.innerText}; }
    await sleep(200);
  }
  return {error: "the help panel stayed empty"};
})"""

# What the canvas shows for the pack's nodes: titles, widget labels, input slot names (localized).
NAMES_JS = """(() => Object.fromEntries(window.comfyAPI.app.app.graph.nodes
  .filter(n => n.type.startsWith("DreamPainter"))
  .map(n => [n.type, {title: n.title,
                      widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.label ?? null])),
                      inputs: Object.fromEntries((n.inputs || []).map(i => [i.name, i.localized_name ?? i.label ?? null]))}])))()"""

# Bring the Sampler (and its neighbours) into view at 100 % beside the help panel, for the screenshot.
# Workflow 7 on the embedded miniature: its product file is the test host's (a random product LoRA of the
# miniature), so the run shows the graph working, not a learned product.
INSERT_RUN_JS = """(async (target) => {
  const app = window.comfyAPI.app.app;
  const set = (type, name, f) => app.graph.nodes.filter(n => n.type === type).forEach(n => {
    const w = n.widgets.find(w => w.name === name); w.value = f(w.value); });
  set("DreamPainterModelLoader", "transformer", () => target.model);
  set("DreamPainterModelLoader", "dreampainter_weights", () => "none");
  for (const t of ["DreamPainterModelLoader", "DreamPainterTextEncoderLoader", "DreamPainterVAELoader"])
    set(t, "weight_dtype", () => "fp32");
  set("DreamPainterTextEncoderLoader", "text_encoder", () => target.model);
  set("DreamPainterVAELoader", "vae", () => target.model);
  set("DreamPainterProductLoRALoader", "product_lora", () => target.product);
  set("DreamPainterInsert", "steps", () => target.steps);
  window.__dreampainter.compareReady = 0;
  await app.queuePrompt(0, 1);
  return true;
})"""

FRAME_NODE_JS = """((type = "DreamPainterSampler") => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.nodes.find(n => n.type === type);
  app.canvas.ds.scale = 1.0;
  app.canvas.ds.offset = [760 - node.pos[0], 90 - node.pos[1]];
  app.canvas.setDirty(true, true);
  return true;
})"""
FRAME_SAMPLER_JS = FRAME_NODE_JS + "()"


async def _run_workflow(page, out: dict, path: Path, key: str, run_js: str, params: dict, timeout: float,
                        frame_js: str, keep_as: Path) -> None:
    """Load a workflow, queue it from the UI with ``run_js``, wait for its result, frame it and take a
    screenshot: out["<key>_run_errors"], out["screens"]["<key>_run"] (copied to ``keep_as`` with
    DP_SCREENSHOTS=1)."""
    mark = len(page.messages)
    wf = json.loads(path.read_text(encoding="utf-8"))
    await page.evaluate(f"{LOAD_JS}({json.dumps(wf)}, {json.dumps(key.replace('_', '-') + ' run')})")
    await page.evaluate(f"{run_js}({json.dumps(params)})")
    await page.wait_for("window.__dreampainter.compareReady >= 1", timeout)
    await asyncio.sleep(0.5)
    await page.evaluate(frame_js)
    await asyncio.sleep(0.5)
    out[f"{key}_run_errors"] = page.errors(mark, ignore=_external)
    shot = await page.screenshot(ARTIFACTS / f"{key}_executed.png")
    out["screens"][f"{key}_run"] = shot
    if os.environ.get("DP_SCREENSHOTS"):
        keep_as.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep_as)


def _external(text: str) -> bool:
    """Requests to other hosts (the frontend asks api.comfy.org about nodes): the test host is offline and
    the page's CSP blocks them. Not about this pack."""
    return "api.comfy.org" in text or ("Content Security Policy" in text and "https://" in text)


def _ours(text: str) -> bool:
    return "dreampainter" in text.lower()


async def _session(host, chromium: str) -> dict:
    out = {"workflows": {}, "screens": {}}
    with Browser(chromium, *VIEW) as browser:
        async with Page(browser.page_ws_url) as page:
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": VIEW[0], "height": VIEW[1], "deviceScaleFactor": 1, "mobile": False})
            # the "Nodes 2.0" banner would cover the top of the screenshots
            await page.send("Page.addScriptToEvaluateOnNewDocument",
                            {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true')"})
            t0 = time.monotonic()
            await page.goto(host.url + "/")
            await page.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.__dreampainter?.active)", 120)
            await asyncio.sleep(1.0)
            out["ui_ready_s"] = time.monotonic() - t0
            out["startup_errors"] = page.errors()
            out["state"] = await page.evaluate("JSON.parse(JSON.stringify(window.__dreampainter))")
            out["extensions"] = await page.evaluate("fetch('/extensions').then(r => r.json())")

            for path in WORKFLOWS:
                wf = json.loads(path.read_text(encoding="utf-8"))
                mark = len(page.messages)
                result = await page.evaluate(f"{LOAD_JS}({json.dumps(wf)}, {json.dumps(path.stem)})")
                await asyncio.sleep(0.3)
                result["errors"] = page.errors(mark, ignore=_external)
                result["warnings"] = [t for k, t in page.messages[mark:] if k == "console.warn" and _ours(t)]
                out["workflows"][path.stem] = result
                if path == TR2I:
                    out["screens"]["tr2i"] = await page.screenshot(ARTIFACTS / "tr2i_workflow.png")

            mini_weights = "dreampainter_miniature.safetensors"  # stage 2: runs both kinds of graph
            target = {"model": "[diffusers] dreampainter-miniature", "lora_scale": 0.3, "shrink": 8, "steps": 8,
                    "weights": {"dreampainter_stage1.safetensors": mini_weights,
                                "dreampainter_stage2.safetensors": mini_weights, "none": "none"}}
            if AUTO_MASK is not None:  # Mask Refine's caption
                mark = len(page.messages)
                wf = json.loads(AUTO_MASK.read_text(encoding="utf-8"))
                await page.evaluate(f"{LOAD_JS}({json.dumps(wf)}, 'auto mask run')")
                await page.evaluate(f"{RUN_JS}({json.dumps(target)})")
                out["mask_stats"] = await page.wait_for("window.__dreampainter.lastMaskStats", 120)
                await page.wait_for("window.__dreampainter.compareReady >= 1", 120)
                await asyncio.sleep(0.5)
                out["automask_run_errors"] = page.errors(mark, ignore=_external)
                out["screens"]["automask_run"] = await page.screenshot(ARTIFACTS / "automask_executed.png")
            if TRAINING_FREE is not None:  # the public base alone: no DreamPainter file, the mode badge
                base_alone = {**target, "lora_scale": 1.0}  # no LoRA here: its slider stays at the default
                await _run_workflow(page, out, TRAINING_FREE, "training_free", RUN_JS, base_alone, 120,
                                    FRAME_SAMPLER_JS, TRAINING_FREE_SCREENSHOT)
                out["training_free_mode"] = await page.evaluate(
                    "window.comfyAPI.app.app.graph.nodes.find(n => n.type === 'DreamPainterSampler')"
                    ".__dreampainter.mode")
            if INSERT is not None:  # DreamPaint: a product into a photo, on the miniature
                await _run_workflow(page, out, INSERT, "insert", INSERT_RUN_JS, {**target, "product": h.MINIATURE_PRODUCT},
                                    300, f"{FRAME_NODE_JS}('DreamPainterInsert')", INSERT_SCREENSHOT)
            if PROMPT_FREE is not None:  # Product2Img: the name and the background token, no prompt
                await _run_workflow(page, out, PROMPT_FREE, "prompt_free", RUN_JS, {**target, "token": h.MINIATURE_TOKEN},
                                    120, FRAME_SAMPLER_JS, PROMPT_FREE_SCREENSHOT)
            if TR2I is not None:  # the Sampler's compare slider, then hover to move its split
                mark = len(page.messages)
                wf = json.loads(TR2I.read_text(encoding="utf-8"))
                await page.evaluate(f"{LOAD_JS}({json.dumps(wf)}, 'tr2i run')")
                await page.evaluate(f"{RUN_JS}({json.dumps(target)})")
                await page.wait_for("window.__dreampainter.compareReady >= 1", 120)
                await asyncio.sleep(0.5)
                rect = await page.wait_for(COMPARE_RECT_JS, 20)
                await page.mouse_move(*rect["a"])
                await asyncio.sleep(0.3)
                out["compare"] = {"before": rect, "after": await page.evaluate(COMPARE_RECT_JS)}
                out["tr2i_run_errors"] = page.errors(mark, ignore=_external)
                out["screens"]["tr2i_run"] = await page.screenshot(ARTIFACTS / "tr2i_executed.png")
                mark = len(page.messages)
                out["help_en"] = await page.evaluate(f"{HELP_JS}('DreamPainterSampler')", timeout=60)
                out["help_en"]["urls"] = page.requested("/docs/DreamPainterSampler/")
                out["help_en"]["errors"] = page.errors(mark, ignore=_external)
                out["screens"]["help_en"] = await page.screenshot(ARTIFACTS / "help_en.png")
            out["all_messages"] = list(page.messages)
    return out


@pytest.fixture(scope="module")
def browser(request):
    try:
        host = h.get_host()
    except h.HostUnavailable as exc:
        h.skip_or_fail(str(exc))
    chromium = find_chromium()
    if chromium is None:
        h.skip_or_fail("no chromium (apt-get install chromium; scripts/setup.sh installs it when CI=true)")
    if not host.real_frontend:
        h.skip_or_fail(f"the ComfyUI frontend package is not installed: {h.FRONTEND_FAILURE or 'unknown reason'}")
    t0 = time.monotonic()
    result = asyncio.run(_session(host, chromium))
    result["session_s"] = time.monotonic() - t0
    result["history"] = host.get("/history?max_items=4")  # the prompts the browser queued
    capmanager = request.config.pluginmanager.getplugin("capturemanager")
    with capmanager.global_and_fixture_disabled():
        shots = ", ".join(str(p) for p in result["screens"].values())
        print(f"\n[browser] UI ready in {result['ui_ready_s']:.1f} s, session {result['session_s']:.1f} s; "
              f"screenshots: {shots}")
    return result


async def _zh_session(host, chromium: str) -> dict:
    """The UI in Chinese (Comfy.Locale = zh, as the settings dialog stores it): the TR2I workflow, its
    node names, the Sampler's help page, a screenshot."""
    out = {}
    settings = host.base / "user" / "default" / "comfy.settings.json"
    with user_settings(settings, **{"Comfy.Locale": "zh"}), Browser(chromium, *VIEW) as browser:
        async with Page(browser.page_ws_url) as page:
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": VIEW[0], "height": VIEW[1], "deviceScaleFactor": 1, "mobile": False})
            await page.send("Page.addScriptToEvaluateOnNewDocument",
                            {"source": "localStorage.setItem('vueNodesBannerDismissed', 'true')"})
            await page.goto(host.url + "/")
            await page.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.__dreampainter?.active)", 120)
            await asyncio.sleep(1.0)
            out["locale"] = await page.evaluate(
                "window.comfyAPI.app.app.extensionManager.setting.get('Comfy.Locale')")
            wf = json.loads(TR2I.read_text(encoding="utf-8"))
            await page.evaluate(f"{LOAD_JS}({json.dumps(wf)}, 'DreamPainter TR2I')")
            try:  # the names can arrive a moment after the graph
                await page.wait_for(f"window.comfyAPI.app.app.graph.nodes.some(n => n.title === "
                                    f"{json.dumps(ZH_DEFS['DreamPainterSampler']['display_name'])})", 20)
            except TimeoutError:
                pass
            out["names"] = await page.evaluate(NAMES_JS)
            out["help"] = await page.evaluate(f"{HELP_JS}('DreamPainterSampler')", timeout=60)
            out["help"]["urls"] = page.requested("/docs/DreamPainterSampler/")
            await page.evaluate(FRAME_SAMPLER_JS)
            await asyncio.sleep(0.8)
            shot = await page.screenshot(ARTIFACTS / "comfy_zh.png")
            if os.environ.get("DP_SCREENSHOTS"):
                ZH_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, ZH_SCREENSHOT)
            out["screenshot"] = shot
            out["errors"] = page.errors(ignore=_external)
    out["settings_restored"] = json.loads(settings.read_text(encoding="utf-8")).get("Comfy.Locale")
    return out


@pytest.fixture(scope="module")
def browser_zh(browser, request):
    """After the English session (``browser``): the same host with the UI set to Chinese."""
    host = h.get_host()
    result = asyncio.run(_zh_session(host, find_chromium()))
    capmanager = request.config.pluginmanager.getplugin("capturemanager")
    with capmanager.global_and_fixture_disabled():
        print(f"\n[browser] Chinese UI screenshot: {result['screenshot']}")
    return result


def test_pack_js_is_active(browser):
    assert "/extensions/ComfyUI-DreamPainter/dreampainter.js" in browser["extensions"]
    state = browser["state"]
    assert state["active"] is True and state["version"]
    assert sorted(state["patched"]) == ["DreamPainterInsert", "DreamPainterMaskRefine", "DreamPainterSampler"]


def test_start_up_has_no_errors_from_the_pack(browser):
    # the frontend logs a few errors of its own on this bare host (404 for user.css and favicon, a
    # settings TypeError): none may come from the pack
    ours = [m for m in browser["startup_errors"] if _ours(m[1])]
    assert not ours, ours


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_without_errors_and_round_trips(browser, path):
    r = browser["workflows"][path.stem]
    assert r["missing"] == [], r["missing"]
    assert r["errors"] == [], r["errors"]
    assert r["warnings"] == [], r["warnings"]
    assert not any("Invalid workflow" in t or "Validation" in t or "Missing" in t for t in r["toasts"]), r["toasts"]
    assert not r["dialogs"], r["dialogs"]
    wf = json.loads(path.read_text(encoding="utf-8"))
    saved = {n["id"]: n for n in r["nodes"]}
    assert sorted(saved) == sorted(n["id"] for n in wf["nodes"])
    for n in wf["nodes"]:  # what the frontend saves back is what we ship
        s = saved[n["id"]]
        assert s["type"] == n["type"]
        assert s["widgets_values"] == n.get("widgets_values"), (n["type"], s["widgets_values"])
        assert all(abs(a - b) <= 1 for a, b in zip(s["size"], n["size"])), (n["type"], s["size"], n["size"])
    assert sorted(map(tuple, r["links"])) == sorted(map(tuple, wf["links"]))
    # the web extension decorates the workflow's sampler (Sampler or Insert) and Mask Refine nodes
    patched = {n["type"] for n in wf["nodes"]} & {"DreamPainterInsert", "DreamPainterMaskRefine", "DreamPainterSampler"}
    assert patched & {"DreamPainterInsert", "DreamPainterSampler"} and patched <= set(r["enhanced"]), r["enhanced"]


def test_tr2i_screenshot_kept(browser):
    shot = browser["screens"]["tr2i"]
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered graph, not a blank page


def test_training_free_workflow_runs_from_the_browser_with_no_dreampainter_file(browser):
    """Workflow 5 on the miniature base alone: it completes and the Sampler's badge says which mode ran."""
    assert browser["training_free_run_errors"] == [], browser["training_free_run_errors"]
    assert browser["training_free_mode"] == "training_free"
    shot = browser["screens"]["training_free_run"]
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_insertion_workflow_runs_from_the_browser(browser):
    """Workflow 7 (DreamPaint) on the miniature: it completes, and Insert gets its compare slider."""
    if INSERT is None:
        pytest.skip("no insertion workflow")
    assert browser["insert_run_errors"] == [], browser["insert_run_errors"]
    shot = browser["screens"]["insert_run"]
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_prompt_free_workflow_runs_from_the_browser(browser):
    """Workflow 6 (Product2Img) on the miniature with its background token: it completes from the UI."""
    if PROMPT_FREE is None:
        pytest.skip("no prompt-free workflow")
    assert browser["prompt_free_run_errors"] == [], browser["prompt_free_run_errors"]
    shot = browser["screens"]["prompt_free_run"]
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_compare_slider_gets_the_run_and_follows_the_mouse(browser):
    assert browser["tr2i_run_errors"] == [], browser["tr2i_run_errors"]
    before, after = browser["compare"]["before"], browser["compare"]["after"]
    assert before["pairs"] == 1 and abs(before["split"] - 0.5) < 1e-6
    assert abs(after["split"] - 0.25) < 0.05, after  # hovering at a quarter of the image moved the split


def test_mask_refine_caption_gets_the_run(browser):
    assert browser["automask_run_errors"] == [], browser["automask_run_errors"]
    stats = browser["mask_stats"]
    assert 0 < stats["coverage"] < 1 and stats["width"] == stats["height"] == 256


def test_prompts_queued_from_the_ui_carry_no_extension_widgets(browser):
    """The extension's canvas widgets stay out of the API prompt and out of the saved workflow."""
    entries = list(browser["history"].values())
    assert len(entries) == 2 + (TRAINING_FREE is not None) + (INSERT is not None)
    assert all(entry["status"]["status_str"] == "success" for entry in entries), [e["status"] for e in entries]
    with_sampler = [e for e in entries if any(n["class_type"] == "DreamPainterSampler" for n in e["prompt"][2].values())]
    assert len(with_sampler) == 2 + (TRAINING_FREE is not None)
    required, optional, _ = NODES["DreamPainterSampler"]
    for entry in with_sampler:
        prompt, extra = entry["prompt"][2], entry["prompt"][3]
        sampler = next(n for n in prompt.values() if n["class_type"] == "DreamPainterSampler")
        assert set(required) <= set(sampler["inputs"]) <= set(required) | set(optional), sorted(sampler["inputs"])
        saved = next(n for n in extra["extra_pnginfo"]["workflow"]["nodes"] if n["type"] == "DreamPainterSampler")
        # 17 widgets (the optional ones too) + seed's "control after generate"
        assert len(saved["widgets_values"]) == 18


def test_help_page_shows_in_english(browser):
    """The Sampler's help page (web/docs/DreamPainterSampler/en.md) in the node library's help panel."""
    help_en = browser["help_en"]
    assert "text" in help_en, help_en
    text = help_en["text"]
    assert text.startswith("DreamPainter Sampler"), text[:200]
    assert "Do not lower lora_scale below about 0.4" in text and "attention_scale" in text, text[:2000]
    assert any(u.endswith("/extensions/ComfyUI-DreamPainter/docs/DreamPainterSampler/en.md")
               for u in help_en["urls"]), help_en["urls"]
    assert not [e for e in help_en["errors"] if _ours(e[1])], help_en["errors"]


def test_chinese_locale_shows_the_pack_in_chinese(browser_zh):
    """Comfy.Locale = zh: the pack's nodes carry their locales/zh names (titles, widget labels, input
    slots) on the canvas, and the help panel shows web/docs/<NodeId>/zh.md."""
    assert browser_zh["locale"] == "zh"
    names = browser_zh["names"]
    assert set(names) >= {"DreamPainterModelLoader", "DreamPainterSampler", "DreamPainterReferenceEncode"}, names
    for node_type, shown in names.items():
        zh = ZH_DEFS[node_type]
        assert shown["title"] == zh["display_name"], (node_type, shown["title"])
        for name, label in shown["widgets"].items():
            if name in zh["inputs"]:
                assert label == zh["inputs"][name]["name"], (node_type, name, label)
        for name, label in shown["inputs"].items():
            assert label == zh["inputs"][name]["name"], (node_type, name, label)
    sampler = names["DreamPainterSampler"]
    assert sampler["title"] == "DreamPainter 采样器"
    assert sampler["widgets"]["lora_scale"] == "LoRA 强度" and sampler["inputs"]["model"] == "模型"
    help_zh = browser_zh["help"]
    assert "text" in help_zh, help_zh
    assert help_zh["text"].startswith("DreamPainter 采样器") and "不要把 lora_scale 降到约 0.4 以下" in help_zh["text"]
    assert any(u.endswith("/extensions/ComfyUI-DreamPainter/docs/DreamPainterSampler/zh.md")
               for u in help_zh["urls"]), help_zh["urls"]
    assert not [e for e in browser_zh["errors"] if _ours(e[1])], browser_zh["errors"]
    assert browser_zh["screenshot"].stat().st_size > 50_000
    assert browser_zh["settings_restored"] is None  # the other tests' host is English again
