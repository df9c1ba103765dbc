"""The pack in a real ComfyUI 0.3.75 server: registration, workflows over /prompt, errors."""

import threading
import wave

import av
import cv2
import numpy as np
import psutil
import pytest
import torch

from conftest import as_image
from gpen import pipeline
from gpen.faces import load_detector

NODES = {"GPENModelLoader": "Load GPEN Model", "GPENDetectFaces": "Detect Faces",
         "GPENRestore": "GPEN Restore 2048", "GPENPasteBack": "Paste Back"}


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


def failure_of(host, graph: dict) -> tuple[str, str]:
    """(node type, message) of a graph that fails: refused when queued (a missing file, found by
    the node's input validation) or failed when run (anything found only by loading)."""
    status, body = host.post_prompt(graph)
    if status == 400:
        [refused] = body["node_errors"].values()
        return refused["class_type"], " ".join(f"{e['message']}: {e['details']}" for e in refused["errors"])
    assert status == 200, body
    error = error_of(host.wait(body["prompt_id"]))
    return error["node_type"], error["exception_message"]


def test_nodes_are_registered_with_tooltips_and_descriptions(host):
    for class_name, display in NODES.items():
        info = host.get(f"/object_info/{class_name}")[class_name]
        assert info["display_name"] == display
        assert info["description"]
        for name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{class_name}.{name} has no tooltip"
    # Inputs added later are optional and come last: saved workflows keep their widget values.
    loader = host.get("/object_info/GPENModelLoader")["GPENModelLoader"]
    assert loader["input_order"]["required"] == ["model_name", "precision"]
    assert loader["input_order"]["optional"] == ["compile"]
    assert loader["input"]["optional"]["compile"][0] == "BOOLEAN"
    assert loader["input"]["optional"]["compile"][1]["default"] is False


def test_core_audio_nodes_resample_with_torchaudio(host):
    """ComfyUI's own audio nodes load (torchaudio from setup.sh) and resample: a 44.1 kHz tone
    merged onto 48 kHz silence must come out at 48 kHz still at 440 Hz."""
    rate = 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    with wave.open(str(host.base / "input" / "tone.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((tone * 32767).astype("<i2").tobytes())
    entry = host.run({
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
        "2": {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 48000, "channels": 1}},
        "3": {"class_type": "AudioMerge", "inputs": {"audio1": ["2", 0], "audio2": ["1", 0], "merge_method": "add"}},
        "4": {"class_type": "SaveAudio", "inputs": {"audio": ["3", 0], "filename_prefix": "tone"}},
    })
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved_audio = entry["outputs"]["4"]["audio"][0]
    with av.open(str(host.base / "output" / saved_audio["subfolder"] / saved_audio["filename"])) as flac:
        stream = flac.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in flac.decode(stream)])
    assert stream.rate == 48000 and len(samples) == 48000
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.fft.rfftfreq(len(samples), 1 / stream.rate)[spectrum.argmax()] == pytest.approx(440, abs=1)


def test_model_list_shows_the_weights(served):
    options = served.get("/object_info/GPENModelLoader")["GPENModelLoader"]["input"]["required"]
    assert "GPEN-BFR-512.pth" in options["model_name"][1]["options"]


def test_restore_workflow_changes_only_the_face(served, astronaut):
    entry = served.run(restore_graph("astronaut.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = saved(served, entry, "6")
    mask = saved(served, entry, "8")[..., 0]
    assert out.shape == astronaut.shape
    diff = np.abs(out.astype(int) - astronaut.astype(int)).max(-1)
    changed = diff > 2  # visibly changed; the multiband blend leaves faint traces a bit wider
    assert changed.sum() > 2000  # the random-weight face really was pasted
    face = pipeline.detect(as_image(astronaut), load_detector("mtcnn")).frames[0][0]
    x0, y0, x1, y1 = face.box
    pad_x, pad_y = 0.5 * (x1 - x0), 0.5 * (y1 - y0)
    for pixels in (np.nonzero(changed), np.nonzero(mask)):
        ys, xs = pixels
        assert x0 - pad_x <= xs.min() and xs.max() <= x1 + pad_x
        assert y0 - pad_y <= ys.min() and ys.max() <= y1 + pad_y
    far = np.ones_like(changed)
    far[int(y0 - pad_y):int(y1 + pad_y), int(x0 - pad_x):int(x1 + pad_x)] = False
    assert diff[far].max() <= 1  # elsewhere at most one 8-bit level (the blend's widest band)


def test_restore_workflow_with_compile_matches_eager(served):
    """The loader's compile switch in the real server: torch.compile'd (first run compiles),
    the same picture as the eager run to within one 8-bit level."""
    eager = restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix="eager")
    compiled = restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix="compiled")
    compiled["2"]["inputs"]["compile"] = True
    for graph in (eager, compiled):  # fp32: auto is bf16 on a CPU with native bf16
        graph["2"]["inputs"]["precision"] = "fp32"
    first, second = served.run(eager), served.run(compiled, timeout=900)
    assert second["status"]["status_str"] == "success", second["status"]
    difference = np.abs(saved(served, first, "6").astype(int) - saved(served, second, "6").astype(int))
    assert difference.max() <= 1
    log = (served.base / "server.log").read_text()
    assert "GPEN: first compiled call for [1, 3, 64, 64]" in log and "torch.compile failed" not in log


def test_image_without_faces_is_saved_unchanged(served):
    entry = served.run(restore_graph("no_face.png", prefix="noface"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    original = cv2.imread(str(served.base / "input" / "no_face.png"))[..., ::-1]
    assert np.array_equal(saved(served, entry, "6"), original)
    assert saved(served, entry, "8").max() == 0


def test_missing_weights_are_named(served):
    node, text = failure_of(served, restore_graph("astronaut.png", model="GPEN-BFR-2048.pth"))
    assert node == "GPENModelLoader"
    assert "GPEN-BFR-2048.pth" in text and "facerestore_models" in text


def test_missing_detector_weights_name_folder_file_and_url(served):
    node, text = failure_of(served, restore_graph("astronaut.png", detector="retinaface_resnet50"))
    assert node == "GPENDetectFaces"
    assert "detection_Resnet50_Final.pth" in text and "facedetection" in text
    assert "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" in text


def test_malicious_weights_are_refused_and_server_keeps_working(served):
    message = error_of(served.run(restore_graph("astronaut.png", model="evil.pth")))
    assert "refused" in message["exception_message"] and "evil.pth" in message["exception_message"]
    assert not (served.base / "pwned").exists()
    entry = served.run(restore_graph("no_face.png", prefix="after_error"))
    assert entry["status"]["status_str"] == "success"


def test_invalid_choices_get_clear_errors(served):
    """ComfyUI 0.3.75 does not check V3 combo values itself, so the nodes do; newer hosts refuse
    them when queued, naming the input and the value."""
    for node, name, value, ours in (("3", "order", "random", "Unknown face order 'random'"),
                                    ("2", "precision", "int8", "Unknown precision 'int8'")):
        graph = restore_graph("astronaut.png")
        graph[node]["inputs"][name] = value
        _, message = failure_of(served, graph)
        assert ours in message or ("not in list" in message and name in message and value in message), message


def _good_run(host, tag: str, threshold: float = 0.9) -> dict:
    graph = restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix=tag)
    graph["3"]["inputs"]["threshold"] = threshold
    return host.run(graph)


BAD_PROMPTS = [
    ({"2": {"model_name": "deleted.pth"}}, "GPENModelLoader", "'deleted.pth' is not in"),
    ({"2": {"model_name": "evil.pth"}}, "GPENModelLoader", "refused"),
    ({"2": {"model_name": "empty.pth"}}, "GPENModelLoader", "empty.pth is empty"),
    ({"2": {"model_name": "noise.pth"}}, "GPENModelLoader", "could not be read"),
    ({"2": {"model_name": "GPEN-BFR-512.onnx"}}, "GPENModelLoader", "ONNX model"),
    ({"2": {"model_name": "GFPGANv1.4-truncated.pth"}}, "GPENModelLoader", "looks like GFPGAN"),
    ({"3": {"detector": "retinaface_mobile0.25"}}, "GPENDetectFaces", "detection_mobilenet0.25_Final.pth"),
    ({"3": {"indices": "first"}}, "GPENDetectFaces", "comma-separated"),
]


@pytest.mark.parametrize("change, node, expected", BAD_PROMPTS)
def test_failing_prompt_then_good_prompt(served, change, node, expected):
    graph = restore_graph("astronaut.png", model="GPEN-tiny-64.pth")
    for node_id, inputs in change.items():
        graph[node_id]["inputs"].update(inputs)
    failed, text = failure_of(served, graph)
    assert failed == node and expected in text
    assert _good_run(served, "recovered", threshold=0.9 - 0.001 * len(expected))["status"][
        "status_str"] == "success"


def test_faces_from_another_image_are_refused(served):
    graph = restore_graph("astronaut.png", model="GPEN-tiny-64.pth")
    graph["9"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                         "width": 300, "height": 200, "crop": "disabled"}}
    graph["5"]["inputs"]["image"] = ["9", 0]
    error = error_of(served.run(graph))
    assert error["node_type"] == "GPENPasteBack"
    assert "300x200" in error["exception_message"] and "512x512" in error["exception_message"]


def test_fifty_prompts_do_not_leak(served):
    process = psutil.Process(served.proc.pid)
    rss = []
    for i in range(50):
        entry = _good_run(served, f"leak{i}", threshold=0.85 - 0.001 * i)
        assert entry["status"]["status_str"] == "success"
        rss.append(process.memory_info().rss)
    growth = rss[-1] / rss[4]
    print(f"RSS after 5th: {rss[4] / 2**20:.0f} MiB, after 50th: {rss[-1] / 2**20:.0f} MiB ({growth:.3f}x)")
    assert growth <= 1.10


def test_two_clients_at_once(served):
    results = {}

    def client(name: str, threshold: float) -> None:
        results[name] = _good_run(served, name, threshold)

    threads = [threading.Thread(target=client, args=(f"client{i}", 0.7 + 0.01 * i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == ["client0", "client1"]
    for name, entry in results.items():
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"]["6"]["images"][0]["filename"].startswith(name)


def test_model_files_are_never_written(served):
    folder = served.base / "models" / "facerestore_models"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    assert _good_run(served, "readonly", threshold=0.77)["status"]["status_str"] == "success"
    error_of(served.run(restore_graph("astronaut.png", model="evil.pth")))
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    assert after == before


def test_upscaled_paste_with_comfy_upscale_model(served, astronaut):
    """Paste Back at 2x with a background model from ComfyUI's own Load Upscale Model node."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    folder = served.base / "models" / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict(), folder / "tiny_x2.pth")
    graph = restore_graph("astronaut.png", model="GPEN-tiny-64.pth", prefix="up2")
    graph["9"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_x2.pth"}}
    graph["5"]["inputs"].update({"upscale": 2.0, "upscale_model": ["9", 0]})
    entry = served.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = saved(served, entry, "6")
    assert out.shape == (1024, 1024, 3) and saved(served, entry, "8").shape == (1024, 1024, 3)
    graph["5"]["inputs"].pop("upscale_model")
    graph["6"]["inputs"]["filename_prefix"] = "up2_lanczos"
    lanczos = saved(served, served.run(graph), "6")
    assert lanczos.shape == (1024, 1024, 3)
    assert np.abs(lanczos.astype(int) - out.astype(int)).mean() > 5  # the model really drew the background
