"""The Prompt Builder node: a background prompt from a product name and a category
(dreampainter_core.prompts.build_prompt), for sellers who have a name, not a prompt."""

from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io

from ..dreampainter_core.prompts import LANGUAGES, PromptConfigError, build_prompt, load_presets
from .paths import folders
from .schema_tools import search_aliases, widget_problem
from .sockets import CATEGORY_CONDITIONING

logger = logging.getLogger("DreamPainter")
PRESETS_SUBFOLDER = "prompt_presets"  # ComfyUI/models/dreampainter/prompt_presets/*.toml
AUTO = "auto"


def user_preset_files() -> list[Path]:
    """The users' presets files, in folder order, then name order."""
    files = []
    for folder in folders("dreampainter"):
        files += sorted((Path(folder) / PRESETS_SUBFOLDER).glob("*.toml"))
    return files


def presets():
    """Built-in presets plus the users' files; a broken user file is named in the log and left out
    of the dropdowns (the node then reports it when it runs), so one typo does not hide the node."""
    files = user_preset_files()
    try:
        return load_presets(*files), files
    except PromptConfigError as exc:
        logger.warning("DreamPainter Prompt Builder: %s; using the built-in presets", exc)
        return load_presets(), []


class DreamPainterPromptBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        p, _ = presets()
        return io.Schema(
            node_id="DreamPainterPromptBuilder",
            display_name="DreamPainter Prompt Builder",
            category=CATEGORY_CONDITIONING,
            **search_aliases("prompt builder", "product name", "category", "提示词生成"),
            description="A full background prompt from the product's name: a display stand, surroundings, a "
                        "distant background and a style that suit its category. Feed it to Text Encode.",
            inputs=[
                io.String.Input("name", default="", tooltip="The product's name, e.g. 'rose face serum' or "
                                                            "'玫瑰精华液'. It starts the prompt as written."),
                io.Combo.Input("category", options=[AUTO, *p.categories], default=AUTO,
                               tooltip="What kind of product: picks the stands, surroundings and backgrounds. "
                                       "auto = general. Add your own in models/dreampainter/prompt_presets/*.toml."),
                io.Combo.Input("language", options=list(LANGUAGES), default="en",
                               tooltip="en or zh: the same seed gives the same scene in both."),
                io.Combo.Input("style", options=[AUTO, *p.styles], default=AUTO,
                               tooltip="Photographic style; auto = one of the category's."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Another seed, another scene for the same product."),
            ],
            outputs=[io.String.Output(display_name="prompt")],
        )

    @classmethod
    def validate_inputs(cls, name=None, category=None, language=None, style=None, seed=None):
        problem = widget_problem(cls, category=category, language=language, style=style, seed=seed)
        if problem:
            return problem
        if name is not None and not str(name).strip():
            return "DreamPainter Prompt Builder: name is empty; give the product's name (e.g. 'rose face serum')."
        return True

    @classmethod
    def execute(cls, name, category, language, style, seed) -> io.NodeOutput:
        files = user_preset_files()  # a broken file is reported here, by name and line
        prompt = build_prompt(name, None if category == AUTO else category, language,
                              None if style == AUTO else style, seed, presets=files or None)
        return io.NodeOutput(prompt)
