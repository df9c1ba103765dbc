"""Command line: restore faces in image files, or convert a checkpoint to .safetensors.

    python -m gpen restore --model GPEN-BFR-512.pth photo.jpg restored.png
    python -m gpen convert GPEN-BFR-512.pth GPEN-BFR-512.safetensors

Outputs are never written over an existing file, and model files are only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from . import pipeline
from .faces import DetectorError, load_detector
from .loader import ModelLoadError, canonicalize, detect_config, load_generator, read_state_dict
from .options import DETECTORS, DetectOptions, PasteOptions, RestoreOptions


def _new_output(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output name (nothing was written).")
    return out


def convert(source: str, target: str) -> None:
    """Re-save a checkpoint's generator weights as a pickle-free .safetensors file."""
    from safetensors.torch import save_file

    out = _new_output(target)
    state_dict = canonicalize(read_state_dict(source), Path(source).name)
    config = detect_config(state_dict, Path(source).name)
    load_generator(state_dict)  # proves the layout before anything is written
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out), metadata={"architecture": "GPEN", "size": str(config.size)})
    print(f"{out}: GPEN-{config.size}, {len(tensors)} tensors")


def restore(model_path: str, source: str, target: str, detector: str, model_dir: str | None,
            strength: float, feather: float) -> None:
    out = _new_output(target)
    bgr = cv2.imread(source, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{source} could not be read as an image.")
    image = torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0)[None]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load_generator(model_path, device=device, dtype=dtype).to_channels_last()
    found = load_detector(detector, (model_dir,) if model_dir else (), device)
    faces = pipeline.detect(image, found, DetectOptions(detector=detector))
    crops, aligned = pipeline.align(image, faces, model.size)
    restored = pipeline.restore(model, crops, RestoreOptions(strength=strength), device, dtype)
    result, _ = pipeline.paste(image, restored, aligned, PasteOptions(feather=feather))
    rgb = (result[0].numpy().clip(0, 1) * 255 + 0.5).astype(np.uint8)
    if not cv2.imwrite(str(out), np.ascontiguousarray(rgb[..., ::-1])):
        raise ValueError(f"Could not write {out}: unknown image extension or folder not writable.")
    print(f"{out}: {aligned.count} face(s) restored with GPEN-{model.size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpen", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="checkpoint -> .safetensors")
    c.add_argument("source")
    c.add_argument("target")
    r = commands.add_parser("restore", help="restore the faces in one image")
    r.add_argument("--model", required=True, help="GPEN-BFR checkpoint (.pth/.pt/.safetensors)")
    r.add_argument("--detector", default="mtcnn", choices=DETECTORS)
    r.add_argument("--detector-dir", help="folder holding the RetinaFace weights")
    r.add_argument("--strength", type=float, default=1.0)
    r.add_argument("--feather", type=float, default=0.15)
    r.add_argument("source")
    r.add_argument("target")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.source, args.target)
        else:
            restore(args.model, args.source, args.target, args.detector, args.detector_dir,
                    args.strength, args.feather)
    except (ModelLoadError, DetectorError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
