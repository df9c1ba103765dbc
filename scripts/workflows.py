"""The shipped workflows, as API graphs, and their export to UI format through the real UI.

    python scripts/workflows.py           # rewrite workflows/*.json (starts ComfyUI + Chromium)
    python scripts/workflows.py NAME ...  # only these (e.g. a new one; the others stay as saved)

Each graph is loaded by ComfyUI's own frontend (``app.loadApiJson``), laid out, given a note
and saved with ``app.graph.serialize()``: exactly what the UI's Save writes.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "astronaut.png"
VIDEO = "astronaut.mp4"  # scripts/sample_video.py


def detect(image: list, **change) -> dict:
    inputs = {"image": image, "detector": "mtcnn", "threshold": 0.9, "max_faces": 0,
              "order": "largest first", "min_size": 0, "indices": "", "smoothing": 0.0}
    return {"class_type": "GPENDetectFaces", "inputs": {**inputs, **change}}


def loader(name: str) -> dict:
    return {"class_type": "GPENModelLoader", "inputs": {"model_name": name, "precision": "auto",
                                                        "compile": False}}


def restore(model: list, image: list, faces: list, strength: float = 1.0, **optional) -> dict:
    return {"class_type": "GPENRestore", "inputs": {"gpen_model": model, "image": image, "faces": faces,
                                                    "strength": strength, "batch_size": 4, **optional}}


def paste(image: list, restored: list, faces: list, upscale: float = 1.0) -> dict:
    return {"class_type": "GPENPasteBack", "inputs": {
        "image": image, "restored_faces": restored, "faces": faces, "feather": 0.15,
        "color_correction": True, "blend": "multiband", "upscale": upscale, "mask": "face ellipse"}}


def stitch(first: list, second: list, direction: str = "right") -> dict:
    return {"class_type": "ImageStitch", "inputs": {"image1": first, "image2": second, "direction": direction,
                                                    "match_image_size": True, "spacing_width": 8,
                                                    "spacing_color": "white"}}


def load(name: str = IMAGE) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def side_by_side(models: list[str], prefix: str, upscale: float = 1.0,
                 restore_options: list[dict] | None = None) -> dict:
    """original | one model | the next | ...: faces detected once, restored by each model (with
    its own ``restore_options``) and pasted back, the results stitched left to right."""
    graph = {"1": load(), "2": detect(["1", 0])}
    loaders = range(3, 3 + len(models))
    restores = range(loaders.stop, loaders.stop + len(models))
    pastes = range(restores.stop, restores.stop + len(models))
    for model, node in zip(models, loaders):
        graph[str(node)] = loader(model)
    for options, node, model_node in zip(restore_options or [{}] * len(models), restores, loaders):
        graph[str(node)] = restore([str(model_node), 0], ["1", 0], ["2", 0], **options)
    for node, restored in zip(pastes, restores):
        graph[str(node)] = paste(["1", 0], [str(restored), 0], [str(restored), 1], upscale=upscale)
    strip = pastes.stop  # the stitched strip so far
    graph[str(strip)] = stitch([str(pastes.start), 0], ["1", 0], direction="left")
    for pasted in pastes[1:]:
        graph[str(strip + 1)] = stitch([str(strip), 0], [str(pasted), 0])
        strip += 1
    graph[str(strip + 1)] = save([str(strip), 0], prefix)
    return graph


WORKFLOWS: dict[str, tuple[dict, str]] = {
    "restore_faces_in_a_photo": ({
        "1": load(),
        "2": loader("GPEN-BFR-512.pth"),
        "3": detect(["1", 0]),
        "4": restore(["2", 0], ["1", 0], ["3", 0]),
        "5": paste(["1", 0], ["4", 0], ["4", 1]),
        "6": save(["5", 0], "gpen_restored"),
        "7": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }, "Restore the faces in a photo with GPEN.\n\n"
       "1. Put GPEN-BFR-512.pth (or the 1024 / 2048 model) in models/facerestore_models and pick it "
       "in Load GPEN Model.\n2. Load your photo. Detect Faces uses mtcnn (no download); "
       "retinaface_resnet50 needs detection_Resnet50_Final.pth in models/facedetection.\n"
       "3. Paste Back writes the restored faces into the photo; the preview shows the paste mask.\n\n"
       "Lower strength on GPEN Restore 2048 to keep more of the original (the authors use 0.8 at "
       "2048); set upscale on Paste Back to keep the detail of a 1024/2048 model."),
    "restore_faces_after_stable_diffusion": ({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo portrait of a smiling woman, natural light"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, deformed"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": loader("GPEN-BFR-512.pth"),
        "8": detect(["6", 0]),
        "9": restore(["7", 0], ["6", 0], ["8", 0]),
        "10": paste(["6", 0], ["9", 0], ["9", 1]),
        "11": save(["10", 0], "sd_gpen"),
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }, "Clean up the faces of a Stable Diffusion image.\n\n"
       "The four GPEN nodes sit between VAE Decode and Save Image; the preview shows the image before "
       "restoration. Pick your own checkpoint in Load Checkpoint and GPEN-BFR-512.pth (or 1024/2048) "
       "in Load GPEN Model."),
    "restore_face_swapped_frames": ({
        "1": load(),
        "2": load(),
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": loader("GPEN-BFR-512.pth"),
        "5": detect(["3", 0], max_faces=1, smoothing=0.8),
        "6": restore(["4", 0], ["3", 0], ["5", 0], strength=0.8),
        "7": paste(["3", 0], ["6", 0], ["6", 1]),
        "8": save(["7", 0], "swap_gpen"),
    }, "Restore face-swapped video frames.\n\n"
       "Feed the swapped frames as one image batch (here two Load Image nodes joined by Batch "
       "Images; in practice the face-swap node's output or a video loader). Detect Faces keeps only "
       "the largest face (max_faces 1) and smooths its landmarks over the frames (smoothing 0.8) "
       "so the restored face does not flicker. Strength 0.8 keeps some of the swap's own texture."),
    "compare_gpen_512_1024_2048": (side_by_side(
        ["GPEN-BFR-512.pth", "GPEN-BFR-1024.pth", "GPEN-BFR-2048.pth"], "gpen_compare", upscale=2.0,
    ), "Before / after with the 512, 1024 and 2048 models, side by side: original | 512 | 1024 | 2048.\n\n"
       "Faces are detected once and restored by each model at its own size, then pasted onto the photo "
       "enlarged 2x (upscale 2 on Paste Back), so the larger models' extra detail is kept instead of "
       "being shrunk back to the face's size in the photo. Needs GPEN-BFR-512.pth, GPEN-BFR-1024.pth "
       "and GPEN-BFR-2048.pth in models/facerestore_models."),
    "compare_gpen_gfpgan_codeformer": (side_by_side(
        ["GPEN-BFR-512.pth", "GFPGANv1.4.pth", "codeformer.pth"], "face_restorers_compare",
        restore_options=[{}, {}, {"fidelity": 0.5}],
    ), "Three face restorers on one photo, side by side: original | GPEN-512 | GFPGAN | CodeFormer.\n\n"
       "Faces are detected once; each model aligns them to its own template and size and they are "
       "pasted back the same way. Needs GPEN-BFR-512.pth, GFPGANv1.4.pth and codeformer.pth in "
       "models/facerestore_models.\n\n"
       "CodeFormer needs the optional package spandrel_extra_arches (pip install "
       "spandrel_extra_arches, in ComfyUI's Python) and its licence is non-commercial (S-Lab "
       "License 1.0). Its fidelity on GPEN Restore 2048: 0 = strongest restoration, 1 = closest to "
       "the photo; GPEN and GFPGAN ignore it."),
    "restore_faces_in_a_video": ({
        "1": {"class_type": "LoadVideo", "inputs": {"file": VIDEO}},
        "2": loader("GPEN-BFR-512.pth"),
        "3": {"class_type": "GPENRestoreVideo", "inputs": {
            "video": ["1", 0], "gpen_model": ["2", 0], "detector": "mtcnn", "threshold": 0.9, "max_faces": 0,
            "order": "largest first", "min_size": 0, "indices": "", "smoothing": 0.5, "redetect_every": 5,
            "strength": 1.0, "batch_size": 4, "feather": 0.15, "color_correction": True, "blend": "multiband",
            "upscale": 1.0, "mask": "face ellipse"}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "video/gpen_restored",
                                                    "format": "auto", "codec": "auto"}},
    }, "Restore the faces of a video, frame by frame, in bounded memory.\n\n"
       "Load Video -> GPEN Restore Video -> Save Video: detection, tracking and landmark smoothing "
       "(against flicker), restoration and paste-back in one node; sound, frame rate and timing are "
       "kept. Whole frames are searched every 5 frames (redetect_every) and the faces followed in "
       "between. Frames without a face pass through unchanged; the node says how many it restored.\n\n"
       "Put GPEN-BFR-512.pth in models/facerestore_models. astronaut.mp4 is a short sample; pick your "
       "own video in Load Video."),
}

# Where each node goes: rows of columns of API node ids ("note": the workflow's note), packed
# left to right and top to bottom, so Fit View on a 1920x1080 screen keeps the text readable.
LAYOUTS: dict[str, list[list[list[str]]]] = {
    "restore_faces_in_a_photo": [[["1", "note"], ["2", "3"], ["4", "5"], ["6"], ["7", "8"]]],
    "restore_faces_after_stable_diffusion": [[["1", "4"], ["2", "3"], ["5"], ["6", "12"]],
                       [["note"], ["7", "8"], ["9", "10"], ["11"]]],
    "restore_face_swapped_frames": [[["1", "2"], ["3", "4", "note"], ["5"], ["6", "7"], ["8"]]],
    "compare_gpen_512_1024_2048": [[["1"], ["3", "6"], ["9"], ["4", "7"], ["10"], ["5", "8"], ["11"]],
                                   [["2", "note"], ["12", "13", "14"], ["15"]]],
    "compare_gpen_gfpgan_codeformer": [[["1"], ["3", "6"], ["9"], ["4", "7"], ["10"], ["5", "8"], ["11"]],
                                       [["2", "note"], ["12", "13", "14"], ["15"]]],
    "restore_faces_in_a_video": [[["1", "2", "note"], ["3"], ["4"]]],
}
# Nodes that show a picture get room for it, so the result is visible without resizing; the
# nodes that say what they did get room for the text ComfyUI shows under their widgets.
PICTURE_SIZES = {"LoadImage": [320, 420], "SaveImage": [480, 520], "PreviewImage": [320, 380],
                 "LoadVideo": [320, 420], "SaveVideo": [480, 600]}
SIZES = {"compare_gpen_512_1024_2048": {"15": [1000, 380]},  # the 4-up strips
         "compare_gpen_gfpgan_codeformer": {"15": [1000, 380]}}
TELLING = ["GPENDetectFaces", "GPENRestore", "GPENPasteBack", "GPENRestoreVideo"]
NOTICE_HEIGHT = 60
NOTE_SIZE = [380, 300]
GAP = 40

EXPORT_JS = """async ([api, name, text, layout, pictures, sizes, telling, noticeHeight, noteSize, gap]) => {
    await window.app.loadApiJson(api, name);
    const graph = window.app.graph;
    const note = LiteGraph.createNode("Note");
    note.size = noteSize;
    note.widgets[0].value = text;
    graph.add(note);
    const nodeOf = (id) => id === "note" ? note : graph.getNodeById(Number(id));
    for (const node of graph._nodes) {
        if (pictures[node.type]) node.size = [...pictures[node.type]];
        if (telling.includes(node.type)) node.size = [node.size[0], node.size[1] + noticeHeight];
    }
    for (const [id, size] of Object.entries(sizes)) nodeOf(id).size = size;
    let top = 0;
    for (const row of layout) {
        let left = 0, bottom = top;
        for (const column of row) {
            let y = top, width = 0;
            for (const id of column) {
                const node = nodeOf(id);
                node.pos = [left, y];
                y += node.size[1] + LiteGraph.NODE_TITLE_HEIGHT + gap;
                width = Math.max(width, node.size[0]);
            }
            left += width + gap;
            bottom = Math.max(bottom, y);
        }
        top = bottom;
    }
    const placed = new Set(layout.flat(2).map(nodeOf));
    const stray = graph._nodes.filter(n => !placed.has(n)).map(n => n.type);
    if (stray.length) throw new Error(`no place in the layout for ${stray}`);
    return JSON.parse(JSON.stringify(graph.serialize()));  // as Save writes it: no undefined fields
}"""


def export(page, name: str) -> dict:
    graph, note = WORKFLOWS[name]
    return page.evaluate(EXPORT_JS, [graph, name, note, LAYOUTS[name], PICTURE_SIZES, SIZES.get(name, {}), TELLING,
                                     NOTICE_HEIGHT, NOTE_SIZE, GAP])


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    from uihost import browser_page
    from conftest import ComfyHost

    names = sys.argv[1:] or list(WORKFLOWS)
    unknown = [name for name in names if name not in WORKFLOWS]
    if unknown:
        raise SystemExit(f"No workflow named {', '.join(unknown)}; the workflows are {', '.join(WORKFLOWS)}.")
    server = ComfyHost.with_pack(Path(tempfile.mkdtemp()))
    try:
        with browser_page(server.url) as page:
            for workflow in names:
                data = export(page, workflow)
                (REPO / "workflows" / f"{workflow}.json").write_text(json.dumps(data, indent=1) + "\n")
                print(f"workflows/{workflow}.json: {len(data['nodes'])} nodes")
    finally:
        server.stop()
