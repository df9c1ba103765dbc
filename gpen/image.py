"""The one place where ComfyUI IMAGE/MASK tensors become numpy frames and back.

ComfyUI's IMAGE is float32 ``[B,H,W,C]`` in 0..1 (C is 3, sometimes 1 or 4) and MASK is
``[B,H,W]``. The rest of ``gpen/`` works on float32 ``HxWx3`` RGB frames in 0..1.
"""

from __future__ import annotations

import numpy as np
import torch


def check_image(image: torch.Tensor, what: str = "image") -> None:
    """Reject tensors that are not a ComfyUI IMAGE with a message that names the problem."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"The {what} input must be an IMAGE batch [B,H,W,C] with 1, 3 or 4 "
                         f"channels; got {shape}.")


def frame_rgb(image: torch.Tensor, index: int) -> np.ndarray:
    """Frame ``index`` as contiguous float32 HxWx3 RGB in 0..1 (grey expanded, alpha dropped,
    NaN/inf replaced) for detection, alignment and compositing."""
    frame = image[index].detach().to("cpu", torch.float32).numpy()
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    frame = np.nan_to_num(frame[..., :3], nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(frame, 0.0, 1.0), dtype=np.float32)


def frame_to_image(frame: np.ndarray) -> torch.Tensor:
    """One float32 RGB frame as a single-image IMAGE batch."""
    return torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))[None]


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """8-bit copy of a 0..1 frame, as detectors expect."""
    return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def with_rgb(image: torch.Tensor, index: int, rgb: np.ndarray) -> torch.Tensor:
    """Frame ``index`` of ``image`` with its colour replaced by ``rgb``, in the input's channel
    layout: grey stays grey (luma), alpha is kept as it was."""
    original = image[index].detach().to("cpu", torch.float32)
    new = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    channels = original.shape[-1]
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114])
        return (new @ weights)[..., None]
    if channels == 4:
        return torch.cat([new, original[..., 3:]], dim=-1)
    return new


def with_rgb_resized(image: torch.Tensor, index: int, rgb: np.ndarray) -> torch.Tensor:
    """Like ``with_rgb`` for a frame that was enlarged: alpha is enlarged to match (bilinear)."""
    height, width = rgb.shape[:2]
    original = image[index:index + 1].detach().to("cpu", torch.float32)
    if original.shape[-1] != 4:
        return with_rgb(torch.nn.functional.interpolate(original.movedim(-1, 1), size=(height, width),
                                                        mode="bilinear").movedim(1, -1), 0, rgb)
    alpha = torch.nn.functional.interpolate(original[..., 3:].movedim(-1, 1), size=(height, width),
                                            mode="bilinear").movedim(1, -1)[0]
    return torch.cat([torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)), alpha], dim=-1)


def crops_to_tensor(crops: list[np.ndarray], size: int) -> torch.Tensor:
    """Aligned face crops as an IMAGE batch; an empty ``[0,S,S,3]`` batch when there are none."""
    if not crops:
        return torch.zeros((0, size, size, 3), dtype=torch.float32)
    return torch.from_numpy(np.stack(crops).astype(np.float32, copy=False))


def crops_to_model(crops: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[N,S,S,3]`` in 0..1 -> model input ``[N,3,S,S]`` in -1..1."""
    return crops.movedim(-1, 1) * 2.0 - 1.0


def model_to_crops(output: torch.Tensor) -> torch.Tensor:
    """Model output ``[N,3,S,S]`` (unbounded) -> IMAGE ``[N,S,S,3]`` clipped to 0..1."""
    return ((output.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
