"""The one place where ComfyUI IMAGE/MASK tensors become frames and crops, and back.

ComfyUI's IMAGE is float32 ``[B,H,W,C]`` in 0..1 (C is 3, sometimes 1 or 4) and MASK is
``[B,H,W]``. The rest of ``gpen/`` works on float32 ``[3,H,W]`` RGB frames in 0..1 on the
model's device (uint8 ``HxWx3`` numpy for the detectors), and on crops ``[N,3,S,S]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def check_image(image: torch.Tensor, what: str = "image") -> None:
    """Reject tensors that are not a ComfyUI IMAGE with a message that names the problem."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"The {what} input must be an IMAGE batch [B,H,W,C] with 1, 3 or 4 "
                         f"channels; got {shape}.")


def frame_tensor(image: torch.Tensor, index: int, device: torch.device | str = "cpu",
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """Frame ``index`` as float32 ``[3,H,W]`` RGB in 0..1 on ``device`` (grey expanded, alpha
    dropped, NaN/inf replaced) for alignment and compositing: a tensor the caller owns (written
    into ``into``, an ``[H,W,3]`` float32 buffer on ``device``, when given), one transfer per
    frame, kept in the IMAGE's pixel-interleaved (channels-last) memory layout."""
    frame = image[index].detach().to(device=device, dtype=torch.float32)
    if frame.shape[-1] == 1:
        frame = frame.expand(-1, -1, 3)
    frame = torch.nan_to_num(frame[..., :3], nan=0.0, posinf=1.0, neginf=0.0, out=into)
    return frame.clamp_(0.0, 1.0).movedim(-1, 0)


def frame_uint8(image: torch.Tensor, index: int) -> np.ndarray:
    """Frame ``index`` as 8-bit HxWx3 RGB numpy, as the detectors expect."""
    return to_uint8(frame_tensor(image, index))


def upload(rgb: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """An 8-bit HxWx3 RGB picture on ``device``, still 8-bit: a quarter of the bytes of float, so
    frames wait between stages in this form (on the CPU it shares the array's memory)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).to(device)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """An ``upload``-ed 8-bit HxWx3 picture as float32 ``[3,H,W]`` in 0..1, where it is."""
    return pixels.movedim(-1, 0).float().div_(255.0)


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """A ``[3,H,W]`` frame in 0..1 as 8-bit HxWx3 RGB numpy (rounded; one transfer back)."""
    return frame.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).movedim(0, -1).cpu().numpy()


def frame_to_image(frame: torch.Tensor) -> torch.Tensor:
    """One ``[3,H,W]`` frame as a single-image IMAGE batch on the CPU."""
    return frame.movedim(0, -1)[None].to("cpu", torch.float32).contiguous()


def output_batch(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An uninitialised IMAGE batch on the CPU like ``image`` (its channels) at ``height`` x ``width``."""
    return torch.empty((image.shape[0], height, width, image.shape[-1]), dtype=torch.float32)


def put_rgb(out: torch.Tensor, index: int, image: torch.Tensor, rgb: torch.Tensor) -> None:
    """Write ``rgb`` ``[3,h,w]`` as frame ``index`` of the IMAGE batch ``out``, in the layout of
    ``image``: grey stays grey (luma), alpha is kept (enlarged, bilinear, if ``rgb`` is)."""
    target = out[index]
    new = rgb.detach().movedim(0, -1)
    channels = image.shape[-1]
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], device=new.device)
        target.copy_((new @ weights)[..., None])
        return
    target[..., :3].copy_(new)
    if channels == 4:
        alpha = image[index, ..., 3:].detach().to("cpu", torch.float32)
        if alpha.shape[:2] != target.shape[:2]:
            alpha = F.interpolate(alpha.movedim(-1, 0)[None], size=target.shape[:2], mode="bilinear")[0].movedim(0, -1)
        target[..., 3:].copy_(alpha)


def crops_to_image(crops: torch.Tensor) -> torch.Tensor:
    """Face crops ``[N,3,S,S]`` as an IMAGE batch ``[N,S,S,3]`` on the CPU."""
    return crops.detach().to("cpu", torch.float32).movedim(1, -1).contiguous()


def image_to_crop(crops: torch.Tensor, index: int, device: torch.device | str) -> torch.Tensor:
    """Crop ``index`` of an IMAGE batch as ``[3,S,S]`` RGB on ``device``: a view where no
    transfer is needed (crops are large; whoever computes with them clamps the result)."""
    crop = crops[index, ..., :3].detach().to(device=device, dtype=torch.float32)
    if crop.shape[-1] == 1:
        crop = crop.expand(-1, -1, 3)
    return crop.movedim(-1, 0)
