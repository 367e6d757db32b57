"""Image bytes -> (format, width, height) after a full decode, or the reason they are refused."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Our own pixel limit is checked from the header, before decoding (each caller has its own: ingest's,
# cbir web's smaller upload limit); Pillow's process-wide one would refuse stored images to the web.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
Image.MAX_IMAGE_PIXELS = None


class Failure(str):
    """Why an item failed: '<reason>: <detail>' as rows and messages show it, with its reason (a short slug)
    kept apart, so that nothing parses it back."""

    reason: str

    def __new__(cls, text: str, reason: str) -> Failure:
        failure = super().__new__(cls, text)
        failure.reason = reason
        return failure

    @classmethod
    def of(cls, reason: str, detail: str) -> Failure:
        return cls(f"{reason}: {detail}", reason)


class ImageRejected(Exception):
    """An item that cannot be stored; str() is '<reason>: <detail>', the reason a short slug."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason

    @property
    def failure(self) -> Failure:
        return Failure(str(self), self.reason)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int
    formats: frozenset[str]

    @classmethod
    def from_settings(cls, ingest) -> Limits:
        return cls(ingest.max_bytes, ingest.max_pixels, frozenset(ingest.formats))


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    format: str
    width: int
    height: int


def on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (not over the black or green a bare convert gives)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_image(data: bytes, limits: Limits) -> ImageInfo:
    """Validate fully (header, limits, complete decode) or raise ImageRejected."""
    if not data:
        raise ImageRejected("empty", "the file has 0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too-large", f"more than ingest.max_bytes={limits.max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not-an-image", "not a format Pillow can read") from None
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{pixels.group(1)} pixels" if pixels else "the image"
        raise ImageRejected("too-many-pixels", f"{size} is over ingest.max_pixels={limits.max_pixels}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged headers
        raise ImageRejected("corrupt", first_line(exc)) from None
    with image:
        if image.format not in limits.formats:
            raise ImageRejected("unsupported-format", f"{image.format} is not in ingest.formats")
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageRejected("too-many-pixels", f"{width}x{height} is over ingest.max_pixels={limits.max_pixels}")
        if width == 0 or height == 0:
            raise ImageRejected("corrupt", f"{width}x{height} image")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - and as many for damaged pixel data
            message = first_line(exc)
            reason = "truncated" if "truncated" in message or "end of file" in message.lower() else "corrupt"
            raise ImageRejected(reason, message) from None
        return ImageInfo(image_id(data), image.format, width, height)


def first_line(exc: Exception) -> str:
    """An exception's first line, at most 300 characters (its type when it has no message)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def shrink(data: bytes, longest_side: int) -> bytes:
    """A smaller copy whose longest side is longest_side: JPEG for photos, PNG where there is transparency."""
    with Image.open(io.BytesIO(data)) as image:
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        image.draft("RGB", (longest_side, longest_side))  # a JPEG decodes at 1/2 to 1/8 scale: less memory
        image = image.convert("RGBA" if has_alpha else "RGB")
        image.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if image.mode == "RGBA":
            image.save(out, "PNG", optimize=True)
        else:
            image.save(out, "JPEG", quality=90)
        return out.getvalue()
