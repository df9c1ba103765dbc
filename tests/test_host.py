"""The pack in a real ComfyUI 0.3.75 server: registration, workflows over /prompt, errors."""

import shutil

import cv2
import numpy as np
import pytest

from gpen import pipeline
from gpen.faces import load_detector

NODES = {"GPENModelLoader": "Load GPEN Model", "GPENDetectFaces": "Detect Faces",
         "GPENRestore": "GPEN Restore 2048", "GPENPasteBack": "Paste Back"}


@pytest.fixture(scope="module")
def served(host, gpen512_file, astronaut):
    """The host with a random-weight GPEN-BFR-512 and two input pictures."""
    shutil.copy(gpen512_file, host.base / "models" / "facerestore_models" / "GPEN-BFR-512.pth")
    cv2.imwrite(str(host.base / "input" / "astronaut.png"), astronaut[..., ::-1])
    ramp = np.tile(np.linspace(30, 220, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    cv2.imwrite(str(host.base / "input" / "no_face.png"), ramp)
    (host.base / "models" / "facerestore_models" / "evil.pth").write_bytes(
        (host.base.parent / "evil.bin").write_bytes(b"") or _evil_pickle(host.base / "pwned"))
    return host


def _evil_pickle(marker) -> bytes:
    import io
    import os

    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    buffer = io.BytesIO()
    torch.save({"x": Exploit()}, buffer)
    return buffer.getvalue()


def restore_graph(image: str, model: str = "GPEN-BFR-512.pth", detector: str = "mtcnn",
                  prefix: str = "gpen") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "GPENModelLoader", "inputs": {"model_name": model, "precision": "auto"}},
        "3": {"class_type": "GPENDetectFaces", "inputs": {
            "image": ["1", 0], "detector": detector, "threshold": 0.9, "max_faces": 0,
            "order": "largest first", "min_size": 0, "indices": ""}},
        "4": {"class_type": "GPENRestore", "inputs": {
            "gpen_model": ["2", 0], "image": ["1", 0], "faces": ["3", 0], "strength": 1.0,
            "batch_size": 4}},
        "5": {"class_type": "GPENPasteBack", "inputs": {
            "image": ["1", 0], "restored_faces": ["4", 0], "faces": ["4", 1], "feather": 0.15}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
        "7": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix + "_mask"}},
    }


def saved(host, entry: dict, node: str) -> np.ndarray:
    image = entry["outputs"][node]["images"][0]
    return cv2.imread(str(host.base / "output" / image["subfolder"] / image["filename"]))[..., ::-1]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_nodes_are_registered_with_tooltips_and_descriptions(host):
    for class_name, display in NODES.items():
        info = host.get(f"/object_info/{class_name}")[class_name]
        assert info["display_name"] == display
        assert info["description"]
        for name, spec in info["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{class_name}.{name} has no tooltip"


def test_model_list_shows_the_weights(served):
    options = served.get("/object_info/GPENModelLoader")["GPENModelLoader"]["input"]["required"]
    assert "GPEN-BFR-512.pth" in options["model_name"][1]["options"]


def test_restore_workflow_changes_only_the_face(served, astronaut):
    entry = served.run(restore_graph("astronaut.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = saved(served, entry, "6")
    mask = saved(served, entry, "8")[..., 0]
    assert out.shape == astronaut.shape
    changed = np.abs(out.astype(int) - astronaut.astype(int)).max(-1) > 0
    assert changed.sum() > 2000  # the random-weight face really was pasted
    face = pipeline.detect(pipeline.im.crops_to_tensor([astronaut / 255.0], 512).float(),
                           load_detector("mtcnn"), 0.9).frames[0][0]
    x0, y0, x1, y1 = face.box
    ys, xs = np.nonzero(changed)
    pad_x, pad_y = 0.5 * (x1 - x0), 0.5 * (y1 - y0)
    assert x0 - pad_x <= xs.min() and xs.max() <= x1 + pad_x
    assert y0 - pad_y <= ys.min() and ys.max() <= y1 + pad_y
    # The saved 8-bit mask rounds its faint edge to 0; there the image can differ by one level.
    assert np.abs(out.astype(int) - astronaut.astype(int)).max(-1)[mask == 0].max() <= 1


def test_image_without_faces_is_saved_unchanged(served):
    entry = served.run(restore_graph("no_face.png", prefix="noface"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    original = cv2.imread(str(served.base / "input" / "no_face.png"))[..., ::-1]
    assert np.array_equal(saved(served, entry, "6"), original)
    assert saved(served, entry, "8").max() == 0


def test_missing_weights_are_named(served):
    message = error_of(served.run(restore_graph("astronaut.png", model="GPEN-BFR-2048.pth")))
    assert "GPEN-BFR-2048.pth" in message["exception_message"]
    assert "facerestore_models" in message["exception_message"]


def test_missing_detector_weights_name_folder_file_and_url(served):
    message = error_of(served.run(restore_graph("astronaut.png", detector="retinaface_resnet50")))
    text = message["exception_message"]
    assert message["node_type"] == "GPENDetectFaces"
    assert "detection_Resnet50_Final.pth" in text and "facedetection" in text
    assert "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" in text


def test_malicious_weights_are_refused_and_server_keeps_working(served):
    message = error_of(served.run(restore_graph("astronaut.png", model="evil.pth")))
    assert "refused" in message["exception_message"] and "evil.pth" in message["exception_message"]
    assert not (served.base / "pwned").exists()
    entry = served.run(restore_graph("no_face.png", prefix="after_error"))
    assert entry["status"]["status_str"] == "success"


def test_invalid_choices_get_clear_errors(served):
    """ComfyUI 0.3.75 does not check V3 combo values itself, so the nodes do."""
    graph = restore_graph("astronaut.png")
    graph["3"]["inputs"]["order"] = "random"
    assert "Unknown face order 'random'" in error_of(served.run(graph))["exception_message"]
    graph = restore_graph("astronaut.png")
    graph["2"]["inputs"]["precision"] = "int8"
    assert "Unknown precision 'int8'" in error_of(served.run(graph))["exception_message"]
