"""The learned likeness (models/likeness.py): relevance from texts, the triplet-loss head, and the memory
moved into its space."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.settings import load_settings
from jobs.train import fit_memory
from models.likeness import POSITIVE, Categories, TextWeights, fit_head, ranked_at_10
from models.neighbours import Memory, _unit
from models.training import Split

GROUPS = ["red ball", "blue car", "green tree", "yellow star"]


def mixed_groups(n: int, seed: int) -> tuple[np.ndarray, list[list[str]]]:
    """Unit vectors whose group shows in one of 64 dimensions, weakly, among noise: raw cosines mix the groups."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, len(GROUPS), n)
    x = rng.normal(0, 1, (n, 64)).astype(np.float32)
    x[np.arange(n), group] += 1.5
    return _unit(x), [[f"a {GROUPS[g]} on the grass"] for g in group]


def test_relevance_is_shared_content_words_weighted_by_rarity():
    texts = TextWeights(
        [["a red ball"], ["the red car"], ["a dog in the park"], ["the the a"], ["a red car"], ["ball"]]
    ).relevance(range(6))
    assert texts[0, 2] == 0 and texts[3].max() == 0  # "a" and "the" make no pair; stop words alone, none
    assert texts[1, 4] == pytest.approx(1.0)  # the same content words
    assert texts[0, 1] > 0 and texts[1, 4] > texts[1, 0]  # "car" is rarer than "red": it weighs more
    assert texts[5, 0] >= POSITIVE > 0 == texts[5, 2]  # the rare word of "a red ball" makes a pair


def test_the_head_lowers_the_triplet_loss_and_raises_map_where_raw_features_mix_the_groups():
    train, train_texts = mixed_groups(600, 1)
    dev, dev_texts = mixed_groups(200, 2)
    head = fit_head(train, train_texts, dev, dev_texts, epochs=12, margin=0.2)

    losses = [epoch["loss"] for epoch in head.history[1:]]
    assert losses[-1] < losses[0]
    raw, learned = head.history[0]["map_at_10"], head.history[head.best_epoch]["map_at_10"]
    assert head.used and head.measured_on == "dev" and learned >= raw + 0.1, head.history
    summary = head.summary()
    assert summary["map_at_10"] == {"raw": raw, "learned": learned} and summary["epochs_run"] == 12
    relevant = TextWeights(dev_texts).relevance(range(len(dev)))
    assert ranked_at_10(_unit(dev @ head.weights), relevant >= POSITIVE)[0] == pytest.approx(learned)


def test_categories_are_the_positives_where_the_data_set_has_them():
    """Texts that tell nothing ("a drawing"), categories that tell the groups: the head learns from these."""
    train, train_texts = mixed_groups(600, 1)
    dev, dev_texts = mixed_groups(200, 2)
    labels = [[text[0].split()[1] for text in texts] for texts in (train_texts, dev_texts)]
    blank = [[["a drawing"]] * len(texts) for texts in (train_texts, dev_texts)]
    assert not fit_head(train, blank[0], dev, blank[1], epochs=4, margin=0.2).used  # nothing to learn from
    head = fit_head(train, blank[0], dev, blank[1], train_labels=labels[0], dev_labels=labels[1], epochs=12, margin=0.2)
    raw, learned = head.history[0]["map_at_10"], head.history[head.best_epoch]["map_at_10"]
    assert head.used and head.measured_on == "dev" and learned >= raw + 0.1, head.history
    assert Categories(["a", "b", "a"]).relevance([0, 1, 2]).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_a_head_that_measures_no_better_than_the_raw_space_is_not_used():
    train, _ = mixed_groups(200, 3)
    nothing_shared = [[f"word{i}"] for i in range(len(train))]  # no pair is relevant: nothing to learn from
    head = fit_head(train, nothing_shared, train[:0], [], epochs=2, margin=0.2)
    assert not head.used and head.best_epoch == 0 and head.measured_on == "train"
    assert np.array_equal(head.weights, np.eye(64, dtype=np.float32))


def test_memory_learned_projects_new_features_into_the_heads_space():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 400)).astype(np.float32)
    raw = Memory.build(features, [f"image {i}" for i in range(300)], limit=1000)
    weights = rng.normal(size=(raw.vectors.shape[1],) * 2).astype(np.float32)
    learned = raw.learned(weights)
    new = rng.normal(size=(5, 400)).astype(np.float32)
    assert np.allclose(learned.project(new), _unit(raw.project(new) @ weights), atol=1e-4)
    assert np.allclose(learned.vectors, _unit(raw.project(features) @ weights), atol=2e-3)  # float16
    assert list(learned.texts) == list(raw.texts)


@pytest.mark.parametrize("head_on", [True, False])
def test_the_trained_memory_is_in_the_heads_space_unless_it_is_off(head_on):
    train, train_texts = mixed_groups(400, 4)
    dev, dev_texts = mixed_groups(120, 5)
    splits = {
        "train": Split(train, np.arange(len(train), dtype=np.int32), [t[0] for t in train_texts]),
        "dev": Split(dev, np.arange(len(dev), dtype=np.int32), [t[0] for t in dev_texts]),
    }
    settings = load_settings(overrides=[f"train.likeness_head={str(head_on).lower()}", "train.likeness_epochs=8"])
    memory, head = fit_memory(settings, splits)

    raw = Memory.build(np.concatenate([train, dev]), [t[0] for t in train_texts + dev_texts], 100_000)
    if not head_on:
        assert head is None and np.array_equal(memory.vectors, raw.vectors)
        return
    assert head.used
    assert np.array_equal(memory.vectors, raw.learned(head.weights).vectors)
    assert np.allclose(memory.project(dev), _unit(raw.project(dev) @ head.weights), atol=1e-4)


def test_ranked_at_10_scores_a_known_ranking():
    vectors = _unit(np.array([[1, 0], [0.9, 0.1], [0, 1], [0.2, 0.9]], np.float32))
    groups = np.array([0, 0, 1, 1])
    assert ranked_at_10(vectors, groups[:, None] == groups[None, :]) == (1.0, 1.0)  # each finds its pair first
    crossed = np.array([0, 1, 0, 1])  # image 0's pair (2) comes last of three, image 1's (3) second
    map_crossed, recall = ranked_at_10(vectors, crossed[:, None] == crossed[None, :])
    assert recall == 1.0 and map_crossed == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 2]))
