"""Bad input through the API gives a readable execution error, and the server goes on serving;
POST /interrupt stops a long sampling run within a step and the next prompt runs."""

import asyncio
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402


def _error(comfy, graph):
    entry = comfy.run(graph)
    assert entry["status"]["status_str"] == "error", comfy.log_tail()
    err = h.execution_error(entry)
    assert err is not None, entry["status"]
    assert comfy.alive() and comfy.get("/system_stats")
    return err


def test_mask_size_differs(comfy):
    err = _error(comfy, h.graph("bad_mask", mask="mask_wrong_size.png"))
    assert err["node_type"] == "DreamPainterSampler"
    msg = err["exception_message"]
    assert "mask size 56x64 (WxH) does not match product image size 64x64" in msg, msg


def test_missing_model_files(comfy):
    err = _error(comfy, h.graph("no_weights", weights="dreampainter-v1-stage2.safetensors"))
    msg = err["exception_message"]
    assert err["node_type"] == "DreamPainterModelLoader"
    assert "dreampainter-v1-stage2.safetensors" in msg and str(comfy.base / "models" / "dreampainter") in msg, msg
    assert "models/dreampainter/" in msg  # where to put it

    err = _error(comfy, h.graph("no_vae", vae="ae.safetensors"))
    msg = err["exception_message"]
    assert "'ae.safetensors' not found" in msg and str(comfy.base / "models" / "vae") in msg, msg
    assert "THUDM/CogView4-6B" in msg

    err = _error(comfy, h.graph("incomplete", transformer=h.BROKEN))
    msg = err["exception_message"]
    assert str(comfy.base / "models" / "diffusers" / "incomplete-download" / "transformer") in msg, msg
    assert "no .safetensors weights" in msg and "THUDM/CogView4-6B" in msg, msg


def test_reference_with_stage1_model(comfy):
    err = _error(comfy, h.graph("stage1_ref", weights=h.STAGE1, reference={"resolution": 32}))
    assert err["node_type"] == "DreamPainterSampler"
    assert "no reference support" in err["exception_message"] and "stage-2" in err["exception_message"]


def test_auto_mask_without_rembg_names_what_to_install(comfy):
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "bottle.png"}},
         "2": {"class_type": "DPTestAutoMaskWithoutRembg", "inputs": {"image": ["1", 0]}}}
    err = _error(comfy, g)
    assert "needs the 'rembg' package" in err["exception_message"]
    assert "-m pip install rembg" in err["exception_message"], err["exception_message"]


async def _run_and_interrupt(comfy, graph, after: int):
    import aiohttp

    client_id = uuid.uuid4().hex
    seen = {"before": 0, "after": 0, "previews": 0, "last": 0, "max": None}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{comfy.port}/ws?clientId={client_id}") as ws:
            async with session.post(f"{comfy.url}/prompt", json={"prompt": graph, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            interrupted_at = None
            while True:
                msg = await asyncio.wait_for(ws.receive(), timeout=120)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    seen["previews"] += 1
                    continue
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                data = json.loads(msg.data)
                kind, body = data["type"], data.get("data", {})
                if body.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress" and body.get("node") == "7":
                    seen["last"], seen["max"] = body["value"], body["max"]
                    if interrupted_at is None:
                        seen["before"] += 1
                        if body["value"] >= after:
                            async with session.post(f"{comfy.url}/interrupt", json={}) as r:
                                assert r.status == 200
                            interrupted_at = time.monotonic()
                    else:
                        seen["after"] += 1
                elif kind == "execution_interrupted":
                    seen["stop_s"] = time.monotonic() - interrupted_at
                    return seen
                elif kind in ("execution_success", "execution_error"):
                    raise AssertionError(f"{kind} instead of an interrupt: {body}")


def test_interrupt_stops_sampling_within_a_step_and_next_prompt_runs(comfy):
    long_run = h.graph("long", steps=5000, cfg=1.0, seed=3)
    long_run["12"] = {"class_type": "DreamPainterProductPrep",  # 192x192: ~0.05-0.2 s per step here
                      "inputs": {"image": ["5", 0], "mask": ["6", 0], "width": 192, "height": 192,
                                 "placement": "keep", "box_ratio": 0.6}}
    long_run["7"]["inputs"].update(product=["12", 0], mask=["12", 1])
    seen = asyncio.run(_run_and_interrupt(comfy, long_run, after=3))
    print("interrupt:", seen)
    assert seen["max"] == 5000 and seen["last"] < 5000
    assert seen["after"] <= 1, seen  # no further step completed after the interrupt (at most one in flight)
    assert seen["previews"] >= 3, seen  # a preview image per step
    assert seen["stop_s"] < 10, seen
    entry = comfy.run(h.graph("after_interrupt", steps=2))
    assert entry["status"]["status_str"] == "success", h.execution_error(entry)
    assert comfy.tensors("after_interrupt")["image"].shape == (1, h.SIZE, h.SIZE, 3)


@contextlib.contextmanager
def _poisoned_stage2(comfy, name: str):
    """models/dreampainter/<name>: the host's stage-2 file with a NaN in a gate (passes every header
    check, so it fails only after the base transformer has loaded, in the NaN pass). Removed afterwards:
    the server is shared by the whole session, and other tests list this folder."""
    import torch
    from safetensors.torch import save_file

    from forge import read_all

    folder = comfy.base / "models" / "dreampainter"
    tensors, meta = read_all(folder / h.STAGE2)
    gate = next(k for k in tensors if k.startswith("control.gates") and k.endswith("weight"))
    tensors[gate] = tensors[gate].clone()
    tensors[gate].view(-1)[0] = float("nan")
    save_file(tensors, str(folder / name), metadata=meta)
    try:
        yield folder / name
    finally:
        (folder / name).unlink(missing_ok=True)


def test_nan_weights_are_refused_with_a_readable_error(comfy):
    with _poisoned_stage2(comfy, "nan-gate.safetensors") as path:
        err = _error(comfy, h.graph("nan_weights", weights=path.name))
    assert err["node_type"] == "DreamPainterModelLoader"
    msg = err["exception_message"]
    assert "NaN or infinite" in msg and "control.gates." in msg and str(path) in msg, msg


def test_failed_load_frees_the_model_it_had_loaded(comfy):
    with _poisoned_stage2(comfy, "nan-gate-2.safetensors") as path:
        g = {"1": {"class_type": "DPTestFailedLoad",
                   "inputs": {"name": "failed", "transformer": h.TINY, "weights": path.name}}}
        entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", h.execution_error(entry)
    report = json.loads((comfy.base / "output" / "dp_failed_load" / "failed.json").read_text(encoding="utf-8"))
    released, unreleased = report["released"], report["unreleased"]
    assert released["error"] == "WeightFormatError" and "NaN" in released["message"], report
    assert released["tracked"] == 2 and released["alive"] == 0, report  # transformer and its tensor: gone
    # the control: the same failure without the release keeps both alive through the held exception
    assert unreleased["error"] == "WeightFormatError" and unreleased["alive"] == 2, report


def test_names_outside_the_model_folders_get_the_not_found_message(comfy, tmp_path):
    import shutil

    outside = comfy.base / "outside-models"  # a complete model next to models/, not inside it
    if not outside.exists():
        shutil.copytree(comfy.base / "models" / "diffusers" / "cogview4-tiny", outside / "cogview4-tiny")
        shutil.copy(comfy.base / "models" / "vae" / "cogview4-tiny-vae.safetensors", outside / "vae.safetensors")
    tiny = outside / "cogview4-tiny"
    missing = outside / "no-such-model"
    # slot: [(entry that exists outside, the same kind of entry that exists nowhere)]
    probes = {
        "transformer": [(f"[diffusers] ../../outside-models/{tiny.name}", "[diffusers] ../../outside-models/nothing"),
                        (f"[diffusers] {tiny}", f"[diffusers] {missing}"),
                        (str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"),
                         str(missing / "diffusion_pytorch_model.safetensors"))],
        "vae": [(str(outside / "vae.safetensors"), str(outside / "nothing.safetensors")),
                (f"{tiny / 'vae'}/", f"{missing}/"),
                ("../../outside-models/vae.safetensors", "../../outside-models/nothing.safetensors")],
        "text_encoder": [(f"{tiny / 'text_encoder'}/", f"{missing}/"),
                         (f"[diffusers] ../../outside-models/{tiny.name}", "[diffusers] ../nothing")],
        "weights": [(str(comfy.base / "models" / "dreampainter" / h.STAGE2), str(missing / h.STAGE2)),
                    (f"../dreampainter/{h.STAGE2}", "../dreampainter/nothing.safetensors")],
    }
    for slot, pairs in probes.items():
        for exists, nowhere in pairs:
            messages = []
            for name in (exists, nowhere):
                err = _error(comfy, h.graph(f"probe_{slot}", **{slot: name}))
                msg = err["exception_message"]
                assert "not found" in msg, (slot, name, msg)
                messages.append(msg.replace(name.removeprefix("[diffusers] ").rstrip("/"), "<name>"))
            assert messages[0] == messages[1], (slot, messages)  # nothing tells the two apart
