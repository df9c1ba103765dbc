"""What a cluster job (``restore --ray``, gpen.cluster) costs its driver, and what a second
worker adds, measured on a local Ray cluster with generated photos and random-weight models.

    .venv/bin/python scripts/bench_cluster.py                    # 2000 tiny photos for the driver
    .venv/bin/python scripts/bench_cluster.py --photos 8000 --model-photos 24

1. Model-bound: photos of one face each restored with a GPEN-256 (one CPU per worker), on one
   worker and then on two: frames per second of each (frames per busy second summed over the
   workers, so starting them does not count) and the ratio. These jobs have few, long calls:
   the driver's CPU time per second of them is what it costs just to wait for results.
2. Driver: a job of tiny photos without faces, so the workers have almost nothing to do and
   the driver's work shows: its CPU time per call (a call is up to 16 photos, or one segment
   of a video) beyond that waiting cost, per photo, and the bytes it routes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpen import FullGenerator, GPENConfig, cluster  # noqa: E402
from gpen.files import plan  # noqa: E402


def random_model(path: Path, config: GPENConfig) -> Path:
    torch.manual_seed(0)
    torch.save(FullGenerator(config).state_dict(), path)
    return path


def run(photos: Path, output: Path, model: Path, workers: int) -> cluster.Report:
    tasks, _ = plan([photos], output)
    report = cluster.restore(tasks, cluster.Job(str(model)), workers=workers, progress=False)
    failed = [o for o in report.outcomes if o.status != "restored"]
    if failed:
        raise SystemExit(f"{len(failed)} photo(s) not restored: {failed[0].error}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=2000, help="tiny faceless photos for the driver figures")
    parser.add_argument("--model-photos", type=int, default=16, help="one-face photos for 1 vs 2 workers")
    args = parser.parse_args()
    import skimage.data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = random_model(root / "tiny.pth", GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16))
        gpen256 = random_model(root / "gpen256.pth", GPENConfig(size=256, style_dim=64, n_mlp=2, narrow=1 / 4))
        blank, faces = root / "blank", root / "faces"
        blank.mkdir()
        faces.mkdir()
        noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        for i in range(args.photos):
            cv2.imwrite(str(blank / f"{i:05d}.png"), np.roll(noise, i, axis=1))
        astronaut = skimage.data.astronaut()[::2, ::2, ::-1]
        for i in range(args.model_photos):
            cv2.imwrite(str(faces / f"{i:03d}.png"), np.roll(astronaut, 5 * i, axis=1))

        cluster.connect("local")
        print(f"local Ray cluster: {os.cpu_count()} CPU(s), Ray {cluster.ray.__version__}")
        rates, waiting = {}, []
        for workers in (1, 2):
            report = run(faces, root / f"faces_out{workers}", gpen256, workers)
            rates[workers] = sum(w.rate for w in report.workers.values())
            waiting.append(report.driver_cpu_seconds / report.seconds)
            print(f"model-bound, {workers} worker(s): {rates[workers]:.2f} frames/s while working "
                  f"({args.model_photos / report.seconds:.2f} frames/s over the {report.seconds:.1f} s "
                  f"including the workers' start); driver {1000 * waiting[-1]:.0f} ms CPU per second")
        print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")

        report = run(blank, root / "blank_out", tiny, workers=2)
        per_call = (report.driver_cpu_seconds - min(waiting) * report.seconds) / report.calls
        print(f"driver, {args.photos} tiny photos in {report.calls} calls, {report.seconds:.1f} s, "
              f"{report.driver_cpu_seconds:.1f} s CPU: {1000 * per_call:.1f} ms CPU per call beyond waiting "
              f"({1000 * per_call * report.calls / args.photos:.2f} ms per photo); "
              f"{report.routed_bytes / report.calls:.0f} bytes routed per call "
              f"({report.routed_bytes / args.photos:.0f} per photo)")


if __name__ == "__main__":
    main()
