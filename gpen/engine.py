"""The frame engine: a stream of frames in, restored frames out, in bounded memory.

Detection runs ahead of the model on a worker thread and paste-back behind it on another, and
faces from several frames share one forward pass, so the model's device does not wait on the
CPU. A frame is uploaded to the model's device once and waits there as 8-bit (float only while
aligned or pasted), and comes back once, finished.
The video node, the command line and the cluster runner all run this engine; the IMAGE-batch
nodes call the same step functions (``pipeline.align_frame``, ``restore_crops``, ``paste_frame``).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from . import execution, heap, threads
from . import image as im
from .faces import DETECT_BATCH, Detector, Face
from .options import DetectOptions, PasteOptions, RestoreOptions
from .parsing import FaceParser
from .pipeline import Upscaler, align_frame, enlarge, paste_frame, restore_crops
from .temporal import FaceFinder
from .video import VideoInfo

T = TypeVar("T")
STAGES = ("decode", "detect", "align", "restore", "paste")
TRIM_EVERY = 32  # frames between hand-backs of freed heap memory


@dataclass
class Frame:
    """One picture travelling through the engine."""

    index: int
    rgb: np.ndarray  # HxWx3 uint8 RGB, as decoded
    pts: int | None = None
    duration: int | None = None  # video: until the next frame, in the stream's time base
    faces: list[Face] = field(default_factory=list)
    output: np.ndarray | None = None  # the result, HxWx3 uint8; ``rgb`` itself when nothing changed


@dataclass
class Restorer:
    """What restoring needs, loaded once: the face restorer (any ``restorers.FaceModel``) and
    where it runs, the face detector, and optionally a face parser and a background upscaler."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    detector: Detector
    parser: FaceParser | None = None
    upscaler: Upscaler = enlarge


def load_restorer(model_path: str | Path, device: torch.device | str, dtype: torch.dtype,
                  detector: str = "mtcnn", weights_dirs: tuple[str, ...] = (), mask: str = "face ellipse",
                  upscale_model: str | Path | None = None, compile: bool = False) -> Restorer:
    """Everything a restore job needs, loaded from files (the command line and cluster workers;
    ComfyUI hands the nodes its own loaded models instead). Errors say which file and what to do.
    ``compile`` runs the restorer through torch.compile (``execution.enable_compile``). A
    precision the architecture lacks is lowered as Load GPEN Model lowers it: fp16 to bf16 only
    where the device computes bf16 (``execution.bf16_supported``), else to fp32."""
    from .faces import load_detector
    from .options import PasteOptions
    from .parsing import load_parser
    from .restorers import load_face_model

    device = torch.device(device)
    model = load_face_model(model_path, device=device, dtype=dtype,
                            bf16_ok=execution.bf16_supported(device)).to_channels_last()
    dtype = next(model.parameters()).dtype  # lowered to what the architecture and device run
    if compile:
        execution.enable_compile(model)
    parser_name = PasteOptions(mask=mask).parser
    parser = load_parser(parser_name, weights_dirs, str(device)) if parser_name else None
    upscaler = model_upscaler(upscale_model, device) if upscale_model else enlarge
    return Restorer(model, device, dtype, load_detector(detector, weights_dirs, str(device)), parser, upscaler)


UPSCALE_TILE = 512  # px of input per upscaler tile, as ComfyUI's Upscale Image (using Model)
UPSCALE_OVERLAP = 32  # px of context on each side of a tile, cut off its output


def model_upscaler(path: str | Path, device: torch.device) -> Upscaler:
    """A background upscaler from an upscale model file (ESRGAN and the other architectures
    spandrel reads, as ComfyUI's Load Upscale Model does), run in tiles and resized to the exact
    size asked for."""
    try:
        from spandrel import ImageModelDescriptor, ModelLoader
    except ImportError:
        raise ValueError("--upscale-model needs spandrel (pip install spandrel), which ComfyUI installs.") from None
    from .loader import ModelLoadError

    name = Path(path).name
    try:
        descriptor = ModelLoader(device).load_from_file(str(path)).eval()
    except Exception as error:  # spandrel raises several types for files it cannot use
        raise ModelLoadError(f"{name} is not an upscale model spandrel can load ({error}).") from None
    if (not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose == "FaceSR"
            or descriptor.input_channels != 3 or descriptor.output_channels != 3):
        raise ModelLoadError(f"{name} is a {descriptor.architecture.name} model ({descriptor.purpose}), not an RGB "
                             "upscaler: give --upscale-model an upscale model (ESRGAN, RealESRGAN, SwinIR, ...).")

    def run(frame: torch.Tensor, width: int, height: int) -> torch.Tensor:
        frame, tile = frame.to(device), UPSCALE_TILE
        while True:
            try:
                enlarged = upscale_tiled(descriptor, frame, tile)
                break
            except torch.OutOfMemoryError:
                if tile <= 4 * UPSCALE_OVERLAP:
                    raise
                tile //= 2
        return enlarge(enlarged, width, height)
    return run


def upscale_tiled(descriptor, frame: torch.Tensor, tile: int) -> torch.Tensor:
    """``descriptor``'s enlargement of a ``[3,H,W]`` frame, one ``tile``-sized piece at a time:
    a whole 1080p frame at 4x needs gigabytes inside the network. Each piece is run with
    ``UPSCALE_OVERLAP`` px of its neighbours around it, cut off its output, so there are no seams
    where the network sees less than that beyond a tile."""
    scale = descriptor.scale
    _, height, width = frame.shape
    out = torch.empty(3, height * scale, width * scale, device=frame.device)
    step = tile - 2 * UPSCALE_OVERLAP
    with torch.inference_mode():
        for top in range(0, height, step):
            for left in range(0, width, step):
                bottom, right = min(top + step, height), min(left + step, width)
                y0, x0 = max(top - UPSCALE_OVERLAP, 0), max(left - UPSCALE_OVERLAP, 0)
                y1, x1 = min(bottom + UPSCALE_OVERLAP, height), min(right + UPSCALE_OVERLAP, width)
                piece = descriptor(frame[None, :, y0:y1, x0:x1])[0]
                out[:, top * scale:bottom * scale, left * scale:right * scale] = piece[
                    :, (top - y0) * scale:(bottom - y0) * scale, (left - x0) * scale:(right - x0) * scale]
    return out.clamp_(0.0, 1.0)


@dataclass
class _Work:
    """A frame between the model stage and paste-back."""

    frame: Frame
    uploaded: torch.Tensor | None = None  # HxWx3 uint8 on the device (float only while used)
    crops: torch.Tensor | None = None  # unrestored, [N,3,S,S]
    affines: list[np.ndarray] = field(default_factory=list)
    restored: torch.Tensor | None = None


class FrameEngine:
    """Restores a stream of frames with one set of options; ``timings`` sums the busy seconds
    of each stage (decode, detect, align, restore, paste) over everything it ran."""

    def __init__(self, restorer: Restorer, detect: DetectOptions = DetectOptions(),
                 restore: RestoreOptions = RestoreOptions(), paste: PasteOptions = PasteOptions(),
                 window: int = 8):
        self.restorer = restorer
        self.detect_options = detect
        self.restore_options = restore
        self.paste_options = paste
        self.window = max(window, 1)  # frames held between stages and waiting for a batch
        self.timings: dict[str, float] = defaultdict(float)
        self.finder = FaceFinder(restorer.detector, detect)  # the latest run's: faces found per frame

    def output_info(self, info: VideoInfo) -> VideoInfo:
        """The VideoInfo of the restored video: the source's, at the paste-back scale."""
        scale = self.paste_options.upscale
        return replace(info, width=round(info.width * scale), height=round(info.height * scale))

    def run(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        """The frames, in order, each with ``faces`` and ``output`` set. Face tracking and
        smoothing run continuously over the whole stream. Closing the iterator early (cancel)
        stops the worker threads."""
        self.finder = FaceFinder(self.restorer.detector, self.detect_options)
        detected = ahead(self._detect(frames, self.finder), self.window)
        restored = ahead(self._restore(detected), self.window)
        try:
            for count, work in enumerate(restored, start=1):
                with threads.on_this_thread_only():
                    pasted = self._paste(work)
                yield pasted
                if count % TRIM_EVERY == 0:
                    heap.release_freed_memory()
        finally:
            restored.close()  # both worker threads end (and their frames are freed) before the trim
            detected.close()
            heap.release_freed_memory()

    def _detect(self, frames: Iterable[Frame], finder: FaceFinder) -> Iterator[Frame]:
        """Decode and detect a few frames at a time, so whole-frame searches run in batches."""
        source = iter(frames)
        with threads.on_this_thread_only():  # detection, alignment, paste-back: one core each
            while True:
                start = time.perf_counter()
                chunk = list(itertools.islice(source, DETECT_BATCH))
                self.timings["decode"] += time.perf_counter() - start
                if not chunk:
                    return
                start = time.perf_counter()
                for frame, faces in zip(chunk, finder.frames([frame.rgb for frame in chunk])):
                    frame.faces = faces
                self.timings["detect"] += time.perf_counter() - start
                yield from chunk

    def _restore(self, frames: Iterable[Frame]) -> Iterator[_Work]:
        """Align each frame's faces on the device and restore them in batches that span frames."""
        pending: list[_Work] = []
        waiting_faces = 0
        for frame in frames:
            work = _Work(frame)
            if frame.faces or self.paste_options.upscale != 1.0:
                start = time.perf_counter()
                with threads.on_this_thread_only():
                    work.uploaded = im.upload(frame.rgb, self.restorer.device)
                    work.crops, work.affines = align_frame(im.from_uint8(work.uploaded), frame.faces,
                                                             self.restorer.model.size, self.restorer.model.template)
                self.timings["align"] += time.perf_counter() - start
            pending.append(work)
            waiting_faces += len(frame.faces)
            if waiting_faces >= self.restore_options.batch_size or len(pending) >= self.window:
                yield from self._restore_pending(pending)
                pending, waiting_faces = [], 0
        yield from self._restore_pending(pending)

    def _restore_pending(self, pending: list[_Work]) -> list[_Work]:
        with_faces = [w for w in pending if w.frame.faces]
        if with_faces:
            start = time.perf_counter()
            crops = torch.cat([w.crops for w in with_faces])
            restored = restore_crops(self.restorer.model, crops, self.restore_options, self.restorer.device,
                                     self.restorer.dtype)
            for work, part in zip(with_faces, restored.split([len(w.frame.faces) for w in with_faces])):
                work.restored = part
            self.timings["restore"] += time.perf_counter() - start
        return pending

    def _paste(self, work: _Work) -> Frame:
        frame = work.frame
        if work.uploaded is None:
            frame.output = frame.rgb
            return frame
        start = time.perf_counter()
        restored = list(work.restored) if work.restored is not None else []
        pixels = im.from_uint8(work.uploaded)
        result, _ = paste_frame(pixels, restored, list(work.crops), work.affines, self.paste_options,
                                self.restorer.upscaler, self.restorer.parser)
        frame.output = im.to_uint8(result)
        self.timings["paste"] += time.perf_counter() - start
        return frame


def ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` on a worker thread, at most ``depth`` items ahead of the consumer.

    An error in the worker is raised in the consumer; when the consumer stops early the worker
    stops too (and closes ``items``).
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def offer(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((finished, None))
        except BaseException as error:  # handed to the consumer, which raises it
            offer((finished, error))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    worker = threading.Thread(target=work, name="gpen-engine", daemon=True)
    worker.start()
    try:
        while True:
            item, error = results.get()
            if error is not None:
                raise error
            if item is finished:
                return
            yield item
    finally:
        stop.set()
        worker.join()
