"""The batch-level steps the nodes and the CLI share: detect, align + restore, paste back.

Each step takes and returns ComfyUI-layout tensors (IMAGE ``[B,H,W,C]``, MASK ``[B,H,W]``)
and a FaceSet, checks that what it was given belongs together, and leaves frames without
faces exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

from . import image as im
from .align import affine_scale, align_face, warp_to_crop
from .faces import Detector, Face, FaceSet, detect_frame, select_faces
from .options import DetectOptions, PasteOptions, RestoreOptions
from .parsing import FaceParser
from .paste import face_mask, match_colour, paste_faces
from .temporal import smooth_landmarks, track

BatchCallback = Callable[[int, int], None]
Upscaler = Callable[[np.ndarray, int, int], np.ndarray]


def detect(image: torch.Tensor, detector: Detector, options: DetectOptions = DetectOptions(),
           on_frame: BatchCallback | None = None) -> FaceSet:
    """Detect and select faces in every frame of an IMAGE batch, give each person a track id
    across frames, and smooth their landmarks over time by ``options.smoothing`` (0..1)."""
    im.check_image(image)
    frames = []
    for index in range(image.shape[0]):
        rgb = im.to_uint8(im.frame_rgb(image, index))
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


def align(image: torch.Tensor, faces: FaceSet, size: int) -> tuple[torch.Tensor, FaceSet]:
    """Cut every selected face at ``size``; returns the crops and the FACES with transforms."""
    check_faces_match(image, faces, "GPEN Restore")
    crops, affines = [], []
    frame_cache: dict[int, np.ndarray] = {}
    for index, face in faces.flat():
        if index not in frame_cache:
            frame_cache = {index: im.frame_rgb(image, index)}
        crop, affine = align_face(frame_cache[index], face.landmarks, size)
        crops.append(crop)
        affines.append(affine)
    return im.crops_to_tensor(crops, size), faces.with_alignment(affines, size)


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


def lanczos(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.clip(cv2.resize(frame, (width, height), interpolation=cv2.INTER_LANCZOS4), 0, 1)


def paste(image: torch.Tensor, crops: torch.Tensor, faces: FaceSet,
          options: PasteOptions = PasteOptions(), upscaler: Upscaler = lanczos,
          parser: FaceParser | None = None,
          on_frame: BatchCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste restored crops onto their frames; returns (IMAGE, MASK).

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
    feather, colour, blend, upscale = options.feather, options.colour, options.blend, options.upscale
    height, width = image.shape[1], image.shape[2]
    out_h, out_w = round(height * upscale), round(width * upscale)
    size = crops.shape[1]
    # Crops may have been resized by other nodes since alignment: rescale the transforms to match.
    rescale = size / faces.crop_size if faces.count else 1.0
    ellipse = face_mask(size, feather)
    images, masks = [], []
    by_frame: dict[int, list[tuple[int, Face]]] = {}
    for k, (index, face) in enumerate(faces.flat()):
        by_frame.setdefault(index, []).append((k, face))
    for index in range(image.shape[0]):
        members = by_frame.get(index, [])
        if not members and upscale == 1.0:
            images.append(image[index].detach().to("cpu", torch.float32))
            masks.append(torch.zeros((height, width), dtype=torch.float32))
        else:
            frame = im.frame_rgb(image, index)
            background = frame if upscale == 1.0 else upscaler(frame, out_w, out_h)
            face_crops, affines, face_masks, originals = [], [], [], []
            for k, face in members:
                affine = face.affine * rescale
                crop = np.clip(crops[k, ..., :3].detach().to("cpu", torch.float32).numpy(), 0, 1)
                mask = parser.mask(crop, feather) if parser else ellipse
                original = warp_to_crop(frame, affine, size)
                if colour:
                    crop = match_colour(crop, original, mask)
                # A crop at least as fine as the frame holds all of the frame's detail, so pasting
                # only the restorer's change is exact where it changed nothing. A coarser crop
                # (a face larger than the model) would let unrestored fine detail through: replace.
                originals.append(original if affine_scale(affine) >= 1.0 else None)
                # Background pixels are ``upscale`` times smaller: image->crop shrinks by as much.
                affine = np.hstack([affine[:, :2] / upscale, affine[:, 2:]])
                face_crops.append(crop)
                affines.append(affine)
                face_masks.append(mask)
            result, mask = paste_faces(background, face_crops, affines, face_masks, blend, originals)
            images.append(im.with_rgb(image, index, result) if upscale == 1.0
                          else im.with_rgb_resized(image, index, result))
            masks.append(torch.from_numpy(mask))
        if on_frame:
            on_frame(index + 1, image.shape[0])
    return torch.stack(images), torch.stack(masks)
