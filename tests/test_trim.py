"""Trim Video -> GPEN Restore Video in a real ComfyUI that has Trim Video (0.33): only the
trimmed frames come out, timed from 0, with the sound of that span. Hosts without a trim API
(0.3.75) are covered by test_video_node: their videos go through whole, as before.

Marked ``trim``: scripts/test.sh runs these against the hosts that have the node."""

import av
import numpy as np
import pytest

import videoclips
from gpen.video import VideoReader, probe
from test_video_node import TINY, saved_video, video_graph

pytestmark = pytest.mark.trim
FPS = 24
SECONDS = 3.0
TRIMS = {"start only": (1.0, 0.0), "duration only": (0.0, 1.0), "negative start": (-1.0, 0.0)}
CODEC_TOLERANCE = 3.0  # mean abs difference, 0..255, between two re-encodes of one decoded frame


@pytest.fixture(scope="module")
def clip(served):
    """3 s, 72 faceless frames (so they pass through), each unlike its neighbours, a keyframe
    every 12 frames, and a sine sweep whose pitch tells where in time the sound is from."""
    videoclips.write_clip(served.base / "input" / "trim.mp4", videoclips.gradients(320, 240, round(FPS * SECONDS)),
                          fps=FPS, audio=videoclips.sine_sweep(SECONDS),
                          options={"crf": "12", "preset": "ultrafast", "g": "12"})
    return served.base / "input" / "trim.mp4"


def trimmed_graph(start: float, duration: float, prefix: str) -> dict:
    """Load Video -> Trim Video -> GPEN Restore Video -> Save Video, and the host's own save of
    the trimmed input beside it (node 6) to compare with."""
    graph = video_graph("trim.mp4", prefix, TINY)
    graph["7"] = {"class_type": "Video Slice", "inputs": {"video": ["1", 0], "start_time": start,
                                                          "duration": duration, "strict_duration": False}}
    graph["3"]["inputs"]["video"] = ["7", 0]
    graph["6"] = {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": prefix + "_input",
                                                        "format": "auto", "codec": "auto"}}
    return graph


def frames_of(path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [frame.rgb.astype(np.int16) for frame in reader.frames()]


def sound_of(path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1), stream.sample_rate


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def trimmed_source(clip, start: float, duration: float) -> list[np.ndarray]:
    """The frames Trim Video selects, by ComfyUI's own rule: a negative start counts back from the
    container's duration; frames from ``int(start / time_base)`` up to (not including) the end."""
    with av.open(str(clip)) as container:
        length = container.duration / av.time_base
        time_base = container.streams.video[0].time_base
    start = max(length + start, 0.0) if start < 0 else start
    first, end = int(start / time_base), int((start + duration) / time_base) if duration else None
    with VideoReader(clip) as reader:
        return [f.rgb.astype(np.int16) for f in reader.frames() if f.pts >= first and (end is None or f.pts < end)]


@pytest.mark.parametrize("start, duration", TRIMS.values(), ids=TRIMS.keys())
def test_trim_video_gives_exactly_the_trimmed_frames_and_their_sound(served, clip, start, duration):
    entry = served.run(trimmed_graph(start, duration, f"video/trim_{start}_{duration}"))
    restored = saved_video(served, entry)
    (item,) = entry["outputs"]["6"]["images"]
    hosts_own = served.base / "output" / item["subfolder"] / item["filename"]  # Save Video of the trim
    expected = trimmed_source(clip, start, duration)
    assert abs(len(expected) - FPS * (duration or abs(start) if start < 0 else duration or SECONDS - start)) <= 1

    ours = frames_of(restored)
    assert len(ours) == len(expected) == len(frames_of(hosts_own))
    for index in (0, -1):  # first and last frame: the trimmed input's, not a neighbour's
        assert differ(ours[index], expected[index]) <= CODEC_TOLERANCE
        neighbour = expected[1] if index == 0 else expected[-2]
        assert differ(ours[index], neighbour) > 2 * differ(ours[index], expected[index])
    info = probe(restored)
    assert info.frame_rate == FPS and info.duration == pytest.approx(len(expected) / FPS, abs=0.05)

    sound, rate = sound_of(restored)
    source, source_rate = sound_of(clip)
    assert rate == source_rate
    assert sound.shape[1] / rate == pytest.approx(len(expected) / FPS, abs=0.05)
    expected_start = round((SECONDS - len(expected) / FPS if start < 0 else start) * rate)
    found, residual = where_in(source, sound[:, 4096:4096 + 8192], around=expected_start + 4096)
    assert abs(found - expected_start) <= 1100  # from the span's start, within one audio packet
    assert residual < 0.02  # the same samples: packets copied, not re-encoded


def where_in(source: np.ndarray, piece: np.ndarray, around: int, reach: int = 4800) -> tuple[int, float]:
    """Where in ``source`` (samples from ``around - reach`` to ``around + reach``) ``piece`` fits
    best, as the offset its start has there minus 4096, and the largest difference there."""
    errors = {shift: float(np.abs(source[:, shift:shift + piece.shape[1]] - piece).max())
              for shift in range(max(around - reach, 0), around + reach)
              if shift + piece.shape[1] <= source.shape[1]}
    best = min(errors, key=errors.get)
    return best - 4096, errors[best]
