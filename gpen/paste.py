"""Paste restored faces back: face-shaped masks, colour matching, seam-free composite.

All of it is torch ops on the device the frame is on. Masks are built on the aligned crop (so
the feather is relative to the face, at any model size) and warped back with the face. When a
crop is finer than the frame, the crop, the original it was cut from and the mask are first
reduced (anti-aliased) to about the face's footprint in the frame: colour matching and the warp
back then work at the resolution the frame can show, whatever the model size. All faces of a
frame are composited in one pass: overlapping faces are averaged by mask weight instead of one
cutting an edge into another, and the final blend is multi-band (Laplacian pyramid), so low
frequencies meet over a wide band and fine detail over a narrow one: no visible rim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .align import (Region, affine_scale, bounding_region, invert_affine, preimage, resize, scaled, shifted,
                    warp)

# Face ellipse on the 512 template: centre between the eyes and mouth, from brow to chin.
MASK_CENTER_512 = (256.0, 290.0)
MASK_AXES_512 = (172.0, 212.0)
MAX_LEVELS = 5
SUPPORT_PAD = 2  # crop pixels around the mask's support that a bicubic warp back still reads
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def face_mask(size: int, feather: float = 0.15, device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft elliptical face mask ``[size, size]`` on a crop, 1 inside, 0 at the ellipse edge.

    ``feather`` is the width of the fall-off as a fraction of the ellipse radius. Defined on the
    template, so the mask of a reduced crop is the reduced mask.
    """
    scale = size / 512.0
    cx, cy = (c * scale for c in MASK_CENTER_512)
    ax, ay = (a * scale for a in MASK_AXES_512)
    coords = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    radius = torch.sqrt(((coords[None, :] - cx) / ax) ** 2 + ((coords[:, None] - cy) / ay) ** 2)
    ramp = ((1.0 - radius) / max(float(feather), 1e-3)).clamp_(0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no kink at the ends


def match_colour(restored: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give ``restored`` ``[3,S,S]`` the luma/chroma mean and spread of ``original`` inside
    ``mask``.

    Restoration models drift skin tone; matching the first and second moments of Y, Cb and Cr
    undoes the drift without touching the restored detail's structure. YCbCr is a linear
    transform of RGB, so the whole correction is one 3x3 affine map of the pixels, computed from
    the two crops' weighted colour covariances: cheap on any device at any crop size.
    """
    weights = mask.reshape(-1).double()
    total = weights.sum()
    if total < 1.0:
        return restored

    def moments(crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = crop.reshape(3, -1).double()
        mean = pixels @ weights / total
        centred = pixels - mean[:, None]
        covariance = (centred * weights) @ centred.T / total
        return mean, covariance

    mean_r, cov_r = moments(restored)
    mean_o, cov_o = moments(original)
    to_ycc = torch.tensor(RGB_TO_YCBCR, dtype=torch.float64, device=restored.device)
    std_r = torch.einsum("ci,ij,cj->c", to_ycc, cov_r, to_ycc).clamp_min(0).sqrt()
    std_o = torch.einsum("ci,ij,cj->c", to_ycc, cov_o, to_ycc).clamp_min(0).sqrt()
    gain = torch.where(std_r > 1e-3, (std_o / std_r.clamp_min(1e-3)).clamp(0.5, 2.0), torch.ones_like(std_r))
    # In YCbCr: y' = gain * (y - mean_r) + mean_o; back in RGB that is one affine map.
    matrix = torch.linalg.inv(to_ycc) @ torch.diag(gain) @ to_ycc
    offset = mean_o - matrix @ mean_r
    out = matrix.to(restored.dtype) @ restored.reshape(3, -1) + offset.to(restored.dtype)[:, None]
    return out.reshape(restored.shape).clamp_(0.0, 1.0)


def _down(image: torch.Tensor) -> torch.Tensor:
    """Burt-Adelson reduction of ``[C,H,W]``: 5-tap binomial blur evaluated only at the kept
    (even) pixels, borders replicated; ``ceil(H/2) x ceil(W/2)``, as OpenCV's pyrDown."""
    x = F.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
    x = x[:, :, 0:-4:2] + x[:, :, 4::2] + 4.0 * (x[:, :, 1:-3:2] + x[:, :, 3:-1:2]) + 6.0 * x[:, :, 2:-2:2]
    x = x[:, 0:-4:2] + x[:, 4::2] + 4.0 * (x[:, 1:-3:2] + x[:, 3:-1:2]) + 6.0 * x[:, 2:-2:2]
    return x / 256.0


def _up(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Back to ``height`` x ``width`` (bilinear). Any expansion works for the blend, as long as
    decomposition and reconstruction use the same one: a mask of 1 returns the foreground."""
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def laplacian_blend(difference: torch.Tensor, mask: torch.Tensor, levels: int) -> torch.Tensor:
    """Multi-band blend of a ``difference`` ``[C,H,W]`` (foreground - background) under ``mask``:
    each frequency band weighted by the mask blurred to that band's scale; the background plus
    the result is the blend. Blending the difference keeps far-away pixels exact."""
    if levels <= 1:
        return difference * mask
    pyramid = [torch.cat([difference, mask[None]])]  # difference and mask are reduced together
    for _ in range(levels - 1):
        pyramid.append(_down(pyramid[-1]))
    blended = pyramid[-1][:3] * pyramid[-1][3:]
    for level in range(levels - 2, -1, -1):
        h, w = pyramid[level].shape[1:]
        band = pyramid[level][:3] - _up(pyramid[level + 1][:3], h, w)
        blended = band.mul_(pyramid[level][3:]).add_(_up(blended, h, w))
    return blended


@dataclass
class PastedFace:
    """One face ready to composite: its colour and weight over its region of the frame."""

    region: Region
    colour: torch.Tensor  # [3, h, w]
    weight: torch.Tensor  # [h, w]


def place_face(background: torch.Tensor, restored: torch.Tensor, original: torch.Tensor,
               affine: np.ndarray, colour: bool, feather: float, parsed: torch.Tensor | None = None,
               change_only: bool = True) -> PastedFace | None:
    """Warp one restored crop ``[3,S,S]`` into ``background`` ``[3,H,W]`` through a soft face
    mask: the face ellipse with ``feather``, or a face-parsing mask ``parsed`` (any size, resized
    to the crop's). ``affine`` maps background pixels to crop pixels.

    ``original`` is the unrestored crop (same size) it was cut from. A crop finer than the
    background is first reduced to its footprint's resolution, and so is ``original``. With
    ``change_only`` (for a crop at least as fine as the frame it was cut from) only the change
    the restorer made is warped back, so what it left alone keeps the background's own pixels
    (exact for an identity restorer); otherwise (a face larger than the model) the restored face
    replaces the original, so unrestored fine detail cannot leak through. Returns None when the
    face is off-frame.
    """
    height, width = background.shape[1:]
    size = restored.shape[-1]
    scale = affine_scale(affine)
    if scale > 1.0:  # reduce to the footprint: about one crop pixel per background pixel
        small = max(1, round(size / scale))
        restored, original = resize(restored, small, small), resize(original, small, small)
        affine = scaled(affine, small / size)
        size = small
    if parsed is None:
        mask = face_mask(size, feather, background.device)
    else:
        mask = resize(parsed[None], size, size)[0].clamp_(0.0, 1.0)
    if colour:
        restored = match_colour(restored, original, mask)
    # Work only where the mask is not zero (the face ellipse covers about half of its crop):
    # elsewhere the face's weight is zero and the frame keeps its pixels anyway.
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    if rows.numel() == 0:
        return None
    (top, bottom), (left, right) = rows[[0, -1]].tolist(), cols[[0, -1]].tolist()
    support = preimage(affine, right + 1 + SUPPORT_PAD, bottom + 1 + SUPPORT_PAD, left - SUPPORT_PAD,
                       top - SUPPORT_PAD)
    region = bounding_region(support, width, height, margin=1)
    if region is None:
        return None
    x0, y0, x1, y1 = region
    back = shifted(invert_affine(affine), -x0, -y0)  # crop pixel -> region pixel
    w, h = x1 - x0, y1 - y0
    weight = warp(mask[None], back, w, h, "bilinear", "zeros")[0].clamp_(0.0, 1.0)
    if change_only:
        change = warp(restored - original, back, w, h, "bicubic", "zeros")
        face = background[:, y0:y1, x0:x1] + change
    else:
        face = warp(restored, back, w, h, "bicubic", "border")
    return PastedFace(region, face.clamp_(0.0, 1.0), weight)


def composite(background: torch.Tensor, faces: list[PastedFace], blend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite placed faces into ``background`` ``[3,H,W]``, in place; returns it and the
    coverage mask ``[H,W]``. Work stays in the faces' regions: faces whose blends could touch
    are composited together (overlaps averaged by weight), faces far apart each on their own."""
    coverage = background.new_zeros(background.shape[1:])
    margin = 2 ** MAX_LEVELS if blend == "multiband" else 0  # room for the pyramid's widest band
    for group in _groups([face.region for face in faces], margin):
        _composite_group(background, coverage, [faces[i] for i in group], blend, margin)
    return background, coverage


def _groups(regions: list[Region], margin: int) -> list[list[int]]:
    """Indices of ``regions`` in groups whose boxes, grown by ``margin``, overlap (transitively)."""
    groups: list[tuple[list[int], Region]] = []
    for index, (x0, y0, x1, y1) in enumerate(regions):
        members, box = [index], (x0 - margin, y0 - margin, x1 + margin, y1 + margin)
        for other in [g for g in groups if g[1][0] < box[2] and box[0] < g[1][2]
                      and g[1][1] < box[3] and box[1] < g[1][3]]:
            groups.remove(other)
            members += other[0]
            box = (min(box[0], other[1][0]), min(box[1], other[1][1]), max(box[2], other[1][2]),
                   max(box[3], other[1][3]))
        groups.append((members, box))
    return [sorted(members) for members, _ in groups]


def _composite_group(background: torch.Tensor, coverage_full: torch.Tensor, faces: list[PastedFace],
                     blend: str, margin: int) -> None:
    height, width = background.shape[1:]
    bx0 = max(0, min(f.region[0] for f in faces) - margin)
    by0 = max(0, min(f.region[1] for f in faces) - margin)
    bx1 = min(width, max(f.region[2] for f in faces) + margin)
    by1 = min(height, max(f.region[3] for f in faces) + margin)
    base = background[:, by0:by1, bx0:bx1]
    # The faces averaged by weight, fading to the background where the weights fade, as a change
    # of the background: sum(w * (colour - base)) / max(sum(w), 1).
    change = torch.zeros_like(base)
    weight_sum = base.new_zeros(base.shape[1:]) if len(faces) > 1 else None
    coverage = coverage_full[by0:by1, bx0:bx1]  # a view: 1 - prod(1 - m), the union of soft masks
    for face in faces:
        x0, y0, x1, y1 = face.region[0] - bx0, face.region[1] - by0, face.region[2] - bx0, face.region[3] - by0
        change[:, y0:y1, x0:x1] += (face.colour - base[:, y0:y1, x0:x1]).mul_(face.weight)
        if weight_sum is not None:
            weight_sum[y0:y1, x0:x1] += face.weight
        coverage[y0:y1, x0:x1] = 1.0 - (1.0 - coverage[y0:y1, x0:x1]) * (1.0 - face.weight)
    if weight_sum is not None:  # one face's weight is at most 1 already
        change /= weight_sum.clamp_(min=1.0)
    levels = 1
    if blend == "multiband":
        levels = max(1, min(MAX_LEVELS, int(math.log2(max(min(base.shape[1:]), 1))) - 2))
    base += laplacian_blend(change, coverage, levels)
