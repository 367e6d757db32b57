"""Captioning an image query as the index job captions it: the same encoder, preprocessing, rounding of the
features and decoding; an image the captioner in use indexed keeps its stored caption and features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cbir.errors import UsageError
from cbir.images import ImageRejected, Limits, inspect_image
from cbir.lake import Lake
from cbir.reader import read_bytes
from cbir.settings import Settings
from models import store
from models.captioner import Decoding
from models.encoding import EncoderConfig, encode_chunks, encoder_config, load_captioner, read_features
from search.index import captions_of


@dataclass(frozen=True)
class ImageCaptioner:
    """Captions images as the index job does: the same encoder, preprocessing, rounding of the features and
    decoding; the captioner is loaded once per process."""

    lake: Lake
    version: str
    encoder: EncoderConfig
    decoding: Decoding

    @classmethod
    def from_settings(cls, lake: Lake, version: str, settings: Settings, parallel_tasks: int = 1) -> ImageCaptioner:
        return cls(lake, version, encoder_config(settings, parallel_tasks), Decoding.from_settings(settings.captioner))

    def load(self) -> None:
        """Load the encoder and the captioner now (TensorFlow's threads are set before its first use)."""
        self.encoder.load()
        load_captioner(self.lake, self.version, self.encoder)

    def caption(self, rows: Iterable[dict], read: Callable[[dict], bytes]) -> Iterator[tuple]:
        """(row, caption, features, None) for each image read and encoded, (row, None, None, reason) for the others."""
        captioner = load_captioner(self.lake, self.version, self.encoder)
        for chunk in encode_chunks(self.encoder, rows, read):
            decoded = captioner.decode(chunk.vectors, self.decoding) if chunk.rows else []
            for row, best, vector in zip(chunk.rows, decoded, chunk.vectors):
                yield row, best[0][0], vector, None
            for row, reason in chunk.failed:
                yield row, None, None, reason


def indexed(
    lake: Lake, config: EncoderConfig, version: str, image_ids: list[str]
) -> dict[str, tuple[str, list[float]]]:
    """image_id -> (caption, features) of the images this captioner version captioned."""
    captions, vectors = captions_of(lake, version, image_ids), read_features(lake, config, image_ids)
    return {
        image_id: (caption, vectors[image_id].tolist()) for image_id, caption in captions.items() if image_id in vectors
    }


def read_image(uri: str, settings: Settings, filesystems: dict | None = None) -> tuple[str, bytes]:
    """(image_id, bytes) of an image query, after the checks ingest makes; ImageRejected says why not."""
    limits = Limits.from_settings(settings.ingest)
    data = read_bytes(uri, settings.s3, {} if filesystems is None else filesystems, limits.max_bytes)
    return inspect_image(data, limits).image_id, data


def caption_image(lake: Lake, settings: Settings, card: dict, uri: str) -> tuple[str, list[float]]:
    """The caption and features of a query image: its stored ones when this captioner indexed it, else
    made now."""
    try:
        caption, features, _ = describe_file(lake, settings, card, uri)
    except UsageError as exc:
        raise UsageError(f"{uri}: {exc}") from None
    return caption, features


def describe_file(lake: Lake, settings: Settings, card: dict, uri: str) -> tuple[str, list[float], str]:
    """(caption, features, image_id) of an image file, as caption_image; UsageError says why not."""
    captioner = ImageCaptioner.from_settings(lake, card["version"], settings)
    store.check_encoder(card, captioner.encoder.key)
    try:
        image_id, data = read_image(uri, settings)
    except ImageRejected as exc:
        raise UsageError(str(exc)) from None
    known = indexed(lake, captioner.encoder, card["version"], [image_id])
    if image_id in known:
        return (*known[image_id], image_id)
    ((_, caption, features, reason),) = captioner.caption([{"image_id": image_id}], lambda row: data)
    if reason:
        raise UsageError(reason)
    return caption, features.tolist(), image_id
