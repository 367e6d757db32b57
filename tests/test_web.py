"""cbir web: the JSON API (text and image search, bad input, path traversal), the pages, index reloads,
a schemathesis run against the OpenAPI schema, the cbir web command, and the page in headless Chromium.

The lake is built once for the module without Spark: shape images in the image store and the
manifest, their features from the configured encoder, a small captioner trained on them, and a
captions run, as `cbir index` would write it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cbir.engine import BleuIndex
from cbir.images import image_id
from cbir.lake import Lake, new_run_id
from cbir.schemas import CAPTIONS, MANIFEST
from cbir.text import words
from models import store
from models.captioner import Decoding
from models.card import ModelCard
from models.encoding import encode_chunks, encoder_config
from models.tokenizer import Tokenizer
from models.training import Split, fit
from search.index import bleu_params
from web.app import create_app

from conftest import LIGHT_ENCODER, headless_chromium, image_bytes, make_settings, shapes_dataset

SMALL = (
    *LIGHT_ENCODER,
    "encoder.batch_size=12",
    "captioner.units=48",
    "captioner.embedding_dim=24",
    "captioner.min_word_count=1",
    "web.max_upload_bytes=300000",
    "web.max_upload_pixels=1500000",
    "web.reload_s=0.2",
    "web.trusted_hosts=testserver",
)  # TestClient's name
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
CBIR = str(Path(sys.executable).parent / "cbir")
XSS = "<script>alert('x')</script>"


def build_lake(tmp: Path) -> dict:
    """Twelve shapes stored and in the manifest, a captioner trained on them, and their captions committed."""
    settings = make_settings(tmp, *SMALL)
    lake = Lake.open(settings)
    lake.check()
    rows = shapes_dataset(tmp / "shapes", 12, seed=3)
    captions_of: dict[str, list[str]] = {}
    for row in rows:
        captions_of.setdefault(row["uri"], []).append(row["caption"])
    run_id, now = new_run_id(), datetime.now(UTC)
    images, manifest = {}, []
    for number, (uri, captions) in enumerate(sorted(captions_of.items())):
        data = Path(uri).read_bytes()
        key = image_id(data)
        lake.put_image(key, "PNG", data)
        images[key] = {"uri": uri, "data": data, "captions": captions}
        colour, shape = captions[1].split()[1:3]
        images[key].update(title=XSS if number == 0 else f"A {colour} {shape}", tags=[colour, shape])
        manifest.append(
            dict(
                image_id=key,
                source=str(tmp / "shapes"),
                uri=uri,
                format="PNG",
                width=96,
                height=96,
                bytes=len(data),
                status="ok",
                title=images[key]["title"],
                tags=images[key]["tags"],
                source_id=f"flickr:{1000 + number}",
                owner="Ada <b>Lovelace</b>",
                license="4",
                page_url="javascript:alert(1)" if number == 0 else f"https://www.flickr.com/photos/ada/{1000 + number}",
                ingested_at=now,
                run_id=run_id,
            )
        )
    write_run(lake, "manifest", manifest, MANIFEST)

    ids = sorted(images)
    config = encoder_config(settings, 1)
    chunk = next(encode_chunks(config, [{"image_id": i} for i in ids], lambda row: images[row["image_id"]]["data"]))
    texts = [caption for i in ids for caption in images[i]["captions"]]
    tokenizer = Tokenizer.fit(texts)
    split = Split(chunk.vectors, np.repeat(np.arange(len(ids)), 5).astype(np.int32), texts)
    captioner, _ = fit(
        split,
        None,
        tokenizer,
        max_length=12,
        embedding_dim=24,
        units=48,
        dropout=0.0,
        epochs=40,
        batch_size=16,
        learning_rate=0.01,
        patience=40,
        seed=0,
    )
    card = {
        "encoder": {"name": config.name, "weights": "random", "key": config.key, "feature_dim": config.dim},
        "sizes": {"vocabulary": len(tokenizer), "max_length": 12},
    }
    version = store.save(lake, captioner, ModelCard.model_validate(card))
    decoded = captioner.decode(chunk.vectors, Decoding.from_settings(settings.captioner))
    for i, ((caption, _), *_) in zip(ids, decoded):
        images[i]["caption"] = caption
    run_id = new_run_id()
    write_run(
        lake,
        "captions",
        [
            dict(
                image_id=i,
                uri=images[i]["uri"],
                caption=images[i]["caption"],
                visual=colour_vector(images[i]["tags"][0], i),
                logprob=-1.0,
                model_version=version,
                status="ok",
                error=None,
                indexed_at=now,
                run_id=run_id,
            )
            for i in ids
        ],
        CAPTIONS,
        model_version=version,
    )
    return {"settings": settings, "lake": lake, "images": images, "version": version, "tmp": tmp}


def colour_vector(colour: str, key: str) -> bytes:
    """A likeness vector that tells the colours apart (as a memory's space tells what images look like), with a
    little of each image's own: images of one colour are alike (cosine about 0.97), not copies."""
    vector = np.random.default_rng(int(key[:8], 16)).random(8).astype(np.float32) * 0.25
    vector[sum(map(ord, colour)) % 8] = 1.0
    return (vector / np.linalg.norm(vector)).astype("<f2").tobytes()


def write_run(lake: Lake, name: str, rows: list[dict], schema: pa.Schema, **meta) -> str:
    table, run_id = lake.table(name), new_run_id()
    writer = table.part_writer(run_id)
    rows = [{**{name: None for name in schema.names}, **row} for row in rows]
    writer.write(pa.RecordBatch.from_pylist(rows, schema=schema))
    table.commit(run_id, [writer.close()], **meta)
    return run_id


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_lake(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def app(built):
    app = create_app(built["settings"], warm_up=False)
    app.state.searcher.warm_up(wait=True)  # the captioner, once for the module
    return app


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def live(app) -> str:
    """The same app served by uvicorn on a free port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def png(size: tuple[int, int], colour=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def assert_error(response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason"} and body["reason"] == reason and body["error"], body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


# The API.
def test_text_search_is_the_engines_exact_top_k(client, built):
    images, params = built["images"], bleu_params(built["settings"])
    ids = sorted(images)
    # Every text of an image counts: its caption, and its source title and tags (bleu.references' default).
    index = BleuIndex.from_texts(
        ids,
        [
            [
                words(images[i][kind] if kind != "tags" else " ".join(images[i]["tags"]))
                for kind in ("caption", "title", "tags")
            ]
            for i in ids
        ],
    )
    for text in ("a red circle", "Square!", "on a white background", "blue triangle on black zyzzyva"):
        response = client.get("/api/search", params={"q": text, "k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = index.search(words(text), 5, params)
        assert [(r["image_id"], r["score"]) for r in body["results"]] == [(h.image_id, h.score) for h in expected]
        assert body["words"] == words(text) and body["query"] == text and body["caption"] is None
        assert body["count"] == len(expected) and body["k"] == 5 and body["captions"] == 12
        assert body["model_version"] == built["version"]
        for rank, result in enumerate(body["results"], start=1):
            assert result["rank"] == rank and result["caption"] == images[result["image_id"]]["caption"]
            assert result["thumbnail_url"] == f"/thumb/{result['image_id']}"
    assert len(client.get("/api/search", params={"q": "a"}).json()["results"]) == min(10, 12)  # query.k


def test_image_search_captions_the_upload_as_the_index_did(client, built):
    for key, image in list(built["images"].items())[:3]:
        response = client.post(
            "/api/search", files={"image": ("shape.png", image["data"], "image/png")}, data={"k": "12"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["caption"] == image["caption"] and body["query"] is None
        assert body["words"] == words(image["caption"]) and body["caption_ms"] > 0
        top = body["results"][0]["score"]
        assert any(r["image_id"] == key and r["score"] == top for r in body["results"])  # itself, among the best


def test_bad_input_is_a_4xx_with_a_reason_and_the_server_keeps_serving(client, built):
    assert_error(client.get("/api/search", params={"q": ""}), 400, "empty-query")
    assert_error(client.get("/api/search", params={"q": "  ?! -- "}), 400, "empty-query")
    body = assert_error(client.get("/api/search", params={"q": "zyzzyva quux"}), 404, "no-match")
    assert "No indexed caption" in body["error"]
    assert_error(client.get("/api/search"), 400, "empty-query")  # no text and no example
    assert_error(client.get("/api/search", params={"q": "red", "k": 0}), 422, "bad-request")
    assert_error(client.get("/api/search", params={"q": "red", "k": "many"}), 422, "bad-request")
    assert_error(client.get("/api/search", params={"q": "red " * 300}), 422, "bad-request")

    def upload(data: bytes, name: str = "x.png"):
        return client.post("/api/search", files={"image": (name, data, "image/png")})

    assert_error(upload(b"GIF89a but not really an image"), 415, "not-an-image")
    assert_error(upload(b"%PDF-1.4\n" + bytes(range(256)) * 8, "doc.pdf"), 415, "not-an-image")
    assert_error(upload(b""), 400, "empty")
    assert_error(upload(built["images"][sorted(built["images"])[0]]["data"][:120]), 400, "truncated")
    body = assert_error(upload(image_bytes(1, size=(700, 500), noise=True, fmt="BMP")), 413, "too-large")
    assert "web.max_upload_bytes=300000" in body["error"]
    assert_error(upload(b"\0" * 2_000_000), 413, "too-large")  # refused before the form is parsed
    body = assert_error(upload(png((1300, 1300))), 413, "too-many-pixels")
    assert "web.max_upload_pixels=1500000" in body["error"]
    assert_error(client.post("/api/search", data={"k": "3"}), 422, "bad-request")
    assert_error(
        client.post("/api/search", files={"image": ("x.png", png((40, 40)), "image/png")}, data={"k": "0"}),
        422,
        "bad-request",
    )

    unknown = "0" * 64
    assert_error(client.get(f"/api/images/{unknown}"), 404, "unknown-image")
    assert_error(client.get(f"/img/{unknown}"), 404, "unknown-image")
    assert_error(client.get("/thumb/not-an-id"), 404, "unknown-image")
    assert_error(client.get("/api/nothing-here"), 404, "not-found")
    assert_error(client.delete("/api/search"), 405, "method-not-allowed")
    assert client.get("/api/search", params={"q": "red circle"}).status_code == 200  # still serving


def test_examples_in_the_api_move_results_toward_positives_and_away_from_negatives(client, built):
    colour = {key: image["tags"][0] for key, image in built["images"].items()}
    ids = sorted(colour)
    liked = next(key for key in ids if colour[key] == "blue")
    body = client.get("/api/search", params={"like": liked, "k": 12}).json()
    blues = sum(colour[key] == "blue" for key in ids)
    assert [colour[r["image_id"]] for r in body["results"][:blues]] == ["blue"] * blues
    assert body["like"] == [liked] and all(r["example"] == liked for r in body["results"])
    text = "a red circle on a white background"
    unliked = next(key for key in ids if colour[key] == "red")
    body = client.get("/api/search", params={"q": text, "unlike": unliked, "like": liked, "k": 12}).json()
    assert unliked not in [r["image_id"] for r in body["results"]] and body["unlike"] == [unliked]
    body = client.get("/api/search", params={"q": text, "like": ["f" * 64, "<b>x</b>"]}).json()
    assert body["results"] and [line.split(":")[0] for line in body["left_out"]] == [
        f"positive example {'f' * 64}",
        "positive example <b>x</b>",
    ]
    assert_error(client.get("/api/search", params={"q": text, "like": liked, "unlike": liked}), 400, "bad-examples")
    assert_error(
        client.get("/api/search", params={"q": text, "like": [f"{n:064x}" for n in range(21)]}),
        400,
        "too-many-examples",
    )
    assert_error(client.get("/api/search", params={"unlike": liked}), 400, "bad-examples")
    assert_error(client.get("/api/search", params={"like": "f" * 64}), 404, "not-found")
    page = client.get("/", params={"q": text, "like": "<b>x</b>"}).text
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page  # what the user sent is escaped too


def test_near_duplicates_fold_under_the_first_of_them_unless_asked_not_to(built):
    """Alike past duplicates.threshold (here: one colour's images): each folds under the first of them."""
    settings = built["settings"]
    loose = settings.model_copy(update={"duplicates": settings.duplicates.model_copy(update={"threshold": 0.9})})
    colour = {key: image["tags"][0] for key, image in built["images"].items()}
    with TestClient(create_app(loose, warm_up=False)) as client:
        text = {"q": "a red circle on a white background", "k": 12}
        plain = client.get("/api/search", params={**text, "fold": "false"}).json()["results"]
        folded = client.get("/api/search", params=text).json()["results"]
        page = client.get("/", params=text).text
    assert all(not r["folded"] for r in plain) and len({colour[r["image_id"]] for r in plain}) > 1
    assert len(folded) == len({colour[r["image_id"]] for r in plain})  # one per colour
    firsts = {}
    for r in plain:
        firsts.setdefault(colour[r["image_id"]], r["image_id"])
    assert [r["image_id"] for r in folded] == [i for i in firsts.values()]
    for r in folded:
        assert [c["image_id"] for c in r["folded"]] == [
            p["image_id"] for p in plain if colour[p["image_id"]] == colour[r["image_id"]]
        ][1:]
    assert page.count('<details class="folded">') == sum(bool(r["folded"]) for r in folded)


def test_server_failures_answer_without_a_traceback(built):
    app = create_app(built["settings"], warm_up=False)
    app.state.searcher.search = lambda text, k, like=(), unlike=(): 1 / 0
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/search", params={"q": "red"})
        page = client.get("/", params={"q": "red"})
    assert_error(response, 500, "internal")
    assert "ZeroDivisionError" not in response.text
    assert_page_error(page, 500, "The server failed to answer")
    assert "ZeroDivisionError" not in page.text


def test_stored_images_thumbnails_and_metadata(client, built):
    key = list(built["images"])[1]  # the first has a script for a title
    response = client.get(f"/img/{key}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == built["images"][key]["data"]
    assert response.headers["x-content-type-options"] == "nosniff"
    thumb = client.get(f"/thumb/{key}")
    assert thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.format == "JPEG" and max(image.size) <= 240
    info = client.get(f"/api/images/{key}").json()
    assert info["caption"] == built["images"][key]["caption"] and info["license_name"] == "CC BY 2.0"
    assert info["owner"] == "Ada <b>Lovelace</b>" and info["source_id"].startswith("flickr:")
    assert info["page_url"].startswith("https://www.flickr.com/photos/ada/") and len(info["tags"]) == 2
    assert (info["width"], info["height"], info["format"]) == (96, 96, "PNG")


@pytest.mark.parametrize(
    "path",
    [
        "/img/../../../../etc/passwd",
        "/img/..%2F..%2F..%2Fetc%2Fpasswd",
        "/img/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumb/..%5C..%5Cwindows%5Cwin.ini",
        "/image/....//....//etc/passwd",
        "/api/images/..%2fmanifest",
        "/img/%00",
        "/img/images%2F00%2F" + "0" * 64,
        "/img/" + "a" * 63 + "/",
        "/img/" + "A" * 64,
        "/thumb/~root",
    ],
)
def test_path_traversal_finds_nothing(live, path):
    host, port = live.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path)  # sent as written: no client normalises the dots away
    response = connection.getresponse()
    body = response.read()
    assert response.status in (400, 404), (path, response.status)
    assert b"root:" not in body and b"[extensions]" not in body and b"Traceback" not in body


def test_image_ids_are_exact(live, built):
    key = sorted(built["images"])[0]
    assert http_status(live, f"/img/{key}") == 200
    for wrong in (key.upper(), key + "0", key[:-1], f"{key}.png", f"{key}%00", f"%20{key}", f"{key}/"):
        assert http_status(live, f"/img/{wrong}") == 404, wrong


def http_status(base: str, path: str) -> int:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    return response.status


# The pages.
def test_the_page_shows_results_and_messages_with_every_text_escaped(client, built):
    home = client.get("/")
    assert home.status_code == 200 and 'name="q"' in home.text and 'type="file"' in home.text
    assert "12 captions indexed" in home.text and home.headers["content-security-policy"].startswith("default-src")

    page = client.get("/", params={"q": f"{XSS} red circle"})
    assert page.status_code == 200 and page.text.count('<figure class="result" data-image-id=') >= 1
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    assert_page_error(client.get("/", params={"q": ""}), 400, "The query has no words")
    assert_page_error(client.get("/", params={"q": "zyzzyva"}), 404, "No indexed caption has any word")
    assert_page_error(client.get("/", params={"q": "red", "k": "lots"}), 400, "k: Input should be a valid integer")
    assert_page_error(client.get("/image/" + "f" * 64), 404, "No indexed image has this id")
    assert_page_error(client.get("/no/such/page"), 404, "There is no such page")
    assert_page_error(
        client.post("/", files={"image": ("notes.txt", b"just words", "text/plain")}), 415, "Not a usable image"
    )
    assert_page_error(
        client.post("/", files={"image": ("big.bmp", b"\0" * 2_000_000, "image/bmp")}),
        413,
        "larger than web.max_upload_bytes=300000",
    )
    assert_page_error(client.post("/", files={"image": ("", b"", "application/octet-stream")}), 400, "Choose an image")

    key, image = next(iter(built["images"].items()))
    uploaded = client.post("/", files={"image": (f"{XSS}.png", image["data"], "image/png")})
    assert uploaded.status_code == 200
    assert f'<q class="query-caption">{image["caption"]}</q>' in uploaded.text
    assert 'src="data:image/jpeg;base64,' in uploaded.text and f'href="/image/{key}"' in uploaded.text
    assert "<script>" not in uploaded.text

    detail = client.get(f"/image/{key}")  # this one's title is a script and its page_url a javascript: link
    assert detail.status_code == 200 and "&lt;script&gt;" in detail.text and "<script>" not in detail.text
    assert "javascript:" not in detail.text and "Ada &lt;b&gt;Lovelace&lt;/b&gt;" in detail.text
    assert "CC BY 2.0" in detail.text and f'src="/img/{key}"' in detail.text
    other = list(built["images"])[1]
    assert 'href="https://www.flickr.com/photos/ada/' in client.get(f"/image/{other}").text


def assert_page_error(response, status: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("text/html")
    assert '<p class="message" role="alert">' in response.text and message in response.text, response.text[-1500:]
    assert "Traceback" not in response.text


def test_a_newer_index_run_is_picked_up_without_a_restart(built, tmp_path):
    shutil.copytree(built["settings"].lake, tmp_path / "lake")
    settings = built["settings"].model_copy(update={"lake": str(tmp_path / "lake")})
    lake = Lake.open(settings)
    with TestClient(create_app(settings, warm_up=False)) as client:
        assert_error(client.get("/api/search", params={"q": "zebra"}), 404, "no-match")
        newcomer = "e" * 64
        run_id = write_run(
            lake,
            "captions",
            [
                dict(
                    image_id=newcomer,
                    uri="/elsewhere/zebra.jpg",
                    caption="a striped zebra on grass",
                    logprob=-1.0,
                    model_version=built["version"],
                    status="ok",
                    indexed_at=datetime.now(UTC),
                )
            ],
            CAPTIONS,
            model_version=built["version"],
        )
        deadline = time.monotonic() + 20
        while (response := client.get("/api/search", params={"q": "zebra"})).status_code != 200:
            assert time.monotonic() < deadline, "the new run was never picked up"
            time.sleep(0.1)
        assert [r["image_id"] for r in response.json()["results"]] == [newcomer]
        status = client.get("/api/status").json()
        captions_version = lake.table("captions").delta().version()
        assert status["captions"] == 13 and status["captions_version"] == captions_version
        assert lake.table("captions").commits()[-1]["run_id"] == run_id
        assert_error(client.get(f"/img/{newcomer}"), 404, "missing-image")  # indexed, but not in the image store

        lake.table("captions").delete(f"image_id = '{newcomer}'", dropped_runs=[run_id])  # deletes are noticed too
        deadline = time.monotonic() + 20
        while client.get("/api/status").json()["captions"] != 12:
            assert time.monotonic() < deadline, "the dropped run was never noticed"
            time.sleep(0.1)


def test_source_titles_and_tags_are_searched_unless_bleu_references_leave_them_out(built):
    with TestClient(create_app(built["settings"], warm_up=False)) as client:
        body = client.get("/api/search", params={"q": "alert"}).json()  # a word of one image's title only
        assert [r["image_id"] for r in body["results"]] == [next(iter(built["images"]))]
        assert (body["results"][0]["matched_kind"], body["results"][0]["matched_text"]) == ("title", XSS)
        page = client.get("/", params={"q": "alert"}).text
        # The matched title is shown, its shared word marked, and the rest escaped as text.
        assert "&lt;script&gt;<mark>alert</mark>(&#39;x&#39;)&lt;/script&gt;" in page and XSS not in page
    captions_only = built["settings"].model_copy(
        update={"bleu": built["settings"].bleu.model_copy(update={"references": ["caption", "label"]})}
    )
    with TestClient(create_app(captions_only, warm_up=False)) as client:
        assert_error(client.get("/api/search", params={"q": "alert"}), 404, "no-match")


# The OpenAPI schema, fuzzed.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_never_fails_on_generated_requests(app, mode):
    # Operation by operation with schemathesis' strategies (its pytest fixture loader needs pytest < 9).
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not (operation.query or operation.body):
            continue  # a path parameter of any string is valid, so it cannot be made invalid

        @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            case.call_and_validate(checks=checks)

        call()


def test_the_schema_documents_the_search(app):
    paths = app.openapi()["paths"]
    assert {"get", "post"} <= set(paths["/api/search"])
    assert "multipart/form-data" in paths["/api/search"]["post"]["requestBody"]["content"]
    assert {"/api/images/{image_id}", "/api/status", "/img/{image_id}", "/thumb/{image_id}"} <= set(paths)
    assert not any(path == "/" or path.startswith("/image/") for path in paths)  # pages are not API


# The command.
def test_cbir_web_serves_on_the_port_of_its_setting(built, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    settings = built["settings"]
    server = subprocess.Popen(
        [
            CBIR,
            "web",
            "--set",
            f"lake={settings.lake}",
            "--set",
            f"state_dir={tmp_path}/state",
            "--set",
            f"web.port={port}",
            *(argument for item in LIGHT_ENCODER for argument in ("--set", item)),
        ],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                status = json.loads(http_get(port, "/api/status"))
                break
            except OSError:
                assert time.monotonic() < deadline, "cbir web did not start"
                time.sleep(0.2)
        assert status["captions"] == 12 and status["model_version"] == built["version"]
        assert json.loads(http_get(port, "/api/search?q=red"))["count"] > 0
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert f"12 captions (captioner {built['version']}) at http://127.0.0.1:{port}/" in stderr


def test_cbir_web_refuses_a_bad_port(tmp_path):
    result = subprocess.run(
        [CBIR, "web", "--set", f"lake={tmp_path}/lake", "--set", "web.port=99999"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CBIR_")},
    )
    assert result.returncode == 2 and "web.port" in result.stderr and "Traceback" not in result.stderr


def http_get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a first search may compile the engine
    connection.request("GET", path)
    return connection.getresponse().read().decode()


# The page in a browser.
def test_the_page_in_headless_chromium(live, built):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = headless_chromium(built["tmp"])
    wait = WebDriverWait(driver, 30)
    all_loaded = (
        "const images = Array.from(document.querySelectorAll(arguments[0]));"
        "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);"
    )
    try:
        driver.get(live + "/")
        box = driver.find_element(By.NAME, "q")
        box.send_keys("a red circle on a white background")
        driver.find_element(By.CSS_SELECTOR, "form.search button").click()
        wait.until(lambda d: d.execute_script(all_loaded, ".grid figure img"))
        driver.save_screenshot(str(ARTIFACTS / "text-search.png"))
        figures = driver.find_elements(By.CSS_SELECTOR, ".grid figure")
        assert 1 <= len(figures) <= 10 and re.search(r"score \d\.\d{4}", figures[0].text)
        assert driver.find_element(By.NAME, "q").get_attribute("value") == "a red circle on a white background"

        # Relevance feedback: mark the last result "more like this" and search again: its colour rises.
        colour = {key: image["tags"][0] for key, image in built["images"].items()}
        before = [f.get_attribute("data-image-id") for f in figures]
        marked = before[-1]
        assert colour[before[0]] != colour[marked]
        figures[-1].find_element(By.CSS_SELECTOR, "input[name=like]").click()
        driver.find_element(By.CSS_SELECTOR, "button.again").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".examples figure.like"))
        wait.until(lambda d: d.execute_script(all_loaded, ".grid figure img"))
        driver.save_screenshot(str(ARTIFACTS / "more-like-this.png"))
        after = [f.get_attribute("data-image-id") for f in driver.find_elements(By.CSS_SELECTOR, ".grid figure")]
        same = [key for key in after if colour[key] == colour[marked]]
        assert after[: len(same)] == same and marked in same  # its colour first, the text kept
        assert driver.find_element(By.NAME, "q").get_attribute("value") == "a red circle on a white background"
        assert "looks like example" in driver.find_element(By.CSS_SELECTOR, ".grid figure").text

        key, image = next(iter(built["images"].items()))
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(image["uri"])
        driver.find_element(By.CSS_SELECTOR, "form.upload button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".query-caption"))
        wait.until(lambda d: d.execute_script(all_loaded, ".grid figure img, img.preview"))
        driver.save_screenshot(str(ARTIFACTS / "image-search.png"))
        assert driver.find_element(By.CSS_SELECTOR, ".query-caption").text == image["caption"]
        driver.find_element(By.CSS_SELECTOR, f'a[href="/image/{key}"]').click()
        wait.until(lambda d: d.execute_script(all_loaded, ".detail img"))
        driver.save_screenshot(str(ARTIFACTS / "image-page.png"))
        assert "CC BY 2.0" in driver.find_element(By.CSS_SELECTOR, ".detail dl").text
    finally:
        driver.quit()
