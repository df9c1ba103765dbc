"""One options object per step (detection, restoration, paste-back).

The nodes, the command line, the video engine and the cluster runner each build these once from
their own inputs and hand them down, instead of threading long parameter lists through every
caller. Defaults equal the nodes' defaults. Every choice is checked here, once, with a message
that names the input and the valid values (ComfyUI 0.3.75 does not check V3 combo values).
"""

from __future__ import annotations

from dataclasses import dataclass

DETECTORS = ("mtcnn", "retinaface_resnet50", "retinaface_mobile0.25")
ORDERS = ("largest first", "left to right", "top to bottom", "confidence")
BLENDS = ("multiband", "alpha")
PARSER_NAMES = ("bisenet", "parsenet")
MASKS = ("face ellipse", *(f"parsing: {name}" for name in PARSER_NAMES))


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} '{value}'; choose one of {', '.join(choices)}.")


def _within(what: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}; got {value:g}.")


def parse_indices(text: str) -> tuple[int, ...]:
    """'0,2' -> (0, 2); empty -> (). Raises a clear error for anything else."""
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part != "")
    except ValueError:
        raise ValueError(f"Face indices must be comma-separated numbers such as '0,2'; got '{text}'.") from None


# Video defaults (GPEN Restore Video, the command line's videos): steady faces, and whole-frame
# searches every few frames with the faces found followed in between.
VIDEO_SMOOTHING = 0.5
VIDEO_REDETECT_EVERY = 5


@dataclass(frozen=True)
class DetectOptions:
    """Which faces to find and keep in each frame, and how to follow them over time."""

    detector: str = DETECTORS[0]
    threshold: float = 0.9
    max_faces: int = 0  # after ordering; 0 = all
    order: str = ORDERS[0]
    min_size: float = 0.0  # shorter box side, pixels
    indices: tuple[int, ...] = ()  # positions in the order; () = all
    smoothing: float = 0.0  # One-Euro landmark smoothing over frames, 0 = off
    redetect_every: int = 1  # video: search whole frames this often, follow found faces between

    def __post_init__(self) -> None:
        _choice("detector", self.detector, DETECTORS)
        _choice("face order", self.order, ORDERS)
        _within("threshold", self.threshold, 0.0, 1.0)
        _within("smoothing", self.smoothing, 0.0, 1.0)
        if self.max_faces < 0 or self.min_size < 0:
            raise ValueError("max_faces and min_size must not be negative.")
        if self.redetect_every < 1:
            raise ValueError(f"redetect_every must be at least 1; got {self.redetect_every}.")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))


@dataclass(frozen=True)
class RestoreOptions:
    """How restored faces are computed: mix with the original, faces per forward pass, and the
    fidelity weight of models that have one (CodeFormer's w; others ignore it)."""

    strength: float = 1.0  # 1 = restored, 0 = original
    batch_size: int = 4  # an upper bound: memory may lower it, never raise it
    fidelity: float = 0.5  # CodeFormer: 0 = most restoration, 1 = closest to the input

    def __post_init__(self) -> None:
        _within("strength", self.strength, 0.0, 1.0)
        _within("fidelity", self.fidelity, 0.0, 1.0)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}.")


@dataclass(frozen=True)
class PasteOptions:
    """How restored faces go back into their frames."""

    feather: float = 0.15  # soft edge of the face mask, relative to the face
    colour: bool = True  # match the restored face's LAB mean and spread to the original
    blend: str = BLENDS[0]
    upscale: float = 1.0  # enlarge the frame and paste faces at their restored resolution
    mask: str = MASKS[0]

    def __post_init__(self) -> None:
        _choice("blend", self.blend, BLENDS)
        _choice("mask", self.mask, MASKS)
        _within("Paste Back: upscale", self.upscale, 1.0, 4.0)
        _within("feather", self.feather, 0.0, 1.0)

    @property
    def parser(self) -> str | None:
        """The face-parsing network the mask needs, or None for the face ellipse."""
        return self.mask.split(": ")[1] if self.mask != MASKS[0] else None
