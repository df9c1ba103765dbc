"""Load GPEN generators safely and work out their architecture from the weights alone.

Pickles are read with ``torch.load(weights_only=True)`` only, so a checkpoint cannot run code.
Every hyperparameter comes from key names and tensor shapes (as spandrel does), so users never
pass a size and file names are never trusted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .arch import FullGenerator, GPENConfig

OFFICIAL_URLS = {
    512: "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/GPEN-BFR-512.pth",
    1024: "https://www.modelscope.cn/models/damo/cv_gpen_image-portrait-enhancement-hires "
          "(pytorch_model.pt)",
    2048: "https://www.modelscope.cn/models/damo/cv_gpen_image-portrait-enhancement-hires "
          "(pytorch_model-2048.pt)",
}
WHERE_TO_GET = (f"Get GPEN-BFR-512.pth from {OFFICIAL_URLS[512]} (1024 and 2048: "
                f"{OFFICIAL_URLS[1024].split(' ')[0]}) and put it in ComfyUI/models/facerestore_models.")
CONTAINER_KEYS = ("g_ema", "params_ema", "params", "state_dict", "model", "net")
PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
ONNX_SUFFIXES = {".onnx"}

# Keys only another architecture has, to tell users what they actually gave us (spandrel loads
# the face restorers among them; these name them when it cannot).
FOREIGN_SIGNATURES = (
    (("conv_body_first.weight",), "GFPGAN"),
    (("stylegan_decoder.style_mlp.1.weight",), "GFPGAN"),
    (("quantize.embedding.weight", "ft_layers.0.self_attn.in_proj_weight"), "CodeFormer"),
    (("quantize.embedding.weight",), "a VQ face restorer such as RestoreFormer"),
    (("ClassHead.0.conv1x1.weight",),
     "a RetinaFace face detector: it belongs in models/facedetection and is chosen in Detect Faces"),
    (("style.1.weight", "to_rgb1.conv.weight"),
     "a plain StyleGAN2 generator without GPEN's encoder (ecd0, final_linear)"),
)
REQUIRED_KEYS = ("generator.input.input", "generator.style.1.weight", "ecd0.0.0.weight",
                 "final_linear.0.weight")


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message says which file and what to do."""


def download_source(name: str) -> str:
    """Where to get the checkpoint ``name``: its own URL for an official GPEN-BFR file name,
    else the URLs of all three."""
    size = re.fullmatch(r"GPEN-BFR-(\d+)\.\w+", name)
    if size and int(size.group(1)) in OFFICIAL_URLS:
        return f"it is at {OFFICIAL_URLS[int(size.group(1))]}"
    return (f"GPEN-BFR-512.pth is at {OFFICIAL_URLS[512]}, GPEN-BFR-1024/2048 at "
            f"{OFFICIAL_URLS[1024].split(' ')[0]}")


def missing_model_message(name: str, folders: list[str], available: list[str]) -> str:
    """Why ``name`` cannot be loaded, worded for both a file the user never had (nothing there
    yet: a first run of a shared workflow) and one that went away (moved, renamed, deleted)."""
    where = " or ".join(folders) or "ComfyUI/models/facerestore_models"
    get = (f"download '{name}' into {where} ({download_source(name)}), then press R in the UI to "
           f"refresh the list")
    if not available:
        return f"No GPEN model is installed yet, so '{name}' cannot be loaded: {get}."
    return (f"GPEN model '{name}' is not in {where}, which holds {', '.join(available)}. Pick one of "
            f"those; if '{name}' was there before, it was moved, renamed or deleted: put it back; if "
            f"you never had it, {get}.")


def read_state_dict(path: str | Path, fix: str = WHERE_TO_GET) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a weights-only pickle, refusing anything else.

    ``fix`` is the what-to-do sentence that ends every error (where to get a good file).
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ModelLoadError(f"GPEN model file not found: {path}. It may have been moved or deleted "
                             f"since the list was shown; refresh the node list. {fix}")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES or _looks_like_onnx(path):
        raise ModelLoadError(f"{name} is an ONNX model (the format ReActor ships); this pack runs the "
                             f"PyTorch checkpoint instead, with no onnxruntime. {fix}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{name} is empty (0 bytes): the download did not finish. {fix}")
    if suffix == ".safetensors":
        return _read_safetensors(path, fix)
    return _read_pickle(path, fix)


def _looks_like_onnx(path: Path) -> bool:
    """An ONNX ModelProto opens with field 1 (ir_version) as a varint: byte 0x08."""
    if path.suffix.lower() == ".safetensors":
        return False
    with path.open("rb") as f:
        return f.read(1) == b"\x08"


def _read_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file ({e}); it is probably "
                             f"truncated. {fix}") from e


def _read_pickle(path: Path, fix: str) -> Mapping:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean the same here
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text) if "Weights only load failed" in text else None
        if found:
            raise ModelLoadError(
                f"{path.name} was refused: its pickle asks for {found.group(1)}, i.e. Python objects "
                f"or code, not just tensors, so it was not loaded and nothing in it ran. Use a "
                f"checkpoint from a trusted source. {fix}") from None
        detail = ("not a plain weights pickle" if "Weights only load failed" in text
                  else text.splitlines()[0] if text else type(e).__name__)
        raise ModelLoadError(
            f"{path.name} could not be read as a PyTorch checkpoint ({detail}). The file is "
            f"truncated, corrupt or not a checkpoint; download it again. {fix}") from None


def canonicalize(obj: object, name: str = "state dict") -> dict[str, torch.Tensor]:
    """Unwrap the usual training containers and ``module.`` prefixes into flat tensors."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{name} holds a {type(obj).__name__}, not a dictionary of weights. "
                             f"{WHERE_TO_GET}")
    while True:
        wrapped = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapped is None:
            mappings = [v for v in obj.values() if isinstance(v, Mapping)]
            has_tensors = any(isinstance(v, torch.Tensor) for v in obj.values())
            wrapped = mappings[0] if len(mappings) == 1 and not has_tensors else None
        if wrapped is None:
            break
        obj = wrapped
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def identify_foreign(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the architecture of a non-GPEN state dict, when we know it."""
    for keys, what in FOREIGN_SIGNATURES:
        if all(k in state_dict for k in keys):
            return what
    return None


def is_gpen(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the tensors are meant as a GPEN generator (complete or not): any of its own keys."""
    return any(k in state_dict for k in REQUIRED_KEYS)


def detect_config(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> GPENConfig:
    """Infer every FullGenerator argument from key names and tensor shapes."""
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        foreign = identify_foreign(state_dict)
        if foreign:
            raise ModelLoadError(f"{name} is not a GPEN model: this looks like {foreign}. {WHERE_TO_GET}")
        raise ModelLoadError(f"{name} is not a GPEN generator: key '{missing[0]}' is missing "
                             f"({len(state_dict)} tensors found). {WHERE_TO_GET}")

    encoders = {int(m.group(1)) for k in state_dict if (m := re.match(r"ecd(\d+)\.", k))}
    size = 2 ** (len(encoders) + 1)
    n_mlp = sum(1 for k in state_dict if re.fullmatch(r"generator\.style\.\d+\.weight", k))
    style_dim = state_dict["generator.style.1.weight"].shape[0]
    narrow = state_dict["generator.input.input"].shape[1] / 512
    channel_multiplier = 2  # only widths at 64 px and above depend on it
    if size >= 64:
        index = int(math.log2(size)) - 6  # the encoder stage whose output is 64x64
        key = "ecd0.0.0.weight" if index == 0 else f"ecd{index}.0.1.weight"
        if key not in state_dict:
            raise ModelLoadError(f"{name} is an incomplete GPEN model: key '{key}' is missing. "
                                 f"Download the file again.")
        channel_multiplier = max(1, round(state_dict[key].shape[0] / (256 * narrow)))
    return GPENConfig(size=size, style_dim=style_dim, n_mlp=n_mlp,
                      channel_multiplier=channel_multiplier, narrow=narrow)


def check_layout(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Name the first missing, unexpected or mis-shaped tensor instead of a long torch dump."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise ModelLoadError(f"{name} is an incomplete or damaged GPEN model: key '{key}' is "
                                 f"missing. Download the file again.")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{name} is a damaged or modified GPEN model: '{key}' has shape "
                                 f"{list(state_dict[key].shape)}, expected {list(tensor.shape)}. "
                                 f"Download the file again.")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise ModelLoadError(f"{name} has tensors a GPEN generator does not have (first: "
                             f"'{extra[0]}'); it is another architecture or a modified model.")


def load_generator(source: str | Path | Mapping, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> FullGenerator:
    """Build a FullGenerator that matches ``source`` (a file or a state dict) and load it strictly.

    The returned module is in eval mode, frozen, and carries its detected ``config``.
    """
    if isinstance(source, Mapping):
        name, raw = "state dict", source
    else:
        name, raw = Path(source).name, read_state_dict(source)
    return load_gpen_state_dict(canonicalize(raw, name), name, device, dtype)


def load_gpen_state_dict(state_dict: Mapping[str, torch.Tensor], name: str, device: str | torch.device,
                         dtype: torch.dtype) -> FullGenerator:
    """``load_generator`` for tensors already read and unwrapped (``canonicalize``)."""
    config = detect_config(state_dict, name)
    with torch.device("meta"):
        model = FullGenerator(config)
    check_layout(model, state_dict, name)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model
