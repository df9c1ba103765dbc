"""Face-parsing masks (facexlib's BiSeNet or ParseNet) for paste-back.

The networks are facexlib's; the weights are read, weights-only, from the detector folder by
their exact facexlib file names. A missing file is a clear error, never a download.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from .align import gaussian_blur, resize
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
    """A loaded parsing network: ``mask(crop)`` -> soft 0..1 face mask for the crop."""

    def __init__(self, name: str, weights: Path, device: str = "cpu"):
        from facexlib.parsing import BiSeNet, ParseNet

        build = (lambda: BiSeNet(num_class=19)) if name == "bisenet" else \
            (lambda: ParseNet(PARSE_SIZE, PARSE_SIZE, parsing_ch=19))
        net = load_facexlib_net(build, weights, PARSERS[name][1], "Face parsing weights", f"facexlib's {name}")
        self.name = name
        self.net = net.eval().to(torch.device(device))

    @property
    def device(self) -> torch.device:
        """Where the net's weights are now (a memory manager may have moved them)."""
        return next(self.net.parameters()).device

    def labels(self, crop: torch.Tensor) -> torch.Tensor:
        """Per-pixel class (0..18) of an RGB crop ``[3,S,S]`` in 0..1, at ``PARSE_SIZE``."""
        device = self.device
        x = resize(crop.to(device, torch.float32), PARSE_SIZE, PARSE_SIZE)[None]
        if self.name == "bisenet":
            mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
            std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
            x = (x - mean) / std
        else:
            x = x * 2 - 1
        with torch.no_grad():
            logits = self.net(x)[0]
        return logits.argmax(1)[0]

    def mask(self, crop: torch.Tensor, feather: float) -> torch.Tensor:
        """Soft face mask at ``PARSE_SIZE`` on the crop's device: face classes, feathered by
        ``feather`` of the crop, faded out towards the crop's edges (no square seams)."""
        face = ~torch.isin(self.labels(crop), torch.tensor(NOT_FACE, device=self.device))
        soft = gaussian_blur(face.float(), max(feather * PARSE_SIZE / 4, 0.5))
        return (soft * border_fade(PARSE_SIZE, feather, self.device)).clamp_(0.0, 1.0).to(crop.device)


def border_fade(size: int, feather: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """1 in the middle of a crop, falling smoothly to 0 at its edges."""
    steps = torch.arange(size, dtype=torch.float32, device=device)
    ramp = (torch.minimum(steps, steps.flip(0)) / max(feather * size, 1.0)).clamp(0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)
    return torch.outer(ramp, ramp)


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
