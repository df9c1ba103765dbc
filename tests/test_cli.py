"""The command line: restore and convert, never overwriting anything."""

import subprocess
import sys
import time

import cv2
import numpy as np
import torch
from safetensors.torch import load_file

import videoclips
from conftest import REPO
from gpen import FullGenerator, GPENConfig, load_generator


def gpen_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpen", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def tiny_checkpoint(path):
    torch.manual_seed(0)
    model = FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16))
    torch.save({"params_ema": model.state_dict()}, path)
    return model


def test_convert_to_safetensors(tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny.pth")
    result = gpen_cli("convert", tmp_path / "tiny.pth", tmp_path / "tiny.safetensors")
    assert result.returncode == 0, result.stderr
    tensors = load_file(tmp_path / "tiny.safetensors")
    assert torch.equal(tensors["final_linear.0.weight"], model.state_dict()["final_linear.0.weight"])
    assert load_generator(tmp_path / "tiny.safetensors").config == model.config


def test_outputs_are_never_overwritten(tmp_path):
    tiny_checkpoint(tmp_path / "tiny.pth")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    result = gpen_cli("convert", tmp_path / "tiny.pth", existing)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert existing.read_bytes() == b"keep me"


def test_restore_an_image_file(tmp_path, astronaut):
    tiny_checkpoint(tmp_path / "tiny.pth")
    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    result = gpen_cli("restore", "--model", tmp_path / "tiny.pth", tmp_path / "in.png", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    assert "GPEN-64 on cpu" in result.stdout
    assert "1 restored, 0 skipped (output exists), 0 failed; 1 face(s) in 1 frame(s)" in result.stdout
    out = cv2.imread(str(tmp_path / "out.png"))
    assert out.shape == astronaut.shape and not np.array_equal(out[..., ::-1], astronaut)


def test_restore_with_an_upscaled_background(tmp_path, astronaut):
    """--upscale 2 with an upscale model draws the background with it (in tiles), not Lanczos."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    tiny_checkpoint(tmp_path / "tiny.pth")
    torch.manual_seed(0)
    torch.save(SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict(), tmp_path / "tiny_x2.pth")
    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    common = ("restore", "--model", tmp_path / "tiny.pth", "--upscale", 2, tmp_path / "in.png")
    with_model = gpen_cli(*common, tmp_path / "model.png", "--upscale-model", tmp_path / "tiny_x2.pth")
    assert with_model.returncode == 0, with_model.stderr
    plain = gpen_cli(*common, tmp_path / "lanczos.png")
    assert plain.returncode == 0, plain.stderr
    drawn, lanczos = cv2.imread(str(tmp_path / "model.png")), cv2.imread(str(tmp_path / "lanczos.png"))
    assert drawn.shape == lanczos.shape == (1024, 1024, 3)
    assert np.abs(drawn.astype(int) - lanczos.astype(int)).mean() > 5


def test_bad_model_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"")
    result = gpen_cli("convert", tmp_path / "bad.pth", tmp_path / "x.safetensors")
    assert result.returncode == 2 and "bad.pth is empty" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.safetensors").exists()


def _photo_tree(root, astronaut):
    """photos/a.png, photos/trip/b.jpg, photos/trip/day2/c.png (+ a text file that is ignored)."""
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)[..., ::-1]
    (root / "trip" / "day2").mkdir(parents=True)
    cv2.imwrite(str(root / "a.png"), small)
    cv2.imwrite(str(root / "trip" / "b.jpg"), small)
    cv2.imwrite(str(root / "trip" / "day2" / "c.png"), np.ascontiguousarray(small[:, ::-1]))
    (root / "notes.txt").write_text("not a picture")
    return ["a.png", "trip/b.jpg", "trip/day2/c.png"]


def test_restore_a_folder_mirrors_its_tree_and_resumes(tmp_path, astronaut):
    tiny_checkpoint(tmp_path / "tiny.pth")
    names = _photo_tree(tmp_path / "photos", astronaut)
    (tmp_path / "photos" / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    result = gpen_cli("restore", "--model", tmp_path / "tiny.pth", tmp_path / "photos", "--output", out)
    assert result.returncode == 1  # one input failed, the rest were restored
    assert "broken.jpg" in result.stderr and "could not be read" in result.stderr
    assert "3 restored, 0 skipped (output exists), 1 failed" in result.stdout
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert made == sorted(names)  # no partial files, no output for the broken input
    for name in names:
        restored = cv2.imread(str(out / name))
        assert restored.shape == (256, 256, 3)
    before = {name: (out / name).stat().st_mtime_ns for name in names}
    again = gpen_cli("restore", "--model", tmp_path / "tiny.pth", tmp_path / "photos", "--output", out)
    assert "0 restored, 3 skipped (output exists), 1 failed" in again.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in names} == before  # never rewritten


def test_missing_input_and_clashing_outputs_are_reported(tmp_path, astronaut):
    tiny_checkpoint(tmp_path / "tiny.pth")
    _photo_tree(tmp_path / "one", astronaut)
    _photo_tree(tmp_path / "two", astronaut)
    result = gpen_cli("restore", "--model", tmp_path / "tiny.pth", tmp_path / "one", tmp_path / "two",
                      tmp_path / "nowhere.png", "--output", tmp_path / "out")
    assert result.returncode == 1
    assert "nowhere.png: no such file or folder" in result.stderr
    assert "would both be written to" in result.stderr
    assert "3 restored" in result.stdout  # the first folder's files; the clashing ones were not run


def test_killed_job_leaves_only_complete_outputs_and_a_rerun_finishes(tmp_path, astronaut):
    torch.manual_seed(0)
    slow = FullGenerator(GPENConfig(size=256, style_dim=64, n_mlp=2, narrow=1 / 4))
    torch.save(slow.state_dict(), tmp_path / "slow.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        cv2.imwrite(str(photos / f"p{i}.png"), np.roll(astronaut, 7 * i, axis=1)[..., ::-1])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gpen", "restore", "--model", str(tmp_path / "slow.pth"), str(photos),
               "--output", str(out)]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(out.glob("p*.png")):
        time.sleep(0.05)
    job.kill()
    job.wait()
    finished = sorted(out.glob("p*.png"))
    assert 1 <= len(finished) < 8
    for path in finished:  # every output under its real name is complete
        assert cv2.imread(str(path)).shape == astronaut.shape
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{8 - len(finished)} restored, {len(finished)} skipped" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.png" for i in range(8)]  # no partials left


def test_restore_videos_in_a_folder_keeps_timing_audio_and_faceless_frames(tmp_path):
    """A folder with a face clip (with sound), a phone clip with rotation metadata, a faceless
    clip and a file that only looks like a video: every real clip restored with its frames,
    timing and audio; frames without faces within 2/255 of the source; the fake reported."""
    import av
    from gpen.video import VideoReader, probe

    tiny_checkpoint(tmp_path / "tiny.pth")
    clips = tmp_path / "clips"
    (clips / "phone").mkdir(parents=True)
    videoclips.face_clip(clips / "faces.mp4", 640, 360, frames=20)
    videoclips.rotated_clip(clips / "phone" / "upright.mp4", frames=12)
    videoclips.no_face_clip(clips / "empty.mp4", 640, 360, frames=12)
    (clips / "fake.mp4").write_text("not a video")
    out = tmp_path / "out"
    result = gpen_cli("restore", "--model", tmp_path / "tiny.pth", clips, "--output", out)
    assert result.returncode == 1 and "fake.mp4" in result.stderr
    assert "3 restored, 0 skipped (output exists), 1 failed" in result.stdout
    for name in ("faces.mp4", "phone/upright.mp4", "empty.mp4"):
        source, restored = probe(clips / name), probe(out / name)
        assert (restored.width, restored.height) == (source.width, source.height)
        assert restored.frame_count == source.frame_count and restored.frame_rate == source.frame_rate
        assert restored.audio_streams == source.audio_streams
    assert probe(out / "phone" / "upright.mp4").rotation == 0  # written upright, displayed the same
    with av.open(str(clips / "faces.mp4")) as a, av.open(str(out / "faces.mp4")) as b:
        assert [p.pts for p in a.demux(audio=0)] == [p.pts for p in b.demux(audio=0)]  # audio copied
    with VideoReader(clips / "empty.mp4") as a, VideoReader(out / "empty.mp4") as b:
        diffs = [np.abs(x.rgb.astype(int) - y.rgb.astype(int)).mean() for x, y in zip(a.frames(), b.frames())]
    print(f"faceless frames after restore: mean abs diff {max(diffs):.2f}/255 at most")
    assert max(diffs) <= 2.0
    changed = []
    with VideoReader(clips / "faces.mp4") as a, VideoReader(out / "faces.mp4") as b:
        for x, y in zip(a.frames(), b.frames()):
            changed.append(np.abs(x.rgb.astype(int) - y.rgb.astype(int)).max())
    assert min(changed) > 40  # the random-weight restorer visibly changed every frame's faces


def test_restore_a_photo_with_codeformer(tmp_path, astronaut, face_weights):
    """--model with a CodeFormer file (auto precision: bf16 on a CPU with native bf16) and
    --fidelity: the photo is what the pipeline functions give for that file and precision."""
    from gpen.execution import cpu_auto_dtype
    from reference_runs import restored_photo

    _, _, pth, _ = face_weights("CodeFormer")
    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    result = gpen_cli("restore", "--model", pth, "--fidelity", "0.3", tmp_path / "in.png", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    precision = str(cpu_auto_dtype()).removeprefix("torch.")
    assert f"CodeFormer-512 on cpu ({precision})" in result.stdout and "note:" not in result.stderr
    out = cv2.imread(str(tmp_path / "out.png"))[..., ::-1]
    expected = restored_photo(pth, astronaut, cpu_auto_dtype(), fidelity=0.3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    changed = np.abs(out.astype(int) - astronaut.astype(int)).max(-1) > 2
    assert changed.sum() > 2000


def test_restore_a_video_with_gfpgan(tmp_path, face_weights):
    """--model with a GFPGAN file on a short clip (fp32; --fidelity is noted as ignored): the
    frames the frame engine and the pack's encoder give for it, the sound kept."""
    import av
    from gpen.options import VIDEO_REDETECT_EVERY, VIDEO_SMOOTHING, DetectOptions
    from reference_runs import decoded_frames, restored_video

    _, _, _, safetensors = face_weights("GFPGAN")
    clip = videoclips.face_clip(tmp_path / "faces.mp4", 480, 270, frames=6)
    result = gpen_cli("restore", "--model", safetensors, "--precision", "fp32", "--fidelity", "0.3", clip,
                      tmp_path / "out.mp4")
    assert result.returncode == 0, result.stderr
    assert "GFPGAN-512 on cpu (float32)" in result.stdout
    assert "note: GFPGAN has no fidelity weight; --fidelity is ignored." in result.stderr
    detect = DetectOptions(smoothing=VIDEO_SMOOTHING, redetect_every=VIDEO_REDETECT_EVERY)
    expected = restored_video(safetensors, clip, tmp_path / "expected.mp4", torch.float32, detect, fidelity=0.3)
    restored, reference, source = decoded_frames(tmp_path / "out.mp4"), decoded_frames(expected), decoded_frames(clip)
    assert len(restored) == len(reference) == 6
    for ours, theirs, before in zip(restored, reference, source):
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() <= 0.25
        assert (np.abs(ours.astype(int) - before.astype(int)).max(-1) > 16).sum() > 1000
    with av.open(str(clip)) as a, av.open(str(tmp_path / "out.mp4")) as b:
        assert [p.pts for p in a.demux(audio=0)] == [p.pts for p in b.demux(audio=0)]


def test_every_option_has_a_flag(tmp_path):
    """Each field of the options the nodes share (detect, restore, paste), and each model choice
    of Load GPEN Model, has a flag; the faces flags default to GPEN Restore Video's values."""
    import argparse
    import dataclasses

    from gpen import execution
    from gpen.__main__ import add_restore_options
    from gpen.engine import load_restorer
    from gpen.options import VIDEO_REDETECT_EVERY, VIDEO_SMOOTHING, DetectOptions, PasteOptions, RestoreOptions

    parser = argparse.ArgumentParser()
    add_restore_options(parser)
    defaults = {action.dest: action.default for action in parser._actions}
    flag_of = {"colour": "color_correction"}
    for options in (DetectOptions, RestoreOptions, PasteOptions):
        for field in dataclasses.fields(options):
            assert flag_of.get(field.name, field.name) in defaults, f"no flag for {options.__name__}.{field.name}"
    assert {"precision", "compile", "upscale_model"} <= set(defaults)
    assert defaults["smoothing"] == VIDEO_SMOOTHING and defaults["redetect_every"] == VIDEO_REDETECT_EVERY
    tiny_checkpoint(tmp_path / "tiny.pth")
    assert execution.is_compiled(load_restorer(tmp_path / "tiny.pth", "cpu", torch.float32, compile=True).model)
    assert not execution.is_compiled(load_restorer(tmp_path / "tiny.pth", "cpu", torch.float32).model)
