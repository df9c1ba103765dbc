"""Restoring an archive on a Ray cluster: the job of ``python -m gpen restore``, spread over every
GPU of a cluster (or its CPUs) with Ray Data.

The driver plans the work (whole files, and long videos cut into segments) and routes only file
paths, segment descriptions and small results; frames never leave the workers. The workers are
a Ray Data actor pool (one actor per GPU, or CPU actors on a cluster without GPUs): each loads
the model once and runs the frame engine on one file or segment per call, writing outputs as a
single process does (``gpen.files``: temporary name, published when complete, never replacing).

A segment decodes a warm-up stretch before its first frame, starting on a whole-frame detection
and long enough for the landmark smoother to settle, so tracking and smoothing reach the state a
single pass has there; its frames are encoded into a segment file, and the segments are joined
by stream copy with the source's audio muxed once (``gpen.video.join_segments``). Each segment
starts with its own keyframe, so the joined stream is valid wherever the cuts fall.

Ray restarts a worker that dies and reruns its file or segment; a killed job leaves finished
outputs and finished segments, which rerunning the same command reuses. The cluster's nodes must
see the inputs, outputs and model at the same paths (shared storage) and have the pack's
requirements installed; the pack's own code is shipped to them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise, takewhile
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from .engine import Frame, FrameEngine, load_restorer
from .execution import default_dtype
from .files import FileRestorer, Outcome, Task
from .options import DetectOptions, PasteOptions, RestoreOptions
from .temporal import settling_frames
from .video import VideoError, VideoReader, VideoWriter, frame_timestamps, join_segments, probe

DEFAULT_SEGMENT_FRAMES = 1000
MAX_PHOTOS_PER_CALL = 16  # a call costs the driver ~10 ms of CPU (measured): spread over 16 photos
WORKER_START_SECONDS = 900  # a cluster may have to start nodes for its workers
TASK_RETRIES = 3  # reruns of a file or segment whose worker died (the worker is restarted too)


@dataclass(frozen=True)
class Job:
    """What a worker needs to restore anything: the model, where it runs, and every option.
    Sent once to each worker, which loads the model from it."""

    model: str  # the same path on every node
    detect: DetectOptions = DetectOptions()
    restore: RestoreOptions = RestoreOptions()
    paste: PasteOptions = PasteOptions()
    device: str | None = None  # None: the worker's GPU when it has one, else the CPU
    dtype: torch.dtype | None = None  # None: the device's "auto" precision (execution.default_dtype)
    weights_dirs: tuple[str, ...] = ()
    upscale_model: str | None = None
    compile: bool = False  # the generator through torch.compile, once per worker

    def engine(self, gpu: bool) -> FrameEngine:
        device = torch.device(self.device or ("cuda" if gpu else "cpu"))
        dtype = self.dtype or default_dtype(device)
        restorer = load_restorer(self.model, device, dtype, self.detect.detector, self.weights_dirs,
                                 self.paste.mask, self.upscale_model, self.compile)
        return FrameEngine(restorer, self.detect, self.restore, self.paste)

    def fingerprint(self) -> str:
        """Names the settings segments are made with, so a rerun reuses only its own."""
        model = Path(self.model).stat()
        settings = (self.model, model.st_size, model.st_mtime_ns, self.detect, self.restore, self.paste,
                    self.device, str(self.dtype), self.upscale_model)
        return hashlib.sha256(repr(settings).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Work:
    """One call of a worker: a few photos, a whole video, or one segment of a long video. A
    segment is the frames with pts in [start_pts, end_pts), restored after warming up from frame
    ``first_index`` (at ``first_pts``)."""

    files: list[tuple[int, str, str]]  # (index in the job's tasks, source, target), absolute paths
    frames: int  # frames it holds, for progress (0: not known)
    segment: str = ""  # the segment's file; "" for whole files
    first_index: int = 0
    first_pts: int = 0
    start_pts: int = 0
    end_pts: int | None = None  # None: to the end


@dataclass(frozen=True)
class Result:
    """What a worker reports for one Work: a few numbers and a message, never pixels."""

    status: str  # "restored", "skipped" (the output or segment exists) or "failed"
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    seconds: float = 0.0
    error: str = ""
    worker: str = ""

    @classmethod
    def of(cls, outcome: Outcome, worker: str) -> Result:
        return cls(outcome.status, outcome.frames, outcome.frames_with_faces, outcome.faces, outcome.seconds,
                   outcome.error, worker)


@dataclass
class WorkerStats:
    """One worker's share of a job: files and segments, frames, seconds busy."""

    items: int = 0
    frames: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    """A finished cluster job: each task's outcome (in task order), each worker's share, and
    what the job cost the driver."""

    outcomes: list[Outcome]
    workers: dict[str, WorkerStats]
    seconds: float  # wall time, planning included
    planning_seconds: float  # reading long videos' timestamps to cut them
    driver_cpu_seconds: float  # CPU time of the driver process, planning included
    routed_bytes: int  # work descriptions sent plus results received
    calls: int  # worker calls (Ray Data rows): up to 16 photos, a whole video, or a segment
    segments: dict[str, int] = field(default_factory=dict)  # "restored" / "reused" segment counts


# The workers import this package from a copy Ray ships to every node (a job-level setting).
RUNTIME_ENV = {"py_modules": [str(Path(__file__).resolve().parent)]}


class ClusterError(ValueError):
    """The cluster cannot be reached or cannot run the job; the message says what to do."""


def connect(address: str = "local") -> bool:
    """Start a Ray cluster in this process ("local") or join one ("auto", "ray://host:port"),
    shipping this package to its workers. Returns whether it connected (False when Ray is
    already initialised, e.g. by a notebook: pass ``runtime_env=RUNTIME_ENV`` to that ray.init)."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env=RUNTIME_ENV)
        else:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=RUNTIME_ENV)
    except ConnectionError as error:
        raise ClusterError(f"No Ray cluster at '{address}' ({error}). Start one (`ray start --head` on one "
                           f"node, `ray start --address=HEAD:6379` on the others), or give --ray without an "
                           f"address to start one on this machine.") from None
    return True


class Worker:
    """A Ray Data actor: loads the model once, then restores one Work per call."""

    def __init__(self, job: Job):
        gpus = ray.get_gpu_ids()
        self.files = FileRestorer(job.engine(gpu=bool(gpus)))
        self.name = f"{ray.util.get_node_ip_address()} pid {os.getpid()}" + (
            f" GPU {','.join(map(str, gpus))}" if gpus else "")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [json.dumps([asdict(r) for r in self.run(Work(**json.loads(str(row))))])
                   for row in batch["work"]]
        return {"id": batch["id"], "results": np.array(results, dtype=object)}

    def run(self, work: Work) -> list[Result]:
        """One result per file of ``work`` (one for a segment)."""
        if work.segment:
            return [Result.of(restore_segment(self.files.engine, work), self.name)]
        return [Result.of(self.files(Task(Path(source), Path(target))), self.name)
                for _, source, target in work.files]


def restore_segment(engine: FrameEngine, work: Work) -> Outcome:
    """Restore one segment of a video into its own file (video only, timestamps from 0), after
    warming tracking and smoothing up on the frames before it. A finished segment is reused."""
    (_, source, _), = work.files
    task = Task(Path(source), Path(work.segment))
    start = time.perf_counter()
    if task.target.exists():
        return Outcome(task, "skipped")
    faces: list[int] = []
    try:
        with VideoReader(task.source) as reader, \
                VideoWriter(task.target, engine.output_info(reader.info)) as writer:
            for frame in restored_segment(engine, reader, work):
                writer.write(frame.output, frame.pts - work.start_pts, frame.duration)
                faces.append(len(frame.faces))
    except Exception as error:  # reported per segment, like a file
        return Outcome(task, "failed", seconds=time.perf_counter() - start, error=str(error) or repr(error))
    return Outcome(task, "restored", frames=len(faces), frames_with_faces=sum(1 for f in faces if f),
                   faces=sum(faces), seconds=time.perf_counter() - start)


def restored_segment(engine: FrameEngine, reader: VideoReader, work: Work) -> Iterator[Frame]:
    """The restored frames of a segment: the engine runs from the warm-up frame on, decoding
    stops at the segment's end, and only the segment's own frames come out."""
    decoded = reader.frames_from(work.first_pts, work.first_index) if work.first_index else reader.frames()
    frames = (Frame(d.index, d.rgb, d.pts, d.duration)
              for d in takewhile(lambda d: work.end_pts is None or d.pts < work.end_pts, decoded))
    return (frame for frame in engine.run(frames) if frame.pts >= work.start_pts)


def join_video(source: str, target: str, parts: list[tuple[str, int]], folder: str) -> tuple[float, str]:
    """Join a video's segments into its output and remove them: (seconds, error or "")."""
    start = time.perf_counter()
    try:
        join_segments([(Path(path), pts) for path, pts in parts], target, probe(source), audio_from=source)
    except Exception as error:  # reported for the file; its segments stay for a rerun
        return time.perf_counter() - start, str(error) or repr(error)
    shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - start, ""


def split_video(task_index: int, task: Task, times: list[int], job: Job, segment_frames: int) -> list[Work]:
    """Cut a video whose frames are at ``times`` into segments of at most ``segment_frames``.

    Each segment warms up from a frame that gets a whole-frame detection in a single pass too
    (a multiple of ``redetect_every``), at least the smoother's settling time before its start,
    so the faces it follows and their smoothed landmarks are those of a single pass.
    """
    count = math.ceil(len(times) / segment_frames)
    bounds = [round(k * len(times) / count) for k in range(count + 1)]
    warm_up = settling_frames(job.detect.smoothing)
    folder = segments_folder(task.target, job)
    files = [(task_index, str(task.source), str(task.target))]
    work = []
    for start, end in pairwise(bounds):
        first = max(0, start - warm_up)
        first -= first % job.detect.redetect_every
        end_pts = times[end] if end < len(times) else None
        name = f"{times[start]}-{'end' if end_pts is None else end_pts}.mp4"
        work.append(Work(files, end - start, str(folder / name), first, times[first], times[start], end_pts))
    return work


def segments_folder(target: Path, job: Job) -> Path:
    """Where a video's segments wait to be joined: hidden, beside its output."""
    return target.parent / f".{target.name}.{job.fingerprint()}.segments"


def plan(tasks: list[Task], job: Job, segment_frames: int, workers: int) -> tuple[list[Work], dict[int, Outcome]]:
    """The work for the tasks (paths made absolute for the workers), longest first, and the
    outcomes known without any: outputs that exist (skipped) and videos that cannot be read.

    Photos go a few to a call (each call costs the driver and Ray some milliseconds), but in
    at least four calls per worker, so a small job still spreads over every worker.
    """
    work: list[Work] = []
    photos: list[tuple[int, str, str]] = []
    known: dict[int, Outcome] = {}
    for i, task in enumerate(tasks):
        absolute = Task(task.source.absolute(), task.target.absolute())
        files = [(i, str(absolute.source), str(absolute.target))]
        if task.target.exists():
            known[i] = Outcome(task, "skipped")
        elif not task.is_video:
            photos += files
        else:
            try:
                frames = probe(task.source).expected_frames or 0
                times = frame_timestamps(task.source) if frames > segment_frames else None
            except VideoError as error:
                known[i] = Outcome(task, "failed", error=str(error))
                continue
            if times and len(times) > segment_frames:
                work += split_video(i, absolute, times, job, segment_frames)
            else:
                work.append(Work(files, frames))
    per_call = max(1, min(MAX_PHOTOS_PER_CALL, len(photos) // (4 * workers)))
    work += [Work(photos[n:n + per_call], len(photos[n:n + per_call])) for n in range(0, len(photos), per_call)]
    work.sort(key=lambda w: -w.frames)  # the last calls to finish are short ones
    return work, known


def pool_size(workers: int | None, worker_cpus: float) -> tuple[int, dict[str, float]]:
    """How many workers and what each reserves: one per GPU when the cluster has GPUs
    (``workers`` at most that many), else ``workers`` or as many as its CPUs hold."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return min(workers or gpus, gpus), {"num_gpus": 1, "num_cpus": worker_cpus}
    return workers or max(1, int(resources.get("CPU", 1) // worker_cpus)), {"num_cpus": worker_cpus}


def restore(tasks: list[Task], job: Job, *, workers: int | None = None, worker_cpus: float = 1,
            segment_frames: int = DEFAULT_SEGMENT_FRAMES, progress: bool = True) -> Report:
    """Restore the tasks on the connected cluster (``connect``), failures reported per file
    while the job goes on, with progress bars over files and frames that follow the results."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be at least 1; got {segment_frames}.")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no start and finish lines per dataset
    started, cpu_started = time.perf_counter(), time.process_time()
    size, resources = pool_size(workers, worker_cpus)
    work, known = plan(tasks, job, segment_frames, size)
    planning = time.perf_counter() - started
    gather = _Gatherer(tasks, work, known, progress)
    if work:
        rows = [{"id": n, "work": json.dumps(asdict(item))} for n, item in enumerate(work)]
        gather.routed += sum(len(row["work"]) for row in rows)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.max_errored_blocks = -1  # a call whose worker died on every retry is reported, not fatal
        # Hand out work once every worker is up (a worker that cannot start fails the job at once,
        # and an early worker does not take all of a small job's calls).
        context.wait_for_min_actors_s = WORKER_START_SECONDS
        with warnings.catch_warnings():
            # Ray Data 2.60 names no parameter for the retry limit (by default it retries forever,
            # which a file that kills its worker every time would turn into a hang).
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            restored = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                Worker, fn_constructor_kwargs={"job": job}, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(size, len(rows)), max_tasks_in_flight_per_actor=2),
                max_task_retries=TASK_RETRIES, **resources)
        for row in restored.iter_rows():
            gather.add(work[row["id"]], row["results"])
    gather.finish()
    return Report(gather.outcomes_in_order(), dict(gather.workers), time.perf_counter() - started, planning,
                  time.process_time() - cpu_started, gather.routed, len(work), gather.segments)


class _Gatherer:
    """The driver's side of a job: results in, outcomes and progress out, and each video's
    segments joined (as a Ray task) once they are all in."""

    def __init__(self, tasks: list[Task], work: list[Work], known: dict[int, Outcome], progress: bool):
        from tqdm import tqdm

        self.tasks, self.outcomes = tasks, dict(known)
        self.parts: dict[int, list[Work]] = defaultdict(list)
        for item in work:
            if item.segment:
                self.parts[item.files[0][0]].append(item)
        self.results: dict[int, list[Result]] = defaultdict(list)
        self.workers: dict[str, WorkerStats] = defaultdict(WorkerStats)
        self.segments = {"restored": 0, "reused": 0}
        self.joining: dict[ray.ObjectRef, int] = {}
        self.join = ray.remote(num_cpus=0, max_retries=TASK_RETRIES)(join_video)
        self.routed = 0
        self.files_bar = tqdm(total=len(tasks), initial=len(known), unit="file", desc="files", position=0,
                              disable=not progress)
        self.frames_bar = tqdm(total=sum(w.frames for w in work), unit="frame", desc="frames", position=1,
                               disable=not progress)
        for outcome in known.values():
            self._report(outcome)

    def add(self, work: Work, results_json: str) -> None:
        """The results of one call."""
        self.routed += len(results_json)
        results = [Result(**r) for r in json.loads(results_json)]
        self.frames_bar.update(work.frames)
        for (task, _, _), result in zip(work.files, results):
            if result.status != "skipped":
                stats = self.workers[result.worker]
                stats.items += 1
                stats.frames += result.frames
                stats.seconds += result.seconds
            if not work.segment:
                self._finish(task, _file_outcome(self.tasks[task], result))
                continue
            self.segments["reused" if result.status == "skipped" else "restored"] += 1
            self.results[task].append(result)
            if len(self.results[task]) == len(self.parts[task]):
                self._join(task)
        self._collect_joins(timeout=0)

    def _join(self, task: int) -> None:
        failed = [r.error for r in self.results[task] if r.status == "failed"]
        if failed:
            self._finish(task, _video_outcome(self.tasks[task], self.results[task], 0.0, failed[0]))
            return
        parts = sorted(self.parts[task], key=lambda w: w.start_pts)
        (_, source, target), = parts[0].files
        ref = self.join.remote(source, target, [(w.segment, w.start_pts) for w in parts],
                               str(Path(parts[0].segment).parent))
        self.joining[ref] = task

    def _collect_joins(self, timeout: float | None) -> None:
        done, _ = ray.wait(list(self.joining), num_returns=len(self.joining), timeout=timeout)
        for ref in done:
            task = self.joining.pop(ref)
            seconds, error = ray.get(ref)
            self._finish(task, _video_outcome(self.tasks[task], self.results[task], seconds, error))

    def finish(self) -> None:
        """Wait for the joins; work that never reported (its worker died on every retry) failed."""
        while self.joining:
            self._collect_joins(timeout=None)
        for task in range(len(self.tasks)):
            if task not in self.outcomes:
                self._finish(task, Outcome(self.tasks[task], "failed", error=(
                    f"its worker died {TASK_RETRIES + 1} times while restoring it (out of memory?); "
                    f"see the Ray logs.")))
        self.frames_bar.close()
        self.files_bar.close()

    def _finish(self, task: int, outcome: Outcome) -> None:
        self.outcomes[task] = outcome
        self._report(outcome)
        self.files_bar.update(1)

    def _report(self, outcome: Outcome) -> None:
        if outcome.status == "failed":
            self.files_bar.write(f"error: {outcome.task.source}: {outcome.error}", file=sys.stderr)

    def outcomes_in_order(self) -> list[Outcome]:
        return [self.outcomes[task] for task in range(len(self.tasks))]


def _file_outcome(task: Task, result: Result) -> Outcome:
    return Outcome(task, result.status, result.frames, result.frames_with_faces, result.faces, result.seconds,
                   result.error)


def _video_outcome(task: Task, results: list[Result], join_seconds: float, error: str) -> Outcome:
    """A segmented video's outcome: its segments' sums (those restored in this run), or the
    first error."""
    seconds = sum(r.seconds for r in results) + join_seconds
    if error:
        return Outcome(task, "failed", seconds=seconds, error=error)
    return Outcome(task, "restored", sum(r.frames for r in results), sum(r.frames_with_faces for r in results),
                   sum(r.faces for r in results), seconds)
