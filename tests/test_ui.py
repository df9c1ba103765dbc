"""Every shipped workflow in ComfyUI's real web UI (1920x1080): it opens cleanly and readably,
runs from the UI with its result in view and each node's notice on it, and the Templates
browser shows it with its thumbnail."""

import json
import re
import shutil
import sys
import urllib.request

import pytest
import torch
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from conftest import REPO, random_state_dict
from uihost import CLEAR_TOASTS_JS, FIT_VIEW_JS, TOASTS_JS, browser_page

sys.path.insert(0, str(REPO / "scripts"))
from sample_video import write_sample  # noqa: E402

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# Saved before Detect Faces and Paste Back gained inputs: must still open and run.
OLD_WORKFLOW = REPO / "tests" / "data" / "restore_photo_v0.1.json"
ARTIFACTS = REPO / "test-artifacts" / "ui"
PACK = "comfyui-gpen"  # the pack's folder in custom_nodes: its category in the Templates browser
# Models a test host cannot have: an SD checkpoint. Everything else the workflows name exists.
UNAVAILABLE = {"CheckpointLoaderSimple"}
# Fit View zoom at which the smallest text (widget values, 12 px at zoom 1) is still about 7 px.
READABLE_ZOOM = 0.6
LOAD_JS = """async (workflow) => {
    await window.app.loadGraphData(workflow);
    const graph = window.app.graph;
    const missing = graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
    const values = Object.fromEntries(graph._nodes.map(n => [n.id, n.serialize().widgets_values ?? null]));
    const prompt = await window.app.graphToPrompt();
    return {missing, values, api: prompt.output};
}"""
# Node boxes (title included) in graph units, the visible part of the graph, and, for each node
# showing a result, whether that result is what the user sees at its centre and corners (not
# covered by another node, a panel or the run controls).
VIEW_JS = """() => {
    const canvas = window.app.canvas, graph = window.app.graph;
    const element = canvas.canvas.getBoundingClientRect();
    const boxes = graph._nodes.map(n => ({id: n.id, type: n.type, box: Array.from(n.getBounding())}));
    const shown = (node) => {
        const [x, y, w, h] = node.getBounding();
        const steps = [0.02, 0.25, 0.5, 0.75, 0.98];
        const points = steps.flatMap(fx => steps.map(fy => [fx, fy]));
        return points.every(([fx, fy]) => {
            const [cx, cy] = canvas.ds.convertOffsetToCanvas([x + fx * w, y + fy * h]);
            const hit = document.elementFromPoint(element.left + cx / devicePixelRatio,
                                                  element.top + cy / devicePixelRatio);
            if (hit?.tagName === "VIDEO") {  // a video plays in a DOM element over its node
                const r = hit.getBoundingClientRect();
                const [left, top] = canvas.ds.convertOffsetToCanvas([x, y]);
                const [right, bottom] = canvas.ds.convertOffsetToCanvas([x + w, y + h]);
                return r.left >= element.left + left / devicePixelRatio - 1
                    && r.right <= element.left + right / devicePixelRatio + 1
                    && r.top >= element.top + top / devicePixelRatio - 1
                    && r.bottom <= element.top + bottom / devicePixelRatio + 1;
            }
            return hit === canvas.canvas && graph.getNodeOnPos(x + fx * w, y + fy * h) === node;
        });
    };
    const results = graph._nodes.filter(n => ["SaveImage", "PreviewImage", "SaveVideo"].includes(n.type))
        .map(n => ({id: n.id, type: n.type, loaded: !!(n.imgs?.length && n.imgs[0].naturalWidth > 0)
                    || !!n.videoContainer || [...document.querySelectorAll("video")].some(v => v.readyState >= 2),
                    shown: shown(n)}));
    const corners = boxes.flatMap(({box: [x, y, w, h]}) => [canvas.ds.convertOffsetToCanvas([x, y]),
                                                           canvas.ds.convertOffsetToCanvas([x + w, y + h])]);
    const screen = [Math.min(...corners.map(c => c[0])), Math.min(...corners.map(c => c[1])),
                    Math.max(...corners.map(c => c[0])), Math.max(...corners.map(c => c[1]))]
        .map((v, i) => Math.round((i % 2 ? element.top : element.left) + v / devicePixelRatio));
    return {zoom: canvas.ds.scale, visible: Array.from(canvas.visible_area), boxes, results, screen};
}"""
NOTICES_JS = """() => Object.fromEntries(window.app.graph._nodes
    .map(n => [n.id, n.widgets?.find(w => w.name === "$$node-text-preview")?.value ?? null]))"""


def overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(box: list[float], area: list[float]) -> bool:
    return (area[0] <= box[0] and box[0] + box[2] <= area[0] + area[2]
            and area[1] <= box[1] and box[1] + box[3] <= area[1] + area[3])


@pytest.fixture(scope="module")
def ui(served, manifests, gpen512_file, face_weights):
    """The served host plus 1024 and 2048 models, GFPGANv1.4.pth and codeformer.pth (random,
    official layouts), the sample video (3 frames: CPU time) and a browser page."""
    folder = served.base / "models" / "facerestore_models"
    added = []
    for size in (1024, 2048):
        path = folder / f"GPEN-BFR-{size}.pth"
        if not path.exists():
            torch.save(random_state_dict(manifests[size], seed=size), path)
            added.append(path)
    for arch, name in (("GFPGAN", "GFPGANv1.4.pth"), ("CodeFormer", "codeformer.pth")):
        path = folder / name
        if not path.exists():
            shutil.copy(face_weights(arch)[2], path)
            added.append(path)
    write_sample(served.base / "input" / "astronaut.mp4", frames=3)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with browser_page(served.url) as page:
            yield served, page
    finally:  # the host is shared: later tests (e.g. test_ux) expect only the 512 model there
        for path in added:
            path.unlink()


def test_the_shipped_workflows():
    assert {p.stem for p in WORKFLOWS} == {"restore_faces_in_a_photo", "restore_faces_after_stable_diffusion",
                                          "restore_face_swapped_frames", "compare_gpen_512_1024_2048",
                                          "compare_gpen_gfpgan_codeformer", "restore_faces_in_a_video"}
    for path in WORKFLOWS:  # the Templates browser's thumbnail
        assert path.with_suffix(".jpg").is_file(), path


def save_screenshot(page, name: str, view: dict) -> None:
    """The page as the user sees it, and where the graph is on it (for scripts/figures.py)."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    (ARTIFACTS / f"{name}.json").write_text(json.dumps({"graph": view["screen"], "zoom": view["zoom"]}))


def forget_earlier_results(host) -> None:
    """ComfyUI does not run nodes whose inputs are those of the previous prompt (it reuses their
    outputs, so they show no notice), and the workflows share their first nodes. POST /free has
    it drop that cache before it takes the prompt after the one it is running; the small prompt
    queued behind it makes sure the drop is done before the workflow's prompt comes."""
    request = urllib.request.Request(host.url + "/free", data=json.dumps({"free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    entry = host.run({"gpen_ui_reset_1": {"class_type": "EmptyImage", "inputs": {
        "width": 8, "height": 8, "batch_size": 1, "color": 0}}, "gpen_ui_reset_2": {
        "class_type": "PreviewImage", "inputs": {"images": ["gpen_ui_reset_1", 0]}}})
    assert entry["status"]["status_str"] == "success", entry["status"]


def run_from_ui(host, page) -> dict:
    """Press Run (app.queuePrompt) on a host that forgot earlier results, and wait for the
    prompt's history entry."""
    forget_earlier_results(host)
    before = set(host.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    for _ in range(3600):
        new = set(host.get("/history")) - before
        if new:
            (prompt_id,) = new
            return host.get(f"/history/{prompt_id}")[prompt_id]
        page.wait_for_timeout(250)
    raise TimeoutError("the prompt queued from the UI did not finish in 15 minutes")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_readably_runs_and_shows_its_result(ui, path):
    host, page = ui
    workflow = json.loads(path.read_text())
    assert any(n["type"] == "Note" and n["widgets_values"][0].strip() for n in workflow["nodes"])
    page.gpen_log.clear()
    page.evaluate(CLEAR_TOASTS_JS)
    result = page.evaluate(LOAD_JS, workflow)
    page.evaluate(FIT_VIEW_JS)
    page.wait_for_timeout(1000)
    assert page.evaluate(TOASTS_JS) == []  # e.g. "Invalid workflow against zod schema"
    assert result["missing"] == []
    for node in workflow["nodes"]:  # the UI kept every widget value as saved; a newer host may
        saved = node.get("widgets_values")  # add widgets after them (0.33's Save Video: codec)
        if saved is not None:
            assert result["values"][str(node["id"])][:len(saved)] == saved, node["type"]
    view = page.evaluate(VIEW_JS)
    assert view["zoom"] >= READABLE_ZOOM, view["zoom"]
    for box in view["boxes"]:
        assert inside(box["box"], view["visible"]), box

    if any(n["type"] in UNAVAILABLE for n in workflow["nodes"]):
        # Only the missing SD checkpoint may be refused; our nodes validate.
        status, body = host.post_prompt(result["api"])
        assert status == 400
        refused = {body["node_errors"][k]["class_type"] for k in body["node_errors"]}
        assert refused <= UNAVAILABLE, body
        save_screenshot(page, path.stem, view)
        assert page.gpen_log == [], page.gpen_log
        return
    entry = run_from_ui(host, page)
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_timeout(1500)  # the result loads into its node
    view = page.evaluate(VIEW_JS)
    save_screenshot(page, path.stem, view)
    boxes = view["boxes"]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not overlaps(a["box"], b["box"]), (a, b)
    assert view["results"] and all(r["loaded"] and r["shown"] for r in view["results"]), view["results"]
    notices = page.evaluate(NOTICES_JS)
    for node in workflow["nodes"]:  # every node of ours that runs says what it did, on the node
        if node["type"] in ("GPENDetectFaces", "GPENRestore", "GPENPasteBack", "GPENRestoreVideo"):
            text = notices[str(node["id"])]
            assert text and text in page.inner_text("body"), (node["type"], text)
    assert page.gpen_log == [], page.gpen_log  # no console error, no 404 among them
    saved = [item for out in entry["outputs"].values() for item in out.get("images", [])
             if item["type"] == "output"]
    assert saved, entry["outputs"]
    shutil.copy(host.base / "output" / saved[0]["subfolder"] / saved[0]["filename"],
                ARTIFACTS / f"{path.stem}_output{(host.base / 'output' / saved[0]['filename']).suffix}")


def test_templates_browser_shows_each_workflow_with_its_thumbnail(ui):
    """Workflow > Browse Templates, the pack's category: one card per workflow, each thumbnail
    loaded (frontend 1.32.9 asks for NAME.jpg beside NAME.json), no console error."""
    host, page = ui
    page.gpen_log.clear()
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text(PACK, exact=True).first.click()
    page.wait_for_timeout(2500)
    cards = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
        .map(card => ({text: card.innerText, images: [...card.querySelectorAll('img')]
                       .map(img => ({name: img.alt, src: img.src, loaded: img.complete && img.naturalWidth > 0}))}))""")
    page.screenshot(path=str(ARTIFACTS / "templates_browser.png"))  # not a graph: no .json
    # Its close button (Escape does not close it): labelled in frontend 1.49, placed in 1.32.
    page.locator("[role=dialog] button[aria-label='Close dialog'], [role=dialog] button.right-6").first.click()
    page.wait_for_selector("[role=dialog]", state="detached", timeout=5000)
    # Each card shows its own picture (fetched, then shown from a blob), not the placeholder.
    thumbnails = {img["name"]: img["loaded"] and "default-template" not in img["src"]
                  for card in cards for img in card["images"]}
    assert thumbnails == {p.stem: True for p in WORKFLOWS}, cards
    for path in WORKFLOWS:
        with urllib.request.urlopen(f"{host.url}/api/workflow_templates/{PACK}/{path.stem}.jpg") as answer:
            assert answer.headers["Content-Type"] == "image/jpeg"
            assert answer.read() == path.with_suffix(".jpg").read_bytes()
    for path in WORKFLOWS:  # each card is titled by its file name (1.32.9 adds it, spaced, below)
        assert any(path.stem in card["text"].split("\n") for card in cards), cards
    assert page.gpen_log == [], page.gpen_log


def test_workflow_saved_before_new_inputs_still_runs(ui):
    host, page = ui
    old = json.loads(OLD_WORKFLOW.read_text())
    paste = next(n for n in old["nodes"] if n["type"] == "GPENPasteBack")
    assert paste["widgets_values"] == [0.15]  # from before color_correction, blend, upscale, mask
    page.evaluate(CLEAR_TOASTS_JS)
    page.gpen_log.clear()
    result = page.evaluate(LOAD_JS, old)
    page.wait_for_timeout(1000)
    assert page.evaluate(TOASTS_JS) == [] and result["missing"] == []
    live = result["values"][str(paste["id"])]
    assert live == [0.15, True, "multiband", 1.0, "face ellipse"]  # new inputs got their defaults
    status, body = host.post_prompt(result["api"])
    assert status == 200, body
    assert host.wait(body["prompt_id"], timeout=600)["status"]["status_str"] == "success"


def search(page, text: str) -> list[str]:
    """The node names the UI's node search lists for ``text``, in order (double-click on an empty
    canvas, type, read the options: li elements in frontend 1.32.9, divs in 1.49.6)."""
    page.keyboard.press("Escape")
    page.evaluate(CLEAR_TOASTS_JS)
    page.evaluate("() => window.app.graph.clear()")  # double-click empty canvas, not a node
    box = "input[role=combobox], .litegraph .comfy-search input, input[placeholder*='Search']"
    for _ in range(3):  # on a busy machine a double-click now and then reads as two clicks
        page.mouse.click(960, 540)  # the canvas has the focus (not a panel a run opened)
        page.wait_for_timeout(300)
        page.mouse.dblclick(960, 540)
        try:
            page.wait_for_selector(box, timeout=2000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    else:
        page.screenshot(path=str(ARTIFACTS / "node_search.png"))
        raise AssertionError("a double-click on the empty canvas did not open the node search "
                             "(test-artifacts/ui/node_search.png)")
    page.keyboard.type(text)
    page.wait_for_timeout(1200)
    found = page.evaluate("() => [...document.querySelectorAll('[role=option]')]"
                          ".map(e => e.innerText.split('\\n')[0].trim()).filter(t => t)")
    page.keyboard.press("Escape")
    return found


def test_node_search_finds_the_pack(ui):
    """Typing 'gpen' in the UI's node search lists the pack's five nodes first; on a host whose
    schema carries search aliases (0.33; 0.3.75's frontend searches names only), so does
    'face restore'."""
    host, page = ui
    ours = {"Load GPEN Model", "Detect Faces", "GPEN Restore 2048", "Paste Back", "GPEN Restore Video"}
    found = search(page, "gpen")
    assert set(found[:5]) == ours, found
    if "search_aliases" in host.get("/object_info/GPENRestore")["GPENRestore"]:
        found = search(page, "face restore")
        assert set(found[:5]) == ours, found


def test_missing_model_is_reported_in_the_ui_before_anything_runs(ui):
    """A shared workflow naming a model this install does not have: Run shows ComfyUI's
    validation error with the folder and the download URL, and nothing is queued."""
    host, page = ui
    workflow = json.loads((REPO / "workflows" / "restore_faces_in_a_photo.json").read_text())
    loader = next(n for n in workflow["nodes"] if n["type"] == "GPENModelLoader")
    loader["widgets_values"][0] = "GPEN-BFR-1024-v2.pth"
    page.evaluate(CLEAR_TOASTS_JS)
    page.evaluate(LOAD_JS, workflow)
    history = set(host.get("/history"))
    page.gpen_log.clear()
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_timeout(1500)
    details = page.get_by_role("button", name="View details")
    if details.count():  # frontend 1.49: an errors panel, each node's message behind its info button
        details.click()
        page.get_by_role("button", name=re.compile(r"^Info for Load GPEN Model")).first.click()
        page.wait_for_timeout(800)
    shown = page.inner_text("body")
    page.screenshot(path=str(ARTIFACTS / "missing_model.png"))
    page.keyboard.press("Escape")
    assert "GPEN-BFR-1024-v2.pth" in shown and str(host.base / "models" / "facerestore_models") in shown, shown
    assert "modelscope.cn" in shown and "public-vigen-video" in shown, shown  # where to get one
    assert set(host.get("/history")) == history and not host.get("/queue")["queue_pending"]
