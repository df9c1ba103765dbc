"""What each step did, in words for the user: faces found per frame, faces restored, frames
passed through without a face, indices that matched nothing. The nodes show these on the node
and write them to the log, so no outcome is silent."""

from __future__ import annotations

from collections.abc import Sequence

from .faces import FaceSet

LISTED_FRAMES = 12  # frames named one by one in a notice; beyond that, counted


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _frames(indices: Sequence[int]) -> str:
    """'frame 3' / 'frames 0, 4, 7' / 'frames 0, 1, ... (40 in all)'."""
    shown = ", ".join(str(i) for i in indices[:LISTED_FRAMES])
    more = f", ... ({len(indices)} in all)" if len(indices) > LISTED_FRAMES else ""
    return f"frame {shown}" if len(indices) == 1 else f"frames {shown}{more}"


def unmatched_indices(found: Sequence[int | None], indices: Sequence[int]) -> dict[int, list[int]]:
    """index -> the frames where it pointed past the faces found there (whole-frame searches only)."""
    missed: dict[int, list[int]] = {}
    for frame, count in enumerate(found):
        if count is None:
            continue
        for index in indices:
            if index >= count:
                missed.setdefault(index, []).append(frame)
    return missed


def _unmatched_sentence(found: Sequence[int | None], indices: Sequence[int]) -> str:
    missed = unmatched_indices(found, indices)
    if not missed:
        return ""
    parts = [f"{index} in {_frames(frames)}" for index, frames in sorted(missed.items())]
    return (f" Indices that matched no face: {'; '.join(parts)} (they count from 0 in the chosen order, "
            f"and fewer faces were found).")


def detection(faces: FaceSet, indices: Sequence[int] = ()) -> str:
    """Detect Faces: what was found and kept, per frame."""
    found = list(faces.found) or [len(frame) for frame in faces.frames]
    kept = [len(frame) for frame in faces.frames]
    empty = [i for i, count in enumerate(kept) if count == 0]
    if len(kept) == 1:
        text = (f"{_plural(found[0] or 0, 'face')} found, {kept[0]} selected."
                if found[0] else "No face found.")
    else:
        per_frame = ", ".join(str(count) for count in kept[:LISTED_FRAMES])
        more = ", ..." if len(kept) > LISTED_FRAMES else ""
        text = (f"{len(kept)} frames, {_plural(sum(kept), 'face')} selected; faces per frame: "
                f"{per_frame}{more}.")
    if empty:
        where = "The image" if len(kept) == 1 else _frames(empty).capitalize()
        text += f" {where} without a face will pass through unchanged."
    return text + _unmatched_sentence(found, indices)


def restoration(count: int, size: int, seconds: float) -> str:
    """GPEN Restore: how many faces went through the model."""
    if count == 0:
        return "No faces to restore (none selected): the image passes through unchanged."
    return f"Restored {_plural(count, 'face')} at {size}x{size} in {seconds:.1f} s."


def fidelity_ignored(model: str) -> str:
    """GPEN Restore / Restore Video: a fidelity set for a model without one."""
    return f"fidelity is CodeFormer's weight; {model} has none, so it was ignored."


def paste(faces: FaceSet, upscale: float) -> str:
    """Paste Back: faces pasted, frames without a face passed through."""
    empty = [i for i, frame in enumerate(faces.frames) if not frame]
    frames = len(faces.frames)
    with_faces = frames - len(empty)
    text = f"Pasted {_plural(faces.count, 'face')} into {with_faces} of {_plural(frames, 'frame')}"
    text += f", upscaled {upscale:g}x." if upscale != 1.0 else "."
    if empty:
        what = "the frame" if frames == 1 else _frames(empty)
        text += f" No face in {what}: passed through unchanged{' (only enlarged)' if upscale != 1.0 else ''}."
    return text


def video(faces_per_frame: Sequence[int], found: Sequence[int | None], indices: Sequence[int] = ()) -> str:
    """GPEN Restore Video: frames, faces restored, frames passed through."""
    frames = len(faces_per_frame)
    empty = [i for i, count in enumerate(faces_per_frame) if count == 0]
    text = (f"{_plural(frames, 'frame')}: restored {_plural(sum(faces_per_frame), 'face')} in "
            f"{_plural(frames - len(empty), 'frame')}")
    text += f"; {_frames(empty)} had no face and passed through unchanged." if empty else "."
    return text + _unmatched_sentence(found, indices)
