"""Detection, alignment, restoration batching and paste-back on real photos, without ComfyUI."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from gpen import pipeline
from gpen.align import similarity_transform, template
from gpen.faces import Face, FaceSet, select_faces
from gpen.options import DetectOptions, PasteOptions, RestoreOptions, parse_indices
from gpen.temporal import FaceFinder


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0)


def test_similarity_transform_is_exact():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 2.5, np.array([10.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    affine = similarity_transform(src, dst)
    assert np.allclose(affine[:, :2], scale * rot) and np.allclose(affine[:, 2], shift)


def test_template_scales_with_size():
    assert np.allclose(template(2048), template(512) * 4)
    assert np.allclose(template(512)[0], [202.04, 242.88])


@pytest.mark.parametrize("size", [512, 1024])
def test_alignment_round_trip_on_astronaut(astro, mtcnn, size):
    """Landmarks re-detected on the aligned crop sit where the alignment put them (within 2% of
    the crop), and no closer fit to GPEN's template exists than the least-squares one we use."""
    faces = pipeline.detect(astro, mtcnn)
    assert faces.count == 1
    crops, aligned = pipeline.align(astro, faces, size)
    assert crops.shape == (1, size, size, 3)
    face = aligned.frames[0][0]
    placed = face.landmarks @ face.affine[:, :2].T + face.affine[:, 2]
    again = pipeline.detect(crops, mtcnn)
    assert again.count == 1
    found = again.frames[0][0].landmarks
    assert np.linalg.norm(found - placed, axis=1).max() <= 0.02 * size
    fit = np.linalg.norm(placed - template(size), axis=1).mean()
    assert np.linalg.norm(found - template(size), axis=1).mean() <= fit + 0.02 * size
    # Any other similarity (here: a slightly rotated one) fits the template worse.
    c, s = np.cos(0.03), np.sin(0.03)
    rotated = (placed - size / 2) @ np.array([[c, -s], [s, c]]).T + size / 2
    assert np.linalg.norm(rotated - template(size), axis=1).mean() > fit


def test_identity_restore_pastes_back_losslessly(astro, mtcnn):
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 512)
    out, mask = pipeline.paste(astro, crops, aligned)
    assert out.shape == astro.shape and mask.shape == astro.shape[:3]
    assert mask.max() > 0.99
    assert psnr(out, astro) >= 45


def test_resized_crops_still_land_in_place(astro, mtcnn):
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 512)
    bigger = torch.nn.functional.interpolate(crops.movedim(-1, 1), scale_factor=2, mode="bicubic")
    out, _ = pipeline.paste(astro, bigger.movedim(1, -1).clamp(0, 1), aligned)
    assert psnr(out, astro) >= 40


@pytest.mark.parametrize("blend", ["multiband", "alpha"])
def test_changes_stay_near_the_face(astro, mtcnn, blend):
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 512)
    out, mask = pipeline.paste(astro, torch.zeros_like(crops), aligned, PasteOptions(colour=False, blend=blend))
    change = (out - astro).abs().amax(-1)[0]
    x0, y0, x1, y1 = faces.frames[0][0].box
    ys, xs = np.nonzero(change.numpy() > 1 / 255)  # a visible change
    w, h = x1 - x0, y1 - y0
    assert xs.min() >= x0 - 0.5 * w and xs.max() <= x1 + 0.5 * w
    assert ys.min() >= y0 - 0.5 * h and ys.max() <= y1 + 0.5 * h
    if blend == "alpha":  # the mask output is exactly where pixels changed
        assert not ((change > 0) & (mask[0] == 0)).any()


def test_faceless_frames_pass_through_unchanged(astro, mtcnn):
    sky = torch.linspace(0, 1, 256)[None, :, None, None].expand(1, 256, 512, 3).clone()
    sky = torch.nn.functional.interpolate(sky.movedim(-1, 1), size=(512, 512)).movedim(1, -1)
    batch = torch.cat([sky, astro])
    faces = pipeline.detect(batch, mtcnn)
    assert [len(f) for f in faces.frames] == [0, 1]
    crops, aligned = pipeline.align(batch, faces, 256)
    out, mask = pipeline.paste(batch, crops, aligned)
    assert torch.equal(out[0], batch[0]) and mask[0].max() == 0


def test_no_faces_at_all(mtcnn):
    grey = torch.full((2, 64, 80, 3), 0.5)
    faces = pipeline.detect(grey, mtcnn)
    crops, aligned = pipeline.align(grey, faces, 512)
    assert crops.shape == (0, 512, 512, 3)
    out, mask = pipeline.paste(grey, crops, aligned)
    assert torch.equal(out, grey) and mask.shape == (2, 64, 80) and mask.max() == 0


def test_alpha_and_grey_layouts_are_kept(astro, mtcnn):
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 256)
    alpha = torch.rand(1, 512, 512, 1)
    rgba = torch.cat([astro, alpha], -1)
    out, _ = pipeline.paste(rgba, torch.zeros_like(crops), aligned)
    assert out.shape == rgba.shape and torch.equal(out[..., 3:], alpha)
    grey = astro.mean(-1, keepdim=True)
    out, _ = pipeline.paste(grey, crops, aligned)
    assert out.shape == grey.shape


def test_mismatched_inputs_are_named(astro, mtcnn):
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 256)
    with pytest.raises(ValueError, match="512x512 image"):
        pipeline.paste(torch.zeros(1, 300, 400, 3), crops, aligned)
    with pytest.raises(ValueError, match="2 frames"):
        pipeline.paste(astro.expand(2, -1, -1, -1), crops, aligned)
    with pytest.raises(ValueError, match="2 restored faces for 1"):
        pipeline.paste(astro, crops.expand(2, -1, -1, -1), aligned)
    with pytest.raises(ValueError, match="not been aligned"):
        pipeline.paste(astro, crops, faces)
    with pytest.raises(ValueError, match="Detect Faces"):
        pipeline.paste(astro, crops, "not faces")


class _FlakyMemory(torch.nn.Module):
    """Stands in for a GPU that only fits one face: larger batches raise CUDA's OOM error."""

    input_range = (-1.0, 1.0)
    has_fidelity = False

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return -x


def test_out_of_memory_halves_the_batch():
    crops = torch.rand(5, 8, 8, 3)
    model = _FlakyMemory()
    done = []
    out = pipeline.restore(model, crops, RestoreOptions(batch_size=4), on_progress=lambda d, t: done.append(d))
    assert model.batches[:3] == [4, 2, 1] and done[-1] == 5
    assert torch.allclose(out, 1 - crops, atol=1e-6)


def test_strength_mixes_with_the_input():
    crops = torch.rand(3, 8, 8, 3)
    out = pipeline.restore(_Negate(), crops, RestoreOptions(strength=0.25, batch_size=2))
    assert torch.allclose(out, 0.25 * (1 - crops) + 0.75 * crops, atol=1e-6)


class _Negate(torch.nn.Module):
    """A stand-in restorer: declares what every face model does (``restorers.FaceModel``)."""

    input_range = (-1.0, 1.0)
    has_fidelity = False

    def forward(self, x):
        return -x


def _face(x, y, size, score=0.99):
    return Face(box=(x, y, x + size, y + size), score=score, landmarks=np.zeros((5, 2)))


def test_selection_orders_and_filters():
    faces = [_face(300, 10, 50, 0.95), _face(10, 200, 120, 0.91), _face(150, 100, 20, 0.99)]
    assert [f.box[0] for f in select_faces(faces, DetectOptions(order="largest first"))] == [10, 300, 150]
    assert [f.box[0] for f in select_faces(faces, DetectOptions(order="left to right"))] == [10, 150, 300]
    assert [f.box[1] for f in select_faces(faces, DetectOptions(order="top to bottom"))] == [10, 100, 200]
    assert [f.score for f in select_faces(faces, DetectOptions(order="confidence"))] == [0.99, 0.95, 0.91]
    assert [f.box[0] for f in select_faces(faces, DetectOptions(order="left to right", min_size=30))] == [10, 300]
    assert [f.box[0] for f in select_faces(faces, DetectOptions(order="left to right", indices=[0, 2]))] == [10, 300]
    assert len(select_faces(faces, DetectOptions(max_faces=1))) == 1
    assert parse_indices(" 0, 2 ") == (0, 2)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_indices("first")


def test_faceset_flat_order():
    fs = FaceSet(image_size=(10, 10), frames=[[_face(0, 0, 1)], [], [_face(1, 1, 1), _face(2, 2, 1)]])
    assert [i for i, _ in fs.flat()] == [0, 2, 2] and fs.count == 3


@pytest.fixture
def detector_batches(mtcnn, monkeypatch) -> list[int]:
    """The number of pictures in each batch the MTCNN detector is given, as they come."""
    calls: list[int] = []
    original = type(mtcnn).detect_batch

    def counted(self, rgbs, threshold, min_face=0.0):
        calls.append(len(rgbs))
        return original(self, rgbs, threshold, min_face)
    monkeypatch.setattr(type(mtcnn), "detect_batch", counted)
    return calls


def test_whole_frame_searches_run_as_one_batch(astro, mtcnn, detector_batches):
    """An IMAGE batch's frames go through the detector a batch at a time (MTCNN runs each pyramid
    level of all of them in one pass) and find what frame-by-frame detection finds."""
    frames = torch.cat([astro, astro.flip(2), astro.roll(40, dims=1)])
    alone = [pipeline.detect(frames[i:i + 1], mtcnn).frames[0] for i in range(3)]
    detector_batches.clear()
    together = pipeline.detect(frames, mtcnn).frames
    assert detector_batches == [3]
    for one, batched in zip(alone, together):
        assert len(one) == len(batched) == 1
        assert np.abs(np.array(one[0].box) - np.array(batched[0].box)).max() < 1e-2
        assert np.abs(one[0].landmarks - batched[0].landmarks).max() < 1e-2


def test_whole_frame_batches_are_bounded_by_their_pixels(mtcnn, detector_batches):
    """A batch holds at most DETECT_BATCH_PIXELS (MTCNN's memory grows by about 75 MB with each
    720p frame of a batch): 720p frames are searched one at a time, 360p ones four at a time."""
    from gpen.faces import DETECT_BATCH_PIXELS

    pipeline.detect(torch.full((3, 720, 1280, 3), 0.5), mtcnn)
    assert detector_batches == [1, 1, 1] and 1280 * 720 <= DETECT_BATCH_PIXELS < 2 * 1280 * 720
    detector_batches.clear()
    pipeline.detect(torch.full((5, 360, 640, 3), 0.5), mtcnn)
    assert detector_batches == [4, 1]


def test_redetection_window_cut_by_the_frame_edge(astro, mtcnn):
    """A tracked face that has mostly left the frame: its window is narrower than the face sizes
    re-detection looks for, which must find nothing rather than fail."""
    from gpen.faces import detect_near

    rgb = (astro[0].numpy() * 255).astype(np.uint8)
    assert detect_near(mtcnn, rgb, (-250.0, 100.0, -40.0, 310.0), 0.9) is None
    face = pipeline.detect(astro, mtcnn).frames[0][0]
    assert detect_near(mtcnn, rgb, face.box, 0.9) is not None


def test_a_video_brings_the_detector_few_input_shapes(mtcnn):
    """oneDNN keeps a primitive (memory for good) for every convolution input shape it meets: a
    clip's re-detection windows and candidate batches come in a bounded set of shapes, instead of
    a new one every few frames (before: 399 after 60 frames, 640 after 120)."""
    import videoclips

    shapes: set[tuple[int, ...]] = set()
    hooks = [layer.register_forward_pre_hook(lambda _, args: shapes.add(tuple(args[0].shape)))
             for layer in mtcnn.net.modules() if isinstance(layer, torch.nn.Conv2d)]
    finder = FaceFinder(mtcnn, DetectOptions(smoothing=0.5, redetect_every=5))
    counts = []
    try:
        for index, rgb in enumerate(videoclips.pan_zoom(640, 360, 120), start=1):
            assert finder(rgb), f"frame {index}: the faces were lost"
            if index % 30 == 0:
                counts.append(len(shapes))
    finally:
        for hook in hooks:
            hook.remove()
    print("distinct convolution input shapes after 30, 60, 90, 120 frames:", counts)
    assert counts[-1] <= 200 and counts[-1] <= 1.2 * counts[1]
