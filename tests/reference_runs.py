"""What the pack's own functions give for a model file, computed in the test's process: the
reference the ComfyUI host's and the command line's outputs are compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import as_image
from gpen import pipeline
from gpen import image as im
from gpen.engine import FrameEngine, load_restorer
from gpen.faces import load_detector
from gpen.files import video_frames
from gpen.options import DetectOptions, PasteOptions, RestoreOptions
from gpen.restorers import load_face_model
from gpen.video import VideoReader, VideoWriter


def restored_photo(model_path: Path, rgb: np.ndarray, dtype: torch.dtype, fidelity: float = 0.5) -> np.ndarray:
    """A photo through the four nodes' steps (detect, align on the model's template, restore,
    paste back) with their defaults, as 8-bit RGB."""
    model = load_face_model(model_path, dtype=dtype).to_channels_last()
    image = as_image(rgb)
    faces = pipeline.detect(image, load_detector("mtcnn"))
    crops, aligned = pipeline.align(image, faces, model.size, "cpu", model.template)
    restored = pipeline.restore(model, crops, RestoreOptions(fidelity=fidelity), "cpu",
                                next(model.parameters()).dtype)
    out, _ = pipeline.paste(image, restored, aligned, PasteOptions())
    return im.to_uint8(out[0].movedim(-1, 0))


def restored_video(model_path: Path, clip: Path, target: Path, dtype: torch.dtype, detect: DetectOptions,
                   fidelity: float = 0.5) -> Path:
    """A video through the frame engine (what GPEN Restore Video and the command line run) and
    the pack's encoder with its defaults, to ``target``; no sound."""
    engine = FrameEngine(load_restorer(model_path, "cpu", dtype), detect, RestoreOptions(fidelity=fidelity))
    with VideoReader(clip) as reader, VideoWriter(target, engine.output_info(reader.info)) as writer:
        for frame in engine.run(video_frames(reader)):
            writer.write(frame.output, frame.pts, frame.duration)
    return target


def decoded_frames(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [frame.rgb for frame in reader.frames()]


def face_region(rgb: np.ndarray, pad: float = 0.5) -> tuple[slice, slice]:
    """(rows, columns) around the largest face mtcnn finds, widened by ``pad`` of its size."""
    face = pipeline.detect(as_image(rgb), load_detector("mtcnn")).frames[0][0]
    x0, y0, x1, y1 = face.box
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    return slice(max(int(y0 - dy), 0), int(y1 + dy)), slice(max(int(x0 - dx), 0), int(x1 + dx))
