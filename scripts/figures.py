"""README pictures: what the pack does on a real photo, and the shipped workflows in the real UI.

    python scripts/figures.py    # after `bash scripts/test.sh` (the UI tests take the screenshots)

Writes docs/*.png. The photo figure is drawn by the pack itself (detection, alignment, mask).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpen import pipeline  # noqa: E402
from gpen.align import template  # noqa: E402
from gpen.faces import load_detector  # noqa: E402

DOCS = REPO / "docs"
SHOTS = REPO / "test-artifacts" / "ui"
COLOURS = [(255, 64, 64), (64, 255, 64), (64, 160, 255), (255, 255, 64), (255, 64, 255)]


def photo_figure() -> np.ndarray:
    """Detected box and landmarks | aligned 512 crop with the template | paste mask."""
    photo = skimage.data.astronaut()
    image = torch.from_numpy(photo.astype(np.float32) / 255)[None]
    faces = pipeline.detect(image, load_detector("mtcnn"))
    crops, aligned = pipeline.align(image, faces, 512)
    _, mask = pipeline.paste(image, crops, aligned)
    face = faces.frames[0][0]
    left = photo.copy()
    x0, y0, x1, y1 = (int(v) for v in face.box)
    cv2.rectangle(left, (x0, y0), (x1, y1), (255, 255, 255), 2)
    for (x, y), colour in zip(face.landmarks, COLOURS):
        cv2.circle(left, (int(x), int(y)), 4, colour, -1)
    middle = (crops[0].numpy() * 255).astype(np.uint8).copy()
    for (x, y), colour in zip(template(512), COLOURS):
        cv2.circle(middle, (int(x), int(y)), 6, colour, 2)
    right = np.repeat((mask[0].numpy() * 255).astype(np.uint8)[..., None], 3, axis=-1)
    gap = np.full((512, 12, 3), 255, np.uint8)
    return np.concatenate([left, gap, middle, gap, right], axis=1)


def crop_screenshot(path: Path) -> np.ndarray:
    """The graph part of a UI screenshot, at most 1600 px wide."""
    shot = cv2.imread(str(path))[..., ::-1]
    body = shot[90:-80, 60:]  # below the tab bar, right of the side bar, above the stats
    background = np.median(body.reshape(-1, 3), axis=0)
    busy = np.abs(body.astype(int) - background).max(-1) > 30
    busy[:, -260:] = False  # the minimap and run controls
    busy[:80] = False
    ys, xs = np.nonzero(busy)
    y0, y1 = max(ys.min() - 20, 0), min(ys.max() + 20, body.shape[0])
    x0, x1 = max(xs.min() - 20, 0), min(xs.max() + 20, body.shape[1])
    graph = body[y0:y1, x0:x1]
    if graph.shape[1] > 1600:
        graph = cv2.resize(graph, (1600, round(graph.shape[0] * 1600 / graph.shape[1])), interpolation=cv2.INTER_AREA)
    return graph


def save(name: str, rgb: np.ndarray) -> None:
    cv2.imwrite(str(DOCS / name), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"docs/{name}: {rgb.shape[1]}x{rgb.shape[0]}")


if __name__ == "__main__":
    DOCS.mkdir(exist_ok=True)
    save("astronaut_landmarks_crop_mask.png", photo_figure())
    for shot in sorted(SHOTS.glob("*.png")):
        if not shot.stem.endswith("_output"):
            save(f"workflow_{shot.stem}.png", crop_screenshot(shot))
