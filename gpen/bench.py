"""Speed, memory and accuracy of the generator's execution paths, all measured in one run.

    python -m gpen.bench                        # this device: 512 px, every dtype, eager
    python -m gpen.bench --compile --authors --node   # + torch.compile, the authors' formulation,
                                                      #   and the ComfyUI node path
    python -m gpen.bench --sizes 512 1024 2048 --batches 1 8 --compile   # e.g. on a GPU
    python -m gpen.bench --memory --sizes 512 1024 2048   # peak memory against the estimate
    python -m gpen.bench --memory --device meta           # the same, allocations only (fast)
    python -m gpen.bench --stages              # per-stage ms of a 1080p one-face frame
    python -m gpen.bench --video clip.mp4      # a video end to end: ms per frame per stage, frames/s
    python -m gpen.bench --models              # ms per face of GPEN-512, GFPGAN, RestoreFormer and
                                               #   CodeFormer, in fp32 and in auto precision

Every path runs the same random-weight generator on the same input. ``ms/face`` is the median
of ``--repeats`` rounds that time every path once in turn (so a load from other processes hits
all paths alike), after each path's first call, reported on its own (``first s``: for compiled
paths, the compile time); ``best ms`` is the fastest round. ``vs base`` divides the baseline's
median time by the path's: the baseline is the authors' formulation in fp32 when ``--authors``
is given, else our fp32 eager. The error columns compare each output with our fp32 eager output (max abs on the [-1,1]
output, PSNR on [0,1]).

The authors' formulation is our own re-implementation, for timing, of how the authors'
FullGenerator computes: one weight tensor per sample (modulated and demodulated weights,
grouped convolutions), bias and activation unfused and out of place, and up/down-sampling FIR
filters run as single-channel convolutions at full resolution then subsampled (their
``upfirdn2d_native``, the path their code takes without its CUDA extension), in NCHW. It is
checked to compute the same output as ours (its max abs column).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import execution
from .arch import (LEAKY_GAIN, LEAKY_SLOPE, ConvLayer, FullGenerator, GPENConfig, ModulatedConv2d,
                   StyledConv, ToRGB, peak_activation_bytes)
from .align import template
from .engine import STAGES
from .options import DetectOptions, RestoreOptions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- the authors' formulation (timing baseline) -------------------------------------------

def _authors_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
                       pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """FIR resampling the way the authors' CPU fallback computes it: channels moved last for the
    zero insertion and padding, moved back, every channel filtered as its own single-channel
    image at full resolution, then subsampled by slicing."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.permute(0, 2, 3, 1).reshape(b, h, 1, w, 1, c)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1]).reshape(b, h * up, w * up, c)
    out = F.pad(out, [0, 0, pad[0], pad[1], pad[0], pad[1]])
    out = out.permute(0, 3, 1, 2).reshape(b * c, 1, out.shape[1], out.shape[2])
    out = F.conv2d(out, kernel.flip((0, 1)).view(1, 1, kh, kw).to(out.dtype))
    return out.reshape(b, c, out.shape[2], out.shape[3])[:, :, ::down, ::down]


def _authors_act(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return LEAKY_GAIN * F.leaky_relu(x + bias.view((1, -1) + (1,) * (x.ndim - 2)), LEAKY_SLOPE)


def _authors_linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.activate:
        return _authors_act(F.linear(x, layer.weight * layer.scale), layer.bias * layer.lr_mul)
    return F.linear(x, layer.weight * layer.scale, bias=layer.bias * layer.lr_mul)


def _authors_modconv(conv: ModulatedConv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One modulated (and demodulated) weight per sample, run as a grouped convolution."""
    b, c_in, h, wd = x.shape
    c_out, k = conv.weight.shape[1], conv.weight.shape[-1]
    style = _authors_linear(conv.modulation, w).view(b, 1, c_in, 1, 1)
    weight = conv.scale * conv.weight * style
    if conv.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, c_out, 1, 1, 1)
    x = x.reshape(1, b * c_in, h, wd)
    if conv.upsample:
        weight = weight.transpose(1, 2).reshape(b * c_in, c_out, k, k)
        out = F.conv_transpose2d(x, weight, stride=2, groups=b)
        out = out.reshape(b, c_out, out.shape[2], out.shape[3])
        return _authors_upfirdn2d(out, conv.blur.kernel, pad=conv.blur.pad)
    out = F.conv2d(x, weight.reshape(b * c_out, c_in, k, k), padding=conv.padding, groups=b)
    return out.reshape(b, c_out, h, wd)


def _authors_styled(layer: StyledConv, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    out = _authors_modconv(layer.conv, x, w)
    out = torch.cat((out, layer.noise.weight * noise), dim=1)
    return _authors_act(out, layer.activate.bias)


def _authors_to_rgb(layer: ToRGB, x: torch.Tensor, w: torch.Tensor,
                    skip: torch.Tensor | None) -> torch.Tensor:
    out = _authors_modconv(layer.conv, x, w) + layer.bias
    if skip is not None:
        up = layer.upsample
        out = out + _authors_upfirdn2d(skip, up.kernel, up=up.factor, pad=up.pad)
    return out


def _authors_encoder(layer: ConvLayer, x: torch.Tensor) -> torch.Tensor:
    modules = list(layer)
    if len(modules) == 3:  # blur, stride-2 conv, activation
        blur, conv, act = modules
        x = _authors_upfirdn2d(x, blur.kernel, pad=blur.pad)
    else:
        conv, act = modules
    x = F.conv2d(x, conv.weight * conv.scale, stride=conv.stride, padding=conv.padding)
    return _authors_act(x, act.bias)


def authors_formulation(model: FullGenerator, x: torch.Tensor) -> torch.Tensor:
    """``model``'s function computed the way the authors' FullGenerator computes it (see the
    module docstring); for timing against, not for use."""
    x = x.contiguous()
    features = []
    for encoder in model.encoders():
        x = _authors_encoder(encoder[0], x)
        features.append(x)
    latent = _authors_linear(model.final_linear[0], x.reshape(x.shape[0], -1))
    decoder = model.generator
    w = latent * torch.rsqrt(torch.mean(latent**2, dim=1, keepdim=True) + 1e-8)
    for layer in list(decoder.style)[1:]:
        w = _authors_linear(layer, w)
    noise = features[::-1]
    out = decoder.input.input.repeat(x.shape[0], 1, 1, 1)
    out = _authors_styled(decoder.conv1, out, w, noise[0])
    skip = _authors_to_rgb(decoder.to_rgb1, out, w, None)
    for up_conv, conv, to_rgb, feature in zip(decoder.convs[::2], decoder.convs[1::2], decoder.to_rgbs,
                                              noise[1:]):
        out = _authors_styled(up_conv, out, w, feature)
        out = _authors_styled(conv, out, w, feature)
        skip = _authors_to_rgb(to_rgb, out, w, skip)
    return skip


# --- measuring --------------------------------------------------------------------------

class PeakLiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside it that are still alive, and their
    peak: the memory a forward needs on any device (weights and tensors made before excluded).
    On the ``meta`` device the same forward allocates the same storages without computing
    anything, so large models and slow dtypes are measured in seconds (``--device meta``)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage itself (unlike its data pointer, distinct on ``meta``)
        if key in self._sizes or storage.nbytes() == 0:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def ignore(self, *tensors: torch.Tensor) -> PeakLiveBytes:
        """Treat these existing tensors' storages (weights, say) as not created here."""
        for tensor in tensors:
            self._sizes.setdefault(tensor.untyped_storage()._cdata, 0)
        return self


def measured_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak live bytes of one inference forward of ``x`` (the input counted, the weights not)."""
    tracker = PeakLiveBytes().ignore(*model.parameters(), *model.buffers())
    with torch.inference_mode(), tracker:
        model(x.clone(memory_format=torch.preserve_format))
    return tracker.peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, output) of one call, the device's queue drained."""
    start = time.perf_counter()
    out = run()
    synchronize(device)
    return time.perf_counter() - start, out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = ((a.float() + 1) / 2).clamp(0, 1)
    b = ((b.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# --- paths ------------------------------------------------------------------------------

@dataclass
class Path:
    name: str
    dtype: torch.dtype
    kind: str = "eager"  # eager | compiled | authors | node | node compiled


def paths_for(dtypes: list[str], compile: bool, authors: bool, node: bool,
              device: torch.device) -> list[Path]:
    paths = [Path("authors' formulation fp32", torch.float32, "authors")] if authors else []
    for name in dtypes:
        paths.append(Path(f"{name} eager", DTYPES[name]))
        if compile:
            paths.append(Path(f"{name} compiled", DTYPES[name], "compiled"))
    if node:
        auto = execution.default_dtype(device)
        label = str(auto).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
        paths.append(Path(f"node path auto={label}", auto, "node"))
        if compile:
            paths.append(Path(f"node path auto={label} +compile", auto, "node compiled"))
    return paths


def _model_for(reference: FullGenerator, path: Path, device: torch.device) -> FullGenerator:
    model = FullGenerator(reference.config).eval().requires_grad_(False)
    model.load_state_dict(reference.state_dict())
    model = model.to(device=device, dtype=path.dtype)
    return model if path.kind == "authors" else model.to_channels_last()


def _runner(model: FullGenerator, path: Path, x: torch.Tensor,
            device: torch.device) -> Callable[[], torch.Tensor]:
    if path.kind.startswith("node"):
        from . import pipeline  # the node's restore step: IMAGE crops in, IMAGE crops out

        if path.kind == "node compiled":
            execution.enable_compile(model)
        crops = ((x.float() + 1) / 2).movedim(1, -1).cpu()
        options = RestoreOptions(batch_size=x.shape[0])
        return lambda: pipeline.restore(model, crops, options, device, path.dtype).movedim(-1, 1) * 2 - 1
    inp = x.to(device=device, dtype=path.dtype)
    if path.kind == "authors":
        return lambda: authors_formulation(model, inp)
    inp = inp.contiguous(memory_format=torch.channels_last)
    if path.kind == "compiled":
        execution.enable_compile(model)
    return lambda: execution.forward_of(model)(inp)


def bench(sizes: list[int], batches: list[int], device: torch.device, paths: list[Path],
          repeats: int) -> list[dict]:
    """Each path's first call, then ``repeats`` rounds timing every path once in turn, so that a
    load from other processes slows all paths alike (medians are reported)."""
    rows = []
    torch.backends.cudnn.benchmark = device.type == "cuda"
    for size in sizes:
        torch.manual_seed(0)
        reference = FullGenerator(GPENConfig(size)).eval().requires_grad_(False)
        for batch in batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
            with torch.inference_mode():  # what every path's error is measured against
                fp32_out = _model_for(reference, Path("fp32", torch.float32), device)(
                    x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
            runs, firsts, outs = [], [], []
            for path in paths:
                run = _runner(_model_for(reference, path, device), path, x, device)
                with torch.inference_mode():
                    first, out = timed(run, device)
                runs.append(run)
                firsts.append(first)
                outs.append(out.float().cpu())
                print(f"  first call of {path.name}: {first:.1f} s", flush=True)
            times: list[list[float]] = [[] for _ in paths]
            for _ in range(repeats):
                for run, spent in zip(runs, times):
                    with torch.inference_mode():
                        spent.append(timed(run, device)[0])
            base = statistics.median(times[0])
            for path, first, spent, out in zip(paths, firsts, times, outs):
                seconds = statistics.median(spent)
                # The node path returns IMAGE crops, clipped to the picture's range.
                expected = fp32_out.clamp(-1, 1) if path.kind.startswith("node") else fp32_out
                rows.append({
                    "size": size, "batch": batch, "path": path.name, "first_s": first,
                    "ms_per_face": 1000 * seconds / batch, "best_ms": 1000 * min(spent) / batch,
                    "faces_per_s": batch / seconds,
                    "speedup": base / seconds, "max_abs": (out - expected).abs().max().item(),
                    "psnr": psnr(out, expected),
                })
                print(format_row(rows[-1]), flush=True)
            del runs
    return rows


def memory(sizes: list[int], device: torch.device, dtypes: list[str]) -> list[dict]:
    """Measured peak live bytes of one face against ``peak_activation_bytes``."""
    rows = []
    for size in sizes:
        for name in dtypes:
            torch.manual_seed(0)
            with torch.device("meta" if device.type == "meta" else "cpu"):  # no values on meta
                model = FullGenerator(GPENConfig(size))
            model = model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[name]).to_channels_last()
            x = (torch.rand(1, 3, size, size) * 2 - 1).to(device=device, dtype=DTYPES[name])
            measured = measured_peak_bytes(model, x.contiguous(memory_format=torch.channels_last))
            estimate = peak_activation_bytes(model.config, DTYPES[name])
            rows.append({"size": size, "dtype": name, "measured_mib": measured / 2**20,
                         "estimate_mib": estimate / 2**20, "ratio": estimate / measured})
            print(f"{size:>5} {name:>5} {measured / 2**20:>10.0f} {estimate / 2**20:>10.0f} "
                  f"{estimate / measured:>7.3f}", flush=True)
    return rows


def forward_gflop(config: GPENConfig, batch: int = 1) -> float:
    """GFLOP of one forward (convolutions and matmuls, counted on ``meta``: no values computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = FullGenerator(config).eval().requires_grad_(False)
        x = torch.zeros(batch, 3, config.size, config.size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def conv_gflops(device: torch.device, dtype: torch.dtype, channels: int = 256, side: int = 256,
                repeats: int = 3) -> float:
    """Throughput of one plain 3x3 convolution (channels last, the weight fixed, so the library
    keeps its packed form) in ``dtype``, best of ``repeats``: the rate no compiler can lift for a
    forward that is almost all convolution."""
    x = torch.randn(1, channels, side, side, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        best = min(timed(lambda: F.conv2d(x, weight, padding=1), device)[0] for _ in range(repeats + 1))
    return 2 * 9 * channels**2 * side**2 / best / 1e9


def print_floor(sizes: list[int], batches: list[int], device: torch.device, dtypes: list[torch.dtype]) -> None:
    """Each model's GFLOP per face and the ms per face this device's convolution rate allows at
    best: how far any path (compiled or not) is from it."""
    rates = {dtype: conv_gflops(device, dtype) for dtype in dict.fromkeys(dtypes)}
    for size in sizes:
        gflop = forward_gflop(GPENConfig(size), batches[0]) / batches[0]
        floors = ", ".join(f"{str(d).removeprefix('torch.')} conv {rate:.0f} GFLOP/s -> >= {1000 * gflop / rate:.0f} ms/face"
                           for d, rate in rates.items())
        print(f"floor: GPEN-{size} {gflop:.0f} GFLOP/face; {floors}")


def graph_breaks(size: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(graphs, graph breaks) torch.compile makes of the forward (``torch._dynamo.explain``: traced,
    not compiled), for the report: a break would split the forward and run the pieces between
    graphs eager."""
    torch.manual_seed(0)
    model = FullGenerator(GPENConfig(size)).eval().requires_grad_(False).to(device=device, dtype=dtype)
    x = torch.zeros(1, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.to_channels_last())(x)
    return explained.graph_count, explained.graph_break_count


def timed_median(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last output."""
    out = run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        seconds, out = timed(run, device)
        times.append(seconds)
    return statistics.median(times), out


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
    seconds, faces = timed_median(lambda: pipeline.detect(image, detector), device, repeats)
    detect_ms = 1000 * seconds
    print(f"frame {image.shape[2]}x{image.shape[1]}, {faces.count} face(s), {dtype}")
    print(f"{'size':>5}  {'detect':>8} {'align':>8} {'restore':>9} {'paste':>8} {'all but model':>14}  ms per frame")
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = FullGenerator(GPENConfig(size)).eval().requires_grad_(False).to(device=device, dtype=dtype)
        model.to_channels_last()
        align_s, (crops, aligned) = timed_median(lambda: pipeline.align(image, faces, size, device), device, repeats)
        restore_s, restored = timed_median(lambda: pipeline.restore(model, crops, device=device, dtype=dtype),
                                    device, 1 if device.type == "cpu" else repeats)
        paste_s, _ = timed_median(lambda: pipeline.paste(image, restored, aligned, device=device), device, repeats)
        row = {"size": size, "detect_ms": detect_ms, "align_ms": 1000 * align_s,
               "restore_ms": 1000 * restore_s, "paste_ms": 1000 * paste_s}
        row["overhead_ms"] = row["detect_ms"] + row["align_ms"] + row["paste_ms"]
        rows.append(row)
        print(f"{size:>5}  {row['detect_ms']:>8.1f} {row['align_ms']:>8.1f} {row['restore_ms']:>9.1f} "
              f"{row['paste_ms']:>8.1f} {row['overhead_ms']:>14.1f}", flush=True)
    return rows


HEADER = (f"{'size':>5} {'batch':>5}  {'path':<32} {'ms/face':>9} {'best ms':>9} {'faces/s':>8} "
          f"{'first s':>8} {'vs base':>7} {'max abs':>9} {'PSNR dB':>8}")


def format_row(r: dict) -> str:
    return (f"{r['size']:>5} {r['batch']:>5}  {r['path']:<32} {r['ms_per_face']:>9.1f} {r['best_ms']:>9.1f} "
            f"{r['faces_per_s']:>8.2f} {r['first_s']:>8.1f} {r['speedup']:>6.2f}x "
            f"{r['max_abs']:>9.2e} {r['psnr']:>8.1f}")


class Passthrough(torch.nn.Module):
    """A stand-in generator that returns its input: times everything around the model without
    the forward competing for the same CPU cores. Declares what every restorer does
    (``restorers.FaceModel``), as GPEN."""

    name = "passthrough"
    input_range = (-1.0, 1.0)
    has_fidelity = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.template = template(size)
        self.register_buffer("anchor", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def video_table(path: str, size: int, device: torch.device, dtype: torch.dtype,
                detect: DetectOptions, model_free: bool = False) -> dict:
    """Restore a video file end to end with the frame engine (a random-weight generator of
    ``size``, or a pass-through one if ``model_free``), writing to a temporary file; ms per frame
    of each stage and frames/s overall. Stages overlap on threads, so their sum can exceed the
    wall time per frame."""
    import tempfile
    from pathlib import Path as FilePath

    from .engine import FrameEngine, Restorer
    from .faces import load_detector
    from .files import video_frames
    from .video import VideoReader, VideoWriter

    torch.manual_seed(0)
    if model_free:
        model = Passthrough(size).to(device)
    else:
        model = FullGenerator(GPENConfig(size)).eval().requires_grad_(False).to(device=device, dtype=dtype)
        model = model.to_channels_last()
    engine = FrameEngine(Restorer(model, device, dtype, load_detector(detect.detector, (), str(device))),
                         detect)
    frames = faces = 0
    encode = 0.0
    with tempfile.TemporaryDirectory() as folder, VideoReader(path) as reader:
        start = time.perf_counter()
        with VideoWriter(FilePath(folder) / "restored.mp4", engine.output_info(reader.info)) as writer:
            for frame in engine.run(video_frames(reader)):
                begin = time.perf_counter()
                writer.write(frame.output, frame.pts, frame.duration)
                encode += time.perf_counter() - begin
                frames += 1
                faces += len(frame.faces)
        wall = time.perf_counter() - start
    row = {"size": size, "frames": frames, "faces": faces, "fps": frames / wall,
           **{f"{stage}_ms": 1000 * engine.timings[stage] / frames for stage in STAGES},
           "encode_ms": 1000 * encode / frames}
    row["overhead_ms"] = sum(row[f"{stage}_ms"] for stage in ("decode", "detect", "align", "paste", "encode"))
    generator = "pass-through" if model_free else str(dtype).removeprefix('torch.')
    print(f"{path}: {frames} frames, {faces} faces, GPEN-{size} {generator}, "
          f"redetect every {detect.redetect_every}")
    print("ms per frame: " + ", ".join(f"{k[:-3]} {row[k]:.1f}" for k in row if k.endswith("_ms")))
    print(f"end to end: {row['fps']:.2f} frames/s ({1000 / row['fps']:.0f} ms per frame, wall)")
    return row


FACE_MODELS = ("GPEN-512", "GFPGAN", "RestoreFormer", "CodeFormer")


def face_models(device: torch.device, dtype: torch.dtype, names: tuple[str, ...] = FACE_MODELS
                ) -> dict[str, torch.nn.Module]:
    """Each of ``names`` with random weights in its released layout, loaded through
    ``restorers.load_face_model`` as a user's file would be, in ``dtype`` lowered as the nodes
    lower it; CodeFormer only where spandrel_extra_arches is installed (``restorers.has_codeformer``)."""
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel.architectures.RestoreFormer import RestoreFormer

    from .restorers import has_codeformer, load_face_model

    builders = {"GPEN-512": lambda: FullGenerator(GPENConfig(512)), "GFPGAN": GFPGAN, "RestoreFormer": RestoreFormer}
    if has_codeformer():
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormer
        builders["CodeFormer"] = CodeFormer
    models = {}
    for name in names:
        if name in builders:
            torch.manual_seed(0)
            state_dict = builders[name]().state_dict()
            models[name] = load_face_model(state_dict, device, dtype,
                                           bf16_ok=execution.bf16_supported(device)).to_channels_last()
    return models


def model_table(device: torch.device, repeats: int, batch: int, names: tuple[str, ...] = FACE_MODELS) -> list[dict]:
    """ms per face of each face model through ``pipeline.restore_crops``, in fp32 and in the
    precision ``auto`` picks for it on this device (``auto`` True on that row; one row where it
    is fp32): each run's first call, then ``repeats`` rounds timing every run once in turn, so a
    load from other processes slows all of them alike (medians reported)."""
    from .pipeline import restore_crops
    from .restorers import CODEFORMER_NOTE, has_codeformer

    if "CodeFormer" in names and not has_codeformer():
        print(f"CodeFormer: skipped, not installed here. {CODEFORMER_NOTE}.", flush=True)
    auto = execution.default_dtype(device)
    rows: list[dict] = []
    runs = []
    for requested in dict.fromkeys((torch.float32, auto)):
        for name, model in face_models(device, requested, names).items():
            dtype = next(model.parameters()).dtype
            same = next((row for row in rows if row["model"] == name and row["precision"] == _dtype_name(dtype)), None)
            if same is not None:  # auto is fp32 for this model here
                same["auto"] = True
                continue
            crops = torch.rand(batch, 3, model.size, model.size, device=device)
            runs.append(functools.partial(restore_crops, model, crops, RestoreOptions(batch_size=batch), device, dtype))
            runs[-1]()
            rows.append({"model": name, "precision": _dtype_name(dtype), "auto": requested == auto})
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            spent.append(timed(run, device)[0])
    print(f"{'model':>14} {'precision':>9} {'ms/face':>9}  (batch {batch}, median of {repeats} rounds after the first "
          f"call; auto: {_dtype_name(auto)}, or what the model runs instead)")
    for row, spent in zip(rows, times):
        row["ms_per_face"] = 1000 * statistics.median(spent) / batch
        label = row["precision"] + (" auto" if row["auto"] else "")
        print(f"{row['model']:>14} {label:>9} {row['ms_per_face']:>9.1f}", flush=True)
    return rows


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m gpen.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="model sizes (default: 512, 1024, 2048 on CUDA and with --stages; 512 otherwise)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8] if cuda else [1])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    parser.add_argument("--authors", action="store_true",
                        help="time the authors' formulation in fp32 first and use it as the baseline")
    parser.add_argument("--node", action="store_true",
                        help="time the node path: auto precision -> pipeline.restore on IMAGE crops")
    parser.add_argument("--memory", action="store_true",
                        help="measure peak memory per face against the estimate, instead of speed")
    parser.add_argument("--stages", action="store_true",
                        help="time each stage of a 1080p one-face frame (detect, align, restore, paste) "
                             "instead of the generator alone; --sizes picks the models")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="with --stages: the model's precision (default: what auto picks here)")
    parser.add_argument("--image", help="with --stages: a frame to use instead of the sample photo")
    parser.add_argument("--video", help="restore this video end to end (frame engine, encode included): "
                                        "ms per frame of each stage and frames/s; --sizes picks the model")
    parser.add_argument("--no-model", action="store_true",
                        help="with --video: a generator that returns its input, to time everything else")
    parser.add_argument("--models", nargs="*", choices=FACE_MODELS, metavar="MODEL",
                        help="ms per face of these face models in fp32 and in auto precision (no names: all of "
                             f"{', '.join(FACE_MODELS)})")
    parser.add_argument("--redetect-every", type=int, default=5,
                        help="with --video: whole-frame face search every N frames")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([512, 1024, 2048] if cuda or args.stages else [512])
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu (native bf16: {execution.cpu_has_native_bf16()})" if device.type == "cpu" else str(device)
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.models is not None:
        return model_table(device, args.repeats, args.batches[0], tuple(args.models) or FACE_MODELS)
    if args.video:
        dtype = DTYPES[args.dtype] if args.dtype else execution.default_dtype(device)
        detect = DetectOptions(smoothing=0.5, redetect_every=args.redetect_every)
        return [video_table(args.video, size, device, dtype, detect, args.no_model) for size in (args.sizes or [512])]
    if args.stages:
        dtype = DTYPES[args.dtype] if args.dtype else execution.default_dtype(device)
        return stage_table(sizes, device, dtype, args.repeats, test_frame(args.image))
    if args.memory:
        print(f"{'size':>5} {'dtype':>5} {'peak MiB':>10} {'estimate':>10} {'ratio':>7}")
        return memory(sizes, device, args.dtypes)
    paths = paths_for(args.dtypes, args.compile, args.authors, args.node, device)
    print(f"baseline (vs base): {paths[0].name}; errors against our fp32 eager output; ms/face: "
          f"median of {args.repeats} rounds after the first call, paths interleaved (best: fastest round)")
    if device.type != "meta":
        print_floor(sizes, args.batches, device, [path.dtype for path in paths])
    if args.compile:
        graphs, breaks = graph_breaks(sizes[0], device, paths[-1].dtype)
        print(f"torch.compile of GPEN-{sizes[0]}: {graphs} graph(s), {breaks} graph break(s)")
    print(HEADER)
    return bench(sizes, args.batches, device, paths, args.repeats)


if __name__ == "__main__":
    main()
