"""Captioner versions in the lake: models/captioner/<version>/{model.keras, tokenizer.json, card.json,
memory.npz} (memory: its training images' features and texts, models/neighbours.py).

A version is written whole before `models/captioner/current` points at it, so a reader never
loads half a model. Loading checks that the model, its tokenizer and the configured encoder agree.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from cbir.errors import UsageError
from cbir.lake import RUN_ID, Lake, checked_run_id, new_run_id
from cbir.storage import put_bytes
from models.captioner import Captioner
from models.card import ModelCard
from models.neighbours import Memory
from models.tokenizer import Tokenizer

ROOT = ("models", "captioner")


def _read(lake: Lake, path: str, limit: int = -1) -> bytes:
    with lake.fs.open_input_stream(path) as stream:
        return stream.read(limit) if limit >= 0 else stream.read()


def save(lake: Lake, captioner: Captioner, card: ModelCard, memory: Memory | None = None, promote: bool = True) -> str:
    """Write a new version, its card saying which; with promote, make it current. Returns the version."""
    version = new_run_id()
    folder = lake.path(*ROOT, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.keras"
        captioner.model.save(local)  # Keras writes local files only
        put_bytes(lake.fs, f"{folder}/model.keras", local.read_bytes())
    put_bytes(lake.fs, f"{folder}/tokenizer.json", captioner.tokenizer.to_json().encode())
    if memory is not None:
        put_bytes(lake.fs, f"{folder}/memory.npz", memory.to_bytes())
    put_bytes(lake.fs, f"{folder}/card.json", card.model_copy(update={"version": version}).to_json().encode())
    if promote:
        put_bytes(lake.fs, lake.path(*ROOT, "current"), version.encode(), overwrite=True)
    return version


def resolve(lake: Lake, version: str = "current") -> str:
    """The version asked for, or the one `current` points at; either checked to be a version (a run
    id) before it names a folder."""
    if version != "current":
        if not RUN_ID.fullmatch(version):
            raise UsageError(
                f"captioner version '{version[:80]}' is not in the lake {lake.uri} (versions are run ids "
                "like 20250101T000000Z-0123abcd)"
            )
        return version
    pointer = lake.path(*ROOT, "current")
    if lake.fs.get_file_info(pointer).type == pafs.FileType.NotFound:
        raise UsageError(f"no captioner in the lake {lake.uri} yet: train one with `cbir train DATASET`")
    return checked_run_id(_read(lake, pointer, 100).decode(errors="replace").strip(), "the captioner pointer holds")


def card(lake: Lake, version: str = "current") -> ModelCard:
    version = resolve(lake, version)
    path = lake.path(*ROOT, version, "card.json")
    if lake.fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise UsageError(f"captioner version '{version}' is not in the lake {lake.uri}")
    try:
        info = ModelCard.from_json(_read(lake, path))
    except ValueError as exc:  # pydantic's ValidationError, JSON errors included
        raise UsageError(
            f"captioner version '{version}': its card is not a model card ({str(exc).splitlines()[0][:200]})"
        ) from None
    if info.version != version:
        raise UsageError(f"captioner version '{version}': its card names another version")
    return info


def check_encoder(info: ModelCard, encoder: str) -> None:
    """A captioner reads only the features it was trained on."""
    if info.encoder.key != encoder:
        raise UsageError(
            f"captioner {info.version} was trained on {info.encoder.key} features, "
            f"but the encoder settings give {encoder}: set encoder.name/encoder.weights to match, or train again"
        )


def load(lake: Lake, version: str = "current", encoder: str | None = None) -> tuple[Captioner, ModelCard]:
    """The captioner and its card; `encoder` (an encoder key) must be the one it was trained on."""
    import keras

    info = card(lake, version)
    folder = lake.path(*ROOT, info.version)
    if encoder is not None:
        check_encoder(info, encoder)
    tokenizer = Tokenizer.from_json(_read(lake, f"{folder}/tokenizer.json").decode())
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.keras"
        local.write_bytes(_read(lake, f"{folder}/model.keras"))
        model = keras.models.load_model(local, compile=False)
    try:
        captioner = Captioner(model, tokenizer)
    except ValueError as exc:
        raise UsageError(f"captioner {info.version} is inconsistent: {exc}") from None
    if captioner.feature_dim != info.encoder.feature_dim:
        raise UsageError(
            f"captioner {info.version} expects {captioner.feature_dim} features per image, "
            f"its card says {info.encoder.feature_dim}"
        )
    return captioner, info


def load_memory(lake: Lake, info: ModelCard) -> Memory | None:
    """The version's memory (`info` is its card), or None for a version saved without one."""
    path = lake.path(*ROOT, info.version, "memory.npz")
    if lake.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        return Memory.from_bytes(_read(lake, path), info.encoder.feature_dim)
    except ValueError as exc:
        raise UsageError(f"captioner {info.version}: memory.npz is {exc}") from None
