"""The sample video the shipped restore_video workflow opens on: one second of a slow zoom into
scikit-image's astronaut portrait (public domain), encoded with the pack's own video writer.

    python scripts/sample_video.py ComfyUI/input/astronaut.mp4
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpen.video import VideoInfo, VideoWriter  # noqa: E402

SIZE = 384  # small: a quick first run (24 faces at 512: seconds on a GPU, a few minutes on a CPU)
FRAMES = 24
FPS = 24


def zoom_frames(frames: int = FRAMES, size: int = SIZE):
    """The astronaut, zooming in by 20 % towards her face over ``frames`` frames."""
    photo = skimage.data.astronaut()
    face = np.float32([230, 150])  # stays where it is in the frame while the rest grows
    fit = size / photo.shape[0]
    for i in range(frames):
        scale = fit * (1.0 + 0.2 * i / max(frames - 1, 1))
        shift = face * (fit - scale)
        matrix = np.float32([[scale, 0, shift[0]], [0, scale, shift[1]]])
        yield cv2.warpAffine(photo, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def write_sample(path: Path, frames: int = FRAMES) -> Path:
    """Write the sample to ``path`` (left alone if it exists: never overwrite a user's file)."""
    if path.exists():
        return path
    with VideoWriter(path, VideoInfo.for_frames(SIZE, SIZE, FPS, frame_count=frames)) as writer:
        for rgb in zoom_frames(frames):
            writer.write(rgb)
    return path


if __name__ == "__main__":
    print(write_sample(Path(sys.argv[1])))
