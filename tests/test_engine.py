"""The frame engine: the same result as the IMAGE-batch steps, continuous tracking across its
batches, faceless frames untouched, and a clean stop."""

import threading

import numpy as np
import pytest
import torch

from gpen import FullGenerator, GPENConfig, heap, pipeline
from gpen import engine
from gpen.engine import Frame, FrameEngine, Restorer, ahead
from gpen.loader import ModelLoadError
from gpen.options import DetectOptions, RestoreOptions


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16)).eval()


def panning_frames(astronaut, count: int, step: int = 3, faceless_every: int = 0) -> list[np.ndarray]:
    """The astronaut moving right by ``step`` px a frame over a 720p grey frame; every
    ``faceless_every``-th frame (if set) shows only the grey."""
    frames = []
    for i in range(count):
        canvas = np.full((720, 1280, 3), 128, np.uint8)
        if not faceless_every or i % faceless_every:
            x = 200 + step * i
            canvas[100:612, x:x + 512] = astronaut
        frames.append(canvas)
    return frames


def engine_for(model, mtcnn, **detect) -> FrameEngine:
    return FrameEngine(Restorer(model, torch.device("cpu"), torch.float32, mtcnn), DetectOptions(**detect),
                       RestoreOptions(batch_size=3), window=4)


def test_engine_matches_the_batch_steps(astronaut, mtcnn, tiny_model):
    """One implementation: the engine's frames equal detect -> align -> restore -> paste on an
    IMAGE batch of the same frames (to 8-bit rounding)."""
    frames = panning_frames(astronaut, 6, faceless_every=4)
    out = list(engine_for(tiny_model, mtcnn).run(Frame(i, f) for i, f in enumerate(frames)))
    image = torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)
    faces = pipeline.detect(image, mtcnn)
    crops, aligned = pipeline.align(image, faces, tiny_model.size)
    restored = pipeline.restore(tiny_model, crops)
    expected, _ = pipeline.paste(image, restored, aligned)
    expected = (expected * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert [len(f.faces) for f in out] == [len(f) for f in faces.frames] == [0, 1, 1, 1, 0, 1]
    for frame, want in zip(out, expected):
        assert np.abs(frame.output.astype(int) - want.astype(int)).max() <= 1
    assert out[0].output is out[0].rgb and out[4].output is out[4].rgb  # faceless: untouched


def test_tracking_and_smoothing_are_continuous_across_batches(astronaut, mtcnn, tiny_model):
    """Batches of the engine (window 4, 3 faces a forward) are not seams in time: the smoothed
    landmarks move by no more at a batch boundary than between ordinary frames."""
    frames = panning_frames(astronaut, 24)
    out = list(engine_for(tiny_model, mtcnn, smoothing=0.8, redetect_every=5)
               .run(Frame(i, f) for i, f in enumerate(frames)))
    assert all(len(f.faces) == 1 for f in out)
    assert len({f.faces[0].track_id for f in out}) == 1  # one person throughout
    centres = np.array([f.faces[0].landmarks.mean(0) for f in out])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)  # steps[i - 1]: frame i-1 -> i
    boundaries = steps[[i - 1 for i in range(9, 24, 3)]]  # a batch of 3 faces ends every 3 frames
    steps = steps[4:]  # after the filter has settled
    print(f"landmark motion per frame: median {np.median(steps):.2f} px, at batch boundaries "
          f"max {boundaries.max():.2f} px (true motion 3 px)")
    assert boundaries.max() <= 1.5 * np.median(steps) + 0.5


def test_stopping_early_stops_the_workers(astronaut, mtcnn, tiny_model):
    pulled = []

    def source():
        for i, f in enumerate(panning_frames(astronaut, 40)):
            pulled.append(i)
            yield Frame(i, f)
    before = threading.active_count()
    run = engine_for(tiny_model, mtcnn).run(source())
    for _ in range(3):
        next(run)
    run.close()
    assert threading.active_count() == before
    assert len(pulled) < 40  # the decoder was not drained to the end


def test_the_final_trim_comes_after_every_worker_has_ended(astronaut, mtcnn, tiny_model, monkeypatch):
    """Frames the workers still hold when the run stops would otherwise stay behind the trim."""
    workers_at_trim = []
    monkeypatch.setattr(heap, "release_freed_memory", lambda: workers_at_trim.append(
        sum(thread.name == "gpen-engine" for thread in threading.enumerate())))
    run = engine_for(tiny_model, mtcnn).run(Frame(i, f) for i, f in enumerate(panning_frames(astronaut, 40)))
    for _ in range(3):
        next(run)
    run.close()
    assert workers_at_trim == [0]


def test_a_worker_error_reaches_the_consumer():
    def broken():
        yield 1
        raise RuntimeError("decoder broke")
    with pytest.raises(RuntimeError, match="decoder broke"):
        list(ahead(broken(), 2))


def test_bench_video_times_every_stage_around_the_model(tmp_path, capsys):
    from gpen import bench
    from videoclips import face_clip

    clip = face_clip(tmp_path / "faces.mp4", width=640, height=360, frames=6)
    [row] = bench.main(["--video", str(clip), "--no-model", "--sizes", "512", "--dtypes", "fp32"])
    assert row["frames"] == 6 and row["faces"] > 0 and row["fps"] > 0
    assert all(row[f"{stage}_ms"] > 0 for stage in ("decode", "detect", "align", "paste", "encode"))
    assert "pass-through" in capsys.readouterr().out


@pytest.fixture(scope="module")
def compact_x2(tmp_path_factory):
    """A tiny Real-ESRGAN Compact 2x upscaler (random weights): 4 convolutions, so 32 px of
    context around a tile is all it can see."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("upscalers") / "tiny_x2.pth"
    torch.save(SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict(), path)
    return path


def test_the_upscaler_runs_in_tiles_equal_to_the_whole_frame(compact_x2):
    from spandrel import ModelLoader

    descriptor = ModelLoader().load_from_file(str(compact_x2)).eval()
    frame = torch.rand(3, 150, 211)  # tiles of 64 px with 32 px of context: ragged edges in both directions
    with torch.inference_mode():
        whole = descriptor(frame[None])[0].clamp(0, 1)
    tiled = engine.upscale_tiled(descriptor, frame, 96)
    assert tiled.shape == (3, 300, 422)
    assert (tiled - whole).abs().max() < 1e-5


def test_the_upscaler_halves_its_tiles_when_memory_runs_out(compact_x2, monkeypatch):
    tried, upscale_tiled = [], engine.upscale_tiled

    def short_of_memory(descriptor, frame, tile):
        tried.append(tile)
        if tile > 128:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return upscale_tiled(descriptor, frame, tile)
    monkeypatch.setattr(engine, "upscale_tiled", short_of_memory)
    out = engine.model_upscaler(compact_x2, torch.device("cpu"))(torch.rand(3, 100, 120), 300, 250)
    assert tried == [engine.UPSCALE_TILE, engine.UPSCALE_TILE // 2, engine.UPSCALE_TILE // 4]
    assert out.shape == (3, 250, 300)


def test_a_face_model_is_refused_as_the_background_upscaler(face_weights):
    _, _, gfpgan, _ = face_weights("GFPGAN")
    with pytest.raises(ModelLoadError, match="GFPGAN.pth is a GFPGAN model .*not an RGB upscaler"):
        engine.model_upscaler(gfpgan, torch.device("cpu"))
