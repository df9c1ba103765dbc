"""Command line: restore the faces in photos, folders and videos; convert a checkpoint.

    python -m gpen restore --model GPEN-BFR-512.pth photos/ clip.mp4 --output restored/
    python -m gpen restore --model GPEN-BFR-512.pth photo.jpg restored.png
    python -m gpen convert GPEN-BFR-512.pth GPEN-BFR-512.safetensors
    python -m gpen restore --model GPEN-BFR-512.pth archive/ --output restored/ --ray auto

Folders are searched recursively and mirrored under --output; videos keep their audio, frame
timing and rotation. An output that exists is skipped (so an interrupted job resumes), outputs
appear only when complete, and nothing is ever overwritten. Model files are only read. With
--ray the same job runs on a Ray cluster (gpen.cluster), long videos split across its workers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import execution
from .engine import FrameEngine, load_restorer
from .faces import DetectorError
from .files import FileRestorer, Outcome, Task, plan
from .loader import ModelLoadError, canonicalize, detect_config, load_generator, read_state_dict
from .restorers import check_face_model
from .options import (BLENDS, DETECTORS, MASKS, ORDERS, VIDEO_REDETECT_EVERY, VIDEO_SMOOTHING, DetectOptions,
                      PasteOptions, RestoreOptions, parse_indices)

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _new_output(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output name (nothing was written).")
    return out


def convert(source: str, target: str) -> None:
    """Re-save a checkpoint's generator weights as a pickle-free .safetensors file."""
    from safetensors.torch import save_file

    out = _new_output(target)
    state_dict = canonicalize(read_state_dict(source), Path(source).name)
    config = detect_config(state_dict, Path(source).name)
    load_generator(state_dict)  # proves the layout before anything is written
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out), metadata={"architecture": "GPEN", "size": str(config.size)})
    print(f"{out}: GPEN-{config.size}, {len(tensors)} tensors")


def add_restore_options(parser: argparse.ArgumentParser) -> None:
    """The flags of every node option (defaults equal the nodes'; the faces options' video
    defaults are GPEN Restore Video's, as smoothing and re-detection act only across frames)."""
    defaults = DetectOptions(), RestoreOptions(), PasteOptions()
    detect, restore, paste = defaults
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="face restorer checkpoint (.pth/.pt/.safetensors): GPEN-BFR, GFPGAN v1.x, "
                            "RestoreFormer, or CodeFormer (with spandrel_extra_arches; non-commercial)")
    model.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                       help="auto: fp16 on a GPU; on the CPU bf16 where it has native bf16, else fp32")
    model.add_argument("--device", help="default: cuda when there is a GPU (--ray: on GPU workers), else cpu")
    model.add_argument("--compile", action="store_true",
                       help="run the generator through torch.compile (Load GPEN Model's compile): faster "
                            "per face, the first batch of each size waits for the compiler")
    model.add_argument("--weights-dir", action="append", default=[],
                       help="folder with facexlib weights (RetinaFace detectors, parsing masks); repeatable")
    faces = parser.add_argument_group("faces (Detect Faces)")
    faces.add_argument("--detector", default=detect.detector, choices=DETECTORS)
    faces.add_argument("--threshold", type=float, default=detect.threshold)
    faces.add_argument("--max-faces", type=int, default=detect.max_faces, help="per frame, after ordering; 0 = all")
    faces.add_argument("--order", default=detect.order, choices=ORDERS)
    faces.add_argument("--min-size", type=float, default=detect.min_size, help="pixels, shorter box side")
    faces.add_argument("--indices", default="", help="only these faces by position in the order, e.g. 0,2")
    faces.add_argument("--smoothing", type=float, default=VIDEO_SMOOTHING, help="video: 0 = off, 0.9 = strong")
    faces.add_argument("--redetect-every", type=int, default=VIDEO_REDETECT_EVERY,
                       help="video: search whole frames every N frames, follow the faces found in between")
    gen = parser.add_argument_group("restoration (GPEN Restore 2048)")
    gen.add_argument("--strength", type=float, default=restore.strength)
    gen.add_argument("--batch-size", type=int, default=restore.batch_size)
    gen.add_argument("--fidelity", type=float, default=restore.fidelity,
                     help="CodeFormer's weight w: 0 = most restoration, 1 = closest to the input; "
                          "other models ignore it")
    back = parser.add_argument_group("paste-back (Paste Back)")
    back.add_argument("--feather", type=float, default=paste.feather)
    back.add_argument("--color-correction", action=argparse.BooleanOptionalAction, default=paste.colour)
    back.add_argument("--blend", default=paste.blend, choices=BLENDS)
    back.add_argument("--upscale", type=float, default=paste.upscale)
    back.add_argument("--mask", default=paste.mask, choices=MASKS)
    back.add_argument("--upscale-model", help="enlarge the background with this upscale model (ESRGAN etc.)")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """The flags of a cluster run (--ray); the cluster module itself is imported only then."""
    ray = parser.add_argument_group("cluster (needs pip install \"ray[data]\")")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run on a Ray cluster: no ADDRESS starts one on this machine; 'auto' or "
                          "'ray://host:10001' joins a running one (paths must be the same on every node)")
    ray.add_argument("--workers", type=int, help="default: one per GPU of the cluster, else one per --worker-cpus CPUs")
    ray.add_argument("--worker-cpus", type=float, default=1, help="CPUs each worker reserves")
    ray.add_argument("--segment-frames", type=int,
                     help="videos longer than this (default 1000 frames) are cut into segments that "
                          "different workers restore")


def restore(args: argparse.Namespace) -> int:
    """Restore every input; returns the exit status (1 if any input failed)."""
    if args.output is None:
        if len(args.inputs) != 2:
            raise ValueError("give --output OUT (a folder), or exactly one input file and one output file.")
        source, target = map(Path, args.inputs)
        if target.exists():
            raise FileExistsError(f"{target} already exists; choose another output name (nothing was written).")
        tasks, problems = [Task(source, target)], [] if source.is_file() else [f"{source}: no such file."]
    else:
        tasks, problems = plan(args.inputs, args.output)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not tasks:
        return 1 if problems else 0
    options = (DetectOptions(detector=args.detector, threshold=args.threshold, max_faces=args.max_faces,
                             order=args.order, min_size=args.min_size, indices=parse_indices(args.indices),
                             smoothing=args.smoothing, redetect_every=args.redetect_every),
               RestoreOptions(strength=args.strength, batch_size=args.batch_size, fidelity=args.fidelity),
               PasteOptions(feather=args.feather, colour=args.color_correction, blend=args.blend,
                            upscale=args.upscale, mask=args.mask))
    if args.ray is not None:
        return restore_on_cluster(args, tasks, problems, options)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = PRECISIONS.get(args.precision) or execution.default_dtype(device)
    restorer = load_restorer(args.model, device, dtype, args.detector, tuple(args.weights_dir), args.mask,
                             args.upscale_model, compile=args.compile)
    model = restorer.model
    print(f"{len(tasks)} file(s), {model.name}-{model.size} on {device} "
          f"({str(restorer.dtype).removeprefix('torch.')})")
    if options[1].fidelity != RestoreOptions().fidelity and not model.has_fidelity:
        print(f"note: {model.name} has no fidelity weight; --fidelity is ignored.", file=sys.stderr)
    start = time.perf_counter()
    outcomes = run_tasks(tasks, FileRestorer(FrameEngine(restorer, *options)))
    print_summary(outcomes, time.perf_counter() - start)
    return 1 if problems or any(o.status == "failed" for o in outcomes) else 0


def restore_on_cluster(args: argparse.Namespace, tasks: list[Task], problems: list[str],
                       options: tuple[DetectOptions, RestoreOptions, PasteOptions]) -> int:
    """The restore command's job on a Ray cluster (--ray); the model is checked here first, so a
    bad file is one clear error rather than every worker failing to start."""
    try:
        import ray.data  # Ray is optional: only --ray needs it
    except ImportError as error:
        raise ValueError(f'--ray needs Ray Data, which is not installed ({error}). Install it with: '
                         f'pip install "ray[data]"') from None
    from . import cluster

    check_face_model(args.model)
    job = cluster.Job(str(Path(args.model).absolute()), *options, device=args.device,
                      dtype=PRECISIONS.get(args.precision), weights_dirs=tuple(args.weights_dir),
                      upscale_model=args.upscale_model and str(Path(args.upscale_model).absolute()),
                      compile=args.compile)
    started_here = cluster.connect(args.ray)
    try:
        size, resources = cluster.pool_size(args.workers, args.worker_cpus)
        kind = "GPU" if resources.get("num_gpus") else f"{args.worker_cpus:g}-CPU"
        print(f"{len(tasks)} file(s) on Ray ({args.ray}): {size} {kind} worker(s)")
        report = cluster.restore(tasks, job, workers=args.workers, worker_cpus=args.worker_cpus,
                                 segment_frames=args.segment_frames or cluster.DEFAULT_SEGMENT_FRAMES)
    except ray.exceptions.RayError as error:  # e.g. a node where the model does not load
        raise cluster.ClusterError(f"The cluster could not run the job: {error}") from None
    finally:
        if started_here:
            ray.shutdown()
    print_summary(report.outcomes, report.seconds)
    for name, worker in sorted(report.workers.items()):
        print(f"  worker {name}: {worker.items} file(s)/segment(s), {worker.frames} frame(s) in "
              f"{worker.seconds:.1f} s, {worker.rate:.2f} frames/s")
    if any(report.segments.values()):
        print(f"  segments: {report.segments['restored']} restored, {report.segments['reused']} reused "
              f"from an earlier run")
    return 1 if problems or any(o.status == "failed" for o in report.outcomes) else 0


def run_tasks(tasks: list[Task], restore_file: FileRestorer) -> list[Outcome]:
    """Restore the tasks in order with progress bars over files and frames; failures are
    reported as they happen and the job goes on."""
    from tqdm import tqdm

    outcomes = []
    with tqdm(total=len(tasks), unit="file", desc="files", position=0) as files, \
            tqdm(unit="frame", desc="frames", position=1, leave=False) as frames:
        for task in tasks:
            frames.reset(total=None)
            frames.set_postfix_str(task.source.name)

            def advance(done: int, total: int | None) -> None:
                if total and frames.total != total:
                    frames.total = total
                frames.update(done - frames.n)
            outcome = restore_file(task, advance)
            if outcome.status == "failed":
                tqdm.write(f"error: {task.source}: {outcome.error}", file=sys.stderr)
            outcomes.append(outcome)
            files.update(1)
    return outcomes


def print_summary(outcomes: list[Outcome], seconds: float) -> None:
    """Files restored / skipped / failed, faces, frames and time."""
    count = {status: sum(1 for o in outcomes if o.status == status) for status in ("restored", "skipped", "failed")}
    frames = sum(o.frames for o in outcomes)
    faces = sum(o.faces for o in outcomes)
    rate = f", {frames / seconds:.2f} frames/s" if seconds > 0 and frames else ""
    print(f"{count['restored']} restored, {count['skipped']} skipped (output exists), {count['failed']} failed; "
          f"{faces} face(s) in {frames} frame(s); {seconds:.1f} s{rate}")
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"  failed: {outcome.task.source}: {outcome.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpen", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="checkpoint -> .safetensors")
    c.add_argument("source")
    c.add_argument("target")
    r = commands.add_parser("restore", help="restore the faces in images, folders and videos",
                            description="Restore faces in images, folders (recursive) and videos.")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files, or folders")
    r.add_argument("--output", "-o", help="output folder (mirrors the inputs' folders)")
    add_restore_options(r)
    add_cluster_options(r)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.source, args.target)
            return 0
        return restore(args)
    except (ModelLoadError, DetectorError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
