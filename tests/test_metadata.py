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
