"""What a user meets in the real ComfyUI 0.3.75 server: missing files refused before anything
runs, a word from every node about what it did, progress per face and a prompt cancel."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import aiohttp
import cv2
import numpy as np
import pytest

from gpen.loader import OFFICIAL_URLS, missing_model_message

RETINAFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
PARSENET_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"


def photo_graph(image: str = "astronaut.png", model: str = "GPEN-BFR-512.pth", *, detector: str = "mtcnn",
                mask: str = "face ellipse", indices: str = "", prefix: str = "ux") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "GPENModelLoader", "inputs": {"model_name": model, "precision": "fp32"}},
        "3": {"class_type": "GPENDetectFaces", "inputs": {
            "image": ["1", 0], "detector": detector, "threshold": 0.9, "max_faces": 0, "order": "largest first",
            "min_size": 0, "indices": indices}},
        "4": {"class_type": "GPENRestore", "inputs": {"gpen_model": ["2", 0], "image": ["1", 0], "faces": ["3", 0],
                                                      "strength": 1.0, "batch_size": 4}},
        "5": {"class_type": "GPENPasteBack", "inputs": {"image": ["1", 0], "restored_faces": ["4", 0],
                                                        "faces": ["4", 1], "feather": 0.15, "mask": mask}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def refusals(body: dict) -> dict[str, str]:
    """class_type -> the text of its validation errors, from a refused POST /prompt."""
    return {error["class_type"]: " ".join(f"{e['message']}: {e['details']}" for e in error["errors"])
            for error in body["node_errors"].values()}


def queue_is_empty(host) -> bool:
    queue = host.get("/queue")
    return not queue["queue_running"] and not queue["queue_pending"]


def test_missing_files_are_refused_before_anything_runs(served):
    """A first run (nothing installed yet), a model that went away, and detector / parsing
    weights that were never downloaded: POST /prompt refuses the graph, naming folder and URL,
    and nothing executes (no history entry, no output)."""
    models = served.base / "models" / "facerestore_models"
    outputs_before = set((served.base / "output").rglob("*"))

    status, body = served.post_prompt(photo_graph(model="GPEN-BFR-2048.pth", detector="retinaface_resnet50",
                                                  mask="parsing: parsenet"))
    assert status == 400, body
    errors = refusals(body)
    assert set(errors) == {"GPENModelLoader", "GPENDetectFaces", "GPENPasteBack"}, body
    went_away = errors["GPENModelLoader"]
    assert str(models) in went_away and OFFICIAL_URLS[2048].split(" ")[0] in went_away
    assert "moved, renamed or deleted" in went_away and "GPEN-BFR-512.pth" in went_away  # what is there
    assert RETINAFACE_URL in errors["GPENDetectFaces"] and "facedetection" in errors["GPENDetectFaces"]
    assert PARSENET_URL in errors["GPENPasteBack"] and "face ellipse" in errors["GPENPasteBack"]

    aside = served.base / "models_aside"
    aside.mkdir(exist_ok=True)
    moved = [shutil.move(str(path), aside / path.name) for path in list(models.iterdir())]
    try:  # a fresh install: the folder is empty
        status, body = served.post_prompt(photo_graph())
    finally:
        for path in moved:
            shutil.move(path, models / path.name)
    assert status == 400, body
    never_had = refusals(body)["GPENModelLoader"]
    assert never_had.count("No GPEN model is installed yet") == 1 and OFFICIAL_URLS[512] in never_had
    assert str(models) in never_had and "moved" not in never_had
    assert queue_is_empty(served) and set((served.base / "output").rglob("*")) == outputs_before


def test_missing_model_message_names_what_is_there():
    text = missing_model_message("my-gpen.pth", ["/m/facerestore_models"], ["GPEN-BFR-512.pth"])
    assert "GPEN-BFR-512.pth" in text and OFFICIAL_URLS[512] in text and "/m/facerestore_models" in text


def log_lines(host, since: int) -> str:
    return host.log_path.read_text()[since:]


def test_every_node_says_what_it_did(served):
    """Detect Faces, GPEN Restore and Paste Back each write what happened to the server log
    (the UI test shows the same words on the nodes): faces found and selected, indices that
    matched nothing, faces restored, and a frame without a face passed through."""
    start = len(served.log_path.read_text())
    entry = served.run(photo_graph(indices="0,3"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = log_lines(served, start)
    assert "Detect Faces (node 3): 1 face found, 1 selected. Indices that matched no face: 3 in frame 0" in log
    assert "GPEN Restore (node 4): Restored 1 face at 512x512 in" in log
    assert "Paste Back (node 5): Pasted 1 face into 1 of 1 frame." in log

    start = len(served.log_path.read_text())
    entry = served.run(photo_graph("no_face.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = log_lines(served, start)
    assert "Detect Faces (node 3): No face found. The image without a face will pass through unchanged." in log
    assert "GPEN Restore (node 4): No faces to restore" in log
    assert "Paste Back (node 5): Pasted 0 faces into 0 of 1 frame. No face in the frame: passed through" in log


@pytest.fixture(scope="module")
def four_faces(served, astronaut) -> str:
    """The astronaut four times, 2x2: four faces for one batch."""
    tile = np.concatenate([np.concatenate([astronaut] * 2, axis=1)] * 2, axis=0)
    cv2.imwrite(str(served.base / "input" / "four_faces.png"), tile[..., ::-1])
    return "four_faces.png"


async def _restore_and_cancel(host, graph: dict, cancel_after_faces: float) -> dict:
    """Queue ``graph`` and follow its progress over the websocket, as the UI does; once the
    restore node (id 4) has done ``cancel_after_faces`` faces, POST /interrupt. Returns the
    restore node's progress messages (time, value, max) and the times of the interrupt and of
    the server's execution_interrupted."""
    client = uuid.uuid4().hex
    progress: list[tuple[float, float, int]] = []
    found: dict = {"progress": progress}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{host.url}/ws?clientId={client}") as ws:
            async with session.post(f"{host.url}/prompt", json={"prompt": graph, "client_id": client}) as r:
                assert r.status == 200, await r.text()
                found["prompt_id"] = (await r.json())["prompt_id"]
            deadline = time.monotonic() + 600
            async for message in ws:
                assert time.monotonic() < deadline, "no end of the prompt within 600 s"
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, found["prompt_id"]):
                    continue
                if event["type"] == "progress" and data.get("node") == "4":
                    progress.append((time.monotonic(), data["value"], data["max"]))
                    if data["value"] >= cancel_after_faces and "interrupt" not in found:
                        found["interrupt"] = time.monotonic()
                        async with session.post(f"{host.url}/interrupt") as r:
                            assert r.status == 200
                elif event["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                    found[event["type"]] = time.monotonic()
                    return found
    raise AssertionError("websocket closed before the prompt ended")


def test_progress_per_face_and_cancel_within_one_face(served, four_faces):
    """Four faces restored in one batch of 4 (the default, and 12-15% faster per face than
    one at a time on a CPU): the progress bar moves in fractions of a face during the batch,
    not once at its end, and a cancel sent mid-batch ends the prompt in less than one face's
    time (measured in the same run from the progress messages)."""
    graph = photo_graph(four_faces, prefix="cancelled")
    found = asyncio.run(_restore_and_cancel(served, graph, cancel_after_faces=1.5))
    assert "execution_interrupted" in found, found
    progress = found["progress"]
    assert {total for _, _, total in progress} == {4}
    values = [value for _, value, _ in progress]
    assert values == sorted(values) and 0 < values[0] < 1 and max(values) < 4  # inside the batch
    assert len({int(v) for v in values}) >= 2  # the bar passed whole faces before the batch ended
    (t0, v0, _), (t1, v1, _) = progress[0], progress[-1]
    seconds_per_face = (t1 - t0) / (v1 - v0)
    waited = found["execution_interrupted"] - found["interrupt"]
    print(f"one face: {seconds_per_face:.2f} s; cancel took {waited:.2f} s "
          f"({waited / seconds_per_face:.2f} of a face)")
    assert waited < seconds_per_face, (waited, seconds_per_face)
    history = served.wait(found["prompt_id"], timeout=60)
    assert history["status"]["status_str"] == "error" and not history["outputs"]
    assert any(kind == "execution_interrupted" for kind, _ in history["status"]["messages"])
