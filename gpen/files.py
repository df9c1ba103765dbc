"""Restoring files: which output each input gets, and writing it so nothing is ever lost.

Inputs are image files, video files and folders (searched recursively; the output folder mirrors
their tree). Each output is written under a temporary name beside its final one and linked into
place only when complete, which also fails rather than replace a file that appeared meanwhile:
a killed job leaves no half-written output, an interrupted job resumes by skipping finished
outputs, and nothing is ever overwritten. The command line and the cluster runner share this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import partial_path, publish
from .engine import Frame, FrameEngine
from .video import VideoReader, VideoWriter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v", ".avi", ".webm"}
VIDEO_OUTPUT_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v"}  # others are written as .mp4 (H.264)
JPEG_QUALITY = 95

FrameCallback = Callable[[int, int | None], None]  # frames done, frames in the file (if known)


@dataclass(frozen=True)
class Task:
    """One input file and the output it gets."""

    source: Path
    target: Path

    @property
    def is_video(self) -> bool:
        return self.source.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class Outcome:
    """What happened to one task."""

    task: Task
    status: str  # "restored", "skipped" (the output exists) or "failed"
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    seconds: float = 0.0
    error: str = ""


def output_name(source: Path) -> str:
    """The output's file name: the input's, with a video container we can write."""
    if source.suffix.lower() in VIDEO_SUFFIXES and source.suffix.lower() not in VIDEO_OUTPUT_SUFFIXES:
        return source.stem + ".mp4"
    return source.name


def plan(inputs: Iterable[str | Path], output: str | Path) -> tuple[list[Task], list[str]]:
    """The tasks for ``inputs`` (files, and folders searched recursively) written into the
    folder ``output``, mirroring each folder's tree; and the problems found (missing inputs,
    unsupported files given by name, two inputs that would write the same output)."""
    output = Path(output)
    tasks: list[Task] = []
    problems: list[str] = []
    for given in map(Path, inputs):
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file() and _supported(p)):
                tasks.append(Task(path, output / path.relative_to(given).parent / output_name(path)))
        elif given.is_file():
            if _supported(given):
                tasks.append(Task(given, output / output_name(given)))
            else:
                problems.append(f"{given}: not an image or video this tool reads "
                                f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}).")
        else:
            problems.append(f"{given}: no such file or folder.")
    seen: dict[Path, Path] = {}
    unique = []
    for task in tasks:
        if task.target in seen:
            problems.append(f"{task.source} and {seen[task.target]} would both be written to {task.target}; "
                            f"restore them into different output folders.")
        else:
            seen[task.target] = task.source
            unique.append(task)
    return unique, problems


def _supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES and not path.name.startswith(".")


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(8-bit RGB, alpha or None, whether the file is grey) of an image file; EXIF orientation
    is applied. Raises ValueError for a file that is not a readable image."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"{path} could not be read as an image (unsupported or damaged file).")
    if raw.dtype != np.uint8:
        raw = (raw.astype(np.float32) / np.iinfo(raw.dtype).max * 255 + 0.5).astype(np.uint8) \
            if raw.dtype.kind == "u" else np.clip(raw * 255 + 0.5, 0, 255).astype(np.uint8)
    if raw.ndim == 3 and raw.shape[2] == 4:
        return np.ascontiguousarray(raw[..., 2::-1]), raw[..., 3], False
    grey = raw.ndim == 2 or raw.shape[2] == 1
    oriented = cv2.imread(str(path), cv2.IMREAD_COLOR)  # applies EXIF orientation
    bgr = oriented if oriented is not None else cv2.cvtColor(raw, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(bgr[..., ::-1]), None, grey


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, grey: bool, suffix: str) -> bytes:
    """The file bytes of an image in the format its ``suffix`` names, in the input's layout."""
    if grey:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif alpha is not None:
        pixels = np.dstack([rgb[..., ::-1], alpha])
    else:
        pixels = rgb[..., ::-1]
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix.lower() in {".jpg", ".jpeg"} else []
    ok, data = cv2.imencode(suffix, np.ascontiguousarray(pixels), params)
    if not ok:
        raise ValueError(f"could not encode a {suffix} image.")
    return data.tobytes()


class FileRestorer:
    """Restores one task at a time with a loaded engine; failures become outcomes."""

    def __init__(self, engine: FrameEngine):
        self.engine = engine

    def __call__(self, task: Task, on_frames: FrameCallback | None = None) -> Outcome:
        start = time.perf_counter()
        if task.target.exists():
            return Outcome(task, "skipped")
        try:
            task.target.parent.mkdir(parents=True, exist_ok=True)
            restore = self._video if task.is_video else self._image
            frames = restore(task, on_frames or (lambda done, total: None))
        except Exception as error:  # reported per file; the job goes on with the next one
            return Outcome(task, "failed", seconds=time.perf_counter() - start, error=str(error) or repr(error))
        return Outcome(task, "restored", frames=len(frames), frames_with_faces=sum(1 for f in frames if f),
                       faces=sum(frames), seconds=time.perf_counter() - start)

    def _image(self, task: Task, on_frames: FrameCallback) -> list[int]:
        """Faces per frame (one frame) of an image task, written atomically."""
        rgb, alpha, grey = read_image(task.source)
        (frame,) = self.engine.run([Frame(0, rgb)])
        partial = partial_path(task.target)
        try:
            partial.write_bytes(encode_image(frame.output, alpha, grey, task.target.suffix))
            publish(partial, task.target)
        finally:
            partial.unlink(missing_ok=True)
        on_frames(1, 1)
        return [len(frame.faces)]

    def _video(self, task: Task, on_frames: FrameCallback) -> list[int]:
        """Faces per frame of a video task; the writer publishes the file when it is complete."""
        faces_per_frame: list[int] = []
        with VideoReader(task.source) as reader:
            info = self.engine.output_info(reader.info)
            with VideoWriter(task.target, info, audio_from=task.source) as writer:
                for frame in self.engine.run(video_frames(reader)):
                    writer.write(frame.output, frame.pts, frame.duration)
                    faces_per_frame.append(len(frame.faces))
                    on_frames(len(faces_per_frame), info.expected_frames)
        return faces_per_frame


def video_frames(reader: VideoReader) -> Iterator[Frame]:
    """A video's frames as engine frames, with their timing."""
    for decoded in reader.frames():
        yield Frame(decoded.index, decoded.rgb, decoded.pts, decoded.duration)
