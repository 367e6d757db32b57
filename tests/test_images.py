"""Image checks: each kind of bad file gets its own reason; random bytes never crash the check."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cbir.images import ImageRejected, Limits, image_id, inspect_image

from conftest import image_bytes

LIMITS = Limits(max_bytes=300_000, max_pixels=1_000_000, formats=frozenset({"JPEG", "PNG", "GIF", "WEBP"}))


def reason(data: bytes, limits: Limits = LIMITS) -> str:
    with pytest.raises(ImageRejected) as caught:
        inspect_image(data, limits)
    return caught.value.reason


def test_a_good_image_is_described():
    data = image_bytes(1, size=(120, 80), fmt="WEBP")
    info = inspect_image(data, LIMITS)
    assert (info.format, info.width, info.height, info.image_id) == ("WEBP", 120, 80, image_id(data))


def test_each_bad_file_has_its_reason():
    png = image_bytes(2, size=(200, 200), fmt="PNG")
    assert reason(b"") == "empty"
    assert reason(b"GIF89a but then nothing useful") == "not-an-image"
    assert reason(b"%PDF-1.4 a document") == "not-an-image"
    assert reason(image_bytes(3, size=(400, 400), fmt="PNG", noise=True)) == "too-large"
    assert reason(image_bytes(4, size=(1100, 1000), fmt="PNG")) == "too-many-pixels"
    assert reason(image_bytes(5, size=(10, 10), fmt="BMP")) == "unsupported-format"
    assert reason(png[: len(png) // 2]) == "truncated"
    idat = png.index(b"IDAT") + 8
    assert reason(png[:idat] + b"\x00" * 64 + png[idat + 64 :]) == "corrupt"


def test_a_decompression_bomb_is_refused_before_decoding():
    # 15000 x 15000 pixels of one colour: some kB on disk, 225 megapixels once decoded.
    out = io.BytesIO()
    Image.new("1", (15000, 15000)).save(out, format="PNG")
    assert len(out.getvalue()) < LIMITS.max_bytes
    with pytest.raises(ImageRejected) as caught:
        inspect_image(out.getvalue(), LIMITS)
    assert caught.value.reason == "too-many-pixels" and "15000x15000" in str(caught.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_either_an_image_or_a_reason(data):
    try:
        info = inspect_image(data, LIMITS)
    except ImageRejected as exc:
        assert exc.reason in {"empty", "not-an-image", "corrupt", "truncated", "unsupported-format", "too-many-pixels"}
    else:
        assert info.width * info.height <= LIMITS.max_pixels


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(["JPEG", "PNG", "GIF", "WEBP"]), st.integers(0, 99))
def test_any_small_image_in_an_allowed_format_is_accepted(width, height, fmt, seed):
    data = image_bytes(seed, size=(width, height), fmt=fmt)
    info = inspect_image(data, LIMITS)
    assert (info.format, info.width, info.height) == (fmt, width, height)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(0, 99))
def test_any_cut_of_an_image_is_refused_not_crashed(keep_percent, seed):
    data = image_bytes(seed, size=(80, 60), fmt="PNG")
    cut = data[: len(data) * keep_percent // 100]
    assert reason(cut) in {"empty", "not-an-image", "corrupt", "truncated"}


def test_thumbnails_of_transparent_pngs_are_white_where_transparent():
    from search.gallery import thumbnail_jpeg

    image = Image.new("RGBA", (64, 64), (0, 200, 0, 0))  # fully transparent green
    image.paste((200, 0, 0, 255), (16, 16, 48, 48))  # an opaque red square
    for mode in ("RGBA", "P"):
        out = io.BytesIO()
        (image if mode == "RGBA" else image.convert("P")).save(out, format="PNG")
        with Image.open(io.BytesIO(thumbnail_jpeg(out.getvalue(), (64, 64)))) as thumb:
            corner, centre = thumb.convert("RGB").getpixel((2, 2)), thumb.convert("RGB").getpixel((32, 32))
        assert min(corner) >= 245, (mode, corner)
        assert centre[0] > 150 and centre[1] < 60, (mode, centre)


def palette_png(width: int, height: int) -> bytes:
    """A two-colour palette PNG, one colour half transparent (tRNS), compressed row by row: tens of KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" + (b"\x00\x01" * width)[:width]
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"PLTE", bytes([200, 30, 30, 0, 0, 255])),
            chunk(b"tRNS", b"\xff\x80"),
            chunk(b"IDAT", idat),
            chunk(b"IEND", b""),
        ]
    )


DECODES = """
import json, resource, sys
from cbir.images import Limits, inspect_image
from search.gallery import thumbnail, thumbnail_jpeg
from models.encoders import pixels
data = open(sys.argv[1], "rb").read()
calls = {
    "inspect_image": lambda: inspect_image(data, Limits(len(data), 10**9, frozenset({"PNG"}))),
    "thumbnail_jpeg 240": lambda: thumbnail_jpeg(data, (240, 240)),
    "thumbnail (upload preview)": lambda: thumbnail(data),
    "pixels 224": lambda: pixels(data, (224, 224)),
}
growth, before = {}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, call in calls.items():
    call()
    growth[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(growth))
"""


@pytest.mark.parametrize("width, height", [(6000, 6000), (4096, 4096)], ids=["stored-36MP", "upload-16.7MP"])
def test_a_transparent_palette_image_decodes_within_the_promised_memory(tmp_path, width, height):
    """A 36-megapixel stored image (for /thumb/ and the index's encoder) and the largest upload web.max_upload_pixels
    lets through (a preview, the encoder): each decode within the 4 bytes a pixel of web.max_upload_pixels
    that the settings promise (64 MiB), not 13 bytes a pixel of the image flattened whole (447 and 208 MiB)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cbir.settings import Settings

    data = palette_png(width, height)
    assert len(data) < 60_000
    (tmp_path / "image.png").write_bytes(data)
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", DECODES, str(tmp_path / "image.png")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        check=True,
    )
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{width}x{height}: peak RSS growth (MiB) after each call: {growth}")
    assert max(growth.values()) < Settings().web.max_upload_pixels * 4 / 2**20, growth


def test_a_large_image_is_reduced_before_it_is_flattened_to_the_same_picture():
    """Reduced band by band (a palette's colours flattened once), a large image gives the picture a whole
    flattening gives, within rounding; a small one gives exactly the encoder's pixels of old."""
    import numpy as np
    from PIL import ImageOps

    from cbir.images import on_white
    from models.encoders import pixels

    def whole(data: bytes, size: tuple[int, int]) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(on_white(ImageOps.exif_transpose(image)).resize(size, Image.Resampling.BILINEAR))

    small = Image.open(io.BytesIO(palette_png(700, 650)))
    exif = Image.Exif()
    exif[0x0112] = 6  # on its side
    for data in (palette_png(700, 650), image_bytes(3, size=(900, 700), fmt="PNG")):
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).save(out, "PNG", exif=exif.tobytes())
        for case in (data, out.getvalue()):
            assert (pixels(case, (224, 224)) == whole(case, (224, 224))).all()
    large = io.BytesIO()
    small.convert("RGBA").resize((3000, 2100)).save(large, "PNG", exif=exif.tobytes())
    difference = np.abs(pixels(large.getvalue(), (224, 224)).astype(int) - whole(large.getvalue(), (224, 224)))
    assert difference.mean() < 1.0 and difference.max() <= 8
