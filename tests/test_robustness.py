"""Odd images and bad detector files: a correct result or a clear error, never a crash."""

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from gpen import FullGenerator, GPENConfig, pipeline
from gpen.faces import DetectorError, load_detector, retinaface_path
from gpen.options import DetectOptions, RestoreOptions


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16)).eval()


def run_all(image, detector, model_size=256, threshold=0.9, min_size=0.0):
    faces = pipeline.detect(image, detector, DetectOptions(threshold=threshold, min_size=min_size))
    crops, aligned = pipeline.align(image, faces, model_size)
    out, mask = pipeline.paste(image, crops, aligned)
    return faces, out, mask


def test_grey_image(astro, mtcnn):
    grey = astro.mean(-1, keepdim=True)
    faces, out, mask = run_all(grey, mtcnn)
    assert faces.count == 1 and out.shape == grey.shape


@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (1, 16, 16, 3), (1, 1, 500, 3)])
def test_tiny_images(shape, mtcnn):
    image = torch.rand(shape)
    faces, out, mask = run_all(image, mtcnn)
    assert torch.equal(out, image) and mask.shape == shape[:3]


def test_face_filling_a_16px_image(astro, mtcnn):
    """A face found at full size, pasted into the same picture shrunk to 16x16."""
    faces = pipeline.detect(astro, mtcnn)
    x0, y0, x1, y1 = (int(v) for v in faces.frames[0][0].box)
    face = astro[:, y0:y1, x0:x1]
    small = torch.nn.functional.interpolate(face.movedim(-1, 1), size=(16, 16), mode="area").movedim(1, -1)
    scale = 16 / (x1 - x0), 16 / (y1 - y0)
    f = faces.frames[0][0]
    moved = type(f)(box=(0, 0, 16, 16), score=f.score,
                    landmarks=(f.landmarks - (x0, y0)) * scale)
    from gpen.faces import FaceSet
    fs = FaceSet(image_size=(16, 16), frames=[[moved]])
    crops, aligned = pipeline.align(small, fs, 256)
    out, mask = pipeline.paste(small, crops, aligned)
    assert out.shape == small.shape and mask.max() > 0.5
    assert torch.isfinite(out).all()


def test_nan_and_inf_values(astro, mtcnn):
    broken = astro.clone()
    broken[0, :40, :40] = float("nan")
    broken[0, -40:, -40:] = float("inf")
    faces, out, mask = run_all(broken, mtcnn)
    assert faces.count == 1
    assert torch.isfinite(out[0, 100:200, 150:300]).all()  # the face region is clean
    faceless = torch.full((1, 64, 64, 3), float("nan"))
    _, out, _ = run_all(faceless, mtcnn)
    assert out.isnan().all()  # passed through untouched, as given


def test_all_black(mtcnn):
    black = torch.zeros(2, 128, 96, 3)
    faces, out, mask = run_all(black, mtcnn)
    assert faces.count == 0 and torch.equal(out, black)


def test_face_touching_the_border(astro, mtcnn):
    cut = astro[:, 80:, 200:].contiguous()  # the face now runs off the top-left corner
    faces, out, mask = run_all(cut, mtcnn, threshold=0.8)
    assert faces.count >= 1 and out.shape == cut.shape
    assert peak_signal_noise_ratio(out.numpy(), cut.numpy(), data_range=1.0) >= 40


def test_face_larger_than_the_model(astro, mtcnn):
    big = torch.nn.functional.interpolate(astro.movedim(-1, 1), scale_factor=5, mode="bilinear")
    big = big.movedim(1, -1).clamp(0, 1).contiguous()  # face about 500 px wide, model 128
    faces, out, mask = run_all(big, mtcnn, model_size=128)
    assert faces.count == 1
    x0, y0, x1, y1 = (int(v) for v in faces.frames[0][0].box)
    assert x1 - x0 > 256
    # Pasting a 128 crop back onto a 500 px face loses detail, but not placement or colour.
    assert peak_signal_noise_ratio(out.numpy(), big.numpy(), data_range=1.0) >= 30


def test_tiny_faces_are_dropped_by_min_size(astro, mtcnn):
    small = torch.nn.functional.interpolate(astro.movedim(-1, 1), scale_factor=0.25, mode="area")
    small = small.movedim(1, -1).contiguous()
    faces = pipeline.detect(small, mtcnn, DetectOptions(threshold=0.5, min_size=40))
    assert faces.count == 0


def test_very_large_frame(mtcnn):
    """8192x8192 with no face: detection runs on a shrunk copy, the frame passes through."""
    frame = torch.zeros(1, 8192, 8192, 3)
    frame[..., 1] = 0.25
    faces, out, mask = run_all(frame, mtcnn)
    assert faces.count == 0 and out.shape == frame.shape and out[0, -1, -1, 1] == 0.25


def test_long_batch_with_and_without_faces(astro, mtcnn, tiny_model):
    """200 frames, faces in every other one, restored in chunks of 8."""
    small = torch.nn.functional.interpolate(astro.movedim(-1, 1), size=(128, 128), mode="area")
    small = small.movedim(1, -1)
    frames = torch.cat([small, torch.zeros_like(small)]).repeat(100, 1, 1, 1)
    faces = pipeline.detect(frames, mtcnn, DetectOptions(threshold=0.8))
    assert [len(f) for f in faces.frames[:4]] == [1, 0, 1, 0] and faces.count == 100
    crops, aligned = pipeline.align(frames, faces, tiny_model.size)
    seen = []
    restored = pipeline.restore(tiny_model, crops, RestoreOptions(batch_size=8), on_progress=lambda d, t: seen.append(d))
    assert 0 < seen[0] < 1 and 8 in seen and seen[-1] == 100  # moves within a batch of 8
    assert seen == sorted(seen)
    out, mask = pipeline.paste(frames, restored, aligned)
    assert out.shape == frames.shape and torch.equal(out[1::2], frames[1::2])


def test_missing_detector_weights(tmp_path):
    with pytest.raises(DetectorError) as info:
        retinaface_path("retinaface_mobile0.25", [str(tmp_path)])
    text = str(info.value)
    assert str(tmp_path) in text and "detection_mobilenet0.25_Final.pth" in text
    assert "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" in text


@pytest.mark.parametrize("content", [b"", b"\x00" * 1000, b"PK\x03\x04 truncated zip"])
def test_corrupt_detector_weights(tmp_path, content):
    (tmp_path / "detection_Resnet50_Final.pth").write_bytes(content)
    with pytest.raises(DetectorError) as info:
        load_detector("retinaface_resnet50", (str(tmp_path),))
    text = str(info.value)
    assert "detection_Resnet50_Final.pth" in text and str(tmp_path) in text
    assert "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" in text
    assert "GPEN-BFR" not in text


def test_detector_weights_of_the_wrong_network(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "detection_mobilenet0.25_Final.pth")
    with pytest.raises(DetectorError, match="not the RetinaFace mobile0.25 detector"):
        load_detector("retinaface_mobile0.25", (str(tmp_path),))


def test_retinaface_runs_on_generated_weights(tmp_path, astro):
    """The real facexlib network, loaded from models/facedetection by exact name, detects under
    no_grad (random weights: we check that it runs and returns well-formed faces)."""
    from facexlib.detection.retinaface import RetinaFace

    torch.save(RetinaFace("mobile0.25", device="cpu").state_dict(),
               tmp_path / "detection_mobilenet0.25_Final.pth")
    detector = load_detector("retinaface_mobile0.25", (str(tmp_path),))
    faces = pipeline.detect(astro, detector, DetectOptions(threshold=0.99))
    for face in faces.frames[0]:
        assert face.landmarks.shape == (5, 2) and 0.99 <= face.score <= 1
