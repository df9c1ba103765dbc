"""comfyui-gpen: GPEN blind face restoration nodes for ComfyUI (V3 node API entry point)."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
