"""Video: finding faces frame after frame, stable face ids, and landmark smoothing against flicker.

Detected landmarks jitter by a pixel or two from frame to frame; the aligned crop, and so the
restored face, jitters with them. A One-Euro filter (Casiez et al., CHI 2012) per tracked face
removes that jitter while following real motion with little lag: its cut-off frequency rises
with the speed of the signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .faces import Detector, Face, detect_frames, detect_near, iou, large_enough, select_faces
from .options import DetectOptions

MIN_IOU = 0.3  # boxes overlapping less than this in consecutive frames are different faces


class Tracker:
    """Stable face ids over a stream of frames: each frame's faces are matched greedily, best IoU
    first, to the previous frame's; unmatched faces get new ids. The state is carried from call
    to call, so a video processed in chunks is tracked as one."""

    def __init__(self) -> None:
        self.previous: list[tuple[Face, int]] = []
        self.next_id = 0

    def ids(self, faces: list[Face]) -> list[int]:
        pairs = sorted(((iou(f.box, p.box), i, j) for i, f in enumerate(faces)
                        for j, (p, _) in enumerate(self.previous)), reverse=True)
        frame_ids = [-1] * len(faces)
        used = set()
        for overlap, i, j in pairs:
            if overlap < MIN_IOU:
                break
            if frame_ids[i] == -1 and j not in used:
                frame_ids[i] = self.previous[j][1]
                used.add(j)
        for i in range(len(faces)):
            if frame_ids[i] == -1:
                frame_ids[i] = self.next_id
                self.next_id += 1
        self.previous = list(zip(faces, frame_ids))
        return frame_ids

    def __call__(self, faces: list[Face]) -> list[Face]:
        """The faces with their ``track_id`` set."""
        return [replace(face, track_id=i) for face, i in zip(faces, self.ids(faces))]


def assign_tracks(frames: list[list[Face]]) -> list[list[int]]:
    """Track id of every face of a sequence of frames."""
    tracker = Tracker()
    return [tracker.ids(faces) for faces in frames]


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


def settling_frames(strength: float, residual: float = 0.01) -> int:
    """Frames after which a Smoother started fresh agrees with one that has run all along, to
    ``residual`` of their first difference: the slowest decay of the One-Euro state (the value at
    the minimum cut-off, the speed estimate at ``d_cutoff``). A video cut into segments decodes
    this many frames before each segment to warm the smoother up."""
    if strength <= 0:
        return 0
    one_euro = OneEuroFilter(*filter_settings(strength, 1.0))
    keep = 1.0 - min(one_euro._alpha(one_euro.min_cutoff), one_euro._alpha(one_euro.d_cutoff))
    return math.ceil(math.log(residual) / math.log(keep))


class Smoother:
    """One-Euro filtering of each tracked face's landmarks, state carried from frame to frame;
    ``strength`` 0 leaves them as they are. Filters of faces that left are dropped."""

    def __init__(self, strength: float):
        self.strength = strength
        self.filters: dict[int, OneEuroFilter] = {}

    def __call__(self, faces: list[Face]) -> list[Face]:
        if self.strength <= 0:
            return faces
        self.filters = {f.track_id: self.filters[f.track_id] for f in faces if f.track_id in self.filters}
        smoothed = []
        for face in faces:
            if face.track_id not in self.filters:
                size = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
                self.filters[face.track_id] = OneEuroFilter(*filter_settings(self.strength, size))
            smoothed.append(replace(face, landmarks=self.filters[face.track_id](face.landmarks)))
        return smoothed


def track(frames: list[list[Face]]) -> list[list[Face]]:
    """The faces of a sequence of frames with their ``track_id`` set."""
    tracker = Tracker()
    return [tracker(faces) for faces in frames]


def smooth_landmarks(frames: list[list[Face]], strength: float) -> list[list[Face]]:
    """One-Euro-filter the landmarks of tracked faces over a sequence of frames."""
    smoother = Smoother(strength)
    return [smoother(faces) for faces in frames]


class FaceFinder:
    """The faces of a stream of frames, state carried from call to call: detection, selection,
    tracking and smoothing.

    Every ``options.redetect_every``-th frame is searched whole and its faces selected (size,
    order, indices, count); in between, only the selected faces are looked for again, each in a
    window around where it was (``detect_near``): far cheaper, and faces cannot swap places in
    the selection. New faces are picked up at the next whole-frame search.
    """

    def __init__(self, detector: Detector, options: DetectOptions):
        self.detector = detector
        self.options = options
        self.tracker = Tracker()
        self.smoother = Smoother(options.smoothing)
        self.frames_seen = 0
        # Per frame: faces the whole-frame search found (before selection), None if followed.
        self.found: list[int | None] = []

    def due(self, ahead: int = 0) -> bool:
        """Whether the frame ``ahead`` frames after the next one is searched whole."""
        return (self.frames_seen + ahead) % self.options.redetect_every == 0

    def __call__(self, rgb: np.ndarray, whole: list[Face] | None = None) -> list[Face]:
        """Faces of the next frame (uint8 HxWx3 RGB), with track ids and smoothed landmarks;
        ``whole``: its whole-frame search, when the caller has run it already (``frames``)."""
        threshold = self.options.threshold
        if self.due():
            found = whole if whole is not None else detect_frames(self.detector, [rgb], threshold)[0]
            self.found.append(len(large_enough(found, self.options.min_size)))
            faces = select_faces(found, self.options)
        else:
            near = (detect_near(self.detector, rgb, face.box, threshold) for face, _ in self.tracker.previous)
            faces = large_enough([f for f in near if f is not None], self.options.min_size)
            self.found.append(None)
        self.frames_seen += 1
        return self.smoother(self.tracker(faces))

    def frames(self, rgbs: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces of the next frames (one size), the whole-frame searches among them run as one
        batch where the detector allows it; the rest as ``__call__``, frame by frame."""
        due = [i for i in range(len(rgbs)) if self.due(i)]
        whole = dict(zip(due, detect_frames(self.detector, [rgbs[i] for i in due], self.options.threshold)))
        return [self(rgb, whole.get(i)) for i, rgb in enumerate(rgbs)]
