"""The captioner's memory: nearest training texts as references, saved without pickles, refused when foreign."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cbir.errors import UsageError
from models import store
from models.card import EncoderInfo, ModelCard
from models.neighbours import PROJECTED_DIM, Memory, consensus


def clusters(dim: int, per_cluster: int = 20, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Three tight clusters of features, each image titled by its cluster and number."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 5
    features = np.concatenate([centre + rng.normal(size=(per_cluster, dim)) for centre in centres])
    texts = [f"{name} {i}" for name in ("cat", "boat", "tree") for i in range(per_cluster)]
    return features.astype(np.float32), texts, centres.astype(np.float32)


@pytest.mark.parametrize("dim", [64, PROJECTED_DIM * 2])
def test_the_nearest_texts_come_from_the_image_s_own_cluster_nearest_first(dim):
    features, texts, centres = clusters(dim, per_cluster=100)  # more images than PROJECTED_DIM: projected
    memory = Memory.build(features, texts, limit=1000)
    assert memory.vectors.shape == (300, min(dim, PROJECTED_DIM)) and memory.vectors.dtype == np.float16

    near = memory.nearest(centres + 0.1, k=5)
    for found, name in zip(near, ("cat", "boat", "tree")):
        assert len(found) == 5 and all(text.startswith(name) for text, _ in found)
        scores = [score for _, score in found]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
    # A remembered image is not its own neighbour: the nearest other one is.
    near = memory.nearest(features[[7, 125]], k=3)
    assert all(text != own for found, own in zip(near, ["cat 7", "boat 25"]) for text, _ in found)
    assert [found[0][0].split()[0] for found in near] == ["cat", "boat"] and all(s < 0.999 for _, s in near[0])


def test_a_text_given_by_a_nearer_image_is_not_repeated():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)
    memory = Memory.build(features, ["A red kite", "a red  kite", "a boat"], limit=10)
    assert [text for text, _ in memory.nearest(np.array([[1.0, 0.05]]), k=3)[0]] == ["A red kite", "a boat"]


def test_a_memory_keeps_at_most_its_limit_and_none_without_neighbours():
    features, texts, _ = clusters(16)
    memory = Memory.build(features, texts, limit=10, seed=1)
    assert len(memory) == 10 and set(memory.texts) <= set(texts)
    assert memory.nearest(features[:2], k=0) == [[], []]


def test_consensus_is_the_caption_the_others_agree_with():
    assert (
        consensus(["a dog", "a brown dog runs on grass", "brown dog on grass", "grass"]) == "a brown dog runs on grass"
    )
    assert consensus(["only one"]) == "only one"


def test_a_memory_round_trips_and_a_foreign_file_is_refused():
    features, texts, _ = clusters(32)
    memory = Memory.build(features, texts, limit=100)
    again = Memory.from_bytes(memory.to_bytes(), 32)
    assert list(again.texts) == texts and np.array_equal(again.vectors, memory.vectors)

    with pytest.raises(ValueError, match="do not fit 48 features"):
        Memory.from_bytes(memory.to_bytes(), 48)
    with pytest.raises(ValueError, match="not a neighbour memory"):
        Memory.from_bytes(b"PK\x03\x04 not really a zip", 32)
    # Texts as Python objects need a pickle to load: numpy refuses it, so such a file never runs code.
    pickled = io.BytesIO()
    np.savez(
        pickled,
        mean=memory.mean,
        basis=memory.basis,
        vectors=memory.vectors,
        texts=np.array([object()] * len(texts), dtype=object),
    )
    with pytest.raises(ValueError, match="not a neighbour memory"):
        Memory.from_bytes(pickled.getvalue(), 32)


def test_a_tampered_memory_in_the_lake_is_one_line_naming_the_version(tmp_path):
    from cbir.lake import Lake

    from conftest import make_settings

    lake = Lake.open(make_settings(tmp_path))
    lake.check()
    version = "20260101T000000Z-0123abcd"
    folder = tmp_path / "lake" / "models" / "captioner" / version
    folder.mkdir(parents=True)
    info = ModelCard(
        version=version, encoder=EncoderInfo(name="vgg16", weights="random", key="vgg16-random", feature_dim=32)
    )
    assert store.load_memory(lake, info) is None  # a version saved before memories existed
    (folder / "memory.npz").write_bytes(b"\x93NUMPY not an archive")
    with pytest.raises(UsageError, match=f"captioner {version}: memory.npz is not a neighbour memory"):
        store.load_memory(lake, info)
