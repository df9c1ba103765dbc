"""The batch-level steps the nodes and the CLI share: detect, align + restore, paste back.

Each step takes and returns ComfyUI-layout tensors (IMAGE ``[B,H,W,C]``, MASK ``[B,H,W]``)
and a FaceSet, checks that what it was given belongs together, and leaves frames without
faces exactly as they were.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from . import execution, heap
from . import image as im
from .align import affine_scale, alignment, cut_crop, resize
from .faces import DETECT_BATCH, Detector, Face, FaceSet
from .options import DetectOptions, PasteOptions, RestoreOptions
from .parsing import FaceParser
from .restorers import FaceModel
from .paste import composite, place_face
from .temporal import FaceFinder

logger = logging.getLogger(__name__)
BatchCallback = Callable[[int, int], None]
# (faces done, in face-equivalents: fractions while a batch is in its forward; total faces)
FaceProgress = Callable[[float, int], None]
Upscaler = Callable[[torch.Tensor, int, int], torch.Tensor]  # [3,H,W] frame, width, height


def detect(image: torch.Tensor, detector: Detector, options: DetectOptions = DetectOptions(),
           on_frame: BatchCallback | None = None) -> FaceSet:
    """Detect and select faces in every frame of an IMAGE batch, give each person a track id
    across frames, and smooth their landmarks over time by ``options.smoothing`` (0..1)."""
    im.check_image(image)
    finder = FaceFinder(detector, options)
    frames: list[list[Face]] = []
    for start in range(0, image.shape[0], DETECT_BATCH):
        stop = min(start + DETECT_BATCH, image.shape[0])
        frames += finder.frames([im.frame_uint8(image, index) for index in range(start, stop)])
        if on_frame:
            on_frame(stop, image.shape[0])
    return FaceSet(image_size=(image.shape[1], image.shape[2]), frames=frames, detector=options.detector,
                   found=tuple(finder.found))


def check_faces_match(image: torch.Tensor, faces: FaceSet, node: str) -> None:
    """FACES from another IMAGE batch would paste faces in the wrong places: say so."""
    if not isinstance(faces, FaceSet):
        raise ValueError(f"{node}: the faces input must come from a Detect Faces node.")
    height, width = image.shape[1], image.shape[2]
    if (height, width) != tuple(faces.image_size):
        raise ValueError(f"{node}: the image is {width}x{height} but the faces were detected on a "
                         f"{faces.image_size[1]}x{faces.image_size[0]} image. Connect the same image "
                         f"to Detect Faces and to this node.")
    if image.shape[0] != len(faces.frames):
        raise ValueError(f"{node}: the image batch has {image.shape[0]} frames but the faces were "
                         f"detected on {len(faces.frames)}. Connect the same image batch to Detect "
                         f"Faces and to this node.")


def align(image: torch.Tensor, faces: FaceSet, size: int, device: torch.device | str = "cpu",
          points: np.ndarray | None = None) -> tuple[torch.Tensor, FaceSet]:
    """Cut every selected face at ``size`` onto the template ``points`` (the model's; GPEN's by
    default) on ``device``, one transfer per frame; returns the crops as an IMAGE batch and the
    FACES with their transforms and unrestored crops."""
    check_faces_match(image, faces, "GPEN Restore")
    crops, affines = [], []
    for index, members in faces.by_frame().items():
        frame_crops, frame_affines = align_frame(im.frame_tensor(image, index, device), members, size, points)
        crops.append(frame_crops.cpu())
        affines += frame_affines
    batch = im.crops_to_image(join(crops) if crops else torch.zeros(0, 3, size, size))
    return batch, faces.with_alignment(affines, size, originals=batch)


def align_frame(frame: torch.Tensor, faces: list[Face], size: int,
                points: np.ndarray | None = None) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The ``size`` crops ``[N,3,S,S]`` of a frame's faces (landmarks on ``points``, GPEN's
    template by default), on the frame's device, and their image -> crop affines."""
    affines = [alignment(face.landmarks, size, points) for face in faces]
    crops = [cut_crop(frame, affine, size)[None] for affine in affines]
    return (join(crops) if crops else frame.new_zeros(0, 3, size, size)), affines


def join(batches: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` that hands a single batch back as it is (a 2048 crop is 50 MB to copy)."""
    return batches[0] if len(batches) == 1 else torch.cat(batches)


def restore_batch(model: FaceModel, crops: torch.Tensor, strength: float, dtype: torch.dtype,
                  pad_to: int = 0, fidelity: float = 0.5) -> torch.Tensor:
    """One forward pass: crops ``[N,3,S,S]`` in 0..1 on the model's device -> restored crops
    (float32, 0..1), mixed with the input by ``strength``. The crops are mapped to the model's
    ``input_range`` and back; ``fidelity`` goes to models that have one.

    The model runs compiled if ``execution.enable_compile`` was called on it; ``pad_to`` pads the
    batch with blank faces to that size first (one shape per compiled graph). A half-precision
    output that is not finite (an overflow) is computed again in fp32, and logged.
    """
    count = crops.shape[0]
    with torch.inference_mode():
        # NHWC: 1.3x faster on CPU for one 512 face (python -m gpen.bench), same result.
        low, high = model.input_range
        x = (crops * (high - low) + low).to(dtype).contiguous(memory_format=torch.channels_last)
        if count < pad_to:
            x = torch.cat((x, x.new_zeros((pad_to - count, *x.shape[1:])))).contiguous(
                memory_format=torch.channels_last)
        extra = (fidelity,) if model.has_fidelity else ()
        out = execution.forward_of(model)(x, *extra)[:count]
        if dtype != torch.float32 and not torch.isfinite(out).all():
            logger.warning("GPEN: the %s output of a batch of %d face(s) is not finite (an overflow); "
                           "running it again in fp32.", str(dtype).removeprefix("torch."), count)
            out = execution.fp32_rerun(model, x[:count], *extra)
        restored = ((out.float() - low) / (high - low)).clamp_(0.0, 1.0)
        return torch.lerp(crops.float(), restored, strength) if strength < 1.0 else restored


def restore_crops(model: FaceModel, crops: torch.Tensor, options: RestoreOptions = RestoreOptions(),
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  on_progress: FaceProgress | None = None) -> torch.Tensor:
    """Restore crops ``[N,3,S,S]`` (0..1, on any device) on ``device`` in batches of at most
    ``options.batch_size``; returns them on the crops' device.

    ``on_progress`` hears how many faces are done after every convolution block of a forward
    (eager models; after each batch when compiled), so progress moves per face while faces
    still run in batches (on a CPU a batch of 4 is 12-15% faster per face than one at a time),
    and a callback that raises (cancel) stops within a block, well inside one face's time.

    Every weight must already be on ``device`` (checked first, with a clear error). A compiled
    model runs batches of a power of two, the last one padded, so few shapes are ever compiled
    and each graph (a CUDA graph on a GPU) keeps its shape. An out-of-memory error halves the
    batch and retries; any other error propagates.
    """
    execution.check_on_device(model, device)
    compiled = execution.is_compiled(model)
    total = crops.shape[0]
    out = torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
    start = 0
    batch_size = 1 << (options.batch_size.bit_length() - 1) if compiled else options.batch_size
    with heap.reuse_freed_memory():  # a forward's large blocks kept for the next batch
        while start < total:
            chunk = crops[start:start + batch_size]

            def within_batch(done: int, steps: int, first: int = start, count: int = chunk.shape[0]) -> None:
                on_progress(first + count * done / steps, total)
            try:
                with execution.layer_steps(model, within_batch) if on_progress else contextlib.nullcontext():
                    restored = restore_batch(model, chunk.to(device), options.strength, dtype,
                                             pad_to=batch_size if compiled else 0, fidelity=options.fidelity)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                continue
            out[start:start + chunk.shape[0]] = restored
            start += chunk.shape[0]
            if on_progress:
                on_progress(start, total)
    return out


def restore(model: FaceModel, crops: torch.Tensor, options: RestoreOptions = RestoreOptions(),
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            on_progress: FaceProgress | None = None) -> torch.Tensor:
    """``restore_crops`` for an IMAGE batch of aligned crops; returns an IMAGE batch. The memory
    the forwards freed goes back to the system afterwards."""
    try:
        return restore_crops(model, crops[..., :3].movedim(-1, 1), options, device, dtype,
                             on_progress).movedim(1, -1).contiguous()
    finally:
        heap.release_freed_memory()


def enlarge(frame: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A ``[3,H,W]`` frame resized to ``width`` x ``height`` (bicubic; anti-aliased if it shrinks):
    the default background for ``upscale``."""
    return resize(frame, height, width).clamp_(0.0, 1.0)


def paste(image: torch.Tensor, crops: torch.Tensor, faces: FaceSet,
          options: PasteOptions = PasteOptions(), upscaler: Upscaler = enlarge,
          parser: FaceParser | None = None, on_frame: BatchCallback | None = None,
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Paste restored crops onto their frames on ``device``; returns (IMAGE, MASK) on the CPU.

    ``options.upscale`` enlarges the background with ``upscaler`` and pastes the faces at the
    restored resolution. Frames without faces pass through unchanged (only resized when
    upscaling). ``parser`` (loaded for ``options.mask``) swaps the face ellipse for a
    face-parsing mask.
    """
    im.check_image(image)
    im.check_image(crops, "restored faces")
    check_faces_match(image, faces, "Paste Back")
    if crops.shape[0] != faces.count:
        raise ValueError(f"Paste Back: got {crops.shape[0]} restored faces for {faces.count} detected "
                         f"faces. Connect the faces output of the same GPEN Restore node.")
    if faces.count and faces.crop_size is None:
        raise ValueError("Paste Back: these faces have not been aligned. Connect the faces output of "
                         "GPEN Restore 2048, not of Detect Faces.")
    if crops.shape[1] != crops.shape[2]:
        raise ValueError(f"Paste Back: restored faces must be square; got {crops.shape[2]}x{crops.shape[1]}.")
    height, width = image.shape[1], image.shape[2]
    upscale = options.upscale
    out_h, out_w = round(height * upscale), round(width * upscale)
    size = crops.shape[1]
    # Crops may have been resized by other nodes since alignment: rescale the transforms to match.
    rescale = size / faces.crop_size if faces.count else 1.0
    originals = faces.originals if faces.originals is not None and faces.originals.shape[1] == size else None
    by_frame = faces.by_frame()
    images = im.output_batch(image, out_h, out_w)
    masks = torch.zeros((image.shape[0], out_h, out_w), dtype=torch.float32)
    # On the CPU an RGB frame is composited right in its slot of the output batch.
    in_place = torch.device(device).type == "cpu" and upscale == 1.0 and image.shape[-1] == 3
    first = 0  # index of the frame's first crop
    for index in range(image.shape[0]):
        members = by_frame.get(index, [])
        if not members and upscale == 1.0:
            images[index] = image[index].detach()
        else:
            frame = im.frame_tensor(image, index, device, into=images[index] if in_place else None)
            picks = range(first, first + len(members))
            affines = [face.affine * rescale for face in members]
            restored = [im.image_to_crop(crops, k, device) for k in picks]
            if originals is not None:
                unrestored = [im.image_to_crop(originals, k, device) for k in picks]
            else:
                unrestored = [cut_crop(frame, affine, size) for affine in affines]
            result, masks[index] = paste_frame(frame, restored, unrestored, affines, options, upscaler, parser)
            if not in_place:
                im.put_rgb(images, index, image, result)
            first += len(members)
        if on_frame:
            on_frame(index + 1, image.shape[0])
    return images, masks


def paste_frame(frame: torch.Tensor, restored: list[torch.Tensor], originals: list[torch.Tensor],
                affines: list[np.ndarray], options: PasteOptions = PasteOptions(),
                upscaler: Upscaler = enlarge,
                parser: FaceParser | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one frame's restored crops ``[3,S,S]`` (with the unrestored ``originals`` and the
    image -> crop ``affines``) into ``frame`` ``[3,H,W]``; returns the frame (composited in place
    at ``upscale`` 1, else an enlarged copy) and the paste mask ``[h,w]``."""
    upscale = options.upscale
    height, width = frame.shape[1:]
    background = frame if upscale == 1.0 else upscaler(frame, round(width * upscale), round(height * upscale))
    placed = []
    for crop, original, affine in zip(restored, originals, affines):
        parsed = parser.mask(crop, options.feather) if parser else None
        # A crop at least as fine as its frame holds all of the frame's detail, so only the
        # restorer's change is pasted, also onto an enlarged background.
        change_only = affine_scale(affine) >= 1.0
        # Background pixels are ``upscale`` times smaller: image->crop shrinks by as much.
        affine = np.hstack([affine[:, :2] / upscale, affine[:, 2:]])
        face = place_face(background, crop, original, affine, options.colour, options.feather, parsed,
                          change_only)
        if face is not None:
            placed.append(face)
    return composite(background, placed, options.blend)
