"""Test videos, generated at test time with plain PyAV (never with gpen.video, the code under
test), deterministic and small enough to make in a fraction of a second on 2 cores.

Faces: a camera panning and zooming across MIT-licensed portraits from ComfyUI's media-image
template package and skimage's astronaut. Sound: a stereo sine sweep. Also a portrait clip stored
landscape with rotation metadata (as phones write it), a variable-frame-rate clip, a clip without
faces, an odd-sized clip, an MJPEG AVI with 8-bit PCM, and the bad inputs users send: truncated,
audio only, zero frames, garbage payload, an unknown codec, not a video at all.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

TEMPLATES = Path(__import__("comfyui_workflow_templates_media_image").__file__).parent / "templates"
PORTRAITS = ("flux_dev_checkpoint_example-1.webp", "flux_fill_inpaint_example-1.webp")
SAMPLE_RATE = 48_000
# Player convention: degrees clockwise -> cv2 rotation that undoes it when storing.
_COLORSPACE_TAGS = {"ITU709": 1, "ITU601": 6}  # AVCOL_SPC_BT709, AVCOL_SPC_SMPTE170M
_STORE_ROTATED = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


@functools.cache
def portrait_strip() -> np.ndarray:
    """Three faces side by side, 1024 px high: two template portraits and the astronaut."""
    import skimage.data

    # Newer template packages ship some of these pictures smaller (400 px): the same portrait.
    tiles = [cv2.resize(cv2.imread(str(TEMPLATES / name), cv2.IMREAD_COLOR_RGB), (1024, 1024),
                        interpolation=cv2.INTER_CUBIC) for name in PORTRAITS]
    tiles.insert(1, cv2.resize(skimage.data.astronaut(), (1024, 1024), interpolation=cv2.INTER_CUBIC))
    strip = np.ascontiguousarray(np.concatenate(tiles, axis=1))
    strip.flags.writeable = False
    return strip


def pan_zoom(width: int, height: int, frames: int, zoom: float = 1.0) -> Iterator[np.ndarray]:
    """A camera panning left to right across the faces while zooming in by 40 %, from ``zoom``
    times the scale at which the faces fill the frame's height."""
    strip = portrait_strip()
    # Shrink once with area averaging, as a lens and sensor would, then only enlarge per frame.
    fit = max(height / strip.shape[0], width / strip.shape[1]) * zoom
    if fit < 1:
        strip = cv2.resize(strip, None, fx=fit, fy=fit, interpolation=cv2.INTER_AREA)
        fit = max(height / strip.shape[0], width / strip.shape[1]) * zoom
    strip_h, strip_w = strip.shape[:2]
    for i in range(frames):
        t = i / max(frames - 1, 1)
        scale = fit * (1.0 + 0.4 * t)
        x0 = t * (strip_w - width / scale)
        y0 = 0.5 * (strip_h - height / scale)
        matrix = np.float32([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])
        yield cv2.warpAffine(strip, matrix, (width, height), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def gradients(width: int, height: int, frames: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Colour gradients drifting sideways under mild fixed noise: no faces anywhere."""
    step = 4
    y, x = np.mgrid[0:height, 0:width + step * frames].astype(np.float32) / max(width, height)
    scene = np.stack([np.sin(2 * np.pi * (x * 1.5 + y * k) + k) for k in (0.5, 1.0, 2.0)], axis=-1)
    scene = 128 + 90 * scene
    noise = np.random.default_rng(seed).normal(0, 3, (height, width, 3)).astype(np.float32)
    for i in range(frames):
        yield np.clip(scene[:, i * step:i * step + width] + noise, 0, 255).astype(np.uint8)


def sine_sweep(seconds: float, sample_rate: int = SAMPLE_RATE, channels: int = 2) -> np.ndarray:
    """A 200 Hz -> 2 kHz logarithmic sweep, float32 [channels, samples], each channel offset in
    phase so a swapped or dropped channel shows."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    k = np.log(2000 / 200) / max(seconds, 1e-9)
    phase = 2 * np.pi * 200 * (np.exp(k * t) - 1) / k
    return np.stack([0.3 * np.sin(phase + c) for c in range(channels)]).astype(np.float32)


def write_clip(path: Path, frames: Iterable[np.ndarray], *, fps: Fraction | int = 30,
               pts: Sequence[int] | None = None, time_base: Fraction | None = None,
               audio: np.ndarray | None = None, audio_codec: str = "aac",
               sample_rate: int = SAMPLE_RATE, rotation: int = 0, codec: str = "libx264",
               pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
               container_options: dict[str, str] | None = None, matrix: str = "ITU709",
               tagged: bool = True) -> Path:
    """Encode upright RGB frames (and audio [C, N] float32) the way cameras and editors do.

    ``rotation`` (degrees clockwise) stores the frames turned the other way plus a display
    matrix, as phones write portrait video; ``pts`` (in ``time_base``) gives irregular timing.
    Colour goes through ``matrix`` (limited range; JPEG's full-range BT.601 for yuvj formats),
    tagged in the stream unless ``tagged`` is False, as some old encoders leave it.
    """
    fps = Fraction(fps)
    time_base = time_base or 1 / fps
    with av.open(str(path), mode="w", options=container_options or {}) as output:
        video = output.add_stream(codec, rate=fps, options=options if options is not None
                                  else {"crf": "12", "preset": "ultrafast"})
        video.pix_fmt = pix_fmt
        video.time_base = video.codec_context.time_base = time_base
        full_range = pix_fmt.startswith("yuvj")
        matrix = "ITU601" if full_range else matrix
        if tagged:
            video.codec_context.colorspace = _COLORSPACE_TAGS[matrix]
            video.codec_context.color_range = 2 if full_range else 1  # AVCOL_RANGE_JPEG / _MPEG
        if rotation:
            video.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees
        sound = None
        if audio is not None:
            sound = output.add_stream(audio_codec, rate=sample_rate,
                                      layout="stereo" if audio.shape[0] == 2 else "mono")
        audio_done = 0
        for index, rgb in enumerate(frames):
            if rotation:
                rgb = cv2.rotate(rgb, _STORE_ROTATED[rotation])
            if index == 0:
                video.height, video.width = rgb.shape[:2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=matrix, dst_color_range="JPEG" if full_range else "MPEG")
            frame.pts = pts[index] if pts is not None else round(index / fps / time_base)
            frame.time_base = time_base
            output.mux(video.encode(frame))
            if sound is not None:  # keep the sound in step with the pictures
                until = min(audio.shape[1], round((frame.pts + 1) * time_base * sample_rate))
                audio_done = _encode_audio(output, sound, audio, audio_done, until, sample_rate)
        output.mux(video.encode(None))
        if sound is not None:
            _encode_audio(output, sound, audio, audio_done, audio.shape[1], sample_rate)
            output.mux(sound.encode(None))
    return path


def _encode_audio(output, stream, audio: np.ndarray, start: int, stop: int, sample_rate: int) -> int:
    if stop > start:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, start:stop]), format="fltp",
                                           layout="stereo" if audio.shape[0] == 2 else "mono")
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        output.mux(stream.encode(frame))
    return max(start, stop)


# Good clips ---------------------------------------------------------------------------------

def face_clip(path: Path, width: int = 1280, height: int = 720, frames: int = 45, fps: int = 30,
              audio: bool = True, **options) -> Path:
    """Pan and zoom over three faces, with a sine sweep as long as the video."""
    sound = sine_sweep(frames / fps) if audio else None
    return write_clip(path, pan_zoom(width, height, frames), fps=fps, audio=sound, **options)


def rotated_clip(path: Path, rotation: int = 90, width: int = 360, height: int = 640,
                 frames: int = 20) -> Path:
    """A ``width`` x ``height`` (as displayed) face clip stored turned, with rotation metadata."""
    return write_clip(path, pan_zoom(width, height, frames), rotation=rotation,
                      audio=sine_sweep(frames / 30))


def vfr_pts(frames: int) -> list[int]:
    """Irregular timestamps (1/90000 s): frame gaps cycling through 1, 1, 2, 1, 3 thirtieths."""
    gaps = [3000, 3000, 6000, 3000, 9000]
    return [sum(gaps[i % len(gaps)] for i in range(n)) for n in range(frames)]


def vfr_clip(path: Path, width: int = 480, height: int = 270, frames: int = 30) -> Path:
    """A face clip with variable frame rate (and sound covering its whole length)."""
    pts = vfr_pts(frames)
    seconds = (pts[-1] + 3000) / 90000
    return write_clip(path, pan_zoom(width, height, frames), pts=pts, time_base=Fraction(1, 90000),
                      audio=sine_sweep(seconds))


def no_face_clip(path: Path, width: int = 640, height: int = 360, frames: int = 30) -> Path:
    return write_clip(path, gradients(width, height, frames), audio=sine_sweep(frames / 30))


def odd_clip(path: Path, width: int = 321, height: int = 241, frames: int = 15) -> Path:
    """Odd width and height: H.264 can only hold them as 4:4:4."""
    return write_clip(path, pan_zoom(width, height, frames), pix_fmt="yuv444p")


def avi_clip(path: Path, width: int = 320, height: int = 240, frames: int = 15) -> Path:
    """An old-camera AVI: full-range MJPEG and 8-bit PCM, which MP4 cannot hold as is."""
    return write_clip(path.with_suffix(".avi"), pan_zoom(width, height, frames), codec="mjpeg",
                      pix_fmt="yuvj420p", options={"q": "2"}, audio=sine_sweep(frames / 30),
                      audio_codec="pcm_u8")


# Bad inputs ---------------------------------------------------------------------------------

def truncated_clip(path: Path, layout: str = "index first") -> Path:
    """A face clip cut at 60 %, as an interrupted download leaves it. ``layout``: "index first"
    (MP4 with faststart, as streamed files are: the index points past the end), "index last"
    (the default MP4 layout: the index is gone), "matroska" (no index needed: it just stops)."""
    suffix = ".mkv" if layout == "matroska" else ".mp4"
    whole = path.with_name(path.stem + ".whole" + suffix)
    options = {"movflags": "+faststart"} if layout == "index first" else None
    face_clip(whole, 320, 180, frames=30, container_options=options)
    data = whole.read_bytes()
    whole.unlink()
    target = path.with_suffix(suffix)
    target.write_bytes(data[: len(data) * 6 // 10])
    return target


def audio_only(path: Path) -> Path:
    """Sound and no pictures, like an .m4a."""
    with av.open(str(path), mode="w", format="mp4") as output:
        sound = output.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        _encode_audio(output, sound, sine_sweep(1.0), 0, SAMPLE_RATE, SAMPLE_RATE)
        output.mux(sound.encode(None))
    return path


def zero_frame_clip(path: Path) -> Path:
    """A video stream with no frames (a fragmented MP4 whose moov lists the track up front)."""
    with av.open(str(path), mode="w", options={"movflags": "frag_keyframe+empty_moov"}) as output:
        video = output.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        output.start_encoding()
    return path


def garbage_clip(path: Path, frames: int = 10) -> Path:
    """A valid MP4 whose H.264 packets hold random bytes: the container opens, nothing decodes."""
    clean = path.with_name(path.stem + ".clean.mp4")
    face_clip(clean, 320, 180, frames=frames, audio=False)
    rng = np.random.default_rng(0)
    with av.open(str(clean)) as source, av.open(str(path), mode="w") as output:
        template = source.streams.video[0]
        stream = output.add_stream_from_template(template)
        for packet in source.demux(template):
            if packet.dts is None:
                continue
            junk = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
            junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
            junk.is_keyframe, junk.stream = packet.is_keyframe, stream
            output.mux(junk)
    clean.unlink()
    return path


def unknown_codec_clip(path: Path) -> Path:
    """An AVI whose video codec tag (fourcc) no FFmpeg knows: there is no decoder for it."""
    avi = write_clip(path.with_name(path.stem + ".mjpeg.avi"), pan_zoom(64, 48, 3), codec="mjpeg",
                     pix_fmt="yuvj420p", options={})
    data = avi.read_bytes()
    avi.unlink()
    target = path.with_suffix(".avi")
    target.write_bytes(data.replace(b"MJPG", b"ZZZZ"))
    return target


def not_a_video(path: Path) -> Path:
    path.write_text("This is a shopping list, not a video.\n" * 20)
    return path
