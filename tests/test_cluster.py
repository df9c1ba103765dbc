"""The cluster runner (gpen.cluster, ``restore --ray``) on a local Ray cluster: the same outputs
as a single process, long videos cut into segments and joined without a seam, a killed job or
worker resumed, one worker per GPU, and what a second worker adds."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import psutil
import pytest
import ray
import torch

import videoclips
from conftest import COMFY_DIR, REPO
from gpen import FullGenerator, GPENConfig, cluster
from gpen.engine import FrameEngine, load_restorer
from gpen.files import FileRestorer, Task, plan, read_image, video_frames
from gpen.options import DetectOptions
from gpen.video import VideoError, VideoReader, frame_timestamps, probe

DETECT = DetectOptions(smoothing=0.5, redetect_every=5)  # warm-up needed: both tracking and smoothing
SEGMENT_FRAMES = 12  # the third segment warms up from frame 5: a fresh start that must settle
CLIP_FRAMES = 36
PHOTOS = 12
IMAGES = ["a.png", "trip/b.jpg", "trip/day2/c.png"]
VIDEOS = ["faces.mkv", "trip/vfr.mp4"]  # Matroska counts time in ms, MP4 finer


@contextlib.contextmanager
def local_cluster(**resources):
    """A Ray cluster in this process, its files in a short temporary folder (socket paths). Its
    workers import gpen from this checkout (the command line ships the package instead, as
    ``cluster.connect`` does; Ray uploads a package once per process, not once per cluster)."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, **resources)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def save_model(path: Path, size: int = 64) -> Path:
    torch.manual_seed(0)
    config = GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16) if size == 64 else \
        GPENConfig(size=size, style_dim=64, n_mlp=2, narrow=1 / 4)
    torch.save(FullGenerator(config).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, astronaut) -> Path:
    """Photos in nested folders, two short videos with sound (one at a variable frame rate),
    and two inputs that only look like a photo and a video."""
    root = tmp_path_factory.mktemp("archive")
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)[..., ::-1]
    (root / "trip" / "day2").mkdir(parents=True)
    cv2.imwrite(str(root / "a.png"), small)
    cv2.imwrite(str(root / "trip" / "b.jpg"), small)
    cv2.imwrite(str(root / "trip" / "day2" / "c.png"), np.ascontiguousarray(small[:, ::-1]))
    (root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "fake.mp4").write_text("not a video")
    videoclips.face_clip(root / "faces.mkv", 320, 180, frames=CLIP_FRAMES)
    videoclips.vfr_clip(root / "trip" / "vfr.mp4", 320, 180, frames=CLIP_FRAMES)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("weights") / "tiny.pth")


def single_process(archive: Path, model: Path, output: Path) -> list:
    """What ``python -m gpen restore`` does without --ray."""
    tasks, _ = plan([archive], output)
    engine = FrameEngine(load_restorer(model, "cpu", torch.float32), DETECT)
    restore_file = FileRestorer(engine)
    return [restore_file(task) for task in tasks]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def frames_of(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [frame.rgb.astype(np.int16) for frame in reader.frames()]


def packets(path: Path, kind: str) -> list[tuple]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        return [(p.pts, p.dts, p.duration, bytes(p) if kind == "audio" else None)
                for p in container.demux(stream) if p.dts is not None]


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_the_cluster_restores_an_archive_as_one_process_does(archive, tiny, tmp_path):
    single = single_process(archive, tiny, tmp_path / "single")
    tasks, problems = plan([archive], tmp_path / "ray")
    assert not problems
    with local_cluster():
        report = cluster.restore(tasks, cluster.Job(str(tiny), DETECT, dtype=torch.float32), workers=2,
                                 segment_frames=SEGMENT_FRAMES, progress=False)
    statuses = {str(o.task.source.relative_to(archive)): o.status for o in report.outcomes}
    assert statuses == {str(o.task.source.relative_to(archive)): o.status for o in single}
    assert statuses == {**{name: "restored" for name in IMAGES + VIDEOS},
                        "trip/broken.jpg": "failed", "fake.mp4": "failed"}  # bad inputs reported, not fatal
    assert files_under(tmp_path / "ray") == files_under(tmp_path / "single") == sorted(IMAGES + VIDEOS)
    assert report.segments == {"restored": 2 * CLIP_FRAMES // SEGMENT_FRAMES, "reused": 0}
    assert sum(o.frames for o in report.outcomes) == sum(o.frames for o in single) == 3 + 2 * CLIP_FRAMES
    assert sum(o.faces for o in report.outcomes) == sum(o.faces for o in single)
    assert len(report.workers) == 2  # both workers did part of the job

    for name in IMAGES:
        diff = mean_abs(read_image(tmp_path / "ray" / name)[0], read_image(tmp_path / "single" / name)[0])
        print(f"{name}: mean abs {diff:.3f}/255 from the single-process output")
        assert diff <= 1.0
    for name in VIDEOS:
        ray_out, single_out = tmp_path / "ray" / name, tmp_path / "single" / name
        assert replace(probe(ray_out), path="") == replace(probe(single_out), path="")  # count, rate, length
        assert packets(ray_out, "video") == packets(single_out, "video")  # timestamps and durations
        assert packets(ray_out, "audio") == packets(single_out, "audio")  # audio copied once, unchanged
        joined, whole, source = frames_of(ray_out), frames_of(single_out), frames_of(archive / name)
        diffs = [mean_abs(a, b) for a, b in zip(joined, whole)]
        print(f"{name}: mean abs {np.mean(diffs):.2f}/255 from the single-process output "
              f"(worst frame {max(diffs):.2f})")
        assert len(joined) == len(whole) == CLIP_FRAMES and np.mean(diffs) <= 3.0
        assert_no_seam(name, joined, whole, source)
    route = report.routed_bytes / sum(o.frames for o in report.outcomes)
    print(f"driver: {report.driver_cpu_seconds * 1000:.0f} ms CPU in all, {route:.0f} bytes routed per frame")
    assert route < 500  # descriptions and small results, never pixels (a 320x180 frame is 173 kB)


def assert_no_seam(name: str, joined: list, whole: list, source: list) -> None:
    """At the first frame of each segment the restoration changes from the frame before no more
    than it does anywhere else: what the restorer added (output minus input) is compared from
    frame to frame, so the camera's own motion does not count."""
    starts = set(range(SEGMENT_FRAMES, CLIP_FRAMES, SEGMENT_FRAMES))
    added = [out - src for out, src in zip(joined, source)]
    change = {t: float(np.abs(added[t] - added[t - 1]).mean()) for t in range(1, len(added))}
    at_seams = [change[t] for t in starts]
    elsewhere = [change[t] for t in change if t not in starts]
    from_single = [mean_abs(joined[t], whole[t]) for t in starts]
    print(f"{name}: frame-to-frame change of the restoration at segment starts {np.mean(at_seams):.2f}/255 "
          f"(max {max(at_seams):.2f}), elsewhere {np.mean(elsewhere):.2f} (max {max(elsewhere):.2f}); "
          f"segment starts are {np.mean(from_single):.2f}/255 from the single-process frames")
    assert max(at_seams) <= max(elsewhere)
    assert np.mean(at_seams) <= 1.5 * np.mean(elsewhere)


def test_a_seek_decodes_what_reading_from_the_start_does(tmp_path):
    """A camera-like clip (B-frames, a keyframe every 12 frames) and a variable-frame-rate one:
    the frames from any frame on, decoded from the keyframe before it, equal (bit for bit, with
    their index and timing) those read from the start; the packet timestamps name every frame."""
    clips = [videoclips.face_clip(tmp_path / "camera.mp4", 160, 96, frames=30, audio=False,
                                  options={"crf": "20", "preset": "medium", "g": "12"}),
             videoclips.vfr_clip(tmp_path / "vfr.mp4", 160, 96, frames=20)]
    with av.open(str(clips[0])) as container:
        assert any(p.pts != p.dts for p in container.demux(video=0) if p.dts is not None)  # B-frames
    for clip in clips:
        with VideoReader(clip) as reader:
            every = list(reader.frames())
        times = frame_timestamps(clip)
        assert times == [frame.pts for frame in every]
        for start in (1, 11, 12, 13, len(every) - 1):
            with VideoReader(clip) as reader:
                part = list(reader.frames_from(times[start], start))
            timing = [(f.index, f.pts, f.duration) for f in part]
            assert timing == [(f.index, f.pts, f.duration) for f in every[start:]]
            assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(part, every[start:]))


def test_segments_that_do_not_fit_together_are_not_joined(tmp_path):
    """Segments encoded at different sizes, or overlapping in time, are refused with a message
    naming the file, and nothing is left behind."""
    from gpen.video import VideoInfo, VideoWriter, join_segments

    def segment(name: str, width: int, frames: int) -> Path:
        info = VideoInfo.for_frames(width, 96, 30)
        with VideoWriter(tmp_path / name, info) as writer:
            for _ in range(frames):
                writer.write(np.full((96, width, 3), 128, np.uint8))
        return tmp_path / name

    info = VideoInfo.for_frames(160, 96, 30)
    wide, narrow = segment("wide.mp4", 160, 4), segment("narrow.mp4", 128, 4)
    with pytest.raises(VideoError, match="narrow.mp4 was encoded differently"):
        join_segments([(wide, 0), (narrow, 4)], tmp_path / "joined.mp4", info)
    with pytest.raises(VideoError, match="the segments overlap"):
        join_segments([(wide, 0), (wide, 2)], tmp_path / "joined.mp4", info)
    assert join_segments([(wide, 0), (wide, 4)], tmp_path / "joined.mp4", info) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.mp4", "narrow.mp4", "wide.mp4"]
    assert [p[0] for p in packets(tmp_path / "joined.mp4", "video")] == [512 * i for i in range(8)]  # 1/15360 s


def test_a_segment_restores_its_frames_as_a_single_pass_does(archive, tiny, tmp_path):
    """Before any encoding: each segment's frames, restored after its warm-up, equal the single
    pass's; started cold on its first frame, tracking and smoothing start over and they do not."""
    source = archive / "faces.mkv"
    job = cluster.Job(str(tiny), DETECT, dtype=torch.float32)
    engine = job.engine(gpu=False)
    with VideoReader(source) as reader:
        single = {frame.index: frame.output for frame in engine.run(video_frames(reader))}
    times = frame_timestamps(source)
    segments = cluster.split_video(0, Task(source, tmp_path / "out.mp4"), times, job, SEGMENT_FRAMES)
    assert [(s.first_index, times.index(s.start_pts)) for s in segments] == [(0, 0), (0, 12), (5, 24)]

    def restored(segment) -> dict[int, np.ndarray]:
        with VideoReader(source) as reader:
            return {frame.index: frame.output for frame in cluster.restored_segment(engine, reader, segment)}

    warm = {}
    for segment in segments:
        warm.update(restored(segment))
    assert sorted(warm) == list(range(CLIP_FRAMES))
    warm_diff = [mean_abs(warm[i], single[i]) for i in range(CLIP_FRAMES)]
    last = segments[-1]
    start = times.index(last.start_pts)
    cold = restored(replace(last, first_index=start, first_pts=last.start_pts))
    cold_diff = [mean_abs(cold[i], single[i]) for i in range(start, CLIP_FRAMES)]
    print(f"restored frames against a single pass: after the warm-up {max(warm_diff):.3f}/255 at most; started "
          f"cold at frame {start}: {max(cold_diff):.3f}/255 at most ({cold_diff[0]:.3f} on its first frame)")
    assert max(warm_diff) <= 0.25
    assert max(cold_diff) > 4 * max(max(warm_diff), 0.05)


def ray_command(model: Path, archive: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "gpen", "restore", "--model", str(model), str(archive), "--output", str(output),
            "--segment-frames", str(SEGMENT_FRAMES), "--ray"]


def processes_of_cluster(ray_dir: str) -> list[psutil.Process]:
    """Processes of the local cluster whose files are under ``ray_dir`` (each names its session
    folder there), wherever they were re-parented after their driver died."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and any(ray_dir in arg for arg in process.cmdline()):
                found.append(process)
    return found


def kill_driver_and_its_cluster(driver: subprocess.Popen, ray_dir: str) -> None:
    """SIGKILL a driver that started a local cluster, then the processes it started (gcs_server,
    raylet, the dashboard and runtime-env agents, workers), which outlive it, by pid: those
    below it, and any that name the cluster's folder (ray::DashboardAgent, ray::RuntimeEnvAgent)."""
    started = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()
    driver.wait()
    for process in list(started):
        with contextlib.suppress(psutil.NoSuchProcess):
            started += [child for child in process.children(recursive=True) if child not in started]
    started += [process for process in processes_of_cluster(ray_dir) if process not in started]
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive


def assert_complete(output: Path, archive: Path, names: list[str]) -> None:
    for name in names:
        if name in IMAGES:
            assert read_image(output / name)[0].shape == (256, 256, 3)
        else:
            info = probe(output / name)
            assert info.audio_streams == 1
            assert len(frames_of(output / name)) == CLIP_FRAMES


def test_a_killed_job_leaves_complete_outputs_and_a_rerun_finishes_it(archive, tiny, tmp_path):
    out = tmp_path / "out"
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir}
    try:
        job = subprocess.Popen(ray_command(tiny, archive, out), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        finished, segments = [], []
        while time.time() < deadline and job.poll() is None and not (finished and segments):
            finished = [name for name in IMAGES + VIDEOS if (out / name).exists()]
            segments = [p for p in out.rglob("*.mp4") if ".segments" in str(p) and ".partial" not in p.name]
            time.sleep(0.05)
        assert finished and segments, "the job ended before it had both finished outputs and segments"
        kill_driver_and_its_cluster(job, ray_dir)
        finished = [name for name in IMAGES + VIDEOS if (out / name).exists()]
        print(f"killed after {len(finished)} output(s) and {len(segments)}+ segment(s) of unfinished videos")
        assert len(finished) < len(IMAGES + VIDEOS)
        assert_complete(out, archive, finished)  # what has its real name is complete
        result = subprocess.run(ray_command(tiny, archive, out), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        leftovers = processes_of_cluster(ray_dir)  # e.g. when the rerun failed or timed out
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(leftovers, timeout=30)
        shutil.rmtree(ray_dir, ignore_errors=True)
    print(result.stdout)
    assert result.returncode == 1  # the two bad inputs
    assert "broken.jpg" in result.stderr and "fake.mp4" in result.stderr
    restored = len(IMAGES + VIDEOS) - len(finished)
    assert f"{restored} restored, {len(finished)} skipped (output exists), 2 failed" in result.stdout
    reused = int(result.stdout.split(" restored, ")[-1].split(" reused")[0])
    assert reused >= 1  # the killed job's finished segments were not done again
    assert files_under(out) == sorted(IMAGES + VIDEOS)  # no partial files, no segments left
    assert_complete(out, archive, IMAGES + VIDEOS)


def test_a_killed_worker_is_replaced_and_its_work_redone(archive, tiny, tmp_path):
    out = tmp_path / "out"
    tasks, _ = plan([archive / "faces.mkv", archive / "a.png"], out)
    killed = []
    stop = threading.Event()

    def kill_a_worker_while_it_writes() -> None:
        while not stop.is_set() and not killed:
            if any(".partial" in p.name for p in out.rglob("*")):
                for process in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if "MapWorker" in " ".join(process.cmdline()):
                            process.kill()
                            killed.append(process.pid)
                            return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_while_it_writes, daemon=True)
    with local_cluster():
        killer.start()
        try:
            report = cluster.restore(tasks, cluster.Job(str(tiny), DETECT, dtype=torch.float32), workers=2,
                                     segment_frames=SEGMENT_FRAMES, progress=False)
        finally:
            stop.set()
            killer.join()
    assert killed
    assert [o.status for o in report.outcomes] == ["restored", "restored"]
    assert files_under(out) == ["a.png", "faces.mkv"]
    assert len(frames_of(out / "faces.mkv")) == CLIP_FRAMES


def test_one_worker_per_gpu(archive, tiny, tmp_path):
    """Ray's GPUs are logical resources: two declared GPUs get two workers, each holding one
    (the model runs on the CPU here)."""
    tasks, _ = plan([archive / name for name in IMAGES], tmp_path / "out")
    with local_cluster(num_gpus=2):
        assert cluster.pool_size(None, 1) == (2, {"num_gpus": 1, "num_cpus": 1})
        assert cluster.pool_size(5, 1)[0] == 2
        job = cluster.Job(str(tiny), DETECT, device="cpu", dtype=torch.float32)
        report = cluster.restore(tasks, job, progress=False)
    assert [o.status for o in report.outcomes] == ["restored"] * 3
    gpus = sorted(name.split(" GPU ")[1] for name in report.workers)
    print(f"workers: {sorted(report.workers)}")
    assert gpus == ["0", "1"]


def test_a_second_worker_restores_faster(astronaut, tmp_path):
    """A model-bound job (a GPEN-256 on one CPU per worker, one face per photo) on one worker,
    then on two, in one run: the throughput of each (the sum of its workers' frames per busy
    second, so the seconds a worker takes to start do not count) and their ratio are printed."""
    model = save_model(tmp_path / "gpen256.pth", 256)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(PHOTOS):
        cv2.imwrite(str(photos / f"p{i:02d}.png"), np.roll(astronaut, 5 * i, axis=1)[::2, ::2, ::-1])
    rates = {}
    with local_cluster():
        for workers in (1, 2):
            tasks, _ = plan([photos], tmp_path / f"out{workers}")
            report = cluster.restore(tasks, cluster.Job(str(model)), workers=workers, progress=False)
            assert [o.status for o in report.outcomes] == ["restored"] * PHOTOS
            assert len(report.workers) == workers
            rates[workers] = sum(w.rate for w in report.workers.values())
            print(f"{workers} worker(s): {rates[workers]:.2f} frames/s ({PHOTOS / report.seconds:.2f} counting "
                  f"the {report.seconds:.1f} s from start to end, workers' start included)")
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x on {psutil.cpu_count()} cores")
    assert rates[2] / rates[1] > 1.1


def test_without_ray_the_option_says_how_to_install_it(tiny, tmp_path, astronaut):
    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    hide_ray = ("import sys, importlib.abc\n"
                "class NoRay(importlib.abc.MetaPathFinder):\n"
                "    def find_spec(self, name, path, target=None):\n"
                "        if name == 'ray' or name.startswith('ray.'):\n"
                "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
                "sys.meta_path.insert(0, NoRay())\n"
                "from gpen.__main__ import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", hide_ray, "restore", "--model", str(tiny), str(tmp_path / "in.png"),
                             "--output", str(tmp_path / "out"), "--ray"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert 'pip install "ray[data]"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_load_is_one_error_before_ray_starts(tmp_path, astronaut):
    """The driver checks the model file (cheaply: gpen.restorers.check_face_model) before it
    starts or joins a cluster: one clear error, no worker, no output folder."""
    from spandrel.architectures.Compact import Compact
    from safetensors.torch import save_file

    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    save_file(Compact().state_dict(), str(tmp_path / "4x-compact.safetensors"))
    command = [sys.executable, "-m", "gpen", "restore", "--model", str(tmp_path / "4x-compact.safetensors"),
               str(tmp_path / "in.png"), "--output", str(tmp_path / "out"), "--ray"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "4x-compact.safetensors is a RealESRGAN Compact model, not a face restorer" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_the_comfyui_pack_never_imports_ray():
    """Load the pack as ComfyUI does (the real comfy modules, CPU mode) and run a restore from
    the command line without --ray: Ray is never imported."""
    check = ("import sys, importlib.util\n"
             f"sys.path.insert(0, {str(COMFY_DIR)!r})\n"
             "sys.argv = ['main.py', '--cpu']\n"
             "import comfy.options; comfy.options.enable_args_parsing()\n"
             f"spec = importlib.util.spec_from_file_location('comfyui_gpen', {str(REPO / '__init__.py')!r}, "
             f"submodule_search_locations=[{str(REPO)!r}])\n"
             "pack = importlib.util.module_from_spec(spec); sys.modules['comfyui_gpen'] = pack\n"
             "spec.loader.exec_module(pack)\n"
             "import gpen.__main__, gpen.files, gpen.video, gpen.engine\n"
             "assert pack.comfy_entrypoint\n"
             "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
