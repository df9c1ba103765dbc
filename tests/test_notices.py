"""What the nodes tell the user for batches and videos (test_ux checks one image in the real
host): faces per frame, frames passed through, indices that matched nothing in which frames."""

import numpy as np

from gpen import notices
from gpen.faces import Face, FaceSet


def faces(count: int) -> list[Face]:
    return [Face((0.0, 0.0, 10.0, 10.0), 0.99, np.zeros((5, 2), np.float32)) for _ in range(count)]


def test_a_batch_lists_faces_per_frame_the_frames_without_one_and_unmatched_indices():
    batch = FaceSet((64, 64), [faces(1), [], faces(1), []], found=(3, 0, 1, None))
    text = notices.detection(batch, indices=(0, 2))
    assert text.startswith("4 frames, 2 faces selected; faces per frame: 1, 0, 1, 0.")
    assert "Frames 1, 3 without a face will pass through unchanged." in text
    # Index 2 pointed past the faces of frames 0 (3 found: matched), 1 (none) and 2 (one);
    # frame 3 followed its faces from earlier frames, so no index is judged there.
    assert "Indices that matched no face: 0 in frame 1; 2 in frames 1, 2 " in text


def test_long_batches_are_counted_not_listed():
    batch = FaceSet((64, 64), [[] for _ in range(40)], found=(0,) * 40)
    text = notices.detection(batch)
    assert "faces per frame: 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ..." in text
    assert "Frames 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (40 in all) without a face" in text


def test_paste_and_restore_say_what_passed_through():
    batch = FaceSet((64, 64), [faces(2), [], faces(1)])
    assert notices.paste(batch, 1.0) == ("Pasted 3 faces into 2 of 3 frames. No face in frame 1: "
                                         "passed through unchanged.")
    assert notices.paste(FaceSet((64, 64), [[]]), 2.0) == ("Pasted 0 faces into 0 of 1 frame, upscaled 2x. "
                                                           "No face in the frame: passed through unchanged "
                                                           "(only enlarged).")
    assert notices.restoration(0, 512, 0.0).startswith("No faces to restore")
    assert notices.restoration(1, 1024, 2.54) == "Restored 1 face at 1024x1024 in 2.5 s."


def test_video_counts_frames_faces_and_the_frames_without_one():
    text = notices.video([1, 0, 2, 0, 1], found=(1, 0, None, None, None), indices=(1,))
    assert text.startswith("5 frames: restored 4 faces in 3 frames; frames 1, 3 had no face and passed "
                           "through unchanged.")
    assert "Indices that matched no face: 1 in frames 0, 1 " in text
    assert notices.video([1], found=(1,)) == "1 frame: restored 1 face in 1 frame."
