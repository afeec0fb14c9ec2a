"""The background token on a real ComfyUI 0.3.75 (tiny model): the loader and Text Encode's prompt-free switch
appear with their inputs; prompt-free encodes "<name> <token>" (at its initialisation exactly "<name>
background"); prompt_free off with or without a token is the old Text Encode bit for bit; bad input is
refused with the reason."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
import comfy_harness as h  # noqa: E402

NAME = "a red bottle"


def _graph(name: str, prompt: str, prompt_free=None, token: str | None = None) -> dict:
    g = h.graph(name, prompt=prompt, steps=2, cfg=1.0)
    if prompt_free is not None:
        g["3"]["inputs"]["prompt_free"] = prompt_free
    if token is not None:
        g["20"] = {"class_type": "DreamPainterBackgroundTokenLoader", "inputs": {"background_token": token}}
        g["3"]["inputs"]["background_token"] = ["20", 0]
    return g


def test_the_nodes_appear_with_their_inputs(comfy):
    info = comfy.get("/object_info")
    loader = info["DreamPainterBackgroundTokenLoader"]
    assert h.TINY_TOKEN in loader["input"]["required"]["background_token"][1]["options"]
    assert loader["output"] == ["DREAMPAINTER_TOKEN", "STRING"] and loader["category"] == "DreamPainter/loaders"
    encode = info["DreamPainterTextEncode"]["input"]
    assert list(encode["required"]) == ["text_encoder", "prompt", "negative_prompt"]  # old prompts stay valid
    assert encode["optional"]["prompt_free"][0] == "BOOLEAN" and encode["optional"]["prompt_free"][1]["default"] is False
    assert encode["optional"]["background_token"][0] == "DREAMPAINTER_TOKEN"


def _image(comfy, graph) -> torch.Tensor:
    name = next(n["inputs"]["name"] for n in graph.values() if n["class_type"] == "DPTestSaveTensors")
    entry = comfy.run(graph, timeout=120)
    assert entry["status"]["status_str"] == "success", f"{h.execution_error(entry)}\n{comfy.log_tail()}"
    return comfy.tensors(name)["image"]


def test_prompt_free_encodes_the_name_with_the_token_and_off_is_the_old_encode(comfy):
    free = _image(comfy, _graph("bt_free", NAME, prompt_free=True, token=h.TINY_TOKEN))
    word = _image(comfy, _graph("bt_word", f"{NAME} background"))
    assert torch.equal(free, word)  # the untrained token is the word "background"
    name_alone = _image(comfy, _graph("bt_name", NAME))
    assert not torch.equal(free, name_alone)
    old = _image(comfy, _graph("bt_old", h.PROMPT))
    assert torch.equal(_image(comfy, _graph("bt_off", h.PROMPT, prompt_free=False)), old)
    assert torch.equal(_image(comfy, _graph("bt_off_token", h.PROMPT, prompt_free=False, token=h.TINY_TOKEN)), old)


def test_bad_input_is_refused_with_the_reason(comfy):
    from dreampainter_core.tokens import load_learned_token, save_learned_token

    status, body = comfy.queue(_graph("bt_empty", "  ", prompt_free=True, token=h.TINY_TOKEN))
    assert status == 400, body
    assert "prompt_free is on and the prompt box is empty" in str(body["node_errors"])
    folder = comfy.base / "models" / "dreampainter_tokens"
    other = load_learned_token(folder / h.TINY_TOKEN)  # as if trained with another GLM
    other.text_encoder = {**other.text_encoder, "fingerprint": "0123456789abcdef"}
    save_learned_token(other, folder / "other-glm.safetensors")
    try:
        for graph, phrase in (
                (_graph("bt_none", NAME, prompt_free=True), "prompt_free needs a learned background token"),
                (_graph("bt_other", NAME, prompt_free=True, token="other-glm.safetensors"),
                 "was made for another text encoder"),
                (_graph("bt_missing", NAME, prompt_free=True, token="gone.safetensors"), "dreampainter_tokens")):
            entry = comfy.run(graph, timeout=120)
            err = h.execution_error(entry)
            assert err is not None and phrase in err["exception_message"], (phrase, err)
    finally:
        (folder / "other-glm.safetensors").unlink()
