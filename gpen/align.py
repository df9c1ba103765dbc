"""Alignment to GPEN's five-point template, and the way back.

The template is the authors' (see shared reference ``pipeline.md``), scaled exactly with the
model size, so a 1024 or 2048 model gets its face cut at full resolution from the source frame
rather than upscaled from a 512 crop.
"""

from __future__ import annotations

import cv2
import numpy as np

TEMPLATE_512 = np.array([
    [202.04, 242.88],  # left eye
    [309.43, 242.29],  # right eye
    [256.08, 303.96],  # nose tip
    [211.96, 366.83],  # left mouth corner
    [300.89, 366.34],  # right mouth corner
])


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


def invert_affine(affine: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(affine, np.float64))


def affine_scale(affine: np.ndarray) -> float:
    """Uniform scale of a similarity transform (crop pixels per image pixel)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(affine)[:, :2]))))


def warp_to_crop(frame: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` crop that ``affine`` (image -> crop) cuts from a float32 RGB frame.

    When the crop is smaller than the face in the frame, the frame is low-passed first so the
    warp does not alias; borders are mirrored so faces at the frame edge still look like faces
    to the model (paste-back only writes inside the frame).
    """
    scale = affine_scale(affine)
    source = frame
    if scale < 0.5:
        sigma = 0.5 / scale
        source = cv2.GaussianBlur(frame, (0, 0), sigmaX=sigma, sigmaY=sigma)
    crop = cv2.warpAffine(source, affine, (size, size), flags=cv2.INTER_LANCZOS4,
                          borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(crop, 0.0, 1.0, out=crop)  # Lanczos rings past 0..1 at hard edges


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the face at ``size`` from a float32 RGB frame; returns (crop, image->crop affine)."""
    affine = similarity_transform(landmarks, template(size))
    return warp_to_crop(frame, affine, size), affine
