"""Video: stable face ids across frames, and landmark smoothing against flicker.

Detected landmarks jitter by a pixel or two from frame to frame; the aligned crop, and so the
restored face, jitters with them. A One-Euro filter (Casiez et al., CHI 2012) per tracked face
removes that jitter while following real motion with little lag: its cut-off frequency rises
with the speed of the signal.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .faces import Face

MIN_IOU = 0.3  # boxes overlapping less than this in consecutive frames are different faces


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assign_tracks(frames: list[list[Face]]) -> list[list[int]]:
    """Track id of every face: greedy best-IoU matching to the previous frame's faces."""
    ids: list[list[int]] = []
    previous: list[tuple[Face, int]] = []
    next_id = 0
    for faces in frames:
        pairs = sorted(((iou(f.box, p.box), i, j) for i, f in enumerate(faces)
                        for j, (p, _) in enumerate(previous)), reverse=True)
        frame_ids = [-1] * len(faces)
        used = set()
        for overlap, i, j in pairs:
            if overlap < MIN_IOU:
                break
            if frame_ids[i] == -1 and j not in used:
                frame_ids[i] = previous[j][1]
                used.add(j)
        for i in range(len(faces)):
            if frame_ids[i] == -1:
                frame_ids[i] = next_id
                next_id += 1
        ids.append(frame_ids)
        previous = list(zip(faces, frame_ids))
    return ids


class OneEuroFilter:
    """One-Euro low-pass for a set of points sampled once per frame.

    The points move together (a face), so one speed, that of their centroid, sets the cut-off
    for all of them: averaging over the points keeps detector jitter from passing as motion.
    """

    def __init__(self, min_cutoff: float, beta: float, d_cutoff: float = 0.05):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.value: np.ndarray | None = None
        self.velocity = np.zeros(2)

    @staticmethod
    def _alpha(cutoff: float) -> float:
        return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, np.float64)
        if self.value is None:
            self.value = points.copy()
            return points.copy()
        a_d = self._alpha(self.d_cutoff)
        step = (points - self.value).reshape(-1, 2).mean(0)
        self.velocity = a_d * step + (1 - a_d) * self.velocity
        a = self._alpha(self.min_cutoff + self.beta * float(np.linalg.norm(self.velocity)))
        self.value = a * points + (1 - a) * self.value
        return self.value.copy()


def filter_settings(strength: float, face_size: float) -> tuple[float, float]:
    """(min_cutoff, beta) for a smoothing strength in 0..1. Speed is measured in face sizes per
    frame, so one setting suits small and large faces alike."""
    min_cutoff = 0.01 ** strength  # cycles per frame: 1 (no smoothing) down to 0.01
    beta = 8.0 * strength / max(face_size, 1.0)
    return min_cutoff, beta


def track(frames: list[list[Face]]) -> list[list[Face]]:
    """The faces with their ``track_id`` set."""
    return [[replace(face, track_id=i) for face, i in zip(faces, ids)]
            for faces, ids in zip(frames, assign_tracks(frames))]


def smooth_landmarks(frames: list[list[Face]], strength: float) -> list[list[Face]]:
    """One-Euro-filter the landmarks of tracked faces; ``strength`` 0 leaves them as they are."""
    if strength <= 0:
        return frames
    filters: dict[int, OneEuroFilter] = {}
    out = []
    for faces in frames:
        smoothed = []
        for face in faces:
            if face.track_id not in filters:
                size = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
                filters[face.track_id] = OneEuroFilter(*filter_settings(strength, size))
            smoothed.append(replace(face, landmarks=filters[face.track_id](face.landmarks)))
        out.append(smoothed)
    return out
