"""How much a ComfyUI server's memory grows while GPEN Restore Video streams a 720p clip, for a
short and a long clip: a real server (this checkout's .host, or GPEN_COMFY_DIR), Load Video ->
GPEN Restore Video -> Save Video over its HTTP API, RSS sampled every 50 ms.

    .venv/bin/python scripts/bench_server_memory.py                       # 150 and 600 frames
    .venv/bin/python scripts/bench_server_memory.py --frames 150 1200 --model 512

Each length runs twice on a fresh server, and each run's peak RSS is reported as growth over
the idle server: ``cold``, the first run (loading the model, the detector and the codecs
included), and ``warm``, a second run of the same clip (another file, so ComfyUI's cache does not
answer it); ``after`` is what the server holds once the second run is over. The last line
compares the longest clip's growth with the shortest's: a stream in bounded memory grows by the
same amount whatever the clip's length.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

import videoclips  # noqa: E402
from conftest import ComfyHost  # noqa: E402
from gpen import FullGenerator, GPENConfig  # noqa: E402
from test_video_node import video_graph  # noqa: E402

MODELS = {"tiny": GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16), "512": GPENConfig(512)}


def bench_graph(clip: str, model: str, precision: str) -> dict:
    """The video node tests' graph, Load Video -> GPEN Restore Video -> Save Video, in ``precision``."""
    graph = video_graph(clip, "bench/restored", model)
    graph["2"]["inputs"]["precision"] = precision
    return graph


def peak_rss_while(host: ComfyHost, graph: dict, timeout: float) -> tuple[int, int, float]:
    """(RSS before, peak RSS during, seconds) of one prompt run to completion."""
    process = psutil.Process(host.proc.pid)
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    try:
        entry = host.run(graph, timeout=timeout)
    finally:
        done.set()
        watcher.join()
    if entry["status"]["status_str"] != "success":
        raise SystemExit(f"the prompt failed: {entry['status']}; see {host.log_path}")
    return before, peak[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[150, 600])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    mib = 2**20
    growth = {}
    print(f"{'frames':>6} {'idle MiB':>9} {'cold +MiB':>10} {'warm +MiB':>10} {'after +MiB':>11} {'frames/s':>9}")
    for frames in args.frames:
        with tempfile.TemporaryDirectory() as folder:
            base = Path(folder)
            host = ComfyHost.with_pack(base)
            try:
                model = f"GPEN-bench-{args.model}.pth"
                torch.manual_seed(0)
                torch.save(FullGenerator(MODELS[args.model]).state_dict(),
                           base / "models" / "facerestore_models" / model)
                clip = videoclips.face_clip(base / "input" / f"clip{frames}.mp4", args.width, args.height,
                                            frames=frames)
                shutil.copy(clip, base / "input" / f"again{frames}.mp4")  # not served from the cache
                time.sleep(2)  # the server settles after start-up
                idle, cold_peak, _ = peak_rss_while(host, bench_graph(clip.name, model, args.precision), 3600)
                _, warm_peak, seconds = peak_rss_while(
                    host, bench_graph(f"again{frames}.mp4", model, args.precision), 3600)
                after = psutil.Process(host.proc.pid).memory_info().rss
            finally:
                host.stop()
        growth[frames] = (cold_peak - idle, warm_peak - idle)
        print(f"{frames:>6} {idle / mib:>9.0f} {(cold_peak - idle) / mib:>10.0f} {(warm_peak - idle) / mib:>10.0f} "
              f"{(after - idle) / mib:>11.0f} {frames / seconds:>9.2f}", flush=True)
    short, long = min(growth), max(growth)
    print(f"{long} frames against {short}: cold {growth[long][0] / growth[short][0]:.3f}x, "
          f"warm {growth[long][1] / growth[short][1]:.3f}x")


if __name__ == "__main__":
    main()
