"""ComfyUI nodes of the DreamPainter pack (V3 schema). Imported by ComfyUI only: every module here
imports ComfyUI's packages (comfy, comfy_api, folder_paths). Registration: registry.py."""
