"""README pictures and Templates-browser thumbnails: what the pack does on a real photo, and the
shipped workflows in the real UI after a run.

    python scripts/figures.py    # after tests/test_ui.py (it takes the screenshots)
    python scripts/figures.py NAME ...   # only these workflows' pictures (after their UI tests)

Writes docs/*.png and workflows/*.jpg. The photo figure is drawn by the pack itself (detection,
alignment, mask); the others are cropped from the UI test's screenshots.
"""

from __future__ import annotations

import json
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
THUMBNAIL = 512
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


def crop_screenshot(path: Path, width: int = 1600) -> np.ndarray:
    """The graph part of a UI screenshot (where the UI test found the nodes on the page), at
    most ``width`` px wide."""
    shot = cv2.imread(str(path))[..., ::-1]
    left, top, right, bottom = json.loads(path.with_suffix(".json").read_text())["graph"]
    margin = 12
    graph = shot[max(top - margin, 0):bottom + margin, max(left - margin, 0):right + margin]
    if graph.shape[1] > width:
        graph = cv2.resize(graph, (width, round(graph.shape[0] * width / graph.shape[1])), interpolation=cv2.INTER_AREA)
    return graph


def thumbnail(graph: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """A square picture of the graph for the Templates browser (which shows NAME.jpg beside
    NAME.json, square, scaled to fit), on the canvas colour."""
    scale = side / max(graph.shape[:2])
    fitted = cv2.resize(graph, (round(graph.shape[1] * scale), round(graph.shape[0] * scale)),
                        interpolation=cv2.INTER_AREA)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = graph[2, 2]  # the canvas around the nodes
    top, left = (side - fitted.shape[0]) // 2, (side - fitted.shape[1]) // 2
    square[top:top + fitted.shape[0], left:left + fitted.shape[1]] = fitted
    return square


def save(name: str, rgb: np.ndarray) -> None:
    cv2.imwrite(str(DOCS / name), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"docs/{name}: {rgb.shape[1]}x{rgb.shape[0]}")


if __name__ == "__main__":
    DOCS.mkdir(exist_ok=True)
    names = sys.argv[1:]
    if not names:
        save("astronaut_landmarks_crop_mask.png", photo_figure())
    for workflow in sorted((REPO / "workflows").glob("*.json")):
        if names and workflow.stem not in names:
            continue
        shot = SHOTS / f"{workflow.stem}.png"
        graph = crop_screenshot(shot)
        save(f"workflow_{workflow.stem}.png", graph)
        cv2.imwrite(str(workflow.with_suffix(".jpg")), np.ascontiguousarray(thumbnail(graph)[..., ::-1]),
                    [cv2.IMWRITE_JPEG_QUALITY, 88])
        print(f"workflows/{workflow.stem}.jpg")
    browser = SHOTS / "templates_browser.png"
    if browser.exists():  # taken once the thumbnails exist
        save("templates_browser.png", cv2.imread(str(browser))[..., ::-1])
