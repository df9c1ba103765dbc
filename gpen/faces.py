"""Face detection (facexlib RetinaFace, facenet-pytorch MTCNN) and the FACES value.

Detectors return boxes, scores and five landmarks (left eye, right eye, nose, left and right
mouth corner, in image coordinates). Weights are only ever read from disk: a missing RetinaFace
file is a clear error naming the folder, file and official URL, never a download.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from .options import DETECTORS, DetectOptions

RETINAFACE_FILES = {
    "retinaface_resnet50": ("resnet50", "detection_Resnet50_Final.pth"),
    "retinaface_mobile0.25": ("mobile0.25", "detection_mobilenet0.25_Final.pth"),
}
RETINAFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
DETECT_MAX_SIDE = 1500  # larger frames are shrunk for detection only, as the authors do
DETECT_SHRINK_TO = 1000
DETECT_MIN_SIDE = 20  # MTCNN finds nothing smaller (its minimum face size), and crashes on it
NEAR_FACE_SIZE = 112  # face size for re-detection in a window around a tracked face
NEAR_MIN_FACE = 0.5  # ... where faces under half the tracked face's size are not looked for
# oneDNN (the CPU convolutions) builds and keeps a primitive for every input shape it meets, up to
# 1,024 of them: re-detection windows of ever-new sizes and MTCNN's ever-new numbers of candidate
# faces grew a server by ~150 MB over a long video. So a resized window (at most twice
# NEAR_FACE_SIZE, plus rounding) reaches the detector at the top left of a black square of
# NEAR_CANVAS pixels, its smallest face size is rounded down to a multiple of NEAR_FACE_STEP, and
# MTCNN's candidate batches are padded to powers of two: a bounded set of shapes.
NEAR_CANVAS = 2 * NEAR_FACE_SIZE + 8
NEAR_FACE_STEP = 8
DETECT_BATCH = 8  # consecutive frames whose whole-frame searches may run as one batch
# ... as long as they hold at most this many pixels (as searched): MTCNN's working memory grows
# by about 75 MB per 720p frame of a batch (462 MB for 8), and a batch pays on a GPU only for
# frames too small to keep it busy.
DETECT_BATCH_PIXELS = 1_000_000


class DetectorError(ValueError):
    """A detector that cannot run; the message says which file, folder and URL."""


@dataclass(frozen=True)
class Face:
    """One detected face; ``affine`` (2x3, image -> aligned crop) is set once it is aligned."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    affine: np.ndarray | None = None
    track_id: int = -1  # the same person across the frames of a batch

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class FaceSet:
    """The FACES value: per frame of one IMAGE batch, the faces selected in it."""

    image_size: tuple[int, int]  # (height, width) of the frames they were found in
    frames: list[list[Face]]
    crop_size: int | None = None  # set once faces are aligned for a model
    detector: str = ""
    # Per frame, the faces a whole-frame search found before selection (size, indices,
    # max_faces), or None where the faces were followed from earlier frames: for the notices.
    found: tuple[int | None, ...] = ()
    # The unrestored aligned crops (IMAGE batch, crop order), kept so Paste Back can paste only
    # the restorer's change without cutting them again.
    originals: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def count(self) -> int:
        return sum(len(faces) for faces in self.frames)

    def flat(self) -> list[tuple[int, Face]]:
        """(frame index, face) in crop order: frame by frame, faces in selection order."""
        return [(i, face) for i, faces in enumerate(self.frames) for face in faces]

    def by_frame(self) -> dict[int, list[Face]]:
        """The faces of each frame that has any, in crop order."""
        return {i: faces for i, faces in enumerate(self.frames) if faces}

    def with_alignment(self, affines: Sequence[np.ndarray], crop_size: int,
                       originals: torch.Tensor | None = None) -> FaceSet:
        it = iter(affines)
        frames = [[replace(face, affine=next(it)) for face in faces] for faces in self.frames]
        return replace(self, frames=frames, crop_size=crop_size, originals=originals)


class Detector:
    """A loaded face detector: ``detect(rgb_uint8)`` -> faces above a low floor score.

    ``net`` is its torch module; it runs wherever that module's weights and ``device`` attribute
    say (both kept in step by whoever moves it, e.g. ComfyUI's ModelPatcher). ``min_face``
    (pixels) is a hint that smaller faces need not be found, which a detector may use to do
    less work.
    """

    net: torch.nn.Module

    def detect(self, rgb: np.ndarray, threshold: float, min_face: float = 0.0) -> list[Face]:
        raise NotImplementedError

    def detect_batch(self, rgbs: Sequence[np.ndarray], threshold: float, min_face: float = 0.0) -> list[list[Face]]:
        """The faces of several pictures of one size; a detector that can run them in a single
        pass (far fewer, larger kernel calls) does so here."""
        return [self.detect(rgb, threshold, min_face) for rgb in rgbs]


def find_weights(filename: str, url: str, model_dirs: Sequence[str | Path], what: str,
                 instead: str) -> Path:
    """The facexlib weights file ``filename`` in ``model_dirs``, or an error saying where to put it."""
    for folder in model_dirs:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in model_dirs) or "models/facedetection"
    raise DetectorError(f"{what} {filename} not found in {where} (never downloaded, or moved or deleted "
                        f"since). Download {url}{filename} into that folder, or put it back there, or "
                        f"{instead}, which needs no download.")


def load_facexlib_net(build: Callable[[], torch.nn.Module], weights: Path, url: str, what: str,
                      network: str) -> torch.nn.Module:
    """Read ``weights`` (weights-only), then build the network and load them strictly; errors
    name the file, folder and URL. The file is read first, so a bad file costs no network build."""
    from .loader import ModelLoadError, canonicalize, read_state_dict

    fix = f"Download {url}{weights.name} into {weights.parent} again."
    try:
        state_dict = canonicalize(read_state_dict(weights, fix), weights.name)
    except ModelLoadError as e:
        raise DetectorError(f"{what} {weights} are unusable: {e}") from None
    net = build()
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise DetectorError(f"{weights.name} in {weights.parent} is not {network} "
                            f"({str(e).splitlines()[0]}). {fix}") from None
    return net.eval()


class RetinaFaceDetector(Detector):
    def __init__(self, network: str, weights: Path, device: torch.device):
        from facexlib.detection.retinaface import RetinaFace

        self.net = load_facexlib_net(lambda: RetinaFace(network_name=network, half=False, device=device),
                                     weights, RETINAFACE_URL, "Face detector weights",
                                     f"the RetinaFace {network} detector")
        # facexlib keeps its input mean as a plain tensor on the build device; as a buffer it
        # moves with the weights when a memory manager moves the net (whose ``device``
        # attribute facexlib reads for everything else).
        mean = self.net.mean_tensor
        del self.net.mean_tensor
        self.net.register_buffer("mean_tensor", mean, persistent=False)

    def detect(self, rgb: np.ndarray, threshold: float, min_face: float = 0.0) -> list[Face]:
        with torch.no_grad():  # one pass at the input's scale: ``min_face`` saves nothing here
            rows = self.net.detect_faces(np.ascontiguousarray(rgb[..., ::-1]), conf_threshold=threshold)
        return [Face(box=tuple(float(v) for v in r[:4]), score=float(r[4]),
                     landmarks=np.asarray(r[5:15], np.float64).reshape(5, 2)) for r in rows]


class MTCNNDetector(Detector):
    """MTCNN with the weights bundled in facenet-pytorch: works with zero downloads."""

    def __init__(self, device: torch.device):
        from facenet_pytorch import MTCNN

        # Channels-last weights: its pictures arrive pixel-interleaved, and its max-pooling and
        # small convolutions run 1.3x faster per 1080p video frame on a CPU that way (the same
        # faces; boxes where several candidates score alike may settle a few pixels apart).
        self.net = MTCNN(keep_all=True, device=device, post_process=False).to(memory_format=torch.channels_last)

    def detect(self, rgb: np.ndarray, threshold: float, min_face: float = 0.0) -> list[Face]:
        return self.detect_batch([rgb], threshold, min_face)[0]

    def detect_batch(self, rgbs: Sequence[np.ndarray], threshold: float, min_face: float = 0.0) -> list[list[Face]]:
        """MTCNN.detect's own cascade over a batch of pictures of one size (each pyramid level
        of all of them in one pass), its image pyramid starting at ``min_face``: each level
        finds faces from its 12-pixel window up, so levels for faces smaller than asked for are
        skipped (re-detection near a known face needs few)."""
        from facenet_pytorch.models.utils.detect_face import detect_face

        net = self.net
        # The pyramid has a level only while its picture is at least the smallest face size.
        smallest = min(max(net.min_face_size, min_face), min(rgbs[0].shape[:2]))
        with torch.no_grad():
            all_boxes, all_points = detect_face(np.stack(rgbs), smallest, net.pnet, PowerOfTwoBatches(net.rnet),
                                                PowerOfTwoBatches(net.onet), net.thresholds, net.factor, net.device)
        found = []
        for boxes, points in zip(all_boxes, all_points):
            faces = [Face(box=tuple(float(v) for v in box[:4]), score=float(box[4]),
                          landmarks=np.asarray(pts, np.float64).reshape(5, 2))
                     for box, pts in zip(np.asarray(boxes).reshape(-1, 5), np.asarray(points).reshape(-1, 5, 2))
                     if box[4] >= threshold]
            found.append(sorted(faces, key=lambda face: -face.area))  # largest first, as MTCNN.detect
        return found


class PowerOfTwoBatches:
    """A per-face network (MTCNN's refinement stages) run on its batch padded with blank faces to
    the next power of two, the padding's outputs dropped: the same results, and a few batch shapes
    for oneDNN to keep a primitive of instead of one per number of candidates."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = batch.shape[0]
        padded = 1 << (count - 1).bit_length() if count else 0
        if padded != count:
            batch = torch.cat((batch, batch.new_zeros((padded - count, *batch.shape[1:]))))
        return tuple(out[:count] for out in self.net(batch))


def retinaface_path(detector: str, model_dirs: Sequence[str | Path]) -> Path:
    """The weights file for a RetinaFace choice, or a clear error saying where to put it."""
    return find_weights(RETINAFACE_FILES[detector][1], RETINAFACE_URL, model_dirs,
                        "Face detector weights", "choose the 'mtcnn' detector")


@functools.lru_cache(maxsize=4)
def load_detector(name: str, model_dirs: tuple[str, ...] = (), device: str = "cpu") -> Detector:
    """Build (once per process) the detector ``name``; RetinaFace weights come from ``model_dirs``."""
    if name not in DETECTORS:
        raise DetectorError(f"Unknown detector '{name}'; choose one of {', '.join(DETECTORS)}.")
    try:
        if name == "mtcnn":
            return MTCNNDetector(torch.device(device))
        network, _ = RETINAFACE_FILES[name]
        return RetinaFaceDetector(network, retinaface_path(name, model_dirs), torch.device(device))
    except ImportError as e:
        package = "facenet-pytorch==2.6.0" if name == "mtcnn" else "facexlib==0.3.0"
        raise DetectorError(f"The '{name}' detector needs {package}, which is not importable "
                            f"({e}). Run the pack's install.py, or: pip install --no-deps {package}"
                            ) from None


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _detect_scaled(detector: Detector, rgbs: list[np.ndarray], threshold: float, size: tuple[int, int],
                   origin: tuple[float, float] = (0.0, 0.0), min_face: float = 0.0,
                   canvas: int = 0) -> list[list[Face]]:
    """Detect on each of ``rgbs`` (one size) resized to ``size`` (width, height), in one batch;
    faces in the coordinates of the image they were cut from at ``origin``; ``min_face`` in
    pixels of the resized images. With ``canvas``, each resized picture is detected at the top
    left of a black square of that side instead, so pictures of any size reach the detector at
    one size."""
    height, width = rgbs[0].shape[:2]
    if size != (width, height):
        rgbs = [cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) for rgb in rgbs]
    if min(size) < DETECT_MIN_SIDE:
        return [[] for _ in rgbs]
    if canvas:
        rgbs = [cv2.copyMakeBorder(rgb, 0, canvas - size[1], 0, canvas - size[0], cv2.BORDER_CONSTANT, value=0)
                for rgb in rgbs]
    scale = np.array([size[0] / width, size[1] / height])
    shift = np.asarray(origin)
    found = detector.detect_batch([np.ascontiguousarray(rgb) for rgb in rgbs], threshold, min_face)
    return [[replace(f, box=tuple((np.reshape(f.box, (2, 2)) / scale + shift).ravel().tolist()),
                     landmarks=f.landmarks / scale + shift) for f in faces]
            for faces in found]


def detect_frames(detector: Detector, rgbs: Sequence[np.ndarray], threshold: float) -> list[list[Face]]:
    """Detect on uint8 RGB frames, those of one size in one batch, shrinking very large frames
    for detection only."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, rgb in enumerate(rgbs):
        by_shape.setdefault(rgb.shape, []).append(index)
    found: list[list[Face]] = [[] for _ in rgbs]
    for (height, width, *_), indices in by_shape.items():
        scale = DETECT_SHRINK_TO / max(height, width) if max(height, width) > DETECT_MAX_SIDE else 1.0
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        per_batch = max(1, DETECT_BATCH_PIXELS // (size[0] * size[1]))
        for start in range(0, len(indices), per_batch):
            batch = indices[start:start + per_batch]
            for index, faces in zip(batch, _detect_scaled(detector, [rgbs[i] for i in batch], threshold, size)):
                found[index] = faces
    return found


def detect_near(detector: Detector, rgb: np.ndarray, box: tuple[float, ...], threshold: float) -> Face | None:
    """Find again the face that was at ``box``: detect only in a window of twice its size
    around it, scaled so the face is about ``NEAR_FACE_SIZE`` pixels (the detectors' landmark
    stage sees a face at 48 px or less anyway), and keep the best overlap. A fraction of a
    full-frame detection's cost for a video's next frame."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = max(0, int(cx - side)), max(0, int(cy - side))
    right, bottom = min(width, int(cx + side) + 1), min(height, int(cy + side) + 1)
    if right - left < DETECT_MIN_SIDE or bottom - top < DETECT_MIN_SIDE:
        return None
    scale = min(1.0, NEAR_FACE_SIZE / max(side, 1.0))
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    min_face = NEAR_FACE_STEP * math.floor(NEAR_MIN_FACE * side * scale / NEAR_FACE_STEP)
    [found] = _detect_scaled(detector, [rgb[top:bottom, left:right]], threshold, size, (left, top), min_face,
                             canvas=NEAR_CANVAS)
    best = max(found, key=lambda f: iou(f.box, box), default=None)
    return best if best is not None and iou(best.box, box) > 0 else None


def large_enough(faces: list[Face], min_size: float) -> list[Face]:
    """The faces whose box is at least ``min_size`` pixels on its shorter side."""
    return [f for f in faces if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_size]


def select_faces(faces: list[Face], options: DetectOptions) -> list[Face]:
    """Filter by size, sort, then keep chosen indices and/or the first ``max_faces``."""
    faces = large_enough(faces, options.min_size)
    keys: dict[str, Callable[[Face], float]] = {
        "largest first": lambda f: -f.area,
        "left to right": lambda f: f.box[0],
        "top to bottom": lambda f: f.box[1],
        "confidence": lambda f: -f.score,
    }
    faces = sorted(faces, key=keys[options.order])
    if options.indices:
        faces = [faces[i] for i in options.indices if 0 <= i < len(faces)]
    if options.max_faces > 0:
        faces = faces[:options.max_faces]
    return faces
