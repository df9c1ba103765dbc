"""The batch-level steps the nodes and the CLI share: detect, align + restore, paste back.

Each step takes and returns ComfyUI-layout tensors (IMAGE ``[B,H,W,C]``, MASK ``[B,H,W]``)
and a FaceSet, checks that what it was given belongs together, and leaves frames without
faces exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import image as im
from .align import affine_scale, alignment, cut_crop, resize
from .faces import Detector, FaceSet, detect_frame, select_faces
from .options import DetectOptions, PasteOptions, RestoreOptions
from .parsing import FaceParser
from .paste import composite, place_face
from .temporal import smooth_landmarks, track

BatchCallback = Callable[[int, int], None]
Upscaler = Callable[[torch.Tensor, int, int], torch.Tensor]  # [3,H,W] frame, width, height


def detect(image: torch.Tensor, detector: Detector, options: DetectOptions = DetectOptions(),
           on_frame: BatchCallback | None = None) -> FaceSet:
    """Detect and select faces in every frame of an IMAGE batch, give each person a track id
    across frames, and smooth their landmarks over time by ``options.smoothing`` (0..1)."""
    im.check_image(image)
    frames = []
    for index in range(image.shape[0]):
        rgb = im.frame_uint8(image, index)
        found = detect_frame(detector, rgb, options.threshold)
        frames.append(select_faces(found, options))
        if on_frame:
            on_frame(index + 1, image.shape[0])
    frames = smooth_landmarks(track(frames), options.smoothing)
    return FaceSet(image_size=(image.shape[1], image.shape[2]), frames=frames, detector=options.detector)


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


def align(image: torch.Tensor, faces: FaceSet, size: int,
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, FaceSet]:
    """Cut every selected face at ``size`` (on ``device``, one transfer per frame); returns the
    crops as an IMAGE batch and the FACES with their transforms and unrestored crops."""
    check_faces_match(image, faces, "GPEN Restore")
    crops, affines = [], []
    for index, members in faces.by_frame().items():
        frame = im.frame_tensor(image, index, device)
        for face in members:
            affine = alignment(face.landmarks, size)
            crops.append(cut_crop(frame, affine, size))
            affines.append(affine)
    batch = im.crops_to_image(crops, size)
    return batch, faces.with_alignment(affines, size, originals=batch)


def activation_bytes(size: int, dtype: torch.dtype) -> int:
    """Rough peak activation memory of one face: the full-resolution layers dominate (about 100
    feature planes of S x S live at once, counting the concatenated encoder features)."""
    return size * size * 100 * torch.finfo(dtype).bits // 8


def restore(model: torch.nn.Module, crops: torch.Tensor, options: RestoreOptions = RestoreOptions(),
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            on_batch: BatchCallback | None = None) -> torch.Tensor:
    """Run the generator over aligned crops in batches of at most ``options.batch_size``;
    ``options.strength`` mixes restored over input.

    A CUDA out-of-memory error halves the batch and retries; any other error propagates.
    """
    total = crops.shape[0]
    out = torch.empty_like(crops)
    start = 0
    batch_size = options.batch_size
    strength = options.strength
    while start < total:
        chunk = crops[start:start + batch_size]
        try:
            with torch.inference_mode():
                # NHWC: 1.3x faster on CPU for one 512 face (python -m gpen.bench), same result.
                x = im.crops_to_model(chunk).to(device=device, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                restored = im.model_to_crops(model(x)).to("cpu")
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            continue
        out[start:start + chunk.shape[0]] = strength * restored + (1.0 - strength) * chunk
        start += chunk.shape[0]
        if on_batch:
            on_batch(start, total)
    return out


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
    flat_index = 0
    for index in range(image.shape[0]):
        members = by_frame.get(index, [])
        if not members and upscale == 1.0:
            images[index] = image[index].detach()
        else:
            frame = im.frame_tensor(image, index, device, into=images[index] if in_place else None)
            background = frame if upscale == 1.0 else upscaler(frame, out_w, out_h)
            placed = []
            for face in members:
                affine = face.affine * rescale
                restored = im.image_to_crop(crops, flat_index, device)
                original = (im.image_to_crop(originals, flat_index, device) if originals is not None
                            else cut_crop(frame, affine, size))
                parsed = parser.mask(restored, options.feather) if parser else None
                # A crop at least as fine as its frame holds all of the frame's detail, so only
                # the restorer's change is pasted, also onto an enlarged background.
                change_only = affine_scale(affine) >= 1.0
                # Background pixels are ``upscale`` times smaller: image->crop shrinks by as much.
                affine = np.hstack([affine[:, :2] / upscale, affine[:, 2:]])
                face_on_frame = place_face(background, restored, original, affine, options.colour,
                                           options.feather, parsed, change_only)
                if face_on_frame is not None:
                    placed.append(face_on_frame)
                flat_index += 1
            result, masks[index] = composite(background, placed, options.blend)
            if not in_place:
                im.put_rgb(images, index, image, result)
        if on_frame:
            on_frame(index + 1, image.shape[0])
    return images, masks
