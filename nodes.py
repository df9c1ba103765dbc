"""ComfyUI nodes: thin wrappers that parse inputs, call gpen/, and wrap the outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from typing_extensions import override

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

# The one place that picks the node API: the versioned v0_0_2 API where the host has it (what
# current ComfyUI asks packs to pin), else `latest` (hosts from before the versioned APIs).
try:
    from comfy_api.v0_0_2 import ComfyExtension, InputImpl, io
except ImportError:
    from comfy_api.latest import ComfyExtension, InputImpl, io

# Inputs added after a node's first release are optional with defaults, so API prompts and
# workflows saved before them keep validating and running unchanged.

from .gpen import ModelLoadError, execution, notices, pipeline
from .gpen import image as im
from .gpen.engine import Frame, FrameEngine, Restorer
from .gpen.faces import load_detector, retinaface_path
from .gpen.files import video_frames
from .gpen.options import (BLENDS, DETECTORS, MASKS, ORDERS, VIDEO_REDETECT_EVERY, VIDEO_SMOOTHING,
                           DetectOptions, PasteOptions, RestoreOptions, parse_indices)
from .gpen.loader import missing_model_message
from .gpen.parsing import load_parser, parser_path
from .gpen.restorers import activation_bytes, load_face_model
from .gpen.video import AudioWaveform, Span, VideoInfo, VideoReader, VideoWriter

MODEL_FOLDER = "facerestore_models"  # shared with the other face-restore packs
DETECTOR_FOLDER = "facedetection"
WEIGHT_EXTENSIONS = {".pth", ".pt", ".safetensors"}
PRECISIONS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CATEGORY = "GPEN"
logger = logging.getLogger(__name__)

GPENModel = io.Custom("GPEN_MODEL")
Faces = io.Custom("FACES")
SEARCH_ALIASES = ["gpen", "face restore", "face enhance", "face restoration"]
# Share of the free memory a batch may plan to use: convolution workspaces and allocator
# fragmentation come on top of the live tensors the per-face estimate counts.
MEMORY_HEADROOM = 0.85


def _schema(**fields) -> io.Schema:
    """io.Schema plus search aliases on ComfyUI versions whose schema has them (newer than 0.3.75)."""
    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        fields["search_aliases"] = SEARCH_ALIASES
    return io.Schema(category=CATEGORY, hidden=[io.Hidden.unique_id], **fields)


def _register_folders() -> None:
    for folder, subdirs in ((MODEL_FOLDER, ("facerestore_models", "gpen")),
                            (DETECTOR_FOLDER, ("facedetection",))):
        for sub in subdirs:
            folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, sub))
        paths, _ = folder_paths.folder_names_and_paths[folder]
        folder_paths.folder_names_and_paths[folder] = (paths, WEIGHT_EXTENSIONS)


_register_folders()


def _progress_callback(total: int):
    """A ProgressBar that also honours the UI's cancel button at every update (``done`` may be
    fractional: faces part-way through a batch's forward)."""
    bar = comfy.utils.ProgressBar(total)

    def update(done: float, _total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)
    return update


def auto_dtype(load_device: torch.device) -> torch.dtype:
    """``auto`` precision: on a GPU, ComfyUI's own decisions for the device (fp16 where it is
    reliable, else bf16, else fp32: GTX 16xx, Pascal on Linux and --force-fp32 give fp32). On a
    CPU, bf16 where the CPU has native bf16 (AMX / AVX512-BF16), else fp32; --force-fp32 still
    forces fp32. (ComfyUI itself never picks bf16 on a CPU.)"""
    if mm.is_device_cpu(load_device):
        return torch.float32 if mm.FORCE_FP32 else execution.cpu_auto_dtype()
    if mm.should_use_fp16(load_device):
        return torch.float16
    if mm.should_use_bf16(load_device):
        return torch.bfloat16
    return torch.float32


def load_fully(patcher: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> None:
    """Load a model completely onto its load device through ComfyUI's memory manager.

    The pack's networks are plain torch modules, not comfy.ops layers, so ComfyUI can move them
    only whole: its partial load would leave most of GPEN's weights behind (63%) and the forward
    would crash. So they load the way ComfyUI loads its own such models (``force_full_load``, as
    comfy/sd.py does for CLIP). --novram overrides that with a layer-streaming load only comfy.ops
    layers can use; there the load is completed through the patcher's own ``partially_load``
    (what ComfyUI's LoadedModel calls), so ComfyUI still accounts for and can offload it.
    """
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    if execution.misplaced_tensors(patcher.model, patcher.load_device):
        patcher.partially_load(patcher.load_device, extra_memory=1e32)
    execution.check_on_device(patcher.model, patcher.load_device)


def free_memory_for(patcher: comfy.model_patcher.ModelPatcher) -> int:
    """What a new allocation on the patcher's load device can get. Under DynamicVRAM (ComfyUI
    0.33 with comfy-aimdo on a GPU) that is the free memory plus other models' resident weights,
    which aimdo evicts on demand, and ComfyUI sizes its own batches by it (samplers, VAE) through
    ``ModelPatcher.get_free_memory``; plain free memory would shrink batches for nothing. Hosts
    without that method (0.3.75) and CPUs: the free memory (it reads the first GPU for a CPU)."""
    device = patcher.load_device
    get_free = getattr(patcher, "get_free_memory", None)
    if callable(get_free) and not mm.is_device_cpu(device):
        return get_free(device)
    return mm.get_free_memory(device)


def batch_that_fits(patcher: comfy.model_patcher.ModelPatcher, per_face: int, batch_size: int) -> int:
    """The largest batch (at most ``batch_size``) whose activations fit in free memory: VRAM left
    by the loaded models, or available RAM on a CPU."""
    free = free_memory_for(patcher)
    if not mm.is_device_cpu(patcher.load_device):
        free -= mm.extra_reserved_memory()
    return max(1, min(batch_size, int(free * MEMORY_HEADROOM // per_face)))


def prepare_generator(patcher: comfy.model_patcher.ModelPatcher, faces: int, batch_size: int) -> int:
    """Load the generator fully, with room for the batches it will run, and return the batch
    size to use (capped by the number of faces and by free memory)."""
    model = patcher.model
    dtype = next(model.parameters()).dtype
    per_face = activation_bytes(model, dtype)
    batch = min(batch_size, faces)
    load_fully(patcher, memory_required=per_face * batch)
    return batch_that_fits(patcher, per_face, batch)


def generator_patcher(model: torch.nn.Module, compile: bool = False) -> comfy.model_patcher.ModelPatcher:
    """The GPEN_MODEL value: the restorer (NHWC, optionally compiled) under ComfyUI's memory
    manager, to be loaded onto ComfyUI's device when it runs and offloaded when others need it.
    A plain ModelPatcher, not CoreModelPatcher: under DynamicVRAM (0.33) that is the dynamic
    patcher, which leaves the parameters of non-leaf modules (GPEN's modulated convolution
    weights, 63% of them) on the GPU untracked."""
    model = model.to_channels_last()
    if compile:
        execution.enable_compile(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# Detectors and parsers are built once per process (cached by gpen.faces / gpen.parsing), and
# so are the patchers that put them under ComfyUI's memory manager.
_NET_PATCHERS: dict[torch.nn.Module, comfy.model_patcher.ModelPatcher] = {}


def load_helper_net(net: torch.nn.Module) -> None:
    """Put a detector or face parser (built on the CPU, cached for the process) under ComfyUI's
    memory manager and load it for use: "Unload Models" and a diffusion model's load offload it
    like any ComfyUI model. ModelPatcher keeps the net's ``device`` attribute, which facexlib and
    facenet-pytorch read, in step with its weights."""
    if net not in _NET_PATCHERS:
        _NET_PATCHERS[net] = comfy.model_patcher.ModelPatcher(
            net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    load_fully(_NET_PATCHERS[net])


# The options of each step, declared once: the step's own node and GPEN Restore Video share them.
def detect_inputs(smoothing: float = 0.0) -> list:
    return [
        io.Combo.Input("detector", options=list(DETECTORS), default="mtcnn",
                       tooltip="mtcnn: bundled weights, no download. retinaface_*: the GPEN "
                               "authors' detector; needs detection_Resnet50_Final.pth or "
                               "detection_mobilenet0.25_Final.pth in models/facedetection."),
        io.Float.Input("threshold", default=0.9, min=0.05, max=1.0, step=0.01,
                       tooltip="Minimum detection confidence."),
        io.Int.Input("max_faces", default=0, min=0, max=256,
                     tooltip="Keep at most this many faces per frame, after ordering "
                             "(0 = all)."),
        io.Combo.Input("order", options=list(ORDERS), default=ORDERS[0],
                       tooltip="How faces are ordered for max_faces and indices."),
        io.Int.Input("min_size", default=0, min=0, max=8192,
                     tooltip="Ignore faces whose box is smaller than this many pixels on its "
                             "shorter side."),
        io.String.Input("indices", default="",
                        tooltip="Only these faces, by position in the order, e.g. '0,2' "
                                "(empty = all)."),
        io.Float.Input("smoothing", default=smoothing, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Video: smooth each tracked face's landmarks over the frames "
                               "of the batch against flicker (0 = off, 0.9 = strong)."),
    ]


def restore_inputs() -> list:
    """The restoration options; ``fidelity`` goes last of the node's inputs (``fidelity_input``)."""
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                       tooltip="1 = fully restored face, 0 = the original; in between mixes "
                               "them (the authors use 0.8 for 2048)."),
        io.Int.Input("batch_size", default=4, min=1, max=64,
                     tooltip="Faces per forward pass, at most: lowered to what free memory "
                             "holds, and halved if the GPU still runs out of memory."),
    ]


def fidelity_input():
    return io.Float.Input("fidelity", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                          tooltip="CodeFormer only (its weight w): 0 = strongest restoration, 1 = "
                                  "closest to the input face. Other models ignore it.")


def paste_inputs() -> list:
    return [
        io.Float.Input("feather", default=0.15, min=0.01, max=0.5, step=0.01,
                       tooltip="Width of the mask's soft edge, relative to the face size."),
        io.Boolean.Input("color_correction", default=True, optional=True,
                         tooltip="Match the restored face's colour (mean and spread of luma and "
                                 "chroma) to the original face, against skin-tone drift."),
        io.Combo.Input("blend", options=list(BLENDS), default=BLENDS[0], optional=True,
                       tooltip="multiband: Laplacian-pyramid blend, no visible edge. alpha: "
                               "plain mask blend, changes exactly inside the mask."),
        io.Float.Input("upscale", default=1.0, min=1.0, max=4.0, step=0.25, optional=True,
                       tooltip="Enlarge the whole image by this factor and paste the faces at "
                               "their restored resolution, keeping 1024/2048 detail."),
        io.Combo.Input("mask", options=list(MASKS), default=MASKS[0], optional=True,
                       tooltip="face ellipse: no download. parsing: facexlib's face parsing "
                               "(parsing_bisenet.pth / parsing_parsenet.pth in "
                               "models/facedetection) follows hair and face outline."),
        io.UpscaleModel.Input("upscale_model", optional=True,
                              tooltip="Optional: enlarge the background with this model "
                                      "(Load Upscale Model) instead of bicubic."),
    ]


def detect_options(detector: str, threshold: float, max_faces: int, order: str, min_size: int, indices: str,
                   smoothing: float = 0.0, redetect_every: int = 1) -> DetectOptions:
    return DetectOptions(detector=detector, threshold=threshold, max_faces=max_faces, order=order,
                         min_size=float(min_size), indices=parse_indices(indices), smoothing=smoothing,
                         redetect_every=redetect_every)


def paste_options(feather: float, color_correction: bool = True, blend: str = BLENDS[0], upscale: float = 1.0,
                  mask: str = MASKS[0]) -> PasteOptions:
    return PasteOptions(feather=feather, colour=color_correction, blend=blend, upscale=upscale, mask=mask)


def load_face_detector(name: str):
    """A detector from models/facedetection (mtcnn: bundled), under ComfyUI's memory manager."""
    detector = load_detector(name, tuple(folder_paths.get_folder_paths(DETECTOR_FOLDER)), "cpu")
    load_helper_net(detector.net)
    return detector


def load_face_parser(options: PasteOptions):
    """The face parser the paste mask needs (None for the ellipse), under the memory manager."""
    if not options.parser:
        return None
    parser = load_parser(options.parser, tuple(folder_paths.get_folder_paths(DETECTOR_FOLDER)))
    load_helper_net(parser.net)
    return parser


def upscaler_for(upscale_model) -> pipeline.Upscaler:
    return pipeline.enlarge if upscale_model is None else _model_upscaler(upscale_model)


def missing_weights(detector: str | None = None, mask: str | None = None) -> str | bool:
    """For ``validate_inputs``: True when the weights the chosen detector and mask need are in
    models/facedetection, else the error (file, folder, URL), shown before anything runs."""
    folders = folder_paths.get_folder_paths(DETECTOR_FOLDER)
    try:
        if detector is not None and detector != "mtcnn":
            DetectOptions(detector=detector)
            retinaface_path(detector, folders)
        if mask is not None:
            parser = PasteOptions(mask=mask).parser
            if parser:
                parser_path(parser, folders)
    except ValueError as error:  # DetectorError, or a choice that does not exist
        return str(error)
    return True


def tell(node: type[io.ComfyNode], name: str, text: str) -> None:
    """What a node did, for the user: on the node in the UI (ComfyUI's progress text, shown
    under the node's widgets) and in the server log as ``name (node ID): text``."""
    node_id = node.hidden.unique_id if node.hidden is not None else None  # None: called from Python
    logger.info("%s (node %s): %s", name, node_id, text)
    server = sys.modules.get("server")  # ComfyUI's server module, once it is running the graph
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if node_id is not None and prompt_server is not None:
        prompt_server.send_progress_text(text, node_id)


def fidelity_note(model, fidelity: float) -> str:
    """A sentence for the node's notice when a fidelity other than the default was set for a
    model without one, else nothing."""
    if fidelity != RestoreOptions().fidelity and not model.has_fidelity:
        return " " + notices.fidelity_ignored(model.name)
    return ""


class LoadGPENModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="GPENModelLoader",
            display_name="Load GPEN Model",
            description="Loads a face restoration checkpoint (.pth or .safetensors) from "
                        "models/facerestore_models or models/gpen: GPEN-BFR 512/1024/2048, GFPGAN "
                        "v1.x, RestoreFormer, or CodeFormer (needs the optional spandrel_extra_arches; "
                        "CodeFormer is for non-commercial use only). The architecture, size and "
                        "alignment are read from the weights; pickles are loaded weights-only.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                               tooltip="GPEN-BFR-512/1024/2048, GFPGANv1.x, RestoreFormer or CodeFormer "
                                       "(non-commercial licence; needs pip install spandrel_extra_arches) "
                                       "in models/facerestore_models or models/gpen."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: on a GPU what ComfyUI picks for it (fp16 on most cards, "
                                       "fp32 on GTX 16xx/Pascal or with --force-fp32); on a CPU bf16 "
                                       "where the CPU has native bf16 (AMX / AVX512-BF16), else fp32 "
                                       "(emulated bf16 is slower). fp32 is exact but slowest. Models "
                                       "without fp16 (GFPGAN, RestoreFormer, CodeFormer) use bf16 "
                                       "where the device has it, else fp32."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="Compile the generator with torch.compile (CUDA graphs on "
                                         "a GPU): faster per face, but the first run of each batch "
                                         "size waits for the compiler (tens of seconds). Falls back "
                                         "to the normal path if compiling fails."),
            ],
            outputs=[GPENModel.Output(display_name="gpen_model")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None) -> str | bool:
        """A missing checkpoint is reported when the prompt is queued, before anything runs."""
        if model_name is None or folder_paths.get_full_path(MODEL_FOLDER, model_name):
            return True
        return missing_model_message(model_name, folder_paths.get_folder_paths(MODEL_FOLDER),
                                     folder_paths.get_filename_list(MODEL_FOLDER))

    @classmethod
    def execute(cls, model_name: str, precision: str, compile: bool = False) -> io.NodeOutput:
        path = folder_paths.get_full_path(MODEL_FOLDER, model_name)
        if path is None:  # went away between queueing and running
            raise ModelLoadError(missing_model_message(model_name, folder_paths.get_folder_paths(MODEL_FOLDER),
                                                       folder_paths.get_filename_list(MODEL_FOLDER)))
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
        device = mm.get_torch_device()
        dtype = PRECISIONS[precision] or auto_dtype(device)
        bf16_ok = mm.is_device_cpu(device) or mm.should_use_bf16(device)
        model = load_face_model(path, device="cpu", dtype=dtype, bf16_ok=bf16_ok)
        return io.NodeOutput(generator_patcher(model, compile))


class DetectFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="GPENDetectFaces",
            display_name="Detect Faces",
            description="Finds faces and their five landmarks in every frame of an image batch and "
                        "selects which ones to restore. mtcnn needs no download; RetinaFace reads "
                        "its weights from models/facedetection.",
            inputs=[
                io.Image.Input("image", tooltip="Image or batch of frames to search for faces."),
                *detect_inputs(),
            ],
            outputs=[Faces.Output(display_name="faces")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, detector: str, threshold: float, max_faces: int,
                order: str, min_size: int, indices: str, smoothing: float = 0.0) -> io.NodeOutput:
        options = detect_options(detector, threshold, max_faces, order, min_size, indices, smoothing)
        faces = pipeline.detect(image, load_face_detector(detector), options,
                                on_frame=_progress_callback(image.shape[0]))
        tell(cls, "Detect Faces", notices.detection(faces, options.indices))
        return io.NodeOutput(faces)

    @classmethod
    def validate_inputs(cls, detector: str | None = None) -> str | bool:
        return missing_weights(detector=detector)


class GPENRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="GPENRestore",
            display_name="GPEN Restore 2048",
            description="Aligns each selected face to the model's five-point template at its own "
                        "size (GPEN's, or the FFHQ template GFPGAN, RestoreFormer and CodeFormer use; "
                        "cut from the full-resolution source) and restores them in batches. "
                        "Outputs the restored face crops and the faces with their alignment.",
            inputs=[
                GPENModel.Input("gpen_model", tooltip="From Load GPEN Model."),
                io.Image.Input("image", tooltip="The same image batch that went into Detect Faces."),
                Faces.Input("faces", tooltip="From Detect Faces."),
                *restore_inputs(),
                fidelity_input(),
            ],
            outputs=[io.Image.Output(display_name="restored_faces"),
                     Faces.Output(display_name="faces")],
        )

    @classmethod
    def execute(cls, gpen_model, image: torch.Tensor, faces, strength: float,
                batch_size: int, fidelity: float = 0.5) -> io.NodeOutput:
        options = RestoreOptions(strength=strength, batch_size=batch_size, fidelity=fidelity)
        model = gpen_model.model
        start = time.perf_counter()
        crops, aligned = pipeline.align(image, faces, model.size, gpen_model.load_device, model.template)
        if aligned.count:
            batch = prepare_generator(gpen_model, aligned.count, batch_size)
            options = dataclasses.replace(options, batch_size=batch)
            crops = pipeline.restore(model, crops, options, gpen_model.load_device,
                                     next(model.parameters()).dtype,
                                     on_progress=_progress_callback(aligned.count))
        tell(cls, "GPEN Restore", notices.restoration(aligned.count, model.size, time.perf_counter() - start)
             + fidelity_note(model, fidelity))
        return io.NodeOutput(crops, aligned)


class PasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="GPENPasteBack",
            display_name="Paste Back",
            description="Warps each restored face back into its frame through a soft face-shaped "
                        "(or face-parsing) mask, matches its colour to the original, and blends all "
                        "faces of a frame in one seam-free pass, optionally onto an upscaled image. "
                        "Frames without faces pass through unchanged. Also outputs the paste mask.",
            inputs=[
                io.Image.Input("image", tooltip="The original image batch the faces were found in."),
                io.Image.Input("restored_faces", tooltip="restored_faces from GPEN Restore 2048 "
                                                         "(other nodes may edit them in between)."),
                Faces.Input("faces", tooltip="faces from GPEN Restore 2048."),
                *paste_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, restored_faces: torch.Tensor, faces, feather: float,
                color_correction: bool = True, blend: str = BLENDS[0], upscale: float = 1.0,
                mask: str = MASKS[0], upscale_model=None) -> io.NodeOutput:
        options = paste_options(feather, color_correction, blend, upscale, mask)
        out, paste_mask = pipeline.paste(image, restored_faces, faces, options, upscaler_for(upscale_model),
                                         load_face_parser(options), _progress_callback(image.shape[0]),
                                         mm.get_torch_device())
        tell(cls, "Paste Back", notices.paste(faces, options.upscale))
        return io.NodeOutput(out, paste_mask)

    @classmethod
    def validate_inputs(cls, mask: str | None = None) -> str | bool:
        return missing_weights(mask=mask)


class GPENRestoreVideo(io.ComfyNode):
    """A whole video in one node: streamed through the frame engine in bounded memory, never
    decoded into an IMAGE batch."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            node_id="GPENRestoreVideo",
            display_name="GPEN Restore Video",
            description="Restores the faces of a video (Load Video, or any node giving a VIDEO) frame "
                        "by frame in bounded memory: detection, tracking and smoothing, restoration "
                        "and paste-back as in the four image nodes, frames encoded as they finish "
                        "(H.264, visually lossless), sound, frame rate and timing kept. Frames "
                        "without faces pass through.",
            inputs=[
                io.Video.Input("video", tooltip="The video to restore, e.g. from Load Video."),
                GPENModel.Input("gpen_model", tooltip="From Load GPEN Model."),
                *detect_inputs(smoothing=VIDEO_SMOOTHING),
                io.Int.Input("redetect_every", default=VIDEO_REDETECT_EVERY, min=1, max=120, optional=True,
                             tooltip="Search whole frames for faces every N frames and follow the "
                                     "faces found in between (much faster); new faces are picked "
                                     "up at the next search. 1 = search every frame."),
                *restore_inputs(),
                *paste_inputs(),
                fidelity_input(),
            ],
            outputs=[io.Video.Output(display_name="video")],
        )

    @classmethod
    def execute(cls, video, gpen_model, detector: str, threshold: float, max_faces: int, order: str,
                min_size: int, indices: str, smoothing: float = VIDEO_SMOOTHING,
                redetect_every: int = VIDEO_REDETECT_EVERY, strength: float = 1.0, batch_size: int = 4,
                feather: float = 0.15, color_correction: bool = True, blend: str = BLENDS[0],
                upscale: float = 1.0, mask: str = MASKS[0], upscale_model=None,
                fidelity: float = 0.5) -> io.NodeOutput:
        detect = detect_options(detector, threshold, max_faces, order, min_size, indices, smoothing,
                                redetect_every)
        paste = paste_options(feather, color_correction, blend, upscale, mask)
        model = gpen_model.model
        restorer = Restorer(model, gpen_model.load_device, next(model.parameters()).dtype,
                            load_face_detector(detector), load_face_parser(paste), upscaler_for(upscale_model))
        restore = RestoreOptions(strength=strength, batch_size=prepare_generator(gpen_model, batch_size, batch_size),
                                 fidelity=fidelity)
        engine = FrameEngine(restorer, detect, restore, paste)
        target = Path(folder_paths.get_temp_directory()) / f"gpen_restored_{uuid.uuid4().hex[:12]}.mp4"
        faces_per_frame: list[int] = []
        with video_source(video) as (info, frames, audio):
            bar = comfy.utils.ProgressBar(info.expected_frames or 0)
            with VideoWriter(target, engine.output_info(info), audio_from=audio) as writer, \
                    contextlib.closing(engine.run(frames)) as restored:
                for frame in restored:
                    mm.throw_exception_if_processing_interrupted()
                    writer.write(frame.output, frame.pts, frame.duration)
                    faces_per_frame.append(len(frame.faces))
                    bar.update(1)
        tell(cls, "GPEN Restore Video", notices.video(faces_per_frame, engine.finder.found, detect.indices)
             + fidelity_note(model, fidelity))
        return io.NodeOutput(InputImpl.VideoFromFile(str(target)))

    @classmethod
    def validate_inputs(cls, detector: str | None = None, mask: str | None = None) -> str | bool:
        return missing_weights(detector=detector, mask=mask)


@contextlib.contextmanager
def video_source(video) -> Iterator[tuple[VideoInfo, Iterator[Frame], object]]:
    """(info, frames, audio source) of a VIDEO input. A video backed by a file (Load Video) is
    decoded lazily from it and its audio copied as is, over its trim window (Trim Video) where
    it has one; one made of components (frames already in memory, e.g. Create Video) is read
    from those, its audio encoded from the waveform."""
    if isinstance(video, InputImpl.VideoFromFile):
        with VideoReader(video.get_stream_source(), trim_span(video)) as reader:
            yield reader.info, video_frames(reader), reader.audio
        return
    components = video.get_components()
    images = components.images
    info = VideoInfo.for_frames(images.shape[2], images.shape[1], components.frame_rate,
                                frame_count=images.shape[0])
    audio = None
    if components.audio is not None:
        audio = AudioWaveform(components.audio["waveform"][0].float().numpy(), int(components.audio["sample_rate"]))
    yield info, (Frame(i, im.frame_uint8(images, i)) for i in range(images.shape[0])), audio


def trim_span(video) -> Span:
    """The trim window of a file-backed VIDEO: Trim Video (ComfyUI 0.14 on) keeps the whole file
    behind ``get_stream_source()`` and the window beside it, its negative start already counted
    from the end. Hosts without trimming give the whole video."""
    window = getattr(video, "get_active_trim_window", None)
    return Span(*window()) if window is not None else Span()


def _model_upscaler(upscale_model) -> pipeline.Upscaler:
    """Background enlargement through ComfyUI's own upscale node (its tiling and OOM handling),
    then resized to the exact size asked for."""
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    def run(frame: torch.Tensor, width: int, height: int) -> torch.Tensor:
        enlarged = ImageUpscaleWithModel.execute(upscale_model, im.frame_to_image(frame)).args[0]
        return pipeline.enlarge(im.frame_tensor(enlarged, 0, frame.device), width, height)
    return run


class GPENExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadGPENModel, DetectFaces, GPENRestore, PasteBack, GPENRestoreVideo]


async def comfy_entrypoint() -> GPENExtension:
    return GPENExtension()
