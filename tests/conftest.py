"""Shared fixtures: reference data, real photos, generated GPEN weights, and a real ComfyUI host."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data"  # golden tensors and checkpoint manifests (see its README)
COMFY_DIR = Path(os.environ.get("GPEN_COMFY_DIR", REPO / ".host" / "ComfyUI"))


def random_state_dict(manifest: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the exact key/shape layout of a released checkpoint, values random.

    Blur kernels get their real values: they are fixed buffers, not learned.
    """
    from gpen.arch import blur_kernel

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in manifest["keys"].items():
        if key.endswith("kernel"):
            gain = 1.0 if key.startswith("ecd") else 4.0
            out[key] = blur_kernel(gain)
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.1
    return out


@pytest.fixture(scope="session")
def manifests() -> dict[int, dict]:
    return {s: json.loads((REFERENCE / f"manifest_{s}.json").read_text()) for s in (512, 1024, 2048)}


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def as_image(rgb: np.ndarray) -> torch.Tensor:
    """An HxWx3 uint8 picture as a one-frame ComfyUI IMAGE."""
    return torch.from_numpy(np.ascontiguousarray(rgb).astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="session")
def astro(astronaut) -> torch.Tensor:
    return as_image(astronaut)


@pytest.fixture(scope="session")
def frame_1080p(astronaut) -> torch.Tensor:
    """The astronaut scaled into a 1920x1080 frame (face about 400 px): a video-sized frame."""
    canvas = np.full((1080, 1920, 3), 128, np.uint8)
    canvas[:, 420:1500] = cv2.resize(astronaut, (1080, 1080), interpolation=cv2.INTER_CUBIC)
    return as_image(canvas)


@pytest.fixture(scope="session")
def mtcnn():
    from gpen.faces import load_detector

    return load_detector("mtcnn")


@pytest.fixture(scope="session")
def gpen512_file(tmp_path_factory, manifests) -> Path:
    path = tmp_path_factory.mktemp("weights") / "GPEN-BFR-512.pth"
    torch.save(random_state_dict(manifests[512]), path)
    return path


def face_arches() -> dict[str, type]:
    """The face architectures spandrel builds, by name (their classes, release hyperparameters
    as defaults)."""
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel.architectures.RestoreFormer import RestoreFormer
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    return {"GFPGAN": GFPGAN, "RestoreFormer": RestoreFormer, "CodeFormer": CodeFormer}


FACE_ARCHES = tuple(face_arches())


@pytest.fixture(scope="session")
def face_weights(tmp_path_factory):
    """name -> (name, reference net, .pth path, .safetensors path) of a GFPGAN, RestoreFormer or
    CodeFormer with random weights in its released layout (spandrel's own class), built once."""
    from safetensors.torch import save_file

    built = {}

    def get(name: str) -> tuple[str, torch.nn.Module, Path, Path]:
        if name not in built:
            torch.manual_seed(0)
            net = face_arches()[name]().eval().requires_grad_(False)
            folder = tmp_path_factory.mktemp(name)
            state_dict = {k: v.contiguous() for k, v in net.state_dict().items()}
            torch.save({"params_ema": state_dict}, folder / f"{name}.pth")  # as the releases wrap it
            save_file(state_dict, str(folder / f"{name}.safetensors"))
            built[name] = name, net, folder / f"{name}.pth", folder / f"{name}.safetensors"
        return built[name]
    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    """A real ComfyUI server started by ``command``, driven over its HTTP API.

    It must start cleanly: an ``IMPORT FAILED`` in its log (a core node or a custom node that
    did not load) fails the start, so every host a test uses proves a clean install.
    """

    def __init__(self, base: Path, command: list[str], cwd: Path, port: int,
                 env: dict[str, str] | None = None, start_timeout: float = 180):
        self.base = base
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = base / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_serving(start_timeout)
            failures = [line.strip() for line in self.log_path.read_text().splitlines()
                        if "IMPORT FAILED" in line]
            assert not failures, f"ComfyUI reported {failures}; see {self.log_path}"
        except BaseException:
            self.stop()
            raise

    @classmethod
    def with_pack(cls, base: Path) -> ComfyHost:
        """COMFY_DIR run by this Python, with this checkout linked into ``base/custom_nodes``."""
        for sub in ("custom_nodes", "input", "output", "user", "models/facerestore_models",
                    "models/facedetection"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "comfyui-gpen").symlink_to(REPO, target_is_directory=True)
        port = free_port()
        return cls(base, [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                          "--base-directory", str(base), "--database-url", f"sqlite:///{base}/user/comfyui.db"],
                   cwd=COMFY_DIR, port=port)

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start-up; see {self.log_path}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log_path}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post_prompt(self, graph: dict, client_id: str | None = None) -> tuple[int, dict]:
        body = {"prompt": graph, **({"client_id": client_id} if client_id else {})}
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue a graph and wait for its history entry (status + outputs)."""
        status, body = self.post_prompt(graph)
        assert status == 200, body
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def stop(self) -> None:
        """End the server and anything it started (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> ComfyHost:
    if not (COMFY_DIR / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {COMFY_DIR}: run `bash scripts/setup.sh` first, or set "
                           f"GPEN_COMFY_DIR.")
    server = ComfyHost.with_pack(tmp_path_factory.mktemp("comfy"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def served(host, gpen512_file, astronaut):
    """The host with a random-weight GPEN-BFR-512 and two input pictures."""
    shutil.copy(gpen512_file, host.base / "models" / "facerestore_models" / "GPEN-BFR-512.pth")
    cv2.imwrite(str(host.base / "input" / "astronaut.png"), astronaut[..., ::-1])
    ramp = np.tile(np.linspace(30, 220, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    cv2.imwrite(str(host.base / "input" / "no_face.png"), ramp)
    models = host.base / "models" / "facerestore_models"
    (models / "evil.pth").write_bytes(_evil_pickle(host.base / "pwned"))
    (models / "empty.pth").write_bytes(b"")
    (models / "noise.pth").write_bytes(np.random.default_rng(0).bytes(5000))
    (models / "GPEN-BFR-512.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    torch.save({"conv_body_first.weight": torch.zeros(1)}, models / "GFPGANv1.4-truncated.pth")
    from gpen import FullGenerator, GPENConfig

    torch.manual_seed(0)
    tiny = FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16))
    torch.save(tiny.state_dict(), models / "GPEN-tiny-64.pth")
    return host


def _evil_pickle(marker) -> bytes:
    """A checkpoint whose unpickling would run ``touch marker``."""
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    buffer = io.BytesIO()
    torch.save({"x": Exploit()}, buffer)
    return buffer.getvalue()
