"""gpen.video on generated clips: what a decode -> encode round trip keeps (frames, timing,
size, rotation, audio), that outputs are atomic and never overwrite, that every bad input is a
VideoError naming the file, and that reading and writing take the same memory for any length."""

import io
import subprocess
import sys
import textwrap
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import videoclips
from gpen.video import (AudioWaveform, VideoError, VideoInfo, VideoReader, VideoWriter, output_pix_fmt,
                        Span, partial_path, probe)

REPO = Path(__file__).resolve().parents[1]
UNCHANGED_LIMIT = 2.0  # mean abs difference, 0..255: the bound for frames left alone


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Each clip made once per module, on first use."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[str, Path] = {}
    makers = {
        "face720": lambda p: videoclips.face_clip(p, 1280, 720, frames=30),
        "face1080": lambda p: videoclips.face_clip(p, 1920, 1080, frames=20),
        "no_face": videoclips.no_face_clip,
        "vfr": videoclips.vfr_clip,
        "odd": videoclips.odd_clip,
        "avi": videoclips.avi_clip,
        **{f"rotated{r}": (lambda p, r=r: videoclips.rotated_clip(p, r)) for r in (90, 180, 270)},
    }

    def get(name: str) -> Path:
        if name not in made:
            made[name] = makers[name](folder / f"{name}.mp4")
        return made[name]

    return get


def read_all(source) -> tuple[VideoInfo, list]:
    with VideoReader(source) as reader:
        return reader.info, list(reader.frames())


def copy_video(source, target: Path, **writer) -> None:
    """What the engine does to a video with no faces: decode, write every frame back."""
    with VideoReader(source) as reader, VideoWriter(target, reader.info, audio_from=source, **writer) as out:
        for frame in reader.frames():
            out.write(frame.rgb, frame.pts, frame.duration)


def mean_abs_diff(a: list, b: list) -> float:
    return float(np.mean([np.abs(x.rgb.astype(np.int16) - y.rgb.astype(np.int16)).mean() for x, y in zip(a, b)]))


def audio_packets(path: Path) -> list[list[tuple[float, bytes]]]:
    with av.open(str(path)) as container:
        return [[(float(p.pts * p.time_base), bytes(p)) for p in container.demux(s) if p.dts is not None]
                for s in container.streams.audio]


def decoded_audio(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [np.concatenate([f.to_ndarray() for f in container.decode(s)], axis=1)
                for s in container.streams.audio]


def assert_same_timing(source: list, copy: list, info: VideoInfo) -> None:
    assert len(copy) == len(source)
    half_tick = float(info.time_base) / 2
    assert max(abs(a.time - b.time) for a, b in zip(source, copy)) <= half_tick


# Round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["face720", "face1080", "no_face"])
def test_round_trip_keeps_frames_timing_size_and_audio(name, clips, tmp_path):
    source = clips(name)
    info, frames = read_all(source)
    target = tmp_path / "copy.mp4"
    copy_video(source, target)
    out_info, out_frames = read_all(target)

    assert (out_info.width, out_info.height, out_info.pix_fmt) == (info.width, info.height, "yuv420p")
    assert out_info.frame_count == info.frame_count == len(frames)
    assert out_info.frame_rate == info.frame_rate
    assert out_info.duration == pytest.approx(info.duration, abs=1e-3)
    assert_same_timing(frames, out_frames, info)
    diff = mean_abs_diff(frames, out_frames)
    print(f"{name} {info.width}x{info.height}: unchanged frames re-encoded, mean abs diff {diff:.2f}/255")
    assert diff <= UNCHANGED_LIMIT
    # The audio is the source's packets, byte for byte, so it decodes to the same samples.
    assert out_info.audio_streams == info.audio_streams == 1
    assert audio_packets(target) == audio_packets(source)
    np.testing.assert_array_equal(decoded_audio(target)[0], decoded_audio(source)[0])


def test_audio_is_interleaved_with_the_video(clips, tmp_path):
    """Audio is muxed as the video advances, so players and streamers never wait for it."""
    target = tmp_path / "copy.mp4"
    copy_video(clips("face720"), target)
    latest = {}
    worst = 0.0
    with av.open(str(target)) as container:
        for packet in container.demux():
            if packet.dts is None:
                continue
            latest[packet.stream.type] = float(packet.dts * packet.time_base)
            if len(latest) == 2:
                worst = max(worst, abs(latest["video"] - latest["audio"]))
    assert len(latest) == 2 and worst < 0.5


def test_variable_frame_rate_keeps_every_timestamp(clips, tmp_path):
    source = clips("vfr")
    info, frames = read_all(source)
    assert [f.pts for f in frames] == videoclips.vfr_pts(len(frames))  # the source really is irregular
    target = tmp_path / "copy.mp4"
    copy_video(source, target)
    out_info, out_frames = read_all(target)
    assert_same_timing(frames, out_frames, info)
    assert ([f.duration * out_info.time_base for f in out_frames]
            == [f.duration * info.time_base for f in frames])
    assert out_info.duration == pytest.approx(info.duration, abs=1e-6)
    assert out_info.frame_rate == info.frame_rate  # average: frames / duration
    assert audio_packets(target) == audio_packets(source)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames_and_upright_output(rotation, clips, tmp_path):
    source = clips(f"rotated{rotation}")
    info, frames = read_all(source)
    assert (info.rotation, info.width, info.height) == (rotation, 360, 640)
    upright = list(videoclips.pan_zoom(360, 640, len(frames)))
    assert all(f.rgb.shape == (640, 360, 3) for f in frames)
    assert np.mean([np.abs(u.astype(np.int16) - f.rgb).mean() for u, f in zip(upright, frames)]) < 4
    upside_down = np.mean([np.abs(cv2.rotate(u, cv2.ROTATE_180).astype(np.int16) - f.rgb).mean()
                           for u, f in zip(upright, frames)])
    assert upside_down > 20  # the comparison can tell orientations apart

    target = tmp_path / "copy.mp4"
    copy_video(source, target)
    out_info, out_frames = read_all(target)
    # Written upright, so every player shows it the same way without metadata.
    assert (out_info.rotation, out_info.width, out_info.height) == (0, 360, 640)
    diff = mean_abs_diff(frames, out_frames)
    print(f"rotated {rotation}, 360x640: mean abs diff {diff:.2f}/255")
    assert diff < 3.5  # small frames of a detailed scene; see test_odd_sized_444_source_round_trips
    assert audio_packets(target) == audio_packets(source)


@pytest.mark.parametrize("size, pix_fmt", [((321, 241), "yuv444p"), ((320, 241), "yuv422p"),
                                           ((321, 240), "yuv444p"), ((320, 240), "yuv420p")])
def test_odd_sizes_are_kept_with_the_chroma_h264_allows(size, pix_fmt, tmp_path):
    width, height = size
    frames = list(videoclips.pan_zoom(width, height, 6))
    info = VideoInfo.for_frames(width, height, 24)
    assert output_pix_fmt(info) == pix_fmt
    target = tmp_path / "odd.mp4"
    with VideoWriter(target, info) as out:
        for rgb in frames:
            out.write(rgb)
    out_info, out_frames = read_all(target)
    assert (out_info.width, out_info.height, out_info.pix_fmt, out_info.frame_count) == (width, height, pix_fmt, 6)
    assert np.mean([np.abs(f.rgb.astype(np.int16) - rgb).mean() for f, rgb in zip(out_frames, frames)]) < 3.5


@pytest.mark.parametrize("matrix, tagged, size", [("ITU709", True, (640, 360)), ("ITU601", True, (640, 360)),
                                                   ("ITU709", False, (1280, 720)), ("ITU601", False, (640, 360))])
def test_colour_is_read_by_the_stream_tags_or_as_players_guess(matrix, tagged, size, tmp_path):
    """Tagged BT.709 and BT.601 both decode to the original colours; untagged video is read
    BT.709 when HD and BT.601 otherwise, as players do."""
    width, height = size
    originals = list(videoclips.pan_zoom(width, height, 3))
    path = videoclips.write_clip(tmp_path / "colour.mp4", originals, matrix=matrix, tagged=tagged,
                                 pix_fmt="yuv444p", options={"crf": "0", "preset": "ultrafast"})
    _, frames = read_all(path)
    diffs = [np.abs(f.rgb.astype(np.int16) - rgb).mean(axis=(0, 1)) for f, rgb in zip(frames, originals)]
    assert np.max(diffs) < 1.0  # per channel: a wrong matrix shifts colours by several levels


def test_richer_sources_keep_their_chroma():
    base = VideoInfo.for_frames(640, 360, 30)
    assert output_pix_fmt(base) == "yuv420p"
    assert output_pix_fmt(VideoInfo.for_frames(640, 360, 30, pix_fmt="yuv444p")) == "yuv444p"
    assert output_pix_fmt(VideoInfo.for_frames(640, 360, 30, pix_fmt="gbrp")) == "yuv444p"
    assert output_pix_fmt(VideoInfo.for_frames(640, 360, 30, pix_fmt="yuv422p10le")) == "yuv422p"
    assert output_pix_fmt(VideoInfo.for_frames(640, 360, 30, pix_fmt="gray")) == "yuv420p"
    # 4:2:2 turned upright by a 90-degree rotation halves vertical chroma: only 4:4:4 keeps it.
    assert output_pix_fmt(replace(VideoInfo.for_frames(360, 640, 30, pix_fmt="yuv422p"), rotation=90)) == "yuv444p"


def test_odd_sized_444_source_round_trips(clips, tmp_path):
    """An odd-sized 4:4:4 source keeps size, chroma and timing. Small frames of a detailed scene
    lose more per pixel at CRF 18 (~2-3/255 here, at any zoom of the scene) than the 720p and
    1080p clips (~1.3-1.6/255), hence the looser bound for the small clips."""
    source = clips("odd")
    info, frames = read_all(source)
    target = tmp_path / "odd.mp4"
    copy_video(source, target)
    out_info, out_frames = read_all(target)
    assert (out_info.width, out_info.height, out_info.pix_fmt) == (321, 241, "yuv444p")
    assert_same_timing(frames, out_frames, info)
    diff = mean_abs_diff(frames, out_frames)
    print(f"321x241 4:4:4: mean abs diff {diff:.2f}/255")
    assert diff < 3.5


def test_audio_mp4_cannot_hold_is_reencoded_to_aac(clips, tmp_path, caplog):
    """An AVI's 8-bit PCM has no place in MP4: it becomes AAC (with a warning), same rate,
    channels and length; the full-range MJPEG pictures come through intact."""
    source = clips("avi")
    info, frames = read_all(source)
    assert (info.codec, info.pix_fmt) == ("mjpeg", "yuvj420p")
    target = tmp_path / "copy.mp4"
    copy_video(source, target)
    assert "re-encoding it to AAC" in caplog.text
    out_info, out_frames = read_all(target)
    assert_same_timing(frames, out_frames, info)
    assert mean_abs_diff(frames, out_frames) < 3.5
    with av.open(str(source)) as a, av.open(str(target)) as b:
        src, out = a.streams.audio[0], b.streams.audio[0]
        assert (out.codec_context.name, out.sample_rate, out.channels) == ("aac", src.sample_rate, src.channels)
    sweep = videoclips.sine_sweep(len(frames) / 30)
    decoded = decoded_audio(target)[0]
    assert abs(decoded.shape[1] - sweep.shape[1]) <= 2048  # AAC pads to whole 1024-sample frames
    n = sweep.shape[1] - 2048
    lag = max(range(0, 2048, 1), key=lambda k: float(decoded[0, k:k + n] @ sweep[0, :n]))
    assert np.corrcoef(decoded[0, lag:lag + n], sweep[0, :n])[0, 1] > 0.95


def test_frames_and_waveform_from_memory(tmp_path):
    """ComfyUI's VideoFromComponents: frames with no container and audio as a waveform."""
    frames = list(videoclips.pan_zoom(320, 180, 12))
    sweep = videoclips.sine_sweep(0.5, sample_rate=44_100)
    info = VideoInfo.for_frames(320, 180, Fraction(24), frame_count=12)
    target = tmp_path / "memory.mp4"
    with VideoWriter(target, info, audio_from=AudioWaveform(sweep, 44_100)) as out:
        for rgb in frames:
            out.write(rgb)
    out_info, out_frames = read_all(target)
    assert (out_info.frame_count, out_info.frame_rate) == (12, 24)
    assert out_info.duration == pytest.approx(0.5)
    assert [f.time for f in out_frames] == pytest.approx([i / 24 for i in range(12)])
    with av.open(str(target)) as container:
        audio = container.streams.audio[0]
        assert (audio.codec_context.name, audio.sample_rate, audio.channels) == ("aac", 44_100, 2)
    decoded = decoded_audio(target)[0]
    n = sweep.shape[1] - 2048
    lag = max(range(0, 2048), key=lambda k: float(decoded[0, k:k + n] @ sweep[0, :n]))
    assert np.corrcoef(decoded[0, lag:lag + n], sweep[0, :n])[0, 1] > 0.95


def test_in_memory_source_shared_by_reader_and_writer(clips, tmp_path):
    """ComfyUI may hand over one BytesIO; reading frames and copying its audio must not collide."""
    buffer = io.BytesIO(clips("face720").read_bytes())
    target = tmp_path / "copy.mp4"
    copy_video(buffer, target)
    assert read_all(target)[0].frame_count == 30
    assert audio_packets(target) == audio_packets(clips("face720"))


def test_chunks_cover_every_frame_once_in_order(clips):
    with VideoReader(clips("face720")) as reader:
        chunks = list(reader.chunks(8))
        with pytest.raises(RuntimeError):
            next(reader.frames())
    assert [len(c) for c in chunks] == [8, 8, 8, 6]
    assert [f.index for c in chunks for f in c] == list(range(30))
    assert all(f.rgb.shape == (720, 1280, 3) and f.rgb.dtype == np.uint8 for c in chunks for f in c)


def test_probe_reads_the_container(clips):
    info = probe(clips("face720"))
    assert (info.width, info.height, info.frame_count, info.frame_rate) == (1280, 720, 30, 30)
    assert (info.codec, info.pix_fmt, info.rotation, info.audio_streams) == ("h264", "yuv420p", 0, 1)
    assert info.duration == pytest.approx(1.0) and info.expected_frames == 30
    assert str(clips("face720")) == info.path


# Atomic output -------------------------------------------------------------------------------

def test_failure_inside_the_writer_leaves_nothing(clips, tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(KeyError), VideoReader(clips("face720")) as reader, \
            VideoWriter(target, reader.info, audio_from=clips("face720")) as out:
        for frame in reader.frames():
            out.write(frame.rgb, frame.pts)
            if frame.index == 10:
                assert partial_path(target).exists() and not target.exists()
                raise KeyError("cancelled")
    assert list(tmp_path.iterdir()) == []


def test_abort_removes_the_partial_file(tmp_path):
    target = tmp_path / "out.mp4"
    out = VideoWriter(target, VideoInfo.for_frames(64, 48, 10))
    out.write(np.zeros((48, 64, 3), np.uint8))
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_never_overwritten(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"user's file")
    with pytest.raises(FileExistsError, match="never overwritten"):
        VideoWriter(target, VideoInfo.for_frames(64, 48, 10))
    assert target.read_bytes() == b"user's file"

    # A file that appears while encoding is not replaced either.
    late = tmp_path / "late.mp4"
    out = VideoWriter(late, VideoInfo.for_frames(64, 48, 10))
    out.write(np.zeros((48, 64, 3), np.uint8))
    late.write_bytes(b"arrived meanwhile")
    with pytest.raises(FileExistsError, match="not overwritten"):
        out.close()
    assert late.read_bytes() == b"arrived meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.mp4", "out.mp4"]


def test_nothing_written_is_an_error_not_an_empty_file(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="No frames"):
        with VideoWriter(target, VideoInfo.for_frames(64, 48, 10)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_wrong_frame_shape_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="48x64x3 uint8"):
        with VideoWriter(tmp_path / "out.mp4", VideoInfo.for_frames(64, 48, 10)) as out:
            out.write(np.zeros((64, 48, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


# Bad inputs ----------------------------------------------------------------------------------

BAD_INPUTS = {
    "truncated, index first": (videoclips.truncated_clip, "truncated"),
    "truncated, index lost": (lambda p: videoclips.truncated_clip(p, "index last"), "incomplete"),
    "audio only": (videoclips.audio_only, "no video stream"),
    "zero frames": (videoclips.zero_frame_clip, "no frames"),
    "garbage payload": (videoclips.garbage_clip, "decoding failed"),
    "unknown codec": (videoclips.unknown_codec_clip, "codec"),
    "not a video": (videoclips.not_a_video, "not a readable video"),
    "missing": (lambda p: p, "not found"),
    "folder": (lambda p: p.mkdir() or p, "folder"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_video_error_naming_the_file(case, tmp_path):
    make, says = BAD_INPUTS[case]
    path = make(tmp_path / "holiday clip.mp4")
    for attempt in (probe, VideoReader):
        with pytest.raises(VideoError, match=says) as error:
            attempt(path)
        assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)  # shown in ComfyUI's error dialog


def test_truncated_file_without_index_ends_early_with_a_warning(tmp_path, caplog):
    """Matroska needs no index, so a cut file plays up to the cut; that is said, not hidden."""
    path = videoclips.truncated_clip(tmp_path / "cut.mkv", "matroska")
    info, frames = read_all(path)
    assert 0 < len(frames) < 0.9 * info.expected_frames
    assert f"{path}: only {len(frames)} of the {info.expected_frames} frames" in caplog.text


def test_bad_input_in_memory_is_named_as_such(tmp_path):
    data = videoclips.truncated_clip(tmp_path / "t.mp4").read_bytes()
    with pytest.raises(VideoError, match="the video in memory is truncated"):
        probe(io.BytesIO(data))


# Memory --------------------------------------------------------------------------------------

COPY_AND_MEASURE = textwrap.dedent("""
    import sys, types
    # gpen.video without the package's __init__ (which imports torch), so its own memory shows.
    package = sys.modules["gpen"] = types.ModuleType("gpen")
    package.__path__ = ["gpen"]
    import gpen.video as video
    source, target = sys.argv[1:]
    with video.VideoReader(source) as reader, video.VideoWriter(target, reader.info, audio_from=source) as out:
        for chunk in reader.chunks(16):
            for frame in chunk:
                out.write(frame.rgb, frame.pts, frame.duration)
    # Peak RSS of this process image (ru_maxrss would carry over the parent's peak across exec).
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]))
""")


def test_memory_does_not_grow_with_the_length_of_the_clip(tmp_path):
    """Peak RSS of a full read + write (with audio) is the same for 150 and 1,200 frames."""
    width, height = 160, 120
    peaks = {}
    for frames in (150, 1200):
        source = videoclips.write_clip(tmp_path / f"long{frames}.mp4", videoclips.pan_zoom(width, height, frames),
                                       audio=videoclips.sine_sweep(frames / 30))
        copy = tmp_path / f"copy{frames}.mp4"
        result = subprocess.run([sys.executable, "-c", COPY_AND_MEASURE, str(source), str(copy)],
                                cwd=REPO, capture_output=True, text=True, check=True)
        peaks[frames] = int(result.stdout.split()[-1]) / 1024
        assert probe(copy).frame_count == frames
    held = 1050 * width * height * 3 / 2**20
    print(f"peak RSS: 150 frames {peaks[150]:.1f} MiB, 1200 frames {peaks[1200]:.1f} MiB "
          f"(ratio {peaks[1200] / peaks[150]:.3f}; holding the extra 1,050 frames would add {held:.0f} MiB)")
    assert held > 0.5 * peaks[150]  # the test could see frames being kept
    assert peaks[1200] <= peaks[150] * 1.10


# Trimmed videos (ComfyUI's Trim Video: start, duration, negative start from the end) ----------

TRIMS = {"start only": Span(start=1.0), "duration only": Span(duration=1.0),
         "negative start": Span(start=-1.0), "start and duration": Span(start=0.55, duration=0.75)}


@pytest.fixture(scope="module")
def keyframed_clip(tmp_path_factory) -> Path:
    """3 s at 30 fps with sound, a keyframe every 12 frames, so a trim seeks into the middle."""
    return videoclips.write_clip(tmp_path_factory.mktemp("trim") / "clip.mp4",
                                 videoclips.gradients(320, 240, 90), fps=30, audio=videoclips.sine_sweep(3.0),
                                 options={"crf": "12", "preset": "ultrafast", "g": "12"})


@pytest.mark.parametrize("span", TRIMS.values(), ids=TRIMS.keys())
def test_a_trimmed_video_is_read_and_written_as_its_span(span, keyframed_clip, tmp_path):
    info, everything = read_all(keyframed_clip)
    start = info.duration + span.start if span.start < 0 else span.start
    first, end = int(start / info.time_base), int((start + span.duration) / info.time_base) if span.duration else None
    expected = [f for f in everything if f.pts >= first and (end is None or f.pts < end)]
    with VideoReader(keyframed_clip, span) as reader:
        trimmed, frames, audio = reader.info, list(reader.frames()), reader.audio
    assert 0 < len(frames) == len(expected) < len(everything)
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(frames, expected))
    assert [f.pts for f in frames] == [f.pts - expected[0].pts for f in expected]  # timed from 0
    assert [f.index for f in frames] == list(range(len(frames)))
    assert trimmed.expected_frames == len(expected)
    assert audio.start == pytest.approx(float(expected[0].pts * info.time_base))

    out = tmp_path / "trimmed.mp4"
    with VideoWriter(out, trimmed, audio_from=audio) as writer:
        for frame in frames:
            writer.write(frame.rgb, frame.pts, frame.duration)
    written = probe(out)
    assert written.frame_count == len(expected)
    assert written.duration == pytest.approx(len(expected) / 30, abs=0.04)
    source_sound, (sound,) = audio_packets(keyframed_clip)[0], audio_packets(out)
    kept = [(t - audio.start, data) for t, data in source_sound  # from 0: with the encoder delay
            if (t >= audio.start or audio.start == 0) and (audio.end is None or t < audio.end)]
    assert [data for _, data in sound] == [data for _, data in kept]  # the span's packets, copied
    assert max(abs(a - b) for (a, _), (b, _) in zip(sound, kept)) < 1e-3  # and moved to its start
    assert sound[-1][0] == pytest.approx(written.duration, abs=0.05)


def test_a_trim_past_the_end_is_a_clear_error(keyframed_clip):
    with pytest.raises(VideoError, match="trim window .* holds no frame .*Trim Video"):
        VideoReader(keyframed_clip, Span(start=5.0))
