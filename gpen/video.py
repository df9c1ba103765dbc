"""Video files in and out one frame at a time, with PyAV (FFmpeg), so a clip never has to fit in
memory: ``VideoReader`` decodes lazily to upright RGB frames, ``VideoWriter`` encodes them as they
come and copies the source's audio packets unchanged; a ``Span`` of a video (ComfyUI's Trim
Video) is read and written as a video of its own, sound included.

Facts this module is built on (PyAV 17.1+; measured with PyAV 18.1, FFmpeg 8):

- Rotation of phone videos is a display matrix that PyAV exposes only on decoded frames
  (``VideoFrame.rotation``, degrees counter-clockwise), so ``probe`` decodes the first frame;
  that also proves the stream decodes at all.
- H.264 codes 4:2:0 chroma, and its frame cropping, in 2-pixel steps: an odd width or height
  cannot be 4:2:0, so odd sizes are written 4:2:2 (odd height) or 4:4:4 (odd width).
- swscale's default YUV<->RGB path drifts about 1.2/255 per round trip; with accurate rounding and
  full chroma interpolation it is near-idempotent (< 0.1/255), which keeps an unchanged frame
  within 2/255 of the source after a CRF 18 re-encode.
- x264 is not bit-reproducible run to run with threads: compare encodes with tolerances.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

from .atomic import partial_path, publish

log = logging.getLogger(__name__)

Source = str | Path | BinaryIO

OUTPUT_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
DEFAULT_CRF = 18
# Measured on 2 busy cores, CPU ms per frame incl. RGB->YUV, 1080p / 720p: ultrafast 37 / 17,
# superfast 51 / 20, veryfast 59 / 34; superfast files are ~55 % of ultrafast's at the same CRF.
DEFAULT_PRESET = "superfast"
# swscale flags (libswscale/swscale.h; PyAV names them only from 18 on). Accurate rounding and
# full chroma interpolation both ways: see the module docstring.
_SWS_BILINEAR, _SWS_FULL_CHR_H_INT, _SWS_FULL_CHR_H_INP, _SWS_ACCURATE_RND = 0x2, 0x2000, 0x4000, 0x40000
DECODE_SCALING = _SWS_BILINEAR | _SWS_ACCURATE_RND | _SWS_FULL_CHR_H_INT
ENCODE_SCALING = _SWS_BILINEAR | _SWS_ACCURATE_RND | _SWS_FULL_CHR_H_INP
# AVColorSpace tag of a decoded frame -> swscale matrix name.
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
_BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709: the tags written on every output
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG
_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
# A stream whose first packets never give a picture is broken; stop looking instead of reading it all.
_PACKETS_BEFORE_FIRST_PICTURE = 500
_AUDIO_CHUNK_SECONDS = 0.1
_MUXER_OPTIONS = {".mp4": {"movflags": "+faststart"}, ".m4v": {"movflags": "+faststart"},
                  ".mov": {"movflags": "+faststart"}}


class VideoError(ValueError):
    """A video that cannot be read or written; the message names the file and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, read from its container and first frame, so work can be planned (sizes,
    progress totals, output settings) before any frame is processed."""

    path: str  # for messages
    width: int  # as displayed: rotation applied
    height: int
    frame_count: int | None  # as the container states it; None when it does not say
    frame_rate: Fraction  # average
    time_base: Fraction  # unit of every pts
    duration: float | None  # seconds
    rotation: int = 0  # degrees clockwise the source asks players to turn it (0/90/180/270)
    pix_fmt: str = "yuv420p"  # of the source stream: decides the output's chroma
    codec: str = "h264"
    audio_streams: int = 0

    @classmethod
    def for_frames(cls, width: int, height: int, frame_rate: Fraction | float, *,
                   frame_count: int | None = None, pix_fmt: str = "yuv420p",
                   name: str = "frames in memory") -> VideoInfo:
        """Describe frames that come from memory (no source container), e.g. ComfyUI's
        VideoFromComponents, so a VideoWriter can encode them; pts then count frames."""
        rate = Fraction(frame_rate).limit_denominator(1001)
        if rate <= 0:
            raise ValueError(f"Frame rate must be positive; got {frame_rate}.")
        return cls(path=name, width=int(width), height=int(height), frame_count=frame_count,
                   frame_rate=rate, time_base=1 / rate,
                   duration=None if frame_count is None else float(frame_count / rate),
                   pix_fmt=pix_fmt, codec="rawvideo")

    @property
    def expected_frames(self) -> int | None:
        """Frame count for a progress bar: the container's, else estimated from the duration."""
        if self.frame_count:
            return self.frame_count
        if self.duration:
            return round(self.duration * self.frame_rate)
        return None


@dataclass(frozen=True)
class Span:
    """A stretch of a video, as ComfyUI's Trim Video gives it: ``start`` seconds into the video
    (negative: counted back from its end) for ``duration`` seconds (0: to the end). Frames whose
    pts is at or after the start and before the end are in it, as in ComfyUI's own decode."""

    start: float = 0.0
    duration: float = 0.0

    def __post_init__(self) -> None:
        if self.duration < 0:
            raise ValueError(f"A trim duration cannot be negative; got {self.duration:g} s.")

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.duration == 0


@dataclass(frozen=True)
class AudioSpan:
    """The audio of ``source`` from ``start`` to ``end`` seconds (None: to its end), moved so
    that ``start`` plays at 0: the sound of a trimmed video."""

    source: Source
    start: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class DecodedFrame:
    """One upright RGB frame with its place in time."""

    index: int
    rgb: np.ndarray  # HxWx3 uint8, as displayed
    pts: int  # in VideoInfo.time_base units, as in the source
    time: float  # seconds
    duration: int | None = None  # time_base units until the next frame, when the container says


@dataclass(frozen=True)
class AudioWaveform:
    """Audio held in memory, e.g. ComfyUI's AUDIO (``waveform[0]`` of [B, C, N]), to be encoded
    as AAC beside the video."""

    samples: np.ndarray  # [channels, samples] float32, -1..1
    sample_rate: int

    def __post_init__(self) -> None:
        if self.samples.ndim != 2 or not 1 <= self.samples.shape[0] <= 8:
            raise ValueError(f"Audio samples must be [channels, samples] with 1-8 channels; "
                             f"got shape {tuple(self.samples.shape)}.")
        if self.sample_rate <= 0:
            raise ValueError(f"Audio sample rate must be positive; got {self.sample_rate}.")


def probe(source: Source) -> VideoInfo:
    """Read a video's VideoInfo, raising VideoError for anything that will not decode (missing,
    not a video, no video stream, no frames, truncated, unknown codec) before work starts."""
    with VideoReader(source) as reader:
        return reader.info


class VideoReader:
    """Decode a video lazily into upright RGB frames: one decoded frame in memory at a time.

    A truncated file raises VideoError where that can be known: at open when its index shows the
    missing bytes (MP4/MOV) or was lost with them, else when decoding fails; frames already
    yielded are not taken back, and a writer fed from them is aborted by its context manager.
    A format that needs no index (Matroska, MPEG-TS) cut between packets just ends early: that is
    logged as a warning when the container's stated length promised clearly more frames.
    """

    def __init__(self, source: Source, span: Span = Span()):
        self._source = source
        self._container, name, size = _open(source)
        try:
            self.info, self._decoded = _inspect(self._container, name, size)
            self._stream = _video_stream(self._container)
            self._offset, self._end = 0, None
            if not span.whole:
                self._trim(span)
        except BaseException:
            self._container.close()
            raise
        self._started = False

    def _trim(self, span: Span) -> None:
        """Decode from the keyframe before the span, drop the frames before it, and describe the
        span as the video: its frames are numbered and timed from 0 (as ComfyUI's trimmed
        decode and save do), its duration is the span's."""
        info = self.info
        length = info.duration or 0.0
        start = max(length + span.start, 0.0) if span.start < 0 else span.start
        start_pts = int(start / info.time_base)
        self._end = int((start + span.duration) / info.time_base) if span.duration else None
        decoded = self._decoded_from(start_pts)
        first = next(decoded, None)
        if first is None:
            window = f"{span.duration:.3f} s from {start:.3f} s" if span.duration else f"from {start:.3f} s to the end"
            raise VideoError(f"{info.path}: the trim window ({window}) holds no frame of this {length:.3f} s "
                             "video. Change Trim Video's start_time and duration.")
        self._offset = first.pts or 0
        self._decoded = itertools.chain([first], decoded)
        left = length - self._offset * info.time_base
        duration = min(span.duration, left) if span.duration else left
        self.info = replace(info, frame_count=None, duration=max(float(duration), 0.0))

    @property
    def audio(self) -> AudioSpan:
        """The source's audio over the frames this reader gives, timed like them."""
        time_base = self.info.time_base
        return AudioSpan(self._source, float(self._offset * time_base),
                         None if self._end is None else float(self._end * time_base))

    def frames(self) -> Iterator[DecodedFrame]:
        """Frames in decode order (= display order), once per reader."""
        self._start()
        count = 0
        for count, decoded in enumerate(self._upright_frames(self._decoded, 0), start=1):
            yield decoded
        expected = self.info.expected_frames
        if expected and count < 0.9 * expected - 1 and self._end is None:  # edit lists legitimately drop a few
            log.warning("%s: only %d of the %d frames its container announces could be read; the "
                        "file is probably truncated.", self.info.path, count, expected)

    def frames_from(self, pts: int, index: int) -> Iterator[DecodedFrame]:
        """The frames from the one at ``pts`` (VideoInfo.time_base units) on, numbered from
        ``index`` (its place in the whole video), decoded from the keyframe before it rather
        than from the start: one segment of a long video. Once per reader, instead of frames()."""
        self._start()
        return self._upright_frames(self._decoded_from(pts), index)

    def _decoded_from(self, pts: int) -> Iterator[av.VideoFrame]:
        """Decoded frames from the one at ``pts`` on, and before the reader's end."""
        back = 0
        while True:  # a keyframe found by its decode time may show after ``pts``: seek further back
            self._container.seek(max(pts - back, 0), stream=self._stream, backward=True)
            decoded = _decode(self._container, self._stream, self.info.path)
            first = next(decoded)
            if first.pts is None or first.pts <= pts or pts - back <= (self._stream.start_time or 0):
                break
            decoded.close()
            back = max(2 * back, round(1 / self.info.time_base))  # one second, then doubling
        frames = itertools.chain([first], decoded)
        kept = (frame for frame in frames if frame.pts is None or frame.pts >= pts)
        return kept if self._end is None else itertools.takewhile(
            lambda frame: frame.pts is None or frame.pts < self._end, kept)

    def _start(self) -> None:
        if self._started:
            raise RuntimeError("A VideoReader's frames can be iterated once; open a new reader to start over.")
        self._started = True

    def _upright_frames(self, decoded: Iterator[av.VideoFrame], first_index: int) -> Iterator[DecodedFrame]:
        info = self.info
        ticks_per_frame = 1 / (info.frame_rate * info.time_base)
        for index, frame in enumerate(decoded, start=first_index):
            # Elementary streams (.h264) carry no timestamps: count frames instead.
            pts = frame.pts - self._offset if frame.pts is not None else round(index * ticks_per_frame)
            yield DecodedFrame(index, _upright(_to_rgb(frame), info.rotation), pts,
                               float(pts * info.time_base), frame.duration or None)

    def chunks(self, size: int) -> Iterator[list[DecodedFrame]]:
        """Frames in lists of ``size`` (the last may be shorter), for batched work."""
        if size < 1:
            raise ValueError(f"Chunk size must be at least 1; got {size}.")
        frames = self.frames()
        while chunk := list(itertools.islice(frames, size)):
            yield chunk

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoWriter:
    """Encode RGB frames incrementally to H.264 and publish the file only when it is complete.

    Frames go to ``.NAME.partial.SUFFIX`` beside ``path``, which becomes ``path`` on a successful
    ``close()``; an existing ``path`` is never overwritten. Leaving the context with an exception
    (or calling ``abort()``, e.g. on cancel) removes the partial file. Audio comes from
    ``audio_from``: a source video whose audio streams are copied packet for packet (re-encoded
    to AAC only where the output container cannot hold the codec), an AudioSpan of such a
    video (a trimmed one's sound), or an AudioWaveform.
    With ``copy_from`` (a video stream of an open file) nothing is encoded: ``copy()`` muxes
    that stream's packets as they are, which is how segments are joined (``join_segments``).
    """

    def __init__(self, path: str | Path, info: VideoInfo,
                 audio_from: Source | AudioSpan | AudioWaveform | None = None, *, crf: int = DEFAULT_CRF,
                 preset: str = DEFAULT_PRESET, pix_fmt: str | None = None,
                 copy_from: av.VideoStream | None = None):
        self.path = Path(path)
        if self.path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"Cannot write video '{self.path}': use one of {', '.join(OUTPUT_SUFFIXES)}.")
        if self.path.exists():
            raise FileExistsError(f"{self.path} already exists and is never overwritten; choose another "
                                  f"output name or move the existing file away.")
        self.info = info
        self.partial = partial_path(self.path)
        self.pix_fmt = pix_fmt or output_pix_fmt(info)
        self.frames_written = 0
        self._last_pts: int | None = None
        self._durations: dict[int, int] = {}
        self._video_time = float("-inf")
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.partial), mode="w",
                                  options=_MUXER_OPTIONS.get(self.path.suffix.lower(), {}))
        self._audio: list[_CopiedAudio | _EncodedAudio] = []
        self._copying = copy_from is not None
        try:
            self._video = self._add_copy(copy_from) if copy_from is not None else self._add_video(crf, preset)
            self._audio = _audio_tracks(self._container, audio_from)
        except BaseException:
            self.abort()
            raise

    def _add_video(self, crf: int, preset: str) -> av.VideoStream:
        info = self.info
        stream = self._container.add_stream("libx264", rate=info.frame_rate,
                                            options={"crf": str(crf), "preset": preset})
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, self.pix_fmt
        stream.time_base = info.time_base
        context = stream.codec_context
        context.time_base = info.time_base
        # No B-frames: packets then come in presentation order, so each keeps its frame's duration
        # and MP4 keeps the exact length (and average rate) of variable-frame-rate video.
        context.max_b_frames = 0
        context.colorspace = context.color_primaries = context.color_trc = _BT709
        context.color_range = _LIMITED_RANGE
        return stream

    def _add_copy(self, template: av.VideoStream) -> av.VideoStream:
        stream = self._container.add_stream_from_template(template=template, opaque=True)
        stream.time_base = self.info.time_base
        stream.codec_context.framerate = self.info.frame_rate  # the stated rate (Matroska writes it)
        return stream

    def write(self, rgb: np.ndarray, pts: int | None = None, duration: int | None = None) -> None:
        """Encode one HxWx3 uint8 frame at ``pts`` (VideoInfo.time_base units, e.g. the source
        frame's pts, which keeps variable frame rates); None places it after the last frame.
        ``duration`` (same units; the source frame's) keeps the length of the last frame."""
        info = self.info
        if self._copying:
            raise RuntimeError("This VideoWriter copies encoded packets (copy_from); use copy().")
        if rgb.shape != (info.height, info.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"Frame must be {info.height}x{info.width}x3 uint8 for {self.path.name}; "
                             f"got {rgb.shape} {rgb.dtype}.")
        if pts is None:
            pts = round(self.frames_written / (info.frame_rate * info.time_base))
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # the encoder needs strictly increasing pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            format=self.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG",
            interpolation=ENCODE_SCALING)
        frame.pts, frame.time_base = pts, info.time_base
        if duration:
            self._durations[pts] = duration
        self._mux_video(self._video.encode(frame))
        self._last_pts = pts
        self.frames_written += 1

    def copy(self, packets: Iterable[av.Packet], offset: int = 0) -> None:
        """Mux encoded packets of the ``copy_from`` codec unchanged, their timestamps moved by
        ``offset`` (VideoInfo.time_base units): a segment written from pts 0 goes where it starts."""
        time_base = self.info.time_base
        for packet in packets:
            if packet.dts is None:  # the empty packet that ends a demux
                continue
            scale = packet.time_base / time_base
            pts = round(packet.pts * scale) + offset
            if self._last_pts is not None and pts <= self._last_pts:
                raise VideoError(f"{self.path}: a segment starts at {float(pts * time_base):.3f} s, "
                                 f"not after the previous one ended; the segments overlap.")
            packet.pts, packet.dts = pts, round(packet.dts * scale) + offset
            packet.duration = round(packet.duration * scale)
            packet.time_base = time_base
            packet.stream = self._video
            self._mux_video([packet])  # the muxer may move the packet to the stream's own time base
            self._last_pts = pts
            self.frames_written += 1

    def _mux_video(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, packet.duration)
            if packet.dts is not None:
                self._video_time = max(self._video_time, float(packet.dts * packet.time_base))
        self._container.mux(packets)
        for track in self._audio:  # audio follows the video, so the file interleaves
            track.mux_until(self._video_time)

    def close(self) -> None:
        """Flush the encoder, add the rest of the audio, and publish the file under ``path``."""
        if self._closed:
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"No frames were written to {self.path}; nothing to save.")
            if not self._copying:
                self._mux_video(self._video.encode(None))
            for track in self._audio:
                track.mux_until(None)
            self._container.close()
            publish(self.partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._close_audio_sources()

    def abort(self) -> None:
        """Stop and remove the partial file; ``path`` is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except (av.FFmpegError, OSError) as error:  # the file is discarded anyway
            log.debug("closing aborted %s: %s", self.partial, error)
        self._close_audio_sources()
        self.partial.unlink(missing_ok=True)

    def _close_audio_sources(self) -> None:
        for track in self._audio:
            track.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def frame_timestamps(source: str | Path) -> list[int] | None:
    """The pts of every frame of a video (VideoInfo.time_base units, display order), read from
    its packets without decoding anything: where a long video can be cut into segments. None
    when its packets carry no timestamps (raw elementary streams), which cannot be cut."""
    container, name, _ = _open(source)
    try:
        stream = _video_stream(container)
        if stream is None:
            raise VideoError(f"{name} has no video stream. Choose a video file.")
        times = []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue  # the flush packet at the end; frames an edit list leaves out
            if packet.pts is None:
                return None
            times.append(packet.pts)
    except av.FFmpegError as error:
        raise VideoError(f"{name}: its packets could not be read ({_reason(error)}); the file is damaged or "
                         f"truncated.") from error
    finally:
        container.close()
    return sorted(times)


def join_segments(parts: Sequence[tuple[str | Path, int]], path: str | Path, info: VideoInfo,
                  audio_from: Source | None = None) -> int:
    """Join segment videos into ``path`` by stream copy (nothing re-encoded) and mux the audio
    of ``audio_from`` once, publishing the file only when complete; returns its frame count.

    ``parts`` are (file, start) in playing order: H.264 written by VideoWriter with timestamps
    from 0 (MP4 keeps a later first timestamp only to its movie timescale, 1/1000 s), and the
    pts (``info.time_base`` units) where each starts. Every segment begins with its own
    keyframe, so the joined stream decodes from any segment on; their encoder settings (and
    so headers) must be the same, which is checked.
    """
    if not parts:
        raise ValueError(f"No segments to join into {path}.")
    writer: VideoWriter | None = None
    headers = None
    try:
        for part, start in parts:
            with av.open(str(part)) as segment:
                stream = segment.streams.video[0]
                layout = (stream.codec_context.name, stream.codec_context.extradata, stream.width, stream.height)
                if writer is None:
                    writer = VideoWriter(path, info, audio_from, copy_from=stream)
                    headers = layout
                elif layout != headers:
                    raise VideoError(f"{part} was encoded differently from the first segment of {path} "
                                     f"(codec, headers or size); its segments cannot be joined.")
                writer.copy(segment.demux(stream), start)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    writer.close()
    return writer.frames_written


def output_pix_fmt(info: VideoInfo) -> str:
    """yuv420p (plays everywhere) unless the source keeps more chroma or the size is odd.

    H.264 steps 4:2:0 chroma (and frame cropping) by 2 pixels both ways and 4:2:2 by 2
    horizontally, so an odd height needs 4:2:2 and an odd width 4:4:4 (x264 has no 4:4:0).
    """
    full_x, full_y = _full_chroma(info.pix_fmt)
    if info.rotation in (90, 270):
        full_x, full_y = full_y, full_x
    if full_x or info.width % 2:
        return "yuv444p"
    if full_y or info.height % 2:
        return "yuv422p"
    return "yuv420p"


def _full_chroma(pix_fmt: str) -> tuple[bool, bool]:
    """Whether a pixel format keeps chroma at full resolution horizontally, vertically."""
    try:
        fmt = av.VideoFormat(pix_fmt)
    except ValueError:
        return False, False
    if fmt.is_rgb:
        return True, True
    if len(fmt.components) < 3:  # grey
        return False, False
    return fmt.chroma_width(64) == 64, fmt.chroma_height(64) == 64


def _open(source: Source) -> tuple[av.container.InputContainer, str, int]:
    """Open ``source`` for reading; returns the container, a name for messages and the size."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise VideoError(f"Video file not found: {path}. Check the path (it may have been moved or deleted).")
        if not path.is_file():
            raise VideoError(f"{path} is a folder, not a video file.")
        target: str | BinaryIO = name
        size = path.stat().st_size
    else:
        name = str(getattr(source, "name", "") or "the video in memory")
        target = _independent(source)
        size = target.seek(0, io.SEEK_END)
        target.seek(0)
    try:
        return av.open(target, mode="r"), name, size
    except av.FFmpegError as error:
        raise VideoError(f"{name} is not a readable video ({_reason(error)}): it is not a video file, or it "
                         f"is incomplete (interrupted download or copy). Use the complete file, or "
                         f"re-export it as MP4 (H.264).") from error


def _independent(source: BinaryIO) -> BinaryIO:
    """A reader of ``source`` with its own position, so a VideoReader and a VideoWriter copying
    its audio can share one in-memory video. BytesIO shares its bytes without copying."""
    if isinstance(source, io.BytesIO):
        return io.BytesIO(source.getvalue())
    source.seek(0)
    return source


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _inspect(container: av.container.InputContainer, name: str,
             size: int) -> tuple[VideoInfo, Iterator[av.VideoFrame]]:
    """VideoInfo from the container and the first decoded frame, and the decoded frames from
    the first on."""
    stream = _video_stream(container)
    audio = len(container.streams.audio)
    if stream is None:
        what = f"only {audio} audio stream(s)" if audio else "no audio or video streams"
        raise VideoError(f"{name} has no video stream ({what}). Choose a video file.")
    if stream.codec_context is None:
        raise VideoError(f"{name}: its video codec is not one this FFmpeg (PyAV {av.__version__}) can "
                         f"decode. Convert it to MP4 (H.264) first.")
    _check_complete(container, name, size)
    stream.thread_type = "AUTO"
    decoded = _decode(container, stream, name)
    first = next(decoded)
    rotation = round(-first.rotation / 90) * 90 % 360
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError(f"{name}: the frame rate cannot be determined. Re-export it as MP4 (H.264).")
    time_base = stream.time_base or 1 / Fraction(rate)
    if stream.duration:
        duration = float(stream.duration * time_base)
    else:
        duration = container.duration / av.time_base if container.duration else None
    info = VideoInfo(path=name, width=width, height=height, frame_count=stream.frames or None,
                     frame_rate=Fraction(rate), time_base=Fraction(time_base), duration=duration,
                     rotation=rotation, pix_fmt=first.format.name, codec=stream.codec_context.name,
                     audio_streams=audio)
    return info, itertools.chain([first], decoded)


def _video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The video that is read: the first video stream that is not a cover picture."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    return streams[0] if streams else None


def _check_complete(container: av.container.InputContainer, name: str, size: int) -> None:
    """Fail early on a truncated file whose index (MP4/MOV sample tables) points past its end,
    instead of after the frames before the cut have been processed."""
    ends = [entry.pos + entry.size
            for stream in container.streams if stream.type in ("video", "audio")
            for entry in stream.index_entries[-64:] if entry.pos >= 0]
    if ends and max(ends) > size:
        raise VideoError(f"{name} is truncated: it has {size:,} bytes but its index needs {max(ends):,}. "
                         f"The download or copy was interrupted; use the complete file.")


def _decode(container: av.container.InputContainer, stream: av.VideoStream,
            name: str) -> Iterator[av.VideoFrame]:
    """Decoded frames, with every failure as a VideoError naming the file."""
    packets = frames = 0
    try:
        for packet in container.demux(stream):
            packets += packet.size > 0  # demux ends with an empty packet that flushes the decoder
            for frame in packet.decode():
                frames += 1
                yield frame
            if frames == 0 and packets >= _PACKETS_BEFORE_FIRST_PICTURE:
                break
    except av.FFmpegError as error:
        raise VideoError(f"{name}: decoding failed after {frames} frame(s) ({_reason(error)}). The file is "
                         f"damaged or truncated; use a complete copy or re-export it.") from error
    if frames == 0 and packets == 0:
        raise VideoError(f"{name} has a video stream with no frames. Choose a video that has pictures.")
    if frames == 0:
        raise VideoError(f"{name}: none of the first {packets} video packets ({stream.codec_context.name}) "
                         f"decodes to a picture; the stream is corrupt or uses a feature this FFmpeg "
                         f"cannot decode. Re-encode it as MP4 (H.264).")


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """RGB by the frame's own colour matrix and range; untagged YUV is read the way players
    read it (BT.709 when HD, else BT.601)."""
    if frame.format.is_rgb:
        return frame.to_ndarray(format="rgb24")
    matrix = _MATRICES.get(frame.colorspace)
    if matrix is None:
        matrix = "ITU709" if frame.width >= 1280 or frame.height > 576 else "ITU601"
    return frame.to_ndarray(format="rgb24", src_colorspace=matrix, interpolation=DECODE_SCALING)


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    return cv2.rotate(rgb, _ROTATE[rotation]) if rotation else rgb


def _audio_tracks(output: av.container.OutputContainer,
                  audio_from: Source | AudioSpan | AudioWaveform | None) -> list[_CopiedAudio | _EncodedAudio]:
    if audio_from is None:
        return []
    if isinstance(audio_from, AudioWaveform):
        return [_EncodedAudio(output, _waveform_frames(audio_from), audio_from.sample_rate,
                              audio_from.samples.shape[0])]
    span = audio_from if isinstance(audio_from, AudioSpan) else AudioSpan(audio_from)
    container, name, _ = _open(span.source)
    tracks: list[_CopiedAudio | _EncodedAudio] = []
    try:
        for index in range(len(container.streams.audio)):
            tracks.append(_source_audio(output, span, index, name))
    except BaseException:
        for track in tracks:
            track.close()
        raise
    finally:
        container.close()
    return tracks


def _source_audio(output: av.container.OutputContainer, span: AudioSpan, index: int,
                  name: str) -> _CopiedAudio | _EncodedAudio:
    """Copy audio stream ``index`` of the span's source over the span; re-encode it to AAC only
    when the output container cannot hold its codec (e.g. ADPCM or u8 PCM from AVI into MP4)."""
    container, _, _ = _open(span.source)
    stream = container.streams.audio[index]
    if span.start > 0 and stream.time_base:
        container.seek(int(span.start / stream.time_base), stream=stream, backward=True)
    try:
        return _CopiedAudio(output, container, stream, name, span)
    except ValueError as error:
        if stream.codec_context is None:
            container.close()
            raise VideoError(f"{name}: audio stream {index} can neither be copied into "
                             f"{output.format.name} nor decoded. Write a .mkv, or remove that stream.") from error
        log.warning("%s: audio stream %d (%s) cannot be stored in %s; re-encoding it to AAC.",
                    name, index, stream.codec_context.name, output.format.name)
        return _EncodedAudio(output, _decoded_audio(container, stream, name, span), stream.sample_rate,
                             stream.channels, source=container)


class _CopiedAudio:
    """One source audio stream remuxed packet by packet: the same bytes, no re-encode."""

    def __init__(self, output: av.container.OutputContainer, source: av.container.InputContainer,
                 stream: av.AudioStream, name: str, span: AudioSpan):
        self._stream = output.add_stream_from_template(template=stream, opaque=True)
        self._output, self._source, self._name = output, source, name
        self._packets = self._spanned(source.demux(stream), span)
        self._pending: av.Packet | None = None

    @staticmethod
    def _spanned(packets: Iterator[av.Packet], span: AudioSpan) -> Iterator[av.Packet]:
        """The packets that start within the span, their timestamps moved by its start."""
        for packet in packets:
            if packet.dts is None:  # the empty packet that ends a demux
                continue
            time = float((packet.dts if packet.pts is None else packet.pts) * packet.time_base)
            if span.end is not None and time >= span.end:
                return
            if span.start > 0:
                if time < span.start:
                    continue
                shift = round(span.start / packet.time_base)
                packet.dts -= shift
                if packet.pts is not None:
                    packet.pts -= shift
            yield packet

    def mux_until(self, seconds: float | None) -> None:
        """Mux the packets that start up to ``seconds`` (None: all that are left)."""
        try:
            while (packet := self._pending or next(self._packets, None)) is not None:
                if seconds is not None and packet.dts * packet.time_base > seconds:
                    self._pending = packet
                    return
                self._pending = None
                packet.stream = self._stream
                self._output.mux(packet)
        except av.FFmpegError as error:
            raise VideoError(f"{self._name}: its audio could not be read ({_reason(error)}); the file is "
                             f"damaged or truncated.") from error

    def close(self) -> None:
        self._source.close()


class _EncodedAudio:
    """Audio frames encoded to AAC as the video advances."""

    def __init__(self, output: av.container.OutputContainer, frames: Iterator[av.AudioFrame],
                 sample_rate: int, channels: int, source: av.container.InputContainer | None = None):
        self._stream = output.add_stream("aac", rate=sample_rate, layout=_layout(channels))
        self._stream.bit_rate = 96_000 * channels
        self._output, self._frames, self._source = output, frames, source
        self._pending: av.AudioFrame | None = None
        self._flushed = False

    def mux_until(self, seconds: float | None) -> None:
        """Encode the frames that start up to ``seconds`` (None: all, then flush)."""
        while (frame := self._pending or next(self._frames, None)) is not None:
            if seconds is not None and frame.time > seconds:
                self._pending = frame
                return
            self._pending = None
            self._output.mux(self._stream.encode(frame))
        if seconds is None and not self._flushed:
            self._flushed = True
            self._output.mux(self._stream.encode(None))

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


def _layout(channels: int) -> str:
    """FFmpeg's usual layout for a channel count (ComfyUI's AUDIO has counts, not layouts)."""
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def _waveform_frames(audio: AudioWaveform) -> Iterator[av.AudioFrame]:
    samples = np.asarray(audio.samples, dtype=np.float32)
    layout = _layout(samples.shape[0])
    step = max(1, round(audio.sample_rate * _AUDIO_CHUNK_SECONDS))
    for start in range(0, samples.shape[1], step):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + step]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = audio.sample_rate, start, Fraction(1, audio.sample_rate)
        yield frame


def _decoded_audio(container: av.container.InputContainer, stream: av.AudioStream,
                   name: str, span: AudioSpan) -> Iterator[av.AudioFrame]:
    try:
        for frame in container.decode(stream):
            if frame.pts is not None and span.end is not None and frame.time >= span.end:
                return
            if span.start > 0 and frame.pts is not None:
                if frame.time < span.start:
                    continue
                frame.pts -= round(span.start / frame.time_base)
            yield frame
    except av.FFmpegError as error:
        raise VideoError(f"{name}: its audio could not be decoded ({_reason(error)}); the file is damaged "
                         f"or truncated.") from error
