"""Paste restored faces back: a soft face-shaped mask, inverse warp, one-pass composite.

The mask is built on the aligned crop (so its feather is relative to the face, at any model
size) and warped back with the face. All faces of a frame are composited together: overlapping
faces are averaged by their mask weights instead of one cutting a hard edge into another.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .align import invert_affine

# Face ellipse on the 512 template: centre between the eyes and mouth, from brow to chin.
MASK_CENTER_512 = (256.0, 290.0)
MASK_AXES_512 = (172.0, 212.0)


def face_mask(size: int, feather: float = 0.1) -> np.ndarray:
    """Soft elliptical face mask on a ``size`` crop, 1 inside, 0 at the ellipse edge.

    ``feather`` is the width of the fall-off as a fraction of the ellipse radius.
    """
    scale = size / 512.0
    cx, cy = (c * scale for c in MASK_CENTER_512)
    ax, ay = (a * scale for a in MASK_AXES_512)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = np.sqrt(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2)
    feather = max(float(feather), 1e-3)
    ramp = np.clip((1.0 - radius) / feather, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep: no kink at the ends


def footprint(affine: np.ndarray, crop_size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Integer (x0, y0, x1, y1) of the frame region a crop maps back onto, or None if outside."""
    inverse = invert_affine(affine)
    corners = np.array([[0, 0, 1], [crop_size, 0, 1], [0, crop_size, 1], [crop_size, crop_size, 1]], float)
    points = corners @ inverse.T
    x0 = max(0, math.floor(points[:, 0].min()) - 1)
    y0 = max(0, math.floor(points[:, 1].min()) - 1)
    x1 = min(width, math.ceil(points[:, 0].max()) + 2)
    y1 = min(height, math.ceil(points[:, 1].max()) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def warp_back(crop: np.ndarray, affine: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """Inverse-warp ``crop`` (HxW or HxWxC) into the frame ``region`` only."""
    x0, y0, x1, y1 = region
    inverse = invert_affine(affine)
    inverse[:, 2] -= (x0, y0)
    return cv2.warpAffine(crop, inverse, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def paste_faces(frame: np.ndarray, crops: list[np.ndarray], affines: list[np.ndarray],
                feather: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Composite restored ``crops`` into a float32 RGB ``frame``; returns (image, mask).

    The mask is the union of the faces' soft masks; where faces overlap their colours are
    averaged by mask weight. Work is confined to the faces' bounding region of the frame.
    """
    height, width = frame.shape[:2]
    out = frame.astype(np.float32, copy=True)
    coverage_full = np.zeros((height, width), np.float32)
    placed = [(crop, affine, region) for crop, affine in zip(crops, affines)
              if (region := footprint(affine, crop.shape[0], height, width)) is not None]
    if not placed:
        return out, coverage_full
    bx0 = min(r[0] for _, _, r in placed)
    by0 = min(r[1] for _, _, r in placed)
    bx1 = max(r[2] for _, _, r in placed)
    by1 = max(r[3] for _, _, r in placed)
    colour_sum = np.zeros((by1 - by0, bx1 - bx0, 3), np.float32)
    weight_sum = np.zeros((by1 - by0, bx1 - bx0), np.float32)
    coverage = coverage_full[by0:by1, bx0:bx1]  # a view: 1 - prod(1 - m), the union of soft masks
    masks: dict[int, np.ndarray] = {}
    for crop, affine, region in placed:
        size = crop.shape[0]
        if size not in masks:
            masks[size] = face_mask(size, feather)
        mask = warp_back(masks[size], affine, region)
        face = warp_back(np.ascontiguousarray(crop, np.float32), affine, region)
        x0, y0, x1, y1 = region[0] - bx0, region[1] - by0, region[2] - bx0, region[3] - by0
        colour_sum[y0:y1, x0:x1] += face * mask[..., None]
        weight_sum[y0:y1, x0:x1] += mask
        coverage[y0:y1, x0:x1] = 1.0 - (1.0 - coverage[y0:y1, x0:x1]) * (1.0 - mask)
    faces = colour_sum / np.maximum(weight_sum, 1e-6)[..., None]
    alpha = coverage[..., None]
    out[by0:by1, bx0:bx1] = out[by0:by1, bx0:bx1] * (1.0 - alpha) + faces * alpha
    return out, coverage_full
