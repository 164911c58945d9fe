"""Image files: open as RGB, or check up front that a data set's images are readable."""

from __future__ import annotations

from pathlib import Path

from .errors import QCacheError


def open_image(im):
    """A PIL image (RGB) from a path or a PIL image; QCacheError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(im, Image.Image):
        return im.convert("RGB")
    try:
        with Image.open(im) as f:
            return f.convert("RGB")
    except FileNotFoundError:
        raise QCacheError(f"{im}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise QCacheError(f"{im}: cannot read image ({e})") from None


def check_image(path: Path, source) -> None:
    """Fail before a long run rather than at sample 900: ``path`` exists and PIL can parse it.
    ``source`` (e.g. ``file.jsonl:12``) names where the path came from."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise QCacheError(f"{source}: image {path} not found")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL reports broken files as any of these
        raise QCacheError(f"{source}: cannot read image {path} ({e})") from None
