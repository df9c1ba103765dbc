"""GPEN Restore Video in the real ComfyUI 0.3.75 server: Load Video -> GPEN Restore Video -> Save
Video, in bounded memory, with sound and timing kept; bad videos give clear errors; cancel
leaves nothing behind."""

import asyncio
import json
import shutil
import threading
import time
import urllib.request

import aiohttp
import av
import numpy as np
import psutil
import pytest

import videoclips
from gpen.video import VideoReader, probe

TINY = "GPEN-tiny-64.pth"


def video_graph(file: str, prefix: str, model: str = TINY, **restore) -> dict:
    inputs = {"video": ["1", 0], "gpen_model": ["2", 0], "detector": "mtcnn", "threshold": 0.9,
              "max_faces": 0, "order": "largest first", "min_size": 0, "indices": "", "smoothing": 0.5,
              "redetect_every": 5, "strength": 1.0, "batch_size": 4, "feather": 0.15}
    inputs.update(restore)
    return {
        "1": {"class_type": "LoadVideo", "inputs": {"file": file}},
        "2": {"class_type": "GPENModelLoader", "inputs": {"model_name": model, "precision": "fp32"}},
        "3": {"class_type": "GPENRestoreVideo", "inputs": inputs},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": prefix,
                                                    "format": "auto", "codec": "auto"}},
    }


def saved_video(host, entry: dict):
    assert entry["status"]["status_str"] == "success", entry["status"]
    (item,) = entry["outputs"]["4"]["images"]
    return host.base / "output" / item["subfolder"] / item["filename"]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


@pytest.fixture(scope="module")
def clips(served):
    folder = served.base / "input"
    videoclips.face_clip(folder / "faces.mp4", 640, 360, frames=24)
    videoclips.no_face_clip(folder / "empty.mp4", 640, 360, frames=12)
    videoclips.vfr_clip(folder / "vfr.mp4")
    videoclips.truncated_clip(folder / "truncated.mp4")
    videoclips.audio_only(folder / "sound_only.mp4")
    videoclips.zero_frame_clip(folder / "no_frames.mp4")
    videoclips.garbage_clip(folder / "garbage.mp4")
    return folder


def test_node_is_registered_with_every_option(served):
    info = served.get("/object_info/GPENRestoreVideo")["GPENRestoreVideo"]
    assert info["display_name"] == "GPEN Restore Video" and info["output"] == ["VIDEO"]
    names = set(info["input"]["required"]) | set(info["input"].get("optional", {}))
    for option in ("video", "gpen_model", "detector", "threshold", "max_faces", "order", "min_size", "indices",
                   "smoothing", "redetect_every", "strength", "batch_size", "feather", "color_correction",
                   "blend", "upscale", "mask", "upscale_model"):
        assert option in names, option


def test_restore_a_video_keeps_frames_timing_and_sound(served, clips):
    out = saved_video(served, served.run(video_graph("faces.mp4", "video/faces")))
    source, restored = probe(clips / "faces.mp4"), probe(out)
    assert (restored.width, restored.height, restored.frame_count) == (source.width, source.height, 24)
    assert restored.frame_rate == source.frame_rate and restored.audio_streams == 1
    with av.open(str(clips / "faces.mp4")) as a, av.open(str(out)) as b:
        assert [p.pts for p in a.demux(audio=0)] == [p.pts for p in b.demux(audio=0)]  # sound copied
    with VideoReader(clips / "faces.mp4") as a, VideoReader(out) as b:
        changed = [np.abs(x.rgb.astype(int) - y.rgb.astype(int)).max() for x, y in zip(a.frames(), b.frames())]
    assert min(changed) > 40  # every frame's faces were restored (random weights: a visible change)


def test_faceless_and_variable_frame_rate_videos(served, clips):
    out = saved_video(served, served.run(video_graph("empty.mp4", "video/empty")))
    with VideoReader(clips / "empty.mp4") as a, VideoReader(out) as b:
        diffs = [np.abs(x.rgb.astype(int) - y.rgb.astype(int)).mean() for x, y in zip(a.frames(), b.frames())]
    assert len(diffs) == 12 and max(diffs) <= 2.0
    out = saved_video(served, served.run(video_graph("vfr.mp4", "video/vfr")))
    with VideoReader(clips / "vfr.mp4") as a, VideoReader(out) as b:
        times_in = [f.time for f in a.frames()]
        times_out = [f.time for f in b.frames()]
    assert times_out == pytest.approx(times_in, abs=1e-3)


def test_frames_from_memory_with_their_sound(served, clips):
    """Get Video Components -> Create Video gives a video without a file: its frames and sound
    are taken from memory."""
    graph = video_graph("faces.mp4", "video/components")
    graph["5"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}}
    graph["6"] = {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": ["5", 2], "audio": ["5", 1]}}
    graph["3"]["inputs"]["video"] = ["6", 0]
    out = saved_video(served, served.run(graph))
    restored = probe(out)
    assert restored.frame_count == 24 and restored.audio_streams == 1
    assert (restored.width, restored.height) == (640, 360)


@pytest.mark.parametrize("name, expected", [
    ("truncated.mp4", "truncated"), ("sound_only.mp4", "no video stream"), ("no_frames.mp4", "no frames"),
    ("garbage.mp4", "decod")])
def test_bad_videos_are_clear_errors_and_the_server_keeps_serving(served, clips, name, expected):
    error = error_of(served.run(video_graph(name, "video/bad")))
    assert name in error["exception_message"], error
    assert expected in error["exception_message"].lower(), error
    assert served.run(video_graph("empty.mp4", "video/after_error"))["status"]["status_str"] == "success"


def test_cancel_leaves_no_partial_file_and_the_next_run_works(served, clips):
    videoclips.face_clip(clips / "long.mp4", 640, 360, frames=240)
    temp = served.base / "temp"
    before = set(temp.glob("*")) if temp.exists() else set()
    status, body = served.post_prompt(video_graph("long.mp4", "video/cancelled"))
    assert status == 200
    time.sleep(6)  # well into the clip
    urllib.request.urlopen(urllib.request.Request(served.url + "/interrupt", data=b"", method="POST"))
    entry = served.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"  # interrupted
    after = set(temp.glob("*")) if temp.exists() else set()
    assert not [p for p in after - before if p.suffix == ".mp4" or "partial" in p.name]
    assert not list((served.base / "output" / "video").glob("cancelled*"))
    assert served.run(video_graph("empty.mp4", "video/after_cancel"))["status"]["status_str"] == "success"


def listen_to_progress(host, client_id: str, progress: list[int], stop: threading.Event) -> None:
    """Append the value of every progress message ComfyUI sends ``client_id`` (the GPEN video
    node counts frames) until ``stop`` is set."""
    async def listen():
        url = host.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket:
            while not stop.is_set():
                try:
                    message = await socket.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if data["type"] == "progress":
                        progress.append(data["data"]["value"])
    asyncio.run(listen())


def test_server_memory_does_not_grow_with_the_length_of_the_clip(served, clips):
    """Server RSS while restoring 1,200 frames of 720p (as float32 frames the clip would be 10 GB):
    its peak over the whole clip against its peak over the first 150 frames (read off the node's
    progress messages), after a warm-up run: the same within 10%."""
    process = psutil.Process(served.proc.pid)
    videoclips.face_clip(clips / "long150.mp4", 1280, 720, frames=150)
    videoclips.face_clip(clips / "long1200.mp4", 1280, 720, frames=1200)
    served.run(video_graph("long150.mp4", "video/warmup"), timeout=900)
    progress: list[int] = [0]
    samples: list[tuple[int, int]] = []  # (frames done, RSS)
    done = threading.Event()
    listener = threading.Thread(target=listen_to_progress, args=(served, "memory-test", progress, done))
    listener.start()
    time.sleep(1)  # connected before the prompt starts

    def watch():
        while not done.is_set():
            samples.append((progress[-1], process.memory_info().rss))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        status, body = served.post_prompt(video_graph("long1200.mp4", "video/long1200"), client_id="memory-test")
        assert status == 200, body
        entry = served.wait(body["prompt_id"], timeout=1800)
    finally:
        done.set()
        watcher.join()
        listener.join()
    assert probe(saved_video(served, entry)).frame_count == 1200
    assert max(progress) == 1200  # progress arrived, in frames
    first = max(rss for frames, rss in samples if frames <= 150) / 2**20
    whole = max(rss for _, rss in samples) / 2**20
    print(f"server peak RSS: first 150 frames {first:.0f} MiB, all 1200 frames {whole:.0f} MiB "
          f"({whole / first:.3f}x)")
    assert whole <= 1.10 * first
    shutil.rmtree(served.base / "output" / "video", ignore_errors=True)
