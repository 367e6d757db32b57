"""Train: a captioned data set -> features (Spark, cached per encoder) -> LSTM captioner -> BLEU -> a version.

The encoder runs in Spark tasks; the captioner trains on the driver from the cached features,
which are small (one vector per image), so any machine that holds them can train.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
from pyspark.sql import SparkSession

from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.settings import Settings
from jobs.embed import embed, identify
from jobs.progress import Report
from models import store
from models.captioner import GREEDY, Captioner, Decoding
from models.card import DatasetInfo, EncoderInfo, LikenessInfo, Metrics, ModelCard, Sizes, Training
from models.datasets import Dataset, read_dataset
from models.encoders import weights_label, weights_source
from models.encoding import EncoderConfig, encoder_config, read_features
from models.likeness import Head, fit_head
from models.neighbours import Memory, consensus
from models.tokenizer import Tokenizer
from models.training import Split, evaluate, fit, split_references

EpochReport = Callable[[int, dict], None]


@dataclass
class Features:
    """The data set's features, computed or cached, split for training."""

    config: EncoderConfig
    computed: int
    splits: dict[str, Split]
    started: float
    dataset: Dataset


@dataclass
class Fitted:
    captioner: Captioner
    history: list[dict]
    max_length: int
    metrics: dict


@dataclass
class Trained:
    """What training staged: the features, the fitted captioner, its memory (and learned likeness, None: off),
    and its card once saved."""

    features: Features
    fitted: Fitted
    memory: Memory
    head: Head | None
    card: ModelCard | None = None


@dataclass
class TrainJob:
    """Train, evaluate and save a captioner version, made current (jobs.job's shape): plan reads the data set
    (before Spark starts, so a wrong file fails fast), work encodes it in Spark tasks and fits the captioner
    on the driver, commit saves the version with its card."""

    lake: Lake
    settings: Settings
    dataset_uri: str
    images: str | None = None
    on_epoch: EpochReport | None = None
    kind: str = "train"
    steps = {"plan": "read the data set", "work": "features and fit", "commit": "save"}

    def describe(self) -> str:
        return "features"

    def plan(self) -> Dataset:
        dataset = read_dataset(self.dataset_uri, self.settings, self.images)
        skipped = f", skipped {dict(dataset.skipped)}" if dataset.skipped else ""
        print(f"{dataset.kind} data set: {len(dataset.rows)} captions{skipped}")
        return dataset

    def has_work(self, dataset: Dataset) -> bool:
        return True

    def work(self, spark: SparkSession, dataset: Dataset, progress: Report | None) -> Trained:
        computed = features(spark, self.lake, self.settings, dataset, progress)
        fitted = fit_captioner(self.settings, computed, self.on_epoch)
        return Trained(computed, fitted, *fit_memory(self.settings, computed.splits))

    def commit(self, trained: Trained) -> None:
        if trained.card is None:  # a retry after the save: saved already
            trained.card = save(self.lake, self.settings, trained)

    def abort(self, trained: Trained) -> None:
        pass  # a version is written whole or not made current: nothing to drop

    def tally(self, dataset: Dataset, trained: Trained | None) -> ModelCard:
        return trained.card


def features(
    spark: SparkSession, lake: Lake, settings: Settings, dataset: Dataset, progress: Report | None = None
) -> Features:
    """The data set's good images encoded in Spark tasks (cached per encoder), split into train/dev/test."""
    started = time.monotonic()
    config = encoder_config(settings, spark.sparkContext.defaultParallelism)
    image_of = _identify(spark, settings, dataset)
    computed = embed(spark, lake, config, {i: uri for uri, i in image_of.items()}, progress)
    splits = _splits(dataset, image_of, read_features(lake, config, list(image_of.values())))
    if not splits["train"].captions:
        skipped = ", ".join(f"{reason} {n}" for reason, n in dataset.skipped.most_common()) or "none"
        raise UsageError(f"data set {dataset.uri} has no usable training rows (skipped: {skipped})")
    return Features(config, computed, splits, started, dataset)


def fit_captioner(settings: Settings, data: Features, on_epoch: EpochReport | None = None) -> Fitted:
    """Fit the LSTM captioner on the driver and measure BLEU on the test split."""
    c, t, splits = settings.captioner, settings.train, data.splits
    tokenizer = Tokenizer.fit(splits["train"].captions, c.min_word_count)
    longest = max(len(tokenizer.encode(caption)) - 1 for caption in splits["train"].captions)
    max_length = min(c.max_length, longest)
    decoding = Decoding.from_settings(c)
    captioner, history = fit(
        splits["train"],
        splits["dev"],
        tokenizer,
        max_length=max_length,
        embedding_dim=c.embedding_dim,
        units=c.units,
        dropout=c.dropout,
        epochs=t.epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        patience=t.patience,
        seed=t.seed,
        monitor=t.monitor,
        label_smoothing=t.label_smoothing,
        decoding=decoding,
        on_epoch=on_epoch,
    )
    test = splits["test"]
    references = split_references(test) if test.captions else []
    # Plain greedy decoding beside the configured one, so a card shows what the decoding settings add.
    metrics = (
        evaluate(captioner, test.features, references, {"greedy": GREEDY, "configured": decoding}) if references else {}
    )
    return Fitted(
        captioner, history, max_length, {"test_images": len(references), "decoding": asdict(decoding), **metrics}
    )


def save(lake: Lake, settings: Settings, trained: Trained) -> ModelCard:
    """Save the captioner as a new version, made current, with its model card; returns the card."""
    data, fitted, memory = trained.features, trained.fitted, trained.memory
    dataset = data.dataset
    c, t, config, splits, history = settings.captioner, settings.train, data.config, data.splits, fitted.history
    card = ModelCard(
        created_at=datetime.now(UTC).isoformat(),
        dataset=DatasetInfo(
            uri=dataset.uri,
            kind=dataset.kind,
            captions={name: len(split) for name, split in splits.items()},
            images={name: len(split.features) for name, split in splits.items()},
            skipped=dict(dataset.skipped),
        ),
        encoder=EncoderInfo(
            name=config.name,
            weights=weights_label(config.weights),
            weights_source=weights_source(config.name, config.weights),
            key=config.key,
            feature_dim=config.dim,
            features_computed=data.computed,
        ),
        sizes=Sizes(
            vocabulary=len(fitted.captioner.tokenizer),
            max_length=fitted.max_length,
            embedding_dim=c.embedding_dim,
            units=c.units,
            dropout=c.dropout,
            min_word_count=c.min_word_count,
            memory_images=len(memory),
            memory_dim=memory.vectors.shape[1],
        ),
        training=Training(
            epochs_run=len(history),
            best_epoch=_best_epoch(history),
            history=history,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            seed=t.seed,
            monitor=t.monitor,
            label_smoothing=t.label_smoothing,
            seconds=round(time.monotonic() - data.started, 1),
        ),
        metrics=Metrics(**fitted.metrics),
        software=_versions(),
    )
    if trained.head is not None:  # set only when fitted: a card keeps absent the keys it does not have
        card.likeness = LikenessInfo(**trained.head.summary())
    card.version = store.save(lake, fitted.captioner, card, memory)
    return card


def _identify(spark: SparkSession, settings: Settings, dataset: Dataset) -> dict[str, str]:
    """uri -> image_id for the good images; rows of bad ones are dropped and counted by reason."""
    checked = identify(spark, settings, sorted({row.uri for row in dataset.rows}))
    kept = []
    for row in dataset.rows:
        image_id, error = checked[row.uri]
        if image_id:
            kept.append(row)
        else:
            dataset.skipped[f"image {error.reason}"] += 1
    dataset.rows = kept
    return {uri: image_id for uri, (image_id, _) in checked.items() if image_id}


def _splits(dataset: Dataset, image_of: dict[str, str], features: dict[str, np.ndarray]) -> dict[str, Split]:
    """Rows -> one Split each for train/dev/test: unique images' features and an index per caption (and each
    image's category, when the data set gives every image one)."""
    grouped: dict[str, dict[str, list[str]]] = {
        "train": defaultdict(list),
        "dev": defaultdict(list),
        "test": defaultdict(list),
    }
    category: dict[str, str] = {}
    for row in dataset.rows:
        image_id = image_of[row.uri]
        if image_id in features:
            grouped[row.split][image_id].append(row.caption)
            category[image_id] = category.get(image_id) or row.category
        else:
            dataset.skipped["no-features"] += 1
    every = all(category.values())
    splits = {}
    for name, by_image in grouped.items():
        ids = sorted(by_image)
        index = [i for i, image_id in enumerate(ids) for _ in by_image[image_id]]
        captions = [caption for image_id in ids for caption in by_image[image_id]]
        matrix = np.stack([features[i] for i in ids]) if ids else np.zeros((0, 1), np.float32)
        splits[name] = Split(matrix, np.array(index, np.int32), captions, [category[i] for i in ids] if every else None)
    return splits


def fit_memory(settings: Settings, splits: dict[str, Split]) -> tuple[Memory, Head | None]:
    """The memory: the train and dev images, each with the caption its annotators agree on most (the images
    whose texts the index job gives as references to the images that look most like them); in the learned
    likeness's space when the head is on and measures better than the raw space."""
    t = settings.train
    train, dev = _captions_per_image(splits["train"]), _captions_per_image(splits["dev"])
    features = np.stack([splits["train"].features[i] for i in train] + [splits["dev"].features[i] for i in dev])
    texts = [consensus(captions) for captions in [*train.values(), *dev.values()]]
    memory = Memory.build(features, texts, settings.captioner.memory_images, t.seed)
    if not t.likeness_head:
        return memory, None
    labels = [_image_labels(splits[name], picked) for name, picked in (("train", train), ("dev", dev))]
    head = fit_head(
        memory.project(features[: len(train)]),
        list(train.values()),
        memory.project(features[len(train) :]),
        list(dev.values()),
        train_labels=labels[0],
        dev_labels=labels[1],
        epochs=t.likeness_epochs,
        margin=t.likeness_margin,
        seed=t.seed,
    )
    return (memory.learned(head.weights) if head.used else memory), head


def _image_labels(split: Split, images: dict[int, list[str]]) -> list[str] | None:
    """The categories of these images of the split (its feature rows), or None when the data set has none."""
    return None if split.categories is None else [split.categories[i] for i in images]


def _captions_per_image(split: Split) -> dict[int, list[str]]:
    """A split's images (feature rows, ascending) -> their captions."""
    by_image: dict[int, list[str]] = defaultdict(list)
    for image, caption in zip(split.image_index.tolist(), split.captions):
        by_image[image].append(caption)
    return dict(sorted(by_image.items()))


def _best_epoch(history: list[dict]) -> int:
    if not history:
        return 0
    if "val_bleu" in history[0]:
        return 1 + int(np.argmax([epoch["val_bleu"] for epoch in history]))
    key = "val_loss" if "val_loss" in history[0] else "loss"
    return 1 + int(np.argmin([epoch[key] for epoch in history]))


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    names = ("cbir", "tensorflow-cpu", "keras", "numpy", "nltk", "pyspark", "pyarrow")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}
