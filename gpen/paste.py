"""Paste restored faces back: face-shaped masks, colour matching, seam-free composite.

Masks are built on the aligned crop (so the feather is relative to the face, at any model
size) and warped back with the face. All faces of a frame are composited in one pass:
overlapping faces are averaged by mask weight instead of one cutting an edge into another, and
the final blend is multi-band (Laplacian pyramid), so low frequencies meet over a wide band and
fine detail over a narrow one: no visible rim where the mask ends.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .align import invert_affine
from .options import BLENDS

# Face ellipse on the 512 template: centre between the eyes and mouth, from brow to chin.
MASK_CENTER_512 = (256.0, 290.0)
MASK_AXES_512 = (172.0, 212.0)
MAX_LEVELS = 5


def face_mask(size: int, feather: float = 0.15) -> np.ndarray:
    """Soft elliptical face mask on a ``size`` crop, 1 inside, 0 at the ellipse edge.

    ``feather`` is the width of the fall-off as a fraction of the ellipse radius.
    """
    scale = size / 512.0
    cx, cy = (c * scale for c in MASK_CENTER_512)
    ax, ay = (a * scale for a in MASK_AXES_512)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = np.sqrt(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2)
    ramp = np.clip((1.0 - radius) / max(float(feather), 1e-3), 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep: no kink at the ends


def match_colour(restored: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give ``restored`` the LAB mean and spread of ``original`` inside ``mask`` (both crops).

    Restoration models drift skin tone; matching first and second moments in a perceptual space
    undoes the drift without touching the restored detail's structure.
    """
    weights = mask.astype(np.float64)
    total = weights.sum()
    if total < 1.0:
        return restored
    lab_r = cv2.cvtColor(np.clip(restored, 0, 1).astype(np.float32), cv2.COLOR_RGB2Lab)
    lab_o = cv2.cvtColor(np.clip(original, 0, 1).astype(np.float32), cv2.COLOR_RGB2Lab)
    out = np.empty_like(lab_r)
    for c in range(3):
        mean_r = (lab_r[..., c] * weights).sum() / total
        mean_o = (lab_o[..., c] * weights).sum() / total
        std_r = math.sqrt(((lab_r[..., c] - mean_r) ** 2 * weights).sum() / total)
        std_o = math.sqrt(((lab_o[..., c] - mean_o) ** 2 * weights).sum() / total)
        gain = float(np.clip(std_o / std_r, 0.5, 2.0)) if std_r > 1e-3 else 1.0
        out[..., c] = (lab_r[..., c] - mean_r) * gain + mean_o
    return np.clip(cv2.cvtColor(out, cv2.COLOR_Lab2RGB), 0, 1)


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


def warp_back(crop: np.ndarray, affine: np.ndarray, region: tuple[int, int, int, int],
              interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Inverse-warp ``crop`` (HxW or HxWxC) into the frame ``region`` only."""
    x0, y0, x1, y1 = region
    inverse = invert_affine(affine)
    inverse[:, 2] -= (x0, y0)
    return cv2.warpAffine(crop, inverse, (x1 - x0, y1 - y0), flags=interpolation,
                          borderMode=cv2.BORDER_REPLICATE)


def laplacian_blend(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray,
                    levels: int) -> np.ndarray:
    """Multi-band blend: each frequency band mixed with a mask blurred to that band's scale."""
    if levels <= 1:
        return background + (foreground - background) * mask[..., None]
    diff = foreground - background  # blending the difference keeps far-away pixels exact
    gaussians_d, gaussians_m = [diff], [mask]
    for _ in range(levels - 1):
        gaussians_d.append(cv2.pyrDown(gaussians_d[-1]))
        gaussians_m.append(cv2.pyrDown(gaussians_m[-1]))
    blended = gaussians_d[-1] * gaussians_m[-1][..., None]
    for level in range(levels - 2, -1, -1):
        size = gaussians_d[level].shape[1::-1]
        band = gaussians_d[level] - cv2.pyrUp(gaussians_d[level + 1], dstsize=size)
        blended = cv2.pyrUp(blended, dstsize=size) + band * gaussians_m[level][..., None]
    return background + blended


def paste_faces(frame: np.ndarray, crops: list[np.ndarray], affines: list[np.ndarray],
                masks: list[np.ndarray], blend: str = "multiband",
                originals: list[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Composite ``crops`` (each with its image->crop ``affine`` and crop-space ``mask``) into a
    float32 RGB ``frame``; returns (image, coverage mask). Work stays in the faces' region.

    Where a face has its unrestored crop in ``originals``, only the change the restorer made
    (restored - original) is warped back onto the frame: what the restorer left alone keeps the
    frame's own pixels instead of a twice-resampled copy of them.
    """
    originals = originals or [None] * len(crops)
    if blend not in BLENDS:
        raise ValueError(f"Unknown blend '{blend}'; choose one of {', '.join(BLENDS)}.")
    height, width = frame.shape[:2]
    out = frame.astype(np.float32, copy=True)
    coverage_full = np.zeros((height, width), np.float32)
    placed = [(crop, affine, mask, original, region)
              for crop, affine, mask, original in zip(crops, affines, masks, originals)
              if (region := footprint(affine, crop.shape[0], height, width)) is not None]
    if not placed:
        return out, coverage_full
    # The region of all faces, with a margin for the pyramid's widest band.
    margin = 2 ** MAX_LEVELS if blend == "multiband" else 0
    bx0 = max(0, min(r[0] for *_, r in placed) - margin)
    by0 = max(0, min(r[1] for *_, r in placed) - margin)
    bx1 = min(width, max(r[2] for *_, r in placed) + margin)
    by1 = min(height, max(r[3] for *_, r in placed) + margin)
    background = out[by0:by1, bx0:bx1]
    colour_sum = np.zeros_like(background)
    weight_sum = np.zeros(background.shape[:2], np.float32)
    coverage = coverage_full[by0:by1, bx0:bx1]  # a view: 1 - prod(1 - m), the union of soft masks
    for crop, affine, mask, original, region in placed:
        soft = warp_back(np.ascontiguousarray(mask, np.float32), affine, region)
        x0, y0, x1, y1 = region[0] - bx0, region[1] - by0, region[2] - bx0, region[3] - by0
        if original is None:
            face = warp_back(np.ascontiguousarray(crop, np.float32), affine, region, cv2.INTER_LANCZOS4)
        else:
            change = np.ascontiguousarray(crop - original, np.float32)
            face = background[y0:y1, x0:x1] + warp_back(change, affine, region, cv2.INTER_LANCZOS4)
        face = np.clip(face, 0, 1)
        colour_sum[y0:y1, x0:x1] += face * soft[..., None]
        weight_sum[y0:y1, x0:x1] += soft
        coverage[y0:y1, x0:x1] = 1.0 - (1.0 - coverage[y0:y1, x0:x1]) * (1.0 - soft)
    # Faces averaged by weight, fading to the background where the weights fade (continuous).
    fill = np.clip(1.0 - weight_sum, 0.0, 1.0)
    faces = (colour_sum + background * fill[..., None]) / (weight_sum + fill)[..., None]
    levels = 1
    if blend == "multiband":
        levels = max(1, min(MAX_LEVELS, int(math.log2(max(min(background.shape[:2]), 1))) - 2))
    out[by0:by1, bx0:bx1] = laplacian_blend(background, faces, coverage, levels)
    return out, coverage_full
