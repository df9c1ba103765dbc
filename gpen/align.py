"""Alignment to GPEN's five-point template, and the resampling both ways.

The template is the authors' (their align_faces.py), scaled exactly with the model size, so a 1024 or
2048 model gets its face cut at full resolution from the source frame rather than upscaled from
a 512 crop.

Every warp in the pack - frame to aligned crop, and crop back to frame - is ``resample``: torch
ops on whatever device the image is on. When a warp minifies, the source is first reduced with
an anti-aliased resize to about the destination's resolution, so detail finer than the
destination's pixels is averaged away instead of aliasing (grain, jagged hair, moire), and the
work scales with the destination's size, not the source's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TEMPLATE_512 = np.array([
    [202.04, 242.88],  # left eye
    [309.43, 242.29],  # right eye
    [256.08, 303.96],  # nose tip
    [211.96, 366.83],  # left mouth corner
    [300.89, 366.34],  # right mouth corner
])
Region = tuple[int, int, int, int]  # x0, y0, x1, y1: integer pixel box, end exclusive


def template(size: int) -> np.ndarray:
    """The five template points for a ``size`` x ``size`` aligned face."""
    return TEMPLATE_512 * (size / 512.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking ``src`` to ``dst``.

    Umeyama's closed form with the reflection guard, as the authors use; returns a 2x3 matrix.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    variance = src_c.var(0).sum()
    scale = (s * d).sum() / variance if variance > 0 else 1.0
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def alignment(landmarks: np.ndarray, size: int, points: np.ndarray | None = None) -> np.ndarray:
    """The image -> crop affine (2x3) that puts ``landmarks`` on the template ``points`` of a
    ``size`` crop (GPEN's ``template(size)`` unless the model has its own)."""
    return similarity_transform(landmarks, template(size) if points is None else points)


def invert_affine(affine: np.ndarray) -> np.ndarray:
    matrix = np.vstack([np.asarray(affine, np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(matrix)[:2]


def affine_scale(affine: np.ndarray) -> float:
    """Uniform scale of a similarity transform (destination pixels per source pixel)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(affine)[:, :2]))))


def shifted(affine: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``affine`` followed by a shift of the destination by (dx, dy)."""
    out = np.array(affine, np.float64)
    out[:, 2] += (dx, dy)
    return out


def scaled(affine: np.ndarray, factor: float) -> np.ndarray:
    """``affine`` followed by scaling the destination by ``factor``."""
    return np.asarray(affine, np.float64) * factor


def preimage(affine: np.ndarray, width: int, height: int, x0: int = 0, y0: int = 0) -> np.ndarray:
    """Corners (4x2) of the source region that destination pixels ``x0..width-1`` x
    ``y0..height-1`` (a whole ``width`` x ``height`` destination by default) come from."""
    corners = np.array([[x0 - 0.5, y0 - 0.5], [width - 0.5, y0 - 0.5], [x0 - 0.5, height - 0.5],
                        [width - 0.5, height - 0.5]])
    inverse = invert_affine(affine)
    return corners @ inverse[:, :2].T + inverse[:, 2]


def bounding_region(points: np.ndarray, width: int, height: int, margin: int = 0) -> Region | None:
    """Integer box around ``points`` (plus ``margin``), clipped to a ``width`` x ``height`` image."""
    x0 = max(0, math.floor(points[:, 0].min()) - margin)
    y0 = max(0, math.floor(points[:, 1].min()) - margin)
    x1 = min(width, math.ceil(points[:, 0].max()) + 1 + margin)
    y1 = min(height, math.ceil(points[:, 1].max()) + 1 + margin)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., C, H, W]`` resized to ``height`` x ``width``: enlarged bicubic; shrunk with an
    anti-aliasing triangle filter as wide as the reduction (PIL's bilinear), which averages away
    what the smaller image cannot hold at half the cost of a wider bicubic one."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:])
    if height <= flat.shape[-2] and width <= flat.shape[-1]:
        out = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    else:
        out = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[..., H, W]`` blurred by a Gaussian of ``sigma`` pixels (kernel 3 sigma each side, edges
    replicated): two 1-D convolutions on the image's own device."""
    radius = math.ceil(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(taps * taps) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    flat = image.reshape(-1, 1, *image.shape[-2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(F.conv2d(flat, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return flat.reshape(image.shape)


def prefilter(image: torch.Tensor, affine: np.ndarray, width: int, height: int,
              margin: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """Reduce ``image`` to about the destination's resolution when ``affine`` minifies it.

    Returns the (possibly) reduced source and the affine from it to the same destination. Only
    the part of the source the destination can see (plus ``margin``) is reduced.
    """
    scale = affine_scale(affine)
    if scale >= 1.0:
        return image, affine
    src_h, src_w = image.shape[-2:]
    region = bounding_region(preimage(affine, width, height), src_w, src_h, margin=margin + math.ceil(2 / scale))
    if region is None:
        return image, affine
    x0, y0, x1, y1 = region
    out_w, out_h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    reduced = resize(image[..., y0:y1, x0:x1], out_h, out_w)
    # Source pixel centre u maps to (u - x0 + 0.5) * fx - 0.5 in the reduced image.
    fx, fy = out_w / (x1 - x0), out_h / (y1 - y0)
    to_reduced = np.array([[fx, 0.0, (0.5 - x0) * fx - 0.5], [0.0, fy, (0.5 - y0) * fy - 0.5]])
    return reduced, compose(affine, invert_affine(to_reduced))


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine ``outer(inner(p))``."""
    outer3 = np.vstack([outer, [0, 0, 1]])
    inner3 = np.vstack([inner, [0, 0, 1]])
    return (outer3 @ inner3)[:2]


def warp(image: torch.Tensor, affine: np.ndarray, width: int, height: int, mode: str = "bilinear",
         padding: str = "zeros") -> torch.Tensor:
    """``[..., C, H, W]`` warped by ``affine`` (source pixel -> destination pixel, pixel centres
    at integer coordinates, as OpenCV) into a ``width`` x ``height`` destination."""
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:])
    src_h, src_w = flat.shape[-2:]
    inverse = invert_affine(affine)
    # Normalised grid (align_corners=False): pixel centre u -> (2u + 1) / size - 1.
    norm = np.array([2.0 / src_w, 2.0 / src_h])
    matrix = torch.tensor((inverse[:, :2] * norm[:, None]).T, dtype=flat.dtype, device=flat.device)
    offset = torch.tensor(inverse[:, 2] * norm + norm / 2 - 1, dtype=flat.dtype, device=flat.device)
    xs = torch.arange(width, dtype=flat.dtype, device=flat.device)[None, :, None] * matrix[0]
    ys = torch.arange(height, dtype=flat.dtype, device=flat.device)[:, None, None] * matrix[1] + offset
    grid = xs + ys
    out = F.grid_sample(flat, grid[None].expand(flat.shape[0], -1, -1, -1), mode=mode,
                        padding_mode=padding, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def resample(image: torch.Tensor, affine: np.ndarray, width: int, height: int, mode: str = "bilinear",
             padding: str = "zeros") -> torch.Tensor:
    """``warp`` with the anti-aliasing pre-filter when the affine minifies."""
    source, affine = prefilter(image, affine, width, height)
    return warp(source, affine, width, height, mode, padding)


def cut_crop(frame: torch.Tensor, affine: np.ndarray, size: int) -> torch.Tensor:
    """The ``size`` crop that ``affine`` (image -> crop) cuts from a ``[3,H,W]`` frame.

    Bilinear, as the authors align; borders are mirrored so faces at the frame edge still look
    like faces to the model (paste-back only writes inside the frame).
    """
    return resample(frame, affine, size, size, "bilinear", "reflection").clamp_(0.0, 1.0)
