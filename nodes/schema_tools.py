"""Schema helpers shared by the nodes: search aliases where ComfyUI has them, and the widget checks
behind the nodes' ``validate_inputs``.

How ComfyUI 0.3.75 calls a V3 ``validate_inputs`` (execution.validate_inputs):

* only the inputs named in its signature are passed (``**kwargs`` would mean all of them);
* for exactly those inputs ComfyUI skips its own checks (min/max, "value not in list"), so the
  node has to repeat them: ``widget_problem`` does, from the node's own schema;
* a linked input (a widget turned into a socket, or an image/mask/model socket) arrives as
  ``None``: its value only exists when the graph runs. An optional input that is absent is not
  passed at all (the signature's default);
* the return value is True or a message; ComfyUI reports a message once per named input, as
  "<input> - <message>", so the message itself says which input is wrong.

JSON allows NaN and Infinity, and ``nan < min`` is False: a NaN passes ComfyUI's min/max check,
so FLOAT widgets are checked for finiteness here.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

#: ``io.Schema`` has ``search_aliases`` only after ComfyUI 0.3.75 (Comfy-Org/ComfyUI#12010,
#: January 2026); the 0.3.75 frontend (1.32.9) searches node ids and display names only.
SCHEMA_HAS_SEARCH_ALIASES = "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {})


def search_aliases(*aliases: str) -> dict:
    """``io.Schema(**search_aliases(...))``: extra search terms on a ComfyUI that knows them, nothing
    on 0.3.75 (an unknown keyword would fail there). On 0.3.75 the node search matches the node id
    and the display name, which the zh locale translates, so Chinese searches still find the nodes."""
    return {"search_aliases": list(aliases)} if SCHEMA_HAS_SEARCH_ALIASES else {}


def widget_problem(node_cls, **values) -> str | None:
    """The first of ``values`` (input id -> value) that its widget would not accept (not in the combo's
    list, not a finite number, outside min..max), as a message; None when all are fine. Linked inputs
    (None) are skipped."""
    schema = node_cls.define_schema()
    inputs, title = {i.id: i for i in schema.inputs or []}, schema.display_name
    for name, value in values.items():
        spec = inputs.get(name)
        if value is None or spec is None:
            continue
        if isinstance(spec, io.Combo.Input):
            if value not in (spec.options or []):
                return (f"{title}: {name} = {value!r} is not one of {list(spec.options)}; pick one from the list "
                        "(an old workflow or an API prompt may hold a value this version does not offer).")
            continue
        if isinstance(spec, (io.Int.Input, io.Float.Input)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{title}: {name} must be a number, got {value!r}."
            if isinstance(value, float) and not math.isfinite(value):
                return (f"{title}: {name} = {value} is not a finite number (JSON NaN/Infinity pass ComfyUI's "
                        f"min/max check); set it to a number in {spec.min}..{spec.max}.")
            if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
                return f"{title}: {name} = {value} is outside {spec.min}..{spec.max}; set it within that range."
    return None


def widget_values(node_cls, exclude: tuple[str, ...] = (), **known) -> dict:
    """Every widget input of the node at its schema default, overlaid with the ``known`` values that
    are not None: what the node will run with, as far as that is known before the run (a linked
    widget keeps its default). Sockets (no default) and ``exclude`` are left out."""
    values = {i.id: i.default for i in node_cls.define_schema().inputs or []
              if getattr(i, "default", None) is not None and i.id not in exclude}
    values.update({k: v for k, v in known.items() if v is not None})
    return values


def core_problem(title: str, build, renames: dict[str, str] | None = None, **kwargs) -> str | None:
    """Run the core's own check (``build(**kwargs)``, e.g. the option objects a node makes); its
    message, with the core's argument names turned into the node's input names, or None."""
    try:
        build(**kwargs)
    except ValueError as exc:  # the core's InputError is a ValueError
        message = str(exc)
        for core_name, input_name in (renames or {}).items():
            if message.startswith(core_name):
                message = f"{input_name} ({core_name}){message[len(core_name):]}"
        return f"{title}: {message}"
    return None
