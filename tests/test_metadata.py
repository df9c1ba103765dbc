"""Registry metadata and the model list agree with what the code expects."""

import json
import tomllib

from conftest import REPO
from gpen.faces import RETINAFACE_FILES, RETINAFACE_URL
from gpen.loader import OFFICIAL_URLS
from gpen.parsing import PARSERS


def test_pyproject_has_registry_fields():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "comfyui-gpen" and meta["project"]["version"]
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert not any(d.split("=")[0].split("<")[0].split(">")[0].strip() == "torch"
                   for d in meta["project"]["dependencies"])
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    packages = [line for line in lines if line and not line.startswith("#")]
    assert not any(p.startswith("torch") for p in packages)


def test_model_list_matches_the_code():
    models = json.loads((REPO / "model-list.json").read_text())["models"]
    by_file = {m["filename"]: m for m in models}
    for model in models:
        assert {"name", "type", "save_path", "filename", "url", "size"} <= set(model)
    assert by_file["GPEN-BFR-512.pth"]["url"] == OFFICIAL_URLS[512]
    for _, filename in RETINAFACE_FILES.values():
        assert by_file[filename]["url"] == RETINAFACE_URL + filename
        assert by_file[filename]["save_path"] == "facedetection"
    for filename, url in PARSERS.values():
        assert by_file[filename]["url"] == url + filename


def test_compare_pastes_every_model_at_its_detail():
    """compare pastes at upscale 2, so 1024 and 2048 faces are not shrunk to the photo's pixels
    (at upscale 1 they would look like the 512 one)."""
    workflow = json.loads((REPO / "workflows" / "compare_gpen_512_1024_2048.json").read_text())
    pastes = [node for node in workflow["nodes"] if node["type"] == "GPENPasteBack"]
    assert len(pastes) == 3
    for node in pastes:
        widgets = [i["name"] for i in node["inputs"] if i.get("widget")]
        assert node["widgets_values"][widgets.index("upscale")] >= 2


def test_restorer_comparison_names_the_files_users_have_and_says_codeformers_terms():
    """compare_gpen_gfpgan_codeformer: one detection, the three models under their release file
    names, CodeFormer's fidelity on its restore node, and a note saying CodeFormer is optional
    and non-commercial."""
    workflow = json.loads((REPO / "workflows" / "compare_gpen_gfpgan_codeformer.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    loaders = {node["widgets_values"][0]: node["id"] for node in nodes.values() if node["type"] == "GPENModelLoader"}
    assert set(loaders) == {"GPEN-BFR-512.pth", "GFPGANv1.4.pth", "codeformer.pth"}
    assert sum(node["type"] == "GPENDetectFaces" for node in nodes.values()) == 1
    assert sum(node["type"] == "GPENPasteBack" for node in nodes.values()) == 3
    restores = [node for node in nodes.values() if node["type"] == "GPENRestore"]
    for node in restores:
        widgets = [i["name"] for i in node["inputs"] if i.get("widget")]
        assert widgets[-1] == "fidelity" and len(node["widgets_values"]) == len(widgets)
    [note] = [node["widgets_values"][0] for node in nodes.values() if node["type"] == "Note"]
    assert "spandrel_extra_arches" in note and "non-commercial" in note
    assert all(name in note for name in loaders)
