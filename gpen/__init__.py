"""GPEN blind face restoration in plain PyTorch, independent of ComfyUI.

``load_generator`` reads a GPEN-BFR checkpoint (any size) into a ``FullGenerator``; the
``pipeline`` module detects, aligns, restores and pastes faces on IMAGE-layout tensors.
"""

from .arch import FullGenerator, GPENConfig
from .loader import ModelLoadError, load_generator

__all__ = ["FullGenerator", "GPENConfig", "ModelLoadError", "load_generator"]
