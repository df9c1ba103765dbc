"""Every face restorer behind one interface: GPEN (our own generator) and the face models spandrel
reads (GFPGAN v1.x clean, RestoreFormer; CodeFormer where spandrel_extra_arches is installed).

Each model declares what alignment, paste-back and precision need -- ``size``, ``template`` (the
five landmark targets at that size), ``input_range``, ``supports_fp16`` / ``supports_bf16`` and
``has_fidelity`` -- so no caller asks which architecture it holds. Files are read by our own
weights-only reader; spandrel only ever sees the tensors (it would unpickle files itself).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from .loader import (ModelLoadError, canonicalize, identify_foreign, is_gpen, load_gpen_state_dict,
                     read_state_dict)

if TYPE_CHECKING:
    from spandrel import ArchSupport

logger = logging.getLogger(__name__)

# The 512 FFHQ five-point template GFPGAN, CodeFormer and RestoreFormer were trained on
# (facexlib.utils.face_restoration_helper.FaceRestoreHelper.face_template).
FFHQ_TEMPLATE_512 = np.array([
    [192.98138, 239.94708],
    [318.90277, 240.19360],
    [256.63416, 314.01935],
    [201.26117, 371.41043],
    [313.08905, 371.15118],
])
FACE_ARCHES = ("GFPGAN", "RestoreFormer", "CodeFormer")
SUPPORTED = "GPEN-BFR (512/1024/2048), GFPGAN v1.x (clean), RestoreFormer, CodeFormer"
CODEFORMER_NOTE = ("CodeFormer needs the optional package spandrel_extra_arches (pip install "
                   "spandrel_extra_arches; CodeFormer's licence is non-commercial)")
# Peak live activation bytes of one 512 face in fp32 (input included, weights not), measured
# with gpen.bench's PeakLiveBytes: GFPGAN 543.7 MiB, RestoreFormer 694.8 MiB, CodeFormer 567.0
# MiB, plus 10%. The peak is proportional to the batch and to the element size (bf16: half),
# and the same on the CPU as on ``meta`` (tests/test_restorers.py checks all of it).
ACTIVATION_BYTES_FP32 = {"GFPGAN": 600 << 20, "RestoreFormer": 765 << 20, "CodeFormer": 625 << 20}


class FaceModel(Protocol):
    """What every restorer offers (FullGenerator and SpandrelFace both do)."""

    name: str
    size: int
    input_range: tuple[float, float]
    supports_fp16: bool
    supports_bf16: bool
    has_fidelity: bool

    @property
    def template(self) -> np.ndarray: ...

    def __call__(self, x: torch.Tensor, *fidelity: float) -> torch.Tensor: ...


class SpandrelFace(nn.Module):
    """A spandrel face model: its network as ``net`` and one ``forward(x, fidelity)`` returning
    the restored face in ``input_range`` (-1..1), deterministic (GFPGAN's fixed noise buffers)."""

    input_range = (-1.0, 1.0)
    size = 512

    def __init__(self, descriptor) -> None:
        super().__init__()
        self.net = descriptor.model
        self.name = str(descriptor.architecture.id)
        self.supports_fp16 = bool(descriptor.supports_half)
        self.supports_bf16 = bool(descriptor.supports_bfloat16)
        self.has_fidelity = self.name == "CodeFormer"
        if self.name == "CodeFormer":
            self.net.quantize.get_codebook_feat = types.MethodType(_codebook_vectors, self.net.quantize)

    @property
    def template(self) -> np.ndarray:
        return FFHQ_TEMPLATE_512

    def activation_bytes(self, dtype: torch.dtype) -> int:
        return ACTIVATION_BYTES_FP32[self.name] * torch.finfo(dtype).bits // 32

    def to_channels_last(self) -> SpandrelFace:
        """Left in NCHW: these arches ``view`` their feature maps, which NHWC tensors cannot."""
        return self

    def forward(self, x: torch.Tensor, fidelity: float = 0.5) -> torch.Tensor:
        x = x.contiguous()  # the pipeline hands NHWC batches (GPEN's layout)
        if self.name == "CodeFormer":
            return self.net(x, weight=fidelity)[0]
        if self.name == "GFPGAN":
            return self.net(x, return_rgb=False, randomize_noise=False)[0]
        return self.net(x)[0]


def _codebook_vectors(quantize: nn.Module, indices: torch.Tensor, shape: list[int] | None) -> torch.Tensor:
    """CodeFormer's codebook lookup (``VectorQuantizer.get_codebook_feat``) as a plain embedding
    lookup, so it runs in the weights' precision: the original multiplies a one-hot matrix it
    makes in fp32 by the codebook weight, which fails in bf16 ("expected m1 and m2 to have the
    same dtype"). Both give the codebook's own vectors exactly. The alternatives are slower on a
    CPU with native bf16 (one 512 face, interleaved runs on 2 shared cores: declaring CodeFormer
    fp32-only takes about 1.9x the time, bf16 under autocast 1.3x or more)."""
    vectors = torch.nn.functional.embedding(indices.reshape(-1), quantize.embedding.weight)
    return vectors if shape is None else vectors.view(shape).permute(0, 3, 1, 2).contiguous()


def _registry():
    """spandrel's architectures plus, where installed, spandrel_extra_arches' (CodeFormer), in a
    registry of our own: the global one ComfyUI may extend itself is left alone."""
    from spandrel import MAIN_REGISTRY

    registry = MAIN_REGISTRY.copy()
    try:
        from spandrel_extra_arches import EXTRA_REGISTRY
    except ImportError:
        return registry
    registry.add(*(arch for arch in EXTRA_REGISTRY if arch.architecture.id not in registry))
    return registry


def has_codeformer() -> bool:
    return "CodeFormer" in _registry()


def load_face_model(source: str | Path | Mapping, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, bf16_ok: bool = True) -> nn.Module:
    """The restorer in ``source`` (a file or a state dict), eval mode, frozen, on ``device`` in
    ``dtype`` (lowered to what the architecture supports: ``supported_dtype``)."""
    name, state_dict = _tensors(source)
    if is_gpen(state_dict):
        return load_gpen_state_dict(state_dict, name, device, dtype)
    model = SpandrelFace(_spandrel_descriptor(state_dict, name))
    dtype = supported_dtype(model, dtype, bf16_ok)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def check_face_model(source: str | Path | Mapping) -> str:
    """The architecture of the restorer in ``source``, checked as ``load_face_model`` checks it
    (read weights-only, one of the supported architectures) without building the network: for
    the cluster driver, before its workers load it. GPEN's tensors are checked in full (its
    loader only assigns them); the others by the keys spandrel recognises them by, their shapes
    when a worker builds them."""
    name, state_dict = _tensors(source)
    if is_gpen(state_dict):
        return load_gpen_state_dict(state_dict, name, "cpu", torch.float32).name
    return str(_spandrel_architecture(state_dict, name)[0].architecture.id)


def _tensors(source: str | Path | Mapping) -> tuple[str, dict[str, torch.Tensor]]:
    """(name for messages, flat tensors) of a file or a state dict."""
    if isinstance(source, Mapping):
        name, raw = "state dict", source
    else:
        name, raw = Path(source).name, read_state_dict(source, fix=f"Supported: {SUPPORTED}.")
    return name, canonicalize(raw, name)


def _spandrel_architecture(state_dict: dict[str, torch.Tensor],
                           name: str) -> tuple[ArchSupport, dict[str, torch.Tensor]]:
    """The face architecture spandrel detects in ``state_dict`` (by its keys; nothing built) and
    the tensors as spandrel's loader sees them (its own unwrapping too, e.g. ``netG.``), or an
    error naming what the file looks like and what is supported."""
    from spandrel import canonicalize_state_dict

    state_dict = canonicalize_state_dict(state_dict)
    registry = _registry()
    support = next((arch for arch in registry.architectures("detection") if arch.detect(state_dict)), None)
    if support is None:
        foreign = identify_foreign(state_dict)
        if foreign and "CodeFormer" in foreign and not has_codeformer():
            raise ModelLoadError(f"{name} is CodeFormer: {CODEFORMER_NOTE}.")
        what = f"it looks like {foreign}" if foreign else f"no known architecture matches its {len(state_dict)} tensors"
        raise ModelLoadError(f"{name} is not a face restorer this pack runs: {what}. Supported: {SUPPORTED}.")
    if str(support.architecture.id) not in FACE_ARCHES:
        raise ModelLoadError(f"{name} is a {support.architecture.name} model, not a face restorer: use it with the "
                             f"node made for its kind (an upscaler: Load Upscale Model). Supported here: {SUPPORTED}.")
    return support, state_dict


def _spandrel_descriptor(state_dict: dict[str, torch.Tensor], name: str):
    support, state_dict = _spandrel_architecture(state_dict, name)
    try:
        descriptor = support.architecture.load(state_dict)
    except Exception as error:  # the keys matched but the tensors do not fit: spandrel raises many types
        what = identify_foreign(state_dict) or support.architecture.name
        lines = str(error).strip().splitlines()
        reason = lines[0][:200] if lines else type(error).__name__
        raise ModelLoadError(f"{name} looks like {what} but its tensors do not fit it ({reason}). Supported: "
                             f"{SUPPORTED}; if it is one of those, the file is incomplete or modified: download "
                             "it again.") from None
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ModelLoadError(f"{name} is a {support.architecture.name} model for {descriptor.input_channels}-channel "
                             f"input and {descriptor.output_channels}-channel output; faces are restored in RGB. "
                             f"Supported: {SUPPORTED}.")
    return descriptor


def supported_dtype(model: FaceModel, dtype: torch.dtype, bf16_ok: bool = True) -> torch.dtype:
    """``dtype``, or the nearest precision ``model``'s architecture runs in (fp16 -> bf16 where
    the device has it, ``bf16_ok`` -> fp32)."""
    if dtype == torch.float16 and not model.supports_fp16:
        dtype = torch.bfloat16 if model.supports_bf16 and bf16_ok else torch.float32
        logger.info("GPEN: %s does not run in fp16; using %s.", model.name, str(dtype).removeprefix("torch."))
    if dtype == torch.bfloat16 and not model.supports_bf16:
        dtype = torch.float32
        logger.info("GPEN: %s does not run in bf16; using fp32.", model.name)
    return dtype


def activation_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Peak memory one face needs in a forward (weights excluded), for the batch-size cap."""
    from .arch import FullGenerator, peak_activation_bytes

    if isinstance(model, FullGenerator):
        return peak_activation_bytes(model.config, dtype)
    return model.activation_bytes(dtype)
