"""Outputs that appear only when complete and never replace anything.

Every file the pack writes for a user (restored images and videos) is written under a hidden
temporary name beside its final one and then linked into place: a killed job leaves no
half-written output, and a file that appeared meanwhile is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path


def partial_path(path: str | Path) -> Path:
    """Where an output is written until it is complete: hidden, beside it, same suffix (so
    encoders choose the format by it). A stale one from a killed run is simply overwritten."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def publish(partial: Path, path: Path) -> None:
    """Move the finished ``partial`` to ``path`` without ever replacing a file that is there."""
    try:
        os.link(partial, path)
    except FileExistsError:
        partial.unlink()
        raise FileExistsError(f"{path} appeared while it was being written and is not overwritten; "
                              f"the new file was discarded.") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            partial.unlink()
            raise FileExistsError(f"{path} appeared while it was being written and is not overwritten; "
                                  f"the new file was discarded.") from None
        os.rename(partial, path)
    else:
        partial.unlink()
