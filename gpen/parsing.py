"""Face-parsing masks (facexlib's BiSeNet or ParseNet) for paste-back.

The networks are facexlib's; the weights are read, weights-only, from the detector folder by
their exact facexlib file names. A missing file is a clear error, never a download.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .faces import DetectorError, find_weights, load_facexlib_net

PARSERS = {
    "bisenet": ("parsing_bisenet.pth", "https://github.com/xinntao/facexlib/releases/download/v0.2.0/"),
    "parsenet": ("parsing_parsenet.pth", "https://github.com/xinntao/facexlib/releases/download/v0.2.2/"),
}
PARSE_SIZE = 512
# CelebAMask-HQ classes; like the GPEN authors, everything but background (0), cloth (16) and
# hat (18) is face: skin, brows, eyes, glasses, ears, nose, mouth, lips, neck and hair.
NOT_FACE = (0, 16, 18)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FaceParser:
    """A loaded parsing network: ``mask(crop)`` -> soft 0..1 face mask at the crop's size."""

    def __init__(self, name: str, weights: Path, device: str = "cpu"):
        from facexlib.parsing import BiSeNet, ParseNet

        build = (lambda: BiSeNet(num_class=19)) if name == "bisenet" else \
            (lambda: ParseNet(PARSE_SIZE, PARSE_SIZE, parsing_ch=19))
        net = load_facexlib_net(build, weights, PARSERS[name][1], "Face parsing weights", f"facexlib's {name}")
        self.name = name
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    def labels(self, crop: np.ndarray) -> np.ndarray:
        """Per-pixel class (0..18) of a float32 RGB crop, at ``PARSE_SIZE``."""
        face = cv2.resize(crop, (PARSE_SIZE, PARSE_SIZE), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)[None].to(self.device)
        if self.name == "bisenet":
            x = (x - torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]) / \
                torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]
        else:
            x = x * 2 - 1
        with torch.no_grad():
            logits = self.net(x)[0]
        return logits.argmax(1)[0].cpu().numpy()

    def mask(self, crop: np.ndarray, feather: float) -> np.ndarray:
        """Soft mask: face classes, feathered by ``feather`` of the crop size, edges faded out."""
        size = crop.shape[0]
        hard = (~np.isin(self.labels(crop), NOT_FACE)).astype(np.float32)
        hard = cv2.resize(hard, (size, size), interpolation=cv2.INTER_LINEAR)
        sigma = max(feather * size / 4, 0.5)
        soft = cv2.GaussianBlur(hard, (0, 0), sigmaX=sigma, sigmaY=sigma)
        return soft * border_fade(size, feather)


def border_fade(size: int, feather: float) -> np.ndarray:
    """1 in the middle of a crop, falling smoothly to 0 at its edges (no square seams)."""
    ramp = np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / max(feather * size, 1.0), 0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)
    return np.outer(ramp, ramp).astype(np.float32)


def parser_path(name: str, model_dirs: Sequence[str | Path]) -> Path:
    filename, url = PARSERS[name]
    return find_weights(filename, url, model_dirs, "Face parsing weights", "use the 'face ellipse' mask")


@functools.lru_cache(maxsize=2)
def load_parser(name: str, model_dirs: tuple[str, ...] = (), device: str = "cpu") -> FaceParser:
    if name not in PARSERS:
        raise DetectorError(f"Unknown face parser '{name}'; choose one of {', '.join(PARSERS)}.")
    try:
        return FaceParser(name, parser_path(name, model_dirs), device)
    except ImportError as e:
        raise DetectorError(f"Face parsing needs facexlib==0.3.0, which is not importable ({e}). Run "
                            f"the pack's install.py, or: pip install --no-deps facexlib==0.3.0") from None
