"""Sample images that pip installs, with captions: the photos inside the scikit-image wheel.

Each skimage.data loader names the file it reads and describes it in its docstring, so the
docstring's first sentence is the caption and the loader's name the title.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")


def skimage_photos() -> list[dict]:
    """Rows of uri, title, caption, tags: one per image file shipped in skimage/data."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    rows: dict[str, dict] = {}
    for name in sorted(skimage.data.__all__):
        loader = getattr(skimage.data, name)
        try:
            source = inspect.getsource(loader)
        except (OSError, TypeError):
            continue
        caption = " ".join((inspect.getdoc(loader) or "").split("\n\n")[0].split())
        for file in re.findall(r"""['"]data/([^'"]+)['"]""", source):
            path = folder / file
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and str(path) not in rows:
                rows[str(path)] = {"uri": str(path), "title": name, "caption": caption, "tags": ["skimage"]}
    return list(rows.values())
