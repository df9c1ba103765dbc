"""Speed, memory and accuracy of the generator's execution paths, against plain fp32 eager.

    python -m gpen.bench                       # CPU: 512 px, batch 1 and 2
    python -m gpen.bench --sizes 512 1024 2048 --batches 1 8   # e.g. on a GPU
    python -m gpen.bench --stages              # per-stage ms of a 1080p one-face frame

Every path runs the same random-weight generator on the same input in the same process; the
ratio column is the plain fp32 eager time divided by the path's time, and the error columns
compare the path's output with fp32's (max abs on the [-1,1] output, PSNR on [0,1]).
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .arch import FullGenerator, GPENConfig


@dataclass
class Path:
    name: str
    dtype: torch.dtype
    channels_last: bool = False
    compile: bool = False


PATHS = [
    Path("fp32 eager", torch.float32),
    Path("fp32 channels_last", torch.float32, channels_last=True),
    Path("bf16 channels_last", torch.bfloat16, channels_last=True),
    Path("fp16 channels_last", torch.float16, channels_last=True),
]
COMPILED = [Path("fp16 compiled", torch.float16, channels_last=True, compile=True)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` runs after one warm-up run."""
    out = run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = ((a.float() + 1) / 2).clamp(0, 1)
    b = ((b.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def bench(sizes: list[int], batches: list[int], device: torch.device, paths: list[Path],
          repeats: int) -> list[dict]:
    rows = []
    torch.backends.cudnn.benchmark = device.type == "cuda"
    for size in sizes:
        torch.manual_seed(0)
        reference = FullGenerator(GPENConfig(size)).eval().requires_grad_(False)
        for batch in batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
            baseline_time, baseline_out = None, None
            for path in paths:
                if device.type == "cpu" and path.dtype != torch.float32:
                    continue  # CPU fp16/bf16 convolutions are slow fallbacks here, not fast paths
                model = FullGenerator(reference.config).eval().requires_grad_(False)
                model.load_state_dict(reference.state_dict())
                fmt = torch.channels_last if path.channels_last else torch.contiguous_format
                model = model.to(device=device, dtype=path.dtype)
                if path.channels_last:
                    model.to_channels_last()
                inp = x.to(device=device, dtype=path.dtype).contiguous(memory_format=fmt)
                forward = torch.compile(model) if path.compile else model
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode():
                    seconds, out = timed(lambda: forward(inp), device, repeats)
                out = out.float().cpu()
                if baseline_time is None:
                    baseline_time, baseline_out = seconds, out
                rows.append({
                    "size": size, "batch": batch, "path": path.name,
                    "ms_per_face": 1000 * seconds / batch, "faces_per_s": batch / seconds,
                    "peak_mib": peak_memory_mib(device), "speedup": baseline_time / seconds,
                    "max_abs": (out - baseline_out).abs().max().item(), "psnr": psnr(out, baseline_out),
                })
                print(format_row(rows[-1]), flush=True)
    return rows


HEADER = f"{'size':>5} {'batch':>5}  {'path':<20} {'ms/face':>9} {'faces/s':>8} {'peak MiB':>9} " \
         f"{'vs fp32':>7} {'max abs':>9} {'PSNR dB':>8}"


def format_row(r: dict) -> str:
    return (f"{r['size']:>5} {r['batch']:>5}  {r['path']:<20} {r['ms_per_face']:>9.1f} "
            f"{r['faces_per_s']:>8.2f} {r['peak_mib']:>9.0f} {r['speedup']:>6.2f}x "
            f"{r['max_abs']:>9.2e} {r['psnr']:>8.1f}")


def test_frame(path: str | None = None) -> torch.Tensor:
    """A 1920x1080 one-face frame as an IMAGE: ``path``, or the astronaut (scikit-image) scaled
    into the frame, face about 400 px."""
    import cv2
    import numpy as np

    if path:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"{path} could not be read as an image.")
        rgb = bgr[..., ::-1]
    else:
        try:
            import skimage.data
        except ImportError:
            raise SystemExit("--stages needs scikit-image for its sample photo (pip install "
                             "scikit-image), or --image PATH.") from None
        rgb = np.full((1080, 1920, 3), 128, np.uint8)
        rgb[:, 420:1500] = cv2.resize(skimage.data.astronaut(), (1080, 1080), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(np.ascontiguousarray(rgb).astype(np.float32) / 255.0)[None]


def stage_table(sizes: list[int], device: torch.device, dtype: torch.dtype, repeats: int,
                image: torch.Tensor) -> list[dict]:
    """ms per frame of each stage of the frame pipeline (detect, align, restore, paste) on
    ``device``, for a random-weight generator of each size."""
    from . import pipeline
    from .faces import load_detector

    detector = load_detector("mtcnn", (), str(device))
    seconds, faces = timed(lambda: pipeline.detect(image, detector), device, repeats)
    detect_ms = 1000 * seconds
    print(f"frame {image.shape[2]}x{image.shape[1]}, {faces.count} face(s), {dtype}")
    print(f"{'size':>5}  {'detect':>8} {'align':>8} {'restore':>9} {'paste':>8} {'all but model':>14}  ms per frame")
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = FullGenerator(GPENConfig(size)).eval().requires_grad_(False).to(device=device, dtype=dtype)
        model.to_channels_last()
        align_s, (crops, aligned) = timed(lambda: pipeline.align(image, faces, size, device), device, repeats)
        restore_s, restored = timed(lambda: pipeline.restore(model, crops, device=device, dtype=dtype),
                                    device, 1 if device.type == "cpu" else repeats)
        paste_s, _ = timed(lambda: pipeline.paste(image, restored, aligned, device=device), device, repeats)
        row = {"size": size, "detect_ms": detect_ms, "align_ms": 1000 * align_s,
               "restore_ms": 1000 * restore_s, "paste_ms": 1000 * paste_s}
        row["overhead_ms"] = row["detect_ms"] + row["align_ms"] + row["paste_ms"]
        rows.append(row)
        print(f"{size:>5}  {row['detect_ms']:>8.1f} {row['align_ms']:>8.1f} {row['restore_ms']:>9.1f} "
              f"{row['paste_ms']:>8.1f} {row['overhead_ms']:>14.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m gpen.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="model sizes (default: 512, 1024, 2048 on CUDA and with --stages; 512 otherwise)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8] if cuda else [1, 2])
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    parser.add_argument("--stages", action="store_true",
                        help="time each stage of a 1080p one-face frame (detect, align, restore, paste) "
                             "instead of the generator alone; --sizes picks the models")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="with --stages: the model's precision (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--image", help="with --stages: a frame to use instead of the sample photo")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.stages:
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        dtype = dtypes[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        return stage_table(args.sizes or [512, 1024, 2048], device, dtype, args.repeats,
                           test_frame(args.image))
    print(HEADER)
    return bench(args.sizes or ([512, 1024, 2048] if cuda else [512]), args.batches, device,
                 PATHS + (COMPILED if args.compile else []), args.repeats)


if __name__ == "__main__":
    main()
