"""Image bytes -> (format, width, height) after a full decode, or the reason they are refused."""

from __future__ import annotations

import hashlib
import io
import math
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


BAND_PIXELS = 1 << 18  # flattened a band of rows at a time: a few MiB of copies, however large the image
ORIENTATIONS = {  # EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright_on_white(
    image: Image.Image, size: tuple[int, int], fit: bool = True, gap: float = 2.0, exact_up_to: int = 0
) -> Image.Image:
    """An opened, not yet decoded image as on_white(ImageOps.exif_transpose(image)) gives it, but shrunk on the
    way to at least `gap` times (less than twice that) the `size` it is going to be resized to: the whole image
    within `size`, its aspect kept, when `fit`; each side to its own otherwise. A JPEG is decoded at 1/2 to 1/8
    scale; the decoded pixels are flattened a band at a time, each band reduced by whole factors at once (a
    transparent palette's colours are flattened once): the decoded image (at most 4 bytes a pixel, 1 for a
    palette) and a few MiB, not 13 bytes a pixel as flattening it whole took. Images of at most `exact_up_to`
    pixels are not reduced, so that they give the very pixels they always gave (plus a 4-byte copy of each)."""
    orientation = image.getexif().get(0x0112, 1)  # a PNG is decoded here: its EXIF may follow the pixels
    width, height = size if orientation not in (5, 6, 7, 8) else size[::-1]  # on its side: sides swapped
    if fit:
        scale = min(width / image.width, height / image.height, 1.0)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    factors = (1, 1)
    if image.width * image.height > exact_up_to:
        image.draft(None, (math.ceil(width * gap), math.ceil(height * gap)))  # JPEG: at 1/2 to 1/8 scale
        factors = (max(1, int(image.width / width / gap)), max(1, int(image.height / height / gap)))
    flat = _flattened(image, factors)
    method = ORIENTATIONS.get(orientation)
    return flat.transpose(method) if method is not None else flat


def _flattened(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """on_white(image).reduce(factors), computed a band of rows at a time (bands of whole reduction blocks:
    the same pixels as at once)."""
    image.load()
    (width, height), (_, down) = image.size, factors
    rows = max(1, BAND_PIXELS // width // down) * down
    if factors == (1, 1) and rows >= height:
        return on_white(image)
    palette = None
    if image.mode == "P" and "transparency" in image.info:  # each colour flattened once, not each pixel
        entries = image.resize((256, 1), Image.Resampling.NEAREST)  # with the image's palette and transparency
        entries.putdata(list(range(256)))
        palette = on_white(entries).tobytes()
    out = Image.new("RGB", (-(-width // factors[0]), -(-height // down)))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        if palette is not None:
            band.putpalette(palette)
            del band.info["transparency"]
        band = on_white(band)
        out.paste(band.reduce(factors) if factors != (1, 1) else band, (0, top // down))
    return out


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
