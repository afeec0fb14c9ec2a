"""UI-format workflow (what users save and drag into ComfyUI) -> API-format prompt (what POST /prompt takes).

The UI format stores widget values positionally (``widgets_values``), so the order comes from
GET /object_info: every widget input (INT, FLOAT, STRING, BOOLEAN, COMBO, not forceInput) in declared
order, required then optional. Frontend-only values are skipped: the "control after generate" value
after a seed (INT inputs named seed / noise_seed, or any input with control_after_generate) and the
trailing "upload" of image loaders. Linked inputs (sockets, and widgets driven by a link, the old
"converted widgets") take the link's source, followed through Reroute nodes; a legacy PrimitiveNode
source gives its value. Note / MarkdownNote / Reroute / PrimitiveNode are frontend-only and not
executed; muted nodes (mode 2) are left out and bypassed nodes (mode 4) pass their first input of the
same type through, as the frontend does.
"""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MUTED, BYPASSED = 2, 4


class ConversionError(ValueError):
    pass


def _spec_inputs(info: dict):
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(typ, list):
                typ = "COMBO"
            yield name, typ, opts


def _is_widget(typ: str, opts: dict) -> bool:
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def _has_control(name: str, typ: str, opts: dict) -> bool:
    if typ == "INT":
        return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))
    return bool(opts.get("control_after_generate"))


def widget_values(node: dict, info: dict) -> dict:
    """{input name: value} for a node's widgets, from its widgets_values."""
    raw = node.get("widgets_values")
    specs = [(n, t, o) for n, t, o in _spec_inputs(info) if _is_widget(t, o)]
    if isinstance(raw, dict):  # some nodes save {name: value}
        return {n: raw[n] for n, _, _ in specs if n in raw}
    values = list(raw or [])
    out, i = {}, 0
    for name, typ, opts in specs:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if _has_control(name, typ, opts):
            i += 1
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            links[link[0]] = tuple(link[1:5])

    def source(link_id, seen=()):
        """(node id, slot) of a real node, or ("value", v) for a PrimitiveNode; None when unconnected."""
        if link_id is None or link_id not in links:
            return None
        origin, slot = int(links[link_id][0]), links[link_id][1]
        node = nodes.get(origin)
        if node is None:
            raise ConversionError(f"link {link_id} starts at missing node {origin}")
        if origin in seen:
            raise ConversionError(f"cycle through node {origin}")
        if node["type"] == "Reroute":
            return source(node["inputs"][0].get("link"), seen + (origin,))
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode") == BYPASSED:
            out_type = node["outputs"][slot]["type"]
            for inp in node.get("inputs", []):
                if inp.get("type") == out_type and inp.get("link") is not None:
                    return source(inp["link"], seen + (origin,))
            return None
        if node.get("mode") == MUTED:
            return None
        return (str(origin), slot)

    prompt = {}
    for nid, node in nodes.items():
        typ = node["type"]
        if typ in VIRTUAL or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(typ)
        if info is None:
            raise ConversionError(f"node {nid}: type {typ!r} is not installed (not in /object_info)")
        inputs = widget_values(node, info)
        for inp in node.get("inputs", []):
            src = source(inp.get("link"))
            if src is None:
                continue
            inputs[inp["name"]] = src[1] if src[0] == "value" else [src[0], src[1]]
        entry = {"class_type": typ, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    return prompt
