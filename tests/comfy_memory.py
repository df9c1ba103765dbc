"""One ComfyUI memory-manager scenario, run in a fresh process by tests/test_memory.py.

    python tests/comfy_memory.py '{"flags": ["--lowvram"], "gpu_gib": 4, ...}'

The real ComfyUI 0.3.75 modules (``comfy.model_management``, ``comfy.model_patcher``, the V3
node API) and the pack's real nodes, with a stand-in GPU: the ``meta`` device, whose free memory
is the card's size minus what other processes hold minus the bytes of every tracked model's
tensors now on it. ComfyUI's CLI flags are parsed as its main.py does, with ``--cpu`` so that
nothing asks CUDA; the VRAM state those flags give on a GPU host is then set (on a CPU host
ComfyUI would say DISABLED). The only functions replaced are ComfyUI's device queries
(``get_torch_device``, ``get_free_memory``), the two constants ComfyUI sets for NVIDIA hosts,
``Tensor.to``/``cpu`` off ``meta`` (which holds no values) and, for the precision cases, torch's CUDA
property queries. Prints one JSON line: what the scenario observed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


VRAM_FLAGS = ("--lowvram", "--novram")


def start_comfy(comfy_dir: str, flags: list[str]):
    """Import ComfyUI's model management with ``flags`` parsed as main.py parses them. ``--cpu``
    keeps CUDA out of it; the VRAM flags, which argparse refuses beside ``--cpu``, are set on
    the parsed arguments before the import, where ComfyUI derives its VRAM state from them."""
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = ["main.py", "--cpu", *(f for f in flags if f not in VRAM_FLAGS)]
    import comfy.cli_args

    for flag in VRAM_FLAGS:
        setattr(comfy.cli_args.args, flag[2:], flag in flags)
    import comfy.model_management as mm

    return mm


def import_pack():
    spec = importlib.util.spec_from_file_location("comfyui_gpen", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_gpen"] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module("comfyui_gpen.nodes")


class StandInGPU:
    """``meta`` as the GPU: free memory = card - other processes - tracked tensors on it."""

    def __init__(self, mm, gib: float, others_gib: float):
        self.mm = mm
        self.total = int(gib * GIB)
        self.others = int(others_gib * GIB)
        self.modules: list[torch.nn.Module] = []
        self.cpu_free = mm.get_free_memory
        mm.vram_state = mm.set_vram_to  # what --lowvram/--novram (or nothing) give on a GPU host
        mm.MIN_WEIGHT_MEMORY_RATIO, mm.NUM_STREAMS = 0.0, 2  # ComfyUI's values on an NVIDIA host
        mm.get_torch_device = lambda: torch.device("meta")
        mm.get_free_memory = self.free
        torch.Tensor.to = offloadable_to(torch.Tensor.to)
        real_cpu = torch.Tensor.cpu
        torch.Tensor.cpu = lambda t, *a, **k: t.to("cpu") if t.device.type == "meta" else real_cpu(t, *a, **k)

    def used(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules
                   for t in (*m.parameters(), *m.buffers()) if t.device.type == "meta")

    def free(self, dev=None, torch_free_too=False):
        if dev is not None and torch.device(dev).type == "cpu":
            return self.cpu_free(dev, torch_free_too)
        free = self.total - self.others - self.used()
        return (free, 0) if torch_free_too else free


def offloadable_to(real_to):
    """Tensor.to that can also copy off the stand-in GPU: ``meta`` holds no values, so an
    offload to the CPU gives an uninitialised tensor of the same shape, dtype and strides (the
    values are never read: the forward runs on meta again after a reload)."""

    def to(self, *args, **kwargs):
        if self.device.type == "meta":
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None and device.type != "meta":
                return torch.empty_strided(self.shape, self.stride(), dtype=dtype or self.dtype,
                                           device=device)
        return real_to(self, *args, **kwargs)
    return to


def on_meta(module: torch.nn.Module) -> tuple[int, int]:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.device.type == "meta" for t in tensors), len(tensors)


def faces_image(count: int, size: int):
    """A black frame with ``count`` faces' landmarks (GPEN's template) in a grid."""
    from comfyui_gpen.gpen.align import template
    from comfyui_gpen.gpen.faces import Face, FaceSet

    side = int(np.ceil(np.sqrt(count)))
    cell = 160
    image = torch.zeros(1, side * cell, side * cell, 3)
    faces = []
    for k in range(count):
        points = template(512) * (cell / 512) + [cell * (k % side), cell * (k // side)]
        box = (*points.min(0), *points.max(0))
        faces.append(Face(box=tuple(float(v) for v in box), score=0.99, landmarks=points))
    return image, FaceSet(image_size=(side * cell, side * cell), frames=[faces])


def restore_on_stand_in(nodes, patcher, faces: int, batch_size: int) -> dict:
    """GPENRestore.execute as the UI runs it. The generator really runs on ``meta`` (shapes
    only); a forward hook records where every weight is at each forward, then hands back zeros
    on the CPU in place of the meta output (meta tensors hold no values to copy back)."""
    model = patcher.model
    seen = []

    def check(module, args):
        seen.append({"batch": args[0].shape[0], "input": args[0].device.type,
                     "misplaced": len(nodes.execution.misplaced_tensors(module, "meta"))})

    def to_cpu(module, args, output):
        return torch.zeros(output.shape, dtype=output.dtype)

    hooks = [model.register_forward_pre_hook(check), model.register_forward_hook(to_cpu)]
    image, face_set = faces_image(faces, model.size)
    try:
        crops, _ = nodes.GPENRestore.execute(patcher, image, face_set, 1.0, batch_size).args
    finally:
        for hook in hooks:
            hook.remove()
    return {"forwards": seen, "crops": list(crops.shape)}


def dummy_diffusion_model(gib: float) -> torch.nn.Module:
    """Stands in for an SD checkpoint: plain layers totalling ``gib`` GiB of fp16 weights."""
    layers = max(1, round(gib * 4))
    per_layer = int(gib * GIB / 2 / layers) // 4096
    net = torch.nn.Sequential(*(torch.nn.Linear(4096, per_layer, bias=False, device="meta",
                                                dtype=torch.float16) for _ in range(layers)))
    return net.to_empty(device="cpu")  # never written: costs no real memory


def run(spec: dict) -> dict:
    mm = start_comfy(spec["comfy_dir"], spec.get("flags", []))
    gpu = StandInGPU(mm, spec.get("gpu_gib", 8), spec.get("others_gib", 0))
    nodes = import_pack()
    import comfy.model_patcher

    from comfyui_gpen.gpen import FullGenerator, GPENConfig

    result: dict = {"vram_state": mm.vram_state.name}
    if "precision" in spec:
        if spec.get("native_bf16"):  # a CPU with AMX / AVX512-BF16, whatever this one has
            nodes.execution.cpu_has_native_bf16 = lambda: True
        return {**result, **precision_cases(mm, nodes, spec["precision"])}
    torch.manual_seed(0)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[spec.get("dtype", "fp16")]
    model = FullGenerator(GPENConfig(spec["size"])).eval().requires_grad_(False).to(dtype)
    patcher = nodes.generator_patcher(model)
    gpu.modules.append(model)
    result["model_mib"] = patcher.model_size() / 2**20
    result["per_face_mib"] = nodes.activation_bytes(model, dtype) / 2**20
    sd = None
    if spec.get("sd_gib"):  # a diffusion model loaded first, as in a txt2img -> GPEN workflow
        sd_model = dummy_diffusion_model(spec["sd_gib"])
        sd = comfy.model_patcher.ModelPatcher(sd_model, load_device=torch.device("meta"),
                                              offload_device=torch.device("cpu"))
        gpu.modules.append(sd_model)
        mm.load_models_gpu([sd])
        result["sd_on_gpu_before"] = on_meta(sd_model)
    result["free_before_gib"] = gpu.free() / GIB
    result["restore"] = restore_on_stand_in(nodes, patcher, spec["faces"], spec["batch_size"])
    result["free_after_gib"] = gpu.free() / GIB
    if sd is not None:  # the next sampling run takes the VRAM back, then GPEN runs again
        mm.load_models_gpu([sd], memory_required=gpu.free())
        result["gpen_after_sd_reload"] = on_meta(model)
        result["restore_again"] = restore_on_stand_in(nodes, patcher, spec["faces"], spec["batch_size"])
    if spec.get("detector"):
        from comfyui_gpen.gpen.faces import load_detector

        net = load_detector(spec["detector"], (), "cpu").net
        gpu.modules.append(net)
        nodes.load_helper_net(net)
        result["detector_loaded"] = on_meta(net)
        result["detector_device_attr"] = str(net.device)
    mm.unload_all_models()  # the UI's "Unload Models"
    result["gpen_after_unload"] = on_meta(model)
    if spec.get("detector"):
        result["detector_after_unload"] = on_meta(net)
    return result


def precision_cases(mm, nodes, cases: list[dict]) -> dict:
    """``auto`` precision for CUDA cards described by name and compute capability (torch's
    property queries answer for them; everything else is ComfyUI's own decision code), and for
    the CPU."""
    out = {}
    mm.cpu_state = mm.CPUState.GPU  # as on a CUDA host; the flags stay as parsed
    for case in cases:
        if case["device"] == "cpu":
            out[case["name"]] = str(nodes.auto_dtype(torch.device("cpu")))
            continue
        props = types.SimpleNamespace(name=case["gpu"], major=case["cc"][0], minor=case["cc"][1])
        torch.cuda.get_device_properties = lambda device=None, props=props: props
        torch.cuda.is_bf16_supported = lambda *a, cc=case["cc"], **k: cc[0] >= 8
        out[case["name"]] = str(nodes.auto_dtype(torch.device("cuda", 0)))
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
