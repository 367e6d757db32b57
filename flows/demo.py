"""Demo flow: the whole pipeline on the embedded default and the sample corpus that pip installed.

ingest -> train (unless the current captioner was trained on this corpus with this encoder) ->
index -> a batch query file of text and image queries (results, gallery) -> retrieval quality
(`cbir eval`) on the corpus -> a summary: the steps, a few images' human and generated captions, the
gallery's path and the metrics.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from prefect.artifacts import create_link_artifact

from cbir import uris
from cbir.errors import UsageError
from cbir.images import image_id
from cbir.lake import Lake
from cbir.samples import DEMO_EMOJI, PHOTO_CATEGORY, sample_corpus, write_jsonl
from cbir.settings import Settings, load_settings
from cbir.text import words
from flows.common import flow
from flows.evaluate import eval_flow
from flows.index import index_flow
from flows.ingest import ingest_flow
from flows.query import query_flow
from flows.reporting import publish_summary
from flows.train import train_flow
from jobs.spark import spark_session
from models import store
from models.encoders import encoder_key
from search.index import captions_of

DEMO_PROFILE = "offline"  # its encoder's weights come with a pip package: no download
# Text queries a person might type; each is asked when the corpus's captions have one of its words.
TYPED_QUERIES = ("dog face", "cat face", "smiling face", "coffee cup")
# Image queries: these photos (by their skimage loader's name), then the first emoji of a few groups.
QUERY_PHOTOS = ("cat", "coffee")
QUERY_EMOJI_GROUPS = 2
# The summary's example captions: these photos, then the first emoji of a few groups.
EXAMPLE_PHOTOS = ("astronaut", "cat", "coffee")
EXAMPLE_EMOJI_GROUPS = 4
STEPS = 5


@flow(name="demo", log_prints=True)
def demo_flow(emoji: int = DEMO_EMOJI, settings: Settings | None = None) -> dict:
    """Ingest the sample corpus (scikit-image photos and `emoji` Twemoji emoji, with their captions),
    train a captioner on it unless the current one already was, caption every image, answer a query
    file of text and image queries, and measure retrieval on the corpus."""
    settings = settings or load_settings(os.environ.get("CBIR_PROFILE") or DEMO_PROFILE)
    rows = sample_corpus(emoji=emoji)
    text = "".join(sorted(row["uri"] + "\t" + row["caption"] + "\n" for row in rows))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    # Named by its content: the same corpus is the same file, so a rerun finds it already trained on.
    samples = Path(settings.state_dir) / "samples"
    manifest = write_jsonl(rows, samples / f"corpus-{digest}.jsonl")
    queries = write_jsonl(demo_queries(rows), samples / f"queries-{digest}.jsonl")
    photos = sum(1 for row in rows if row["category"] == PHOTO_CATEGORY)
    print(
        f"sample corpus: {photos} photos and {len(rows) - photos} emoji ({manifest}); "
        f"encoder {settings.encoder.name} ({settings.encoder.weights})"
    )
    lake = Lake.open(settings)  # each step's flow checks it
    steps: list[dict] = []

    def step(name: str, what: str, run):
        print(f"demo step {len(steps) + 1}/{STEPS}: {name}: {what}")
        started = time.monotonic()
        result = run()
        steps.append({"step": name, "seconds": round(time.monotonic() - started, 1), "what": what})
        return result

    with spark_session(settings):  # one Spark session for every step
        ingested = step(
            "ingest", "store the corpus's images in the lake", lambda: ingest_flow(str(manifest), settings=settings)
        )
        if _trained_on(lake, str(manifest), encoder_key(settings.encoder.name, settings.encoder.weights)):
            step("train", "skipped: the current captioner was trained on this corpus with this encoder", lambda: None)
        else:
            step("train", "train a captioner on the corpus", lambda: train_flow(str(manifest), settings=settings))
        indexed = step("index", "caption every image not captioned yet", lambda: index_flow(settings=settings))
        answered = step("query", f"answer {queries.name}", lambda: query_flow(str(queries), settings=settings))
        metrics = step(
            "eval",
            "recall@1/5/10 and mAP@10 on the corpus",
            lambda: eval_flow(str(manifest), prepare=False, settings=settings),
        )
    gallery = answered["gallery"]
    create_link_artifact(
        link=uris.link(gallery),
        link_text="gallery",
        key="demo-gallery",
        description="The demo's query results as a gallery",
    )
    publish_summary("demo-summary", "cbir demo", steps)
    version = store.resolve(lake, settings.captioner.version)
    publish_summary("demo-captions", f"example captions (captioner {version})", example_captions(lake, version, rows))
    profile = "" if settings.profile == "local" else f" --profile {settings.profile}"
    print(
        f"images: {ingested['ingested']} ingested now, {indexed['indexed']} captioned now; "
        f"queries: {answered['queries']} asked, run {answered['run_uri']}"
    )
    print(
        f"retrieval on the corpus ({metrics['queries']} captions asked): recall@1 {metrics['r_at_1']:.3f}, "
        f"recall@5 {metrics['r_at_5']:.3f}, recall@10 {metrics['r_at_10']:.3f}, mAP@10 {metrics['map_at_10']:.3f}"
    )
    print(f"lake: {settings.lake}\ngallery: {gallery}\nsearch it: cbir{profile} search 'dog face'")
    return {
        "ingest": ingested,
        "index": indexed,
        "query": answered,
        "eval": metrics,
        "gallery": gallery,
        "steps": steps,
    }


def demo_queries(rows: list[dict]) -> list[dict]:
    """A query file for the corpus: typed text queries, each group's first caption, and a few images."""
    vocabulary = {word for row in rows for word in words(row["caption"])}
    firsts: dict[str, dict] = {}
    for row in rows:
        firsts.setdefault(row["category"], row)
    texts = [q for q in TYPED_QUERIES if vocabulary & set(words(q))] + [row["caption"] for row in firsts.values()]
    queries = [{"query_id": f"text-{i + 1}", "text": text} for i, text in enumerate(dict.fromkeys(texts))]
    photos = {row["title"]: row for row in rows if row["category"] == PHOTO_CATEGORY}
    images = [photos[name] for name in QUERY_PHOTOS if name in photos]
    images += [row for category, row in firsts.items() if category != PHOTO_CATEGORY][:QUERY_EMOJI_GROUPS]
    queries += [{"query_id": f"image-{row['title'].replace(' ', '-')}", "image": row["uri"]} for row in images]
    return queries


def example_captions(lake: Lake, version: str, rows: list[dict]) -> list[dict]:
    """A few photos and emoji of different groups: their human caption and what the captioner says."""
    photos = {row["title"]: row for row in rows if row["category"] == PHOTO_CATEGORY}
    emoji: dict[str, dict] = {}
    for row in rows:
        if row["category"] != PHOTO_CATEGORY:
            emoji.setdefault(row["category"], row)
    examples = [photos[name] for name in EXAMPLE_PHOTOS if name in photos]
    examples += list(emoji.values())[:EXAMPLE_EMOJI_GROUPS]
    ids = [image_id(Path(row["uri"]).read_bytes()) for row in examples]  # the lake's id: the bytes' sha256
    generated = captions_of(lake, version, ids)
    return [
        {
            "image": row["title"],
            "group": row["category"],
            "human caption": row["caption"],
            "generated caption": generated.get(id_, "(not captioned)"),
        }
        for row, id_ in zip(examples, ids)
    ]


def _trained_on(lake: Lake, dataset: str, encoder: str) -> bool:
    try:
        card = store.card(lake)
    except UsageError:  # no captioner yet
        return False
    return card.dataset is not None and card.dataset.uri == dataset and card.encoder.key == encoder
