"""GFPGAN, RestoreFormer and CodeFormer in the real ComfyUI server (scripts/test.sh runs this
file on every host in GPEN_TEST_HOSTS): each from .pth and .safetensors through the four nodes,
GPEN Restore Video with a non-GPEN model, and the optional ``fidelity`` input. Outputs are
compared with what the pack's own functions give for the same model (tests/reference_runs.py)."""

import json

import numpy as np
import pytest
import torch

import videoclips
from conftest import FACE_ARCHES, REPO
from gpen.execution import cpu_auto_dtype
from gpen.options import VIDEO_REDETECT_EVERY, VIDEO_SMOOTHING, DetectOptions
from reference_runs import decoded_frames, face_region, restored_photo, restored_video
from test_host import restore_graph, saved
from test_video_node import saved_video, video_graph

# Inputs of the two restore nodes before fidelity was added: saved workflows hold their
# widget values in this order, so fidelity must come after all of them.
RESTORE_INPUTS = ["gpen_model", "image", "faces", "strength", "batch_size"]


def installed(host, source, name: str) -> str:
    target = host.base / "models" / "facerestore_models" / name
    target.write_bytes(source.read_bytes())
    return target.name


def widget_names(info: dict) -> list[str]:
    """The node's inputs that are widgets (not sockets), in the order the UI lays them out and
    saves their values: required, then optional."""
    order = info["input_order"]
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    return [name for name in order["required"] + order.get("optional", [])
            if isinstance(specs[name][0], list) or specs[name][0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]


@pytest.mark.parametrize("node", ["GPENRestore", "GPENRestoreVideo"])
def test_fidelity_is_an_optional_input_after_every_other(served, node):
    """Optional (API prompts and workflows without it still validate) and last, so the widget
    values of every shipped workflow, saved before it existed, keep their places."""
    info = served.get(f"/object_info/{node}")[node]
    assert info["input_order"]["optional"][-1] == "fidelity"
    assert "fidelity" not in info["input_order"]["required"]
    spec = info["input"]["optional"]["fidelity"]
    assert spec[0] == "FLOAT" and (spec[1]["default"], spec[1]["min"], spec[1]["max"]) == (0.5, 0.0, 1.0)
    if node == "GPENRestore":
        assert info["input_order"]["required"] == RESTORE_INPUTS
    widgets = widget_names(info)
    assert widgets[-1] == "fidelity"
    for path in sorted((REPO / "workflows").glob("*.json")):
        for saved_node in json.loads(path.read_text())["nodes"]:
            if saved_node["type"] == node and "fidelity" not in json.dumps(saved_node["inputs"]):
                assert len(saved_node["widgets_values"]) == len(widgets) - 1, (path.name, widgets)


def test_fidelity_for_a_model_without_one_is_ignored_and_said(served):
    """GPEN has no fidelity weight: a fidelity set on GPEN Restore 2048 changes nothing and the
    node says so; at its default it says nothing."""
    start = len(served.log_path.read_text())
    plain = served.run(restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix="fidelity_default"))
    graph = restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix="fidelity_set")
    graph["4"]["inputs"]["fidelity"] = 0.3
    with_fidelity = served.run(graph)
    assert with_fidelity["status"]["status_str"] == "success", with_fidelity["status"]
    assert np.array_equal(saved(served, plain, "6"), saved(served, with_fidelity, "6"))
    log = served.log_path.read_text()[start:]
    ignored = "fidelity is CodeFormer's weight; GPEN has none, so it was ignored."
    assert log.count(ignored) == 1
    assert "GPEN Restore (node 4): Restored 1 face at 64x64 in" in log.split(ignored)[0].splitlines()[-1]


@pytest.mark.parametrize("suffix, precision", [(".pth", "auto"), (".safetensors", "fp32")])
@pytest.mark.parametrize("name", FACE_ARCHES)
def test_four_nodes_restore_each_architecture_as_the_pipeline_does(served, face_weights, astronaut, name, suffix,
                                                                   precision):
    """Load GPEN Model -> Detect Faces -> GPEN Restore 2048 (fidelity 0.3) -> Paste Back in the
    server, from the released .pth layout in ``auto`` precision (bf16 on a CPU with native
    bf16) and from .safetensors in fp32: the saved picture is what the pipeline functions give
    for the same file and precision, it changed around the face and nowhere else."""
    _, _, pth, safetensors = face_weights(name)
    source = pth if suffix == ".pth" else safetensors
    graph = restore_graph("astronaut.png", model=installed(served, source, f"{name}{suffix}"),
                          prefix=f"restorer_{name}_{precision}")
    graph["2"]["inputs"]["precision"] = precision
    graph["4"]["inputs"]["fidelity"] = 0.3
    entry = served.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = saved(served, entry, "6")
    dtype = cpu_auto_dtype() if precision == "auto" else torch.float32
    expected = restored_photo(source, astronaut, dtype, fidelity=0.3)
    difference = np.abs(out.astype(int) - expected.astype(int))
    print(f"{name}{suffix} {precision}: vs the pipeline max {difference.max()}, mean {difference.mean():.4f}")
    assert difference.max() <= 1  # SaveImage truncates where the pipeline rounds
    changed = np.abs(out.astype(int) - astronaut.astype(int)).max(-1) > 2
    rows, columns = face_region(astronaut)
    assert changed[rows, columns].sum() > 2000
    changed[rows, columns] = False
    assert not changed.any()


def test_restore_video_runs_a_non_gpen_model_as_the_frame_engine_does(served, face_weights, tmp_path):
    """Load Video -> GPEN Restore Video (GFPGAN, fidelity set) -> Save Video: every frame is
    what the frame engine and the pack's encoder give for the same model here, and visibly
    restored; the node says the fidelity was ignored."""
    _, _, _, safetensors = face_weights("GFPGAN")
    clip = videoclips.face_clip(served.base / "input" / "gfpgan_faces.mp4", 480, 270, frames=6)
    graph = video_graph("gfpgan_faces.mp4", "video/gfpgan", model=installed(served, safetensors, "GFPGAN.safetensors"),
                        fidelity=0.3)
    start = len(served.log_path.read_text())
    out = saved_video(served, served.run(graph, timeout=900))
    detect = DetectOptions(smoothing=VIDEO_SMOOTHING, redetect_every=VIDEO_REDETECT_EVERY)
    expected = restored_video(safetensors, clip, tmp_path / "expected.mp4", torch.float32, detect, fidelity=0.3)
    source, restored, reference = decoded_frames(clip), decoded_frames(out), decoded_frames(expected)
    assert len(restored) == len(reference) == len(source) == 6
    for index, (before, ours, theirs) in enumerate(zip(source, restored, reference)):
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        change = np.abs(theirs.astype(int) - before.astype(int)).max(-1)
        print(f"frame {index}: vs the engine max {difference.max()}, mean {difference.mean():.3f}; "
              f"{(change > 16).sum()} pixels restored")
        assert difference.mean() <= 0.25 and (change > 16).sum() > 1000
    assert "fidelity is CodeFormer's weight; GFPGAN has none, so it was ignored." in \
        served.log_path.read_text()[start:]
