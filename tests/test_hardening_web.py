"""cbir web against hostile clients: decompression-bomb uploads (refused before decoding, and
decodes bounded in memory however many come at once) and foreign Host headers (DNS rebinding)."""

from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cbir.lake import Lake
from web.app import create_app

from conftest import make_settings


def one_colour_png(width: int, height: int) -> bytes:
    """A one-colour RGB PNG, compressed row by row: a few hundred KB that decode to width x height x 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" + b"\x80" * (3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def empty_lake(tmp_path):
    settings = make_settings(tmp_path, "ingest.max_pixels=89478485", "web.max_upload_bytes=10000000")
    Lake.open(settings).check()
    return settings


def test_a_bomb_upload_is_refused_before_it_is_decoded(empty_lake):
    bomb = one_colour_png(9400, 9400)  # passes ingest.max_pixels; 337 MiB decoded as RGBA
    assert len(bomb) < 400_000
    with TestClient(create_app(empty_lake, warm_up=False), base_url="http://127.0.0.1") as client:
        started = time.monotonic()
        response = client.post("/api/search", files={"image": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413 and response.json()["reason"] == "too-many-pixels", response.text
    assert "web.max_upload_pixels=16777216" in response.json()["error"]
    assert time.monotonic() - started < 2  # refused from the header, not after a decode


SERVER = """
import sys
import uvicorn
from cbir.settings import load_settings
from web.app import create_app
settings = load_settings(overrides=sys.argv[1:], environ={})
uvicorn.run(create_app(settings, warm_up=False), host="127.0.0.1", port=int(sys.argv[-1].split("=")[1]),
            log_level="warning")
"""


def peak_rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def post_image(port: int, data: bytes, host: str = "127.0.0.1") -> int:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n"
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/api/search", body, {"Content-Type": "multipart/form-data; boundary=b", "Host": host})
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.fixture
def web_process(empty_lake):
    with running_web(empty_lake, "web.max_uploads=48") as (process, port):  # all read: the decodes are the bound
        yield process, port


@contextmanager
def running_web(empty_lake, *extra: str):
    """cbir web in a process of its own (uvicorn on 127.0.0.1), on the settings of empty_lake and `extra`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [
        f"lake={empty_lake.lake}",
        f"state_dir={empty_lake.state_dir}",
        "ingest.max_pixels=89478485",
        "web.max_upload_bytes=10000000",
        *extra,
        f"web.port={port}",
    ]
    root = str(Path(__file__).resolve().parents[1])
    process = subprocess.Popen([sys.executable, "-c", SERVER, *overrides], env={**os.environ, "PYTHONPATH": root})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "cbir web did not start"
            time.sleep(0.2)
    try:
        yield process, port
    finally:
        process.terminate()
        process.wait(10)


def test_concurrent_bomb_uploads_decode_within_a_memory_bound(web_process):
    """24 uploads at once of the largest image web.max_upload_pixels lets through (4,000 x 4,000, 61 MiB
    decoded as Pillow's 4 bytes a pixel), and 24 of a 9,400 x 9,400 bomb: with web.decodes=2 at most
    two decodes are in memory at once."""
    process, port = web_process
    near_limit, bomb = one_colour_png(4000, 4000), one_colour_png(9400, 9400)
    assert post_image(port, one_colour_png(64, 64)) == 503  # warm: no captioner in an empty lake
    before = peak_rss_mib(process.pid)
    with ThreadPoolExecutor(48) as pool:
        statuses = list(pool.map(lambda data: post_image(port, data), [near_limit] * 24 + [bomb] * 24))
    growth = peak_rss_mib(process.pid) - before
    print(f"peak RSS growth under 48 concurrent uploads: {growth:.0f} MiB")
    assert statuses == [503] * 24 + [413] * 24  # decoded and checked, then no captioner; the bombs refused
    assert growth < 2 * 4000 * 4000 * 4 / 2**20 + 64  # two decodes and the request bodies, not 24 (nor 24 x 337 MiB)


@pytest.mark.parametrize(
    "host, served",
    [("127.0.0.1", True), ("localhost:8080", True), ("evil.example", False), ("127.0.0.1.nip.io", False), ("", False)],
)
def test_only_the_servers_own_names_are_served(empty_lake, host, served):
    with TestClient(create_app(empty_lake, warm_up=False)) as client:
        response = client.get("/api/status", headers={"Host": host})
    assert (response.status_code == 200) == served, response.text


def test_a_configured_name_is_served(empty_lake, tmp_path):
    settings = make_settings(tmp_path, "web.trusted_hosts=search.example.org")
    with TestClient(create_app(settings, warm_up=False)) as client:
        assert client.get("/api/status", headers={"Host": "search.example.org"}).status_code == 200


# An index without Spark or a captioner: three stored images, their manifest rows and captions.
def indexed_lake(tmp_path, *extra):
    from datetime import datetime

    import pyarrow as pa

    from cbir.images import image_id
    from cbir.lake import new_run_id
    from cbir.schemas import CAPTIONS, MANIFEST
    from cbir.storage import put_bytes

    from conftest import image_bytes

    settings = make_settings(tmp_path, "web.reload_s=0.05", *extra)
    lake = Lake.open(settings)
    lake.check()
    version, now, manifest, captions = new_run_id(), datetime.now(UTC), [], []
    for number, caption in enumerate(["a red ball", "a dog on grass", "a red car"]):
        data = image_bytes(number)
        key = image_id(data)
        lake.put_image(key, "JPEG", data)
        uri = f"{tmp_path}/secret-folder/{number}.jpg"
        manifest.append(
            dict(
                image_id=key,
                uri=uri,
                source=f"{tmp_path}/secret-folder",
                format="JPEG",
                width=64,
                height=48,
                bytes=len(data),
                status="ok",
                ingested_at=now,
                run_id=version,
            )
        )
        manifest.append(
            dict(
                image_id=key,
                uri=f"s3://private-bucket/copy/{number}.jpg",
                source="s3://private-bucket/copy",
                status="duplicate",
                ingested_at=now,
                run_id=version,
            )
        )
        captions.append(
            dict(
                image_id=key,
                uri=uri,
                caption=caption,
                logprob=-1.0,
                model_version=version,
                status="ok",
                captioned_at=now,
                run_id=version,
            )
        )
    for name, rows, schema in (("manifest", manifest, MANIFEST), ("captions", captions, CAPTIONS)):
        table = lake.table(name)
        writer = table.part_writer(version)
        writer.write(pa.RecordBatch.from_pylist([{n: row.get(n) for n in schema.names} for row in rows], schema=schema))
        table.commit(version, [writer.close()])
    put_bytes(lake.fs, lake.path("models", "captioner", "current"), version.encode(), overwrite=True)
    return settings, [row["image_id"] for row in captions]


def test_image_metadata_is_served_from_the_loaded_index(tmp_path, monkeypatch):
    from cbir.lake import Table

    settings, ids = indexed_lake(tmp_path)
    reads = []
    real = Table.dataset
    monkeypatch.setattr(Table, "dataset", lambda self, *a: reads.append(self.name) or real(self, *a))
    with TestClient(create_app(settings, warm_up=False), base_url="http://127.0.0.1") as client:
        reads.clear()  # building the index reads the lake once
        for _ in range(3):
            info = client.get(f"/api/images/{ids[1]}").json()
            assert client.get(f"/image/{ids[1]}").status_code == 200
    assert info["caption"] == "a dog on grass" and info["width"] == 64
    assert "manifest" not in reads


def test_answers_carry_no_server_paths(tmp_path):
    settings, ids = indexed_lake(tmp_path)
    with TestClient(create_app(settings, warm_up=False), base_url="http://127.0.0.1") as client:
        answers = [
            client.get("/api/search", params={"q": "a red ball"}),
            client.get(f"/api/images/{ids[0]}"),
            client.get(f"/image/{ids[0]}"),
            client.get("/api/status"),
            client.post("/api/search", files={"image": ("x.jpg", b"", "image/jpeg")}),
            client.post("/api/search", files={"image": ("x.png", one_colour_png(32, 32), "image/png")}),
        ]
        info = answers[1].json()
    assert answers[-1].status_code == 503  # no card in this lake: the captioner cannot load
    for answer in answers:
        assert str(tmp_path) not in answer.text and "private-bucket" not in answer.text, answer.text
    assert (info["uri"], info["source"], info["also_at"]) == ("0.jpg", "secret-folder", ["0.jpg"])  # the bucket's copy
    assert answers[0].json()["results"][0]["uri"] == "0.jpg"


def test_a_failing_index_rebuild_backs_off(tmp_path):
    from web.library import Library

    settings, _ = indexed_lake(tmp_path)
    searcher = Library(settings)
    attempts = []

    def broken():
        attempts.append(time.monotonic())
        raise OSError("the lake is unreachable")

    searcher.reload = broken
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        searcher.maybe_reload()
        time.sleep(0.01)
    assert 2 <= len(attempts) <= 5  # 0.05 s apart at first, doubling: not 30 tries in 1.6 s


def test_thumbnails_decode_a_large_jpeg_at_a_fraction_of_its_size(monkeypatch):
    import io

    from PIL import Image, ImageFile

    from search.gallery import thumbnail_jpeg

    out = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(out, "JPEG")
    loaded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self.size) or real(self))
    with Image.open(io.BytesIO(thumbnail_jpeg(out.getvalue(), (240, 240)))) as thumb:
        assert thumb.size == (240, 180)
    assert loaded and max(w * h for w, h in loaded) <= 1000 * 750  # decoded at 1/4 scale or less, not 12 MP


@pytest.mark.parametrize("weights", ["missing", "unreadable"])
def test_a_local_weights_file_is_not_named_to_clients(tmp_path, monkeypatch, weights):
    """encoder.weights set to a server path: the upload's 503, /api/status and the page say what failed,
    not where the file is (the log has it)."""
    path = tmp_path / "secret-weights" / "vgg16.h5"
    settings, _ = indexed_lake(tmp_path, f"encoder.weights={path}")
    if weights == "unreadable":  # the file is there, but Keras cannot read it: its error names the file
        from search.captioning import ImageCaptioner

        def broken(*args, **kwargs):
            raise OSError(f"Unable to synchronously open file (name = '{path}', errno = 2)")

        monkeypatch.setattr(ImageCaptioner, "from_settings", broken)
    with TestClient(create_app(settings, warm_up=False), base_url="http://127.0.0.1") as client:
        upload = client.post("/api/search", files={"image": ("x.png", one_colour_png(32, 32), "image/png")})
        answers = [upload, client.get("/api/status"), client.get("/")]
    assert upload.status_code == 503 and upload.json()["reason"] == "no-captioner", upload.text
    assert "unavailable" in answers[1].json()["captioner"]
    for answer in answers:
        assert "secret-weights" not in answer.text and str(tmp_path) not in answer.text, answer.text


def raw_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of one HTTP/1.1 answer read from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"  # closed before an answer: parsed as an empty one
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536) or b"x" * int(headers["content-length"])
    return int(lines[0].split()[1]) if lines[0] else 0, headers, body


def test_stalled_uploads_are_bounded_in_number_time_and_memory(empty_lake):
    """20 clients each send 9 MiB of a 10 MB upload and stall: with web.max_uploads=2, two are read (and
    answered 408 after web.upload_timeout_s), the others are refused at once (503, Retry-After) before their
    bodies are read; memory holds two bodies, not twenty (180 MiB before the bound)."""
    with running_web(empty_lake, "web.max_uploads=2", "web.upload_timeout_s=2") as (process, port):
        assert post_image(port, one_colour_png(64, 64)) == 503  # warm: no captioner in an empty lake
        before = peak_rss_mib(process.pid)
        head = (
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 10000000\r\n\r\n--b\r\nContent-Disposition: form-data; name="image"; '
            b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        part, sockets = b"\x89PNG" + bytes(9 * 2**20), []
        started = time.monotonic()
        for number in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=8)
            sock.sendall(head + part)
            sockets.append(sock)
            if number == 1:
                time.sleep(0.3)  # the first two are being read before the others come
        time.sleep(0.5)
        growth = peak_rss_mib(process.pid) - before
        print(f"peak RSS growth under 20 stalled 9 MiB uploads: {growth:.0f} MiB")
        try:
            assert growth < 2 * 10_000_000 / 2**20 + 32, growth
            answers = [raw_answer(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        waited = time.monotonic() - started
        assert post_image(port, one_colour_png(64, 64)) == 503  # the server goes on: no captioner, as before
    assert [status for status, _, _ in answers] == [408] * 2 + [503] * 18, answers
    assert all(headers["retry-after"] == "5" for _, headers, _ in answers[2:])
    assert b"web.upload_timeout_s=2" in answers[0][2] and b'"reason":"busy"' in answers[2][2]
    assert 2 <= waited < 6
