"""Model folders: registration with ComfyUI's folder_paths, dropdown lists, name -> path.

Dropdown entries (stable; workflows store them):

* ``[diffusers] <folder>``: a diffusers-layout CogView4 folder under ``models/diffusers/``
  (THUDM/CogView4-6B as downloaded). The transformer, VAE, text encoder and tokenizer loaders
  each take their part (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) from it.
* ``<file>.safetensors``: a single file in the component's own folder
  (``diffusion_models/``, ``vae/``, ``text_encoders/``, ``dreampainter/``).
* ``<folder>/`` (trailing slash): a component folder (``config.json`` + safetensors) inside
  ``text_encoders/`` or ``vae/``.

The pack's embedded miniature model (dreampainter_core.embedded) is listed too, after the user's
models: ``[diffusers] dreampainter-miniature`` and ``dreampainter_miniature.safetensors``.

A name that is not found raises ``ModelFilesError`` naming the file, the folders searched and
where to get it. Names come from API clients too, so every name must stay inside the registered
folders (``inside_model_folder``): an absolute path, a drive or a ``..`` component is refused with
that same "not found" message, before the file system is asked anything, so a client cannot tell
whether something exists outside them. Symlinks placed inside a model folder are followed, as
ComfyUI's own loaders do (models kept on another disk, Hugging Face downloads linking into their
cache); a name cannot walk out through one, since ``..`` is refused wherever it appears.
"""

from __future__ import annotations

import logging
import os
import re

import folder_paths

from ..dreampainter_core.embedded import MODELS_DIR as EMBEDDED_MODELS_DIR
from ..dreampainter_core.errors import ModelFilesError

logger = logging.getLogger("DreamPainter")

DIFFUSERS_PREFIX = "[diffusers] "
NONE = "none"
BASE_REPO = "THUDM/CogView4-6B"
BASE_HINT = (
    f"Get the base model from the Hugging Face repo {BASE_REPO} (diffusers layout: transformer/, vae/, "
    f"text_encoder/, tokenizer/, scheduler/, model_index.json) and put the whole folder into "
    f"ComfyUI/models/diffusers/ (e.g. models/diffusers/CogView4-6B/), or single .safetensors files into "
    "the folder named above."
)
DREAMPAINTER_HINT = (
    "DreamPainter weight files (.safetensors with format=dreampainter metadata) are made by this pack's "
    "training code (python -m train.stage1 / train.stage2); put them into ComfyUI/models/dreampainter/. "
    "Choose 'none' to run the base CogView4 model without DreamPainter."
)

PRODUCTS_HINT = (
    "DreamPaint product files (.safetensors with format=dreampainter-product metadata) are made by this pack's "
    "python -m train.dreampaint --images DIR --class-noun NOUN --out FILE; put them into "
    "ComfyUI/models/dreampainter_products/."
)

TOKENS_HINT = (
    "Background token files (.safetensors with format=dreampainter-token metadata) are made by this pack's "
    "python -m train.background_token --config configs/background_token.toml; put them into "
    "ComfyUI/models/dreampainter_tokens/."
)

# folder name -> (default sub-folder of models/, extensions)
_OWN_FOLDERS = {"dreampainter": ({".safetensors"}), "dreampainter_products": ({".safetensors"}),
                "dreampainter_tokens": ({".safetensors"})}


def _embedded_folders() -> dict[str, str]:
    """The pack's own models/ sub-folders holding the embedded miniature model (after the user's)."""
    return {kind: str(EMBEDDED_MODELS_DIR / kind) for kind in ("diffusers", "dreampainter")
            if (EMBEDDED_MODELS_DIR / kind).is_dir()}


def register_model_folders() -> None:
    """Add ``models/dreampainter``, then the pack's embedded-model folders after the user's own
    (idempotent; keeps paths others added, e.g. from extra_model_paths.yaml)."""
    for name, exts in _OWN_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, old_exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            if isinstance(old_exts, set):
                old_exts.update(exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))
    for name, folder in _embedded_folders().items():
        if name in folder_paths.folder_names_and_paths:
            paths = folder_paths.folder_names_and_paths[name][0]
            if folder not in paths:
                paths.append(folder)


def folders(kind: str) -> list[str]:
    """The folders ComfyUI searches for ``kind`` ('diffusers', 'vae', ...); [] if unknown."""
    register_model_folders()
    try:
        return folder_paths.get_folder_paths(kind)
    except KeyError:
        return []


def _subdirs(base: str):
    try:
        with os.scandir(base) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def diffusers_entries(component: str) -> list[str]:
    """``[diffusers] <folder>`` for every folder under models/diffusers having ``component/``."""
    out = []
    for base in folders("diffusers"):
        for name in _subdirs(base):
            if os.path.isdir(os.path.join(base, name, component)):
                entry = DIFFUSERS_PREFIX + name
                if entry not in out:
                    out.append(entry)
    return out


def file_entries(kind: str) -> list[str]:
    register_model_folders()
    try:
        names = folder_paths.get_filename_list(kind)
    except KeyError:
        return []
    return [n for n in names if n.lower().endswith(".safetensors")]


def folder_entries(kind: str, marker: str = "config.json") -> list[str]:
    """``<folder>/`` for component folders (holding ``marker``) directly inside ``kind``'s folders."""
    out = []
    for base in folders(kind):
        for name in _subdirs(base):
            if os.path.isfile(os.path.join(base, name, marker)) and name + "/" not in out:
                out.append(name + "/")
    return out


def inside_model_folder(name) -> bool:
    """Whether ``name``, joined to a model folder, can only lead inside it: relative, no drive, no
    '..' component, no NUL, not the folder itself."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        return False
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0]:
        return False
    return ".." not in re.split(r"[\\/]", name) and os.path.normpath(name) != "."


def _searched(kind: str) -> str:
    paths = folders(kind)
    return ", ".join(paths) if paths else f"(no '{kind}' folder is registered)"


def resolve_diffusers(entry: str, component: str | None, what: str) -> str:
    """Path of a ``[diffusers] <folder>`` entry (or its ``component`` sub-folder)."""
    name = entry[len(DIFFUSERS_PREFIX):].strip()
    for base in folders("diffusers") if inside_model_folder(name) else ():
        folder = os.path.join(base, name)
        if os.path.isdir(folder):
            if component is None:
                return folder
            sub = os.path.join(folder, component)
            if not os.path.isdir(sub):
                raise ModelFilesError(
                    f"{what}: the diffusers folder {folder} has no '{component}/' sub-folder (incomplete "
                    f"download?). {BASE_HINT}"
                )
            return sub
    raise ModelFilesError(f"{what}: diffusers folder '{name[:200]}' not found; searched {_searched('diffusers')}. {BASE_HINT}")


def resolve(entry: str, kind: str, component: str, what: str) -> str:
    """Path (file or folder) for a dropdown entry of a loader whose single files live in ``kind``."""
    if not isinstance(entry, str) or not entry.strip() or entry == NONE:
        raise ModelFilesError(f"{what}: no model selected; the folders searched are {_searched(kind)} and "
                              f"{_searched('diffusers')}. {BASE_HINT}")
    if entry.startswith(DIFFUSERS_PREFIX):
        return resolve_diffusers(entry, component, what)
    if entry.endswith("/"):
        for base in folders(kind) if inside_model_folder(entry.rstrip("/")) else ():
            folder = os.path.join(base, entry.rstrip("/"))
            if os.path.isdir(folder):
                return folder
        raise ModelFilesError(f"{what}: folder '{entry[:200]}' not found; searched {_searched(kind)}. {BASE_HINT}")
    known = kind in folder_paths.folder_names_and_paths and inside_model_folder(entry)
    path = folder_paths.get_full_path(kind, entry) if known else None
    if path is None:
        raise ModelFilesError(f"{what}: model file '{entry[:200]}' not found; searched {_searched(kind)}. {BASE_HINT}")
    return path


def resolve_dreampainter(entry: str) -> str | None:
    if entry in (None, "", NONE):
        return None
    register_model_folders()
    path = folder_paths.get_full_path("dreampainter", entry) if inside_model_folder(entry) else None
    if path is None:
        raise ModelFilesError(
            f"DreamPainter weights: file '{str(entry)[:200]}' not found; searched {_searched('dreampainter')}. {DREAMPAINTER_HINT}"
        )
    return path


def _resolve_own(kind: str, entry: str, what: str, hint: str) -> str:
    """Path of a file named in the dropdown of one of the pack's own folders (``_OWN_FOLDERS``)."""
    register_model_folders()
    usable = entry not in (None, "", NONE) and inside_model_folder(entry)
    path = folder_paths.get_full_path(kind, entry) if usable else None
    if path is None:
        raise ModelFilesError(f"{what}: file '{str(entry)[:200]}' not found; searched {_searched(kind)}. {hint}")
    return path


def resolve_product(entry: str) -> str:
    """Path of a product file named in the product loader's dropdown."""
    return _resolve_own("dreampainter_products", entry, "DreamPaint product", PRODUCTS_HINT)


def resolve_token(entry: str) -> str:
    """Path of a background token file named in the token loader's dropdown."""
    return _resolve_own("dreampainter_tokens", entry, "Background token", TOKENS_HINT)


def with_missing(options: list[str], what: str) -> list[str]:
    """Dropdowns may not be empty in the UI; an empty list gets a placeholder that fails with a hint."""
    return options if options else [f"(no {what} found)"]
