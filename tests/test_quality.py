"""What users see, measured: identity round trips, seams, colour, upscaling, masks, video."""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from conftest import as_image
from gpen import pipeline
from gpen.faces import DetectorError, Face
from gpen.align import affine_scale, cut_crop
from gpen.options import DetectOptions, PasteOptions
from gpen.paste import composite, face_mask, place_face
from gpen.parsing import load_parser, parser_path
from gpen.temporal import OneEuroFilter, assign_tracks, filter_settings, smooth_landmarks, track

TEMPLATES = Path(__import__("comfyui_workflow_templates_media_image").__file__).parent / "templates"
OTHER = Path(__import__("comfyui_workflow_templates_media_other").__file__).parent / "templates"


def psnr(a, b) -> float:
    return peak_signal_noise_ratio(np.asarray(a), np.asarray(b), data_range=1.0)


@pytest.fixture(scope="module")
def group(astronaut):
    """Three real faces in one 512x1536 frame: the astronaut and two MIT-licensed ComfyUI
    template portraits."""
    portraits = [cv2.imread(str(p))[..., ::-1] for p in
                 (TEMPLATES / "flux_fill_inpaint_example-1.webp", OTHER / "sd3.5_simple_example-1.webp")]
    tiles = [astronaut] + [cv2.resize(p, (512, 512), interpolation=cv2.INTER_AREA) for p in portraits]
    return as_image(np.concatenate(tiles, axis=1))


def restored_by(crops: torch.Tensor, change) -> torch.Tensor:
    return change(crops).clamp(0, 1)


def run(image, mtcnn, change=lambda c: c, size=512, threshold=0.9, **paste):
    faces = pipeline.detect(image, mtcnn, DetectOptions(threshold=threshold))
    crops, aligned = pipeline.align(image, faces, size)
    out, mask = pipeline.paste(image, restored_by(crops, change), aligned, PasteOptions(**paste))
    return faces, out, mask


def test_group_has_several_faces(group, mtcnn):
    assert pipeline.detect(group, mtcnn).count >= 2


@pytest.mark.parametrize("name", ["astro", "group"])
def test_identity_round_trip_at_1x(name, request, mtcnn):
    image = request.getfixturevalue(name)
    faces, out, mask = run(image, mtcnn)
    value = psnr(out, image)
    print(f"identity 1x {name}: {faces.count} faces, PSNR {value:.1f} dB")
    assert value >= 60


@pytest.mark.parametrize("name", ["astro", "group"])
def test_identity_round_trip_at_2x(name, request, mtcnn):
    image = request.getfixturevalue(name)
    faces, out, mask = run(image, mtcnn, upscale=2.0)
    h, w = image.shape[1:3]
    reference = pipeline.enlarge(image[0].movedim(-1, 0), 2 * w, 2 * h).movedim(0, -1)
    assert out.shape == (1, 2 * h, 2 * w, 3) and mask.shape == (1, 2 * h, 2 * w)
    value = psnr(out[0], reference)
    print(f"identity 2x {name}: PSNR {value:.1f} dB against the enlarged input")
    assert value >= 60


@pytest.mark.parametrize("name", ["astro", "frame_1080p"])
@pytest.mark.parametrize("size", [512, 1024, 2048])
def test_fine_detail_is_averaged_not_aliased(name, size, request, mtcnn):
    """White noise added to the crop stands in for detail finer than the frame's pixels: pasted
    at 1x, what is left of it in the frame must be close to what an ideal area average down to
    frame pixels leaves (std 0.1 / scale), not point-sampled grain."""
    image = request.getfixturevalue(name)
    faces = pipeline.detect(image, mtcnn)
    crops, aligned = pipeline.align(image, faces, size)
    scale = affine_scale(aligned.frames[0][0].affine)
    noise = 0.1 * torch.randn(crops.shape, generator=torch.Generator().manual_seed(0))
    options = PasteOptions(colour=False, blend="alpha")
    clean, mask = pipeline.paste(image, crops, aligned, options)
    noisy, _ = pipeline.paste(image, crops + noise, aligned, options)
    left = (noisy[0] - clean[0])[mask[0] > 0.999].std().item()
    ideal = 0.1 / scale
    print(f"aliasing {name} {size}: scale {scale:.2f}, noise left {left:.4f}, ideal {ideal:.4f}, "
          f"{left / ideal:.2f}x")
    assert scale > 1 and left <= 1.5 * ideal


def test_paste_cost_follows_the_face_not_the_model(frame_1080p, mtcnn):
    """A 2048 crop is 16x the pixels of a 512 one, but it is reduced to the face's footprint
    first: pasting it costs at most 3x as much (best of interleaved runs, one process). Without
    the reduction it cost 7.5x (552 against 74 ms); with it 1.7-2.1x, depending on the CPU's
    load, since the reduction itself still reads all 16x the pixels."""
    faces = pipeline.detect(frame_1080p, mtcnn)
    jobs = {size: pipeline.align(frame_1080p, faces, size) for size in (512, 2048)}
    best = {size: float("inf") for size in jobs}
    for _ in range(7):
        for size, (crops, aligned) in jobs.items():
            start = time.perf_counter()
            pipeline.paste(frame_1080p, crops, aligned)
            best[size] = min(best[size], time.perf_counter() - start)
    print(f"paste at 1080p: 512 {1000 * best[512]:.0f} ms, 2048 {1000 * best[2048]:.0f} ms, "
          f"ratio {best[2048] / best[512]:.2f}")
    assert best[2048] <= 3.0 * best[512]


def high_band_energy(image: np.ndarray, center: tuple[int, int], cutoff: float = 0.28) -> float:
    """Spectral energy above ``cutoff`` cycles/pixel in a 128 px window (Hann-tapered)."""
    cx, cy = center
    patch = image[cy - 64:cy + 64, cx - 64:cx + 64].mean(-1)
    window = np.outer(np.hanning(128), np.hanning(128))
    spectrum = np.abs(np.fft.fft2((patch - patch.mean()) * window)) ** 2
    f = np.fft.fftfreq(128)
    radius = np.hypot(*np.meshgrid(f, f))
    return float(spectrum[radius > cutoff].sum())


def test_face_larger_than_the_crop_is_replaced_not_mixed(astro, mtcnn):
    """A 64 px crop of a ~90 px face is coarser than the frame: the restored face replaces the
    original there (no unrestored fine detail leaks through), it is not added as a change."""
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 64)
    flat = torch.full_like(crops, 0.5)
    out, mask = pipeline.paste(astro, flat, aligned, PasteOptions(colour=False, blend="alpha"))
    core = mask[0] > 0.999
    assert (out[0][core] - 0.5).abs().max() < 0.02


def test_2x_keeps_restored_detail(astro, mtcnn):
    """A crop detail finer than the 1x frame can hold survives a 2x paste, and not a 1x paste
    enlarged afterwards (which is what shrinking faces back to their footprint amounts to)."""
    stripes = 0.15 * torch.sin(torch.arange(512) * (2 * np.pi / 4.0))[None, None, :, None]
    texture = lambda c: c + stripes
    faces, out1, _ = run(astro, mtcnn, texture, colour=False)
    _, out2, _ = run(astro, mtcnn, texture, colour=False, upscale=2.0)
    x0, y0, x1, y1 = faces.frames[0][0].box
    center = (int(x0 + x1), int(y0 + y1))  # the face centre in 2x pixels
    enlarged = pipeline.enlarge(out1[0].movedim(-1, 0), 1024, 1024).movedim(0, -1).numpy()
    kept, lost = high_band_energy(out2[0].numpy(), center), high_band_energy(enlarged, center)
    print(f"2x detail: high-band energy {kept:.2f} pasted at 2x vs {lost:.2f} pasted at 1x then enlarged")
    assert kept > 5 * lost


def boundary_and_interior_gradients(out, mask):
    """Mean gradient magnitude on a 3 px band around the mask's 0.5 contour, and inside."""
    gray = out[0].numpy().mean(-1)
    grad = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)) / 8
    m = mask[0].numpy()
    inside = (m > 0.5).astype(np.uint8)
    band = (cv2.dilate(inside, np.ones((3, 3))) - cv2.erode(inside, np.ones((3, 3)))) > 0
    return grad[band].mean(), grad[(m >= 0.98) & ~band].mean()


@pytest.mark.parametrize("blend", ["multiband", "alpha"])
def test_no_seam_with_brightened_face(astro, mtcnn, blend):
    _, out, mask = run(astro, mtcnn, lambda c: c * 1.2, colour=False, blend=blend)
    edge, inside = boundary_and_interior_gradients(out, mask)
    print(f"seam {blend}: boundary gradient {edge:.4f}, interior {inside:.4f}, ratio {edge / inside:.2f}")
    assert edge <= 1.5 * inside


def test_square_paste_would_show_a_seam(astro, mtcnn):
    """The measure catches a hard-edged square paste (the anchors' complaint)."""
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 512)
    square = torch.zeros(512, 512)
    square[64:448, 64:448] = 1
    frame, crop = astro[0].movedim(-1, 0).clone(), crops[0].movedim(-1, 0)  # composite writes into frame
    face = place_face(frame, crop * 1.2, crop, aligned.frames[0][0].affine, False, 0.15, parsed=square)
    out, mask = composite(frame, [face], "alpha")
    edge, inside = boundary_and_interior_gradients(out.movedim(0, -1)[None], mask[None])
    assert edge > 1.5 * inside


def mean_lab(image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2Lab)
    return (lab * weights[..., None]).sum((0, 1)) / weights.sum()


def test_colour_correction_undoes_a_tint(astro, mtcnn):
    tint = lambda c: c * torch.tensor([1.15, 0.95, 0.8])
    _, raw, mask = run(astro, mtcnn, tint, colour=False)
    _, fixed, _ = run(astro, mtcnn, tint, colour=True)
    weights = mask[0].numpy() ** 2
    original = mean_lab(astro[0].numpy(), weights)
    before = np.abs(mean_lab(raw[0].numpy(), weights) - original).max()
    after = np.abs(mean_lab(fixed[0].numpy(), weights) - original).max()
    print(f"colour: mean LAB error {before:.2f} without correction, {after:.2f} with")
    assert before > 5 and after <= 2


def test_overlapping_faces_are_blended_together(astro, mtcnn):
    """Two restorations of the same face, one darker: the overlap mixes them, no hard edge."""
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 512)
    affine = aligned.frames[0][0].affine
    shifted = affine.copy()
    shifted[0, 2] += 60  # the second copy sits 60 crop pixels to the left
    frame, crop = astro[0].movedim(-1, 0).clone(), crops[0].movedim(-1, 0)  # composite writes into frame
    moved = cut_crop(frame, shifted, 512)
    placed = [place_face(frame, crop, crop, affine, False, 0.15),
              place_face(frame, moved * 0.8, moved, shifted, False, 0.15)]
    out, cover = composite(frame, placed, "multiband")
    edge, inside = boundary_and_interior_gradients(out.movedim(0, -1)[None], cover[None])
    assert edge <= 1.5 * inside


def test_feather_is_relative_to_the_face():
    small, large = face_mask(512, 0.2), face_mask(2048, 0.2)
    assert torch.allclose(torch.nn.functional.avg_pool2d(large[None], 4)[0], small, atol=0.02)
    soft = ((small > 0.01) & (small < 0.99)).sum()
    softer = ((face_mask(512, 0.4) > 0.01) & (face_mask(512, 0.4) < 0.99)).sum()
    assert softer > 1.6 * soft


def test_parsing_mask_with_facexlib_networks(tmp_path, astro, mtcnn):
    from facexlib.parsing import BiSeNet

    with pytest.raises(DetectorError) as info:
        parser_path("bisenet", [str(tmp_path)])
    assert "parsing_bisenet.pth" in str(info.value) and "https://github.com/xinntao/facexlib" in str(info.value)
    torch.manual_seed(0)
    torch.save(BiSeNet(num_class=19).state_dict(), tmp_path / "parsing_bisenet.pth")
    parser = load_parser("bisenet", (str(tmp_path),))
    faces = pipeline.detect(astro, mtcnn)
    crops, aligned = pipeline.align(astro, faces, 256)
    mask = parser.mask(crops[0].movedim(-1, 0), 0.1)
    assert mask.shape == (512, 512) and mask.min() >= 0 and mask.max() <= 1
    assert mask[0].max() == 0 and mask[:, -1].max() == 0  # faded out at the crop's edges
    out, cover = pipeline.paste(astro, crops, aligned, parser=parser)
    assert out.shape == astro.shape and torch.isfinite(out).all()


def test_tracks_keep_their_ids():
    def face(x):
        return Face(box=(x, 10, x + 50, 60), score=1.0, landmarks=np.zeros((5, 2)))
    frames = [[face(0), face(200)], [face(205), face(3)], [face(8)], [face(12), face(400)]]
    ids = assign_tracks(frames)
    assert ids == [[0, 1], [1, 0], [0], [0, 2]]
    assert [f.track_id for f in track(frames)[1]] == [1, 0]


def landmarks_at(center):
    offsets = np.array([[-50, -40], [50, -40], [0, 20], [-40, 80], [40, 80]], float)
    return offsets + center


def test_smoothing_removes_jitter_without_lag():
    rng = np.random.default_rng(0)
    n, strength = 200, 0.9

    def faces_for(points):
        return [[Face(box=(p[:, 0].min() - 30, p[:, 1].min() - 60, p[:, 0].max() + 30,
                           p[:, 1].max() + 40), score=1.0, landmarks=p)] for p in points]
    still = np.array([landmarks_at((300, 300)) + rng.uniform(-2, 2, (5, 2)) for _ in range(n)])
    smoothed = np.array([f[0].landmarks for f in smooth_landmarks(track(faces_for(still)), strength)])
    raw_jitter = np.std(still[20:] - landmarks_at((300, 300)))
    smooth_jitter = np.std(smoothed[20:] - landmarks_at((300, 300)))
    moving_truth = np.array([landmarks_at((100 + 3 * t, 300)) for t in range(n)])
    moving = moving_truth + rng.uniform(-2, 2, moving_truth.shape)
    followed = np.array([f[0].landmarks for f in smooth_landmarks(track(faces_for(moving)), strength)])
    lag = (moving_truth[30:, :, 0] - followed[30:, :, 0]).mean() / 3
    print(f"jitter {raw_jitter:.2f} -> {smooth_jitter:.2f} px ({raw_jitter / smooth_jitter:.1f}x), "
          f"lag {lag:.2f} frames at 3 px/frame")
    assert raw_jitter / smooth_jitter >= 3 and lag <= 1
    assert smooth_landmarks(faces_for(still), 0.0)[5][0].landmarks is not None
    assert np.array_equal(smooth_landmarks(track(faces_for(still)), 0.0)[5][0].landmarks, still[5])


def test_one_euro_starts_at_the_first_sample():
    f = OneEuroFilter(*filter_settings(1.0, 100))
    assert np.array_equal(f(np.ones((5, 2))), np.ones((5, 2)))
