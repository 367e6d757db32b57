"""The captioner's memory: its training images' features and human texts, for nearest-neighbour references.

A captioner trained on a few thousand images says the few phrases it learned well; the human texts of
the training images that look most like a new image carry the specific words it cannot (Devlin et al.,
"Exploring Nearest Neighbor Approaches for Image Captioning", 2015). On OpenClipart's held-out drawings
the five nearest titles lift text->image recall@10 from 0.41 to 0.49 (bench/quality.py).

Features are centred and, above PROJECTED_DIM, projected on their principal axes (fitted on a seeded
sample), so a memory of 100,000 VGG16 images is about 50 MB, not 800; neighbours are found by cosine.
Saved with numpy's npz without pickles: a foreign memory file can only be refused, never run.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cbir.bleu import BleuParams
from cbir.engine import BleuIndex
from cbir.text import words

PROJECTED_DIM = 256
PCA_SAMPLE = 10_000  # rows the principal axes are fitted on: enough for 256 axes, seconds at 4096 dims
MEMBERS = ("mean", "basis", "vectors", "texts")  # memory.npz's arrays
# What a saved memory may inflate to: any file up to MEMORY_FLOOR (100,000 images with captions of up to 200
# characters come to about 130 MB, much of it the texts' padding), beyond that MEMORY_RATIO times its file's
# size (float vectors hardly compress: a real memory inflates two to five times; a zip bomb a thousand).
MEMORY_FLOOR = 512 << 20
MEMORY_RATIO = 64
SAME_IMAGE = 0.999  # a cosine this close is the image itself (or its copy): its own text is not a neighbour's


@dataclass(frozen=True)
class Memory:
    mean: np.ndarray  # (feature_dim,) float32
    basis: np.ndarray  # (feature_dim, d) float32: identity-like when not projected
    vectors: np.ndarray  # (n, d) float16, unit length
    texts: np.ndarray  # (n,) str: one human text per remembered image

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def feature_dim(self) -> int:
        return len(self.mean)

    @classmethod
    def build(cls, features: np.ndarray, texts: list[str], limit: int, seed: int = 0) -> Memory:
        """Remember at most `limit` images (a seeded sample when there are more)."""
        features = np.asarray(features, np.float32)
        rng = np.random.default_rng(seed)
        if len(features) > limit:
            keep = np.sort(rng.choice(len(features), limit, replace=False))
            features, texts = features[keep], [texts[i] for i in keep]
        mean = features.mean(axis=0) if len(features) else np.zeros(features.shape[1], np.float32)
        centred = features - mean
        if features.shape[1] > PROJECTED_DIM and len(features) > PROJECTED_DIM:
            sample = centred[rng.choice(len(centred), min(PCA_SAMPLE, len(centred)), replace=False)]
            basis = np.linalg.svd(sample, full_matrices=False)[2][:PROJECTED_DIM].T
        else:
            basis = np.eye(features.shape[1], dtype=np.float32)
        return cls(mean, basis.astype(np.float32), _unit(centred @ basis).astype(np.float16), np.array(texts, str))

    def learned(self, weights: np.ndarray) -> Memory:
        """The memory in a learned space (models.likeness): its unit vectors @ weights, L2-normalised. A linear
        map keeps a direction's scale out of it, so it folds into the basis and project() gives the same space."""
        weights = np.asarray(weights, np.float32)
        vectors = _unit(self.vectors.astype(np.float32) @ weights).astype(np.float16)
        return Memory(self.mean, (self.basis @ weights).astype(np.float32), vectors, self.texts)

    @cached_property
    def _columns(self) -> np.ndarray:
        """The vectors as float32 columns, once: every batch of nearest() multiplies by them."""
        return np.ascontiguousarray(self.vectors.T, np.float32)

    def project(self, features: np.ndarray) -> np.ndarray:
        """Features in the memory's space, unit length: comparable with its vectors."""
        return _unit((np.asarray(features, np.float32) - self.mean) @ self.basis)

    def nearest(self, features: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each row: the texts of its k nearest remembered images with their cosine, nearest first,
        a text already given by a nearer image left out. An image the memory holds is not its own
        neighbour: its text would answer for it (and inflate cbir eval on the training images)."""
        if k <= 0 or not len(self) or not len(features):
            return [[] for _ in range(len(features))]
        similarity = self.project(features) @ self._columns
        similarity[similarity >= SAME_IMAGE] = -np.inf
        k = min(k, len(self))
        best = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        out = []
        for row, candidates in zip(similarity, best):
            seen, found = set(), []
            for i in candidates[np.argsort(-row[candidates], kind="stable")]:
                key = " ".join(words(str(self.texts[i])))
                if key not in seen and np.isfinite(row[i]):
                    seen.add(key)
                    found.append((str(self.texts[i]), float(row[i])))
            out.append(found)
        return out

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=self.mean, basis=self.basis, vectors=self.vectors, texts=self.texts)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, feature_dim: int) -> Memory:
        """Read a saved memory; ValueError says what is wrong with a file that is not one for these features.
        The arrays' declared sizes are checked before any is inflated or allocated (_check_declared)."""
        try:
            _check_declared(data, feature_dim)
            with np.load(io.BytesIO(data), allow_pickle=False) as saved:
                mean, basis, vectors, texts = (saved[name] for name in MEMBERS)
        except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(str(exc) if isinstance(exc, _Unfit) else f"not a neighbour memory ({exc})") from None
        return cls(mean.astype(np.float32), basis.astype(np.float32), vectors.astype(np.float16), texts)


class _Unfit(ValueError):
    """A memory whose arrays do not fit the captioner's features."""


def _check_declared(data: bytes, feature_dim: int) -> None:
    """A saved memory's sizes, as its zip directory and its .npy headers declare them, checked before anything
    is inflated or allocated (np.load allocates what a header declares, then reads): ValueError for a memory
    that would inflate past the limit (MEMORY_FLOOR, or MEMORY_RATIO times the file's size), that does not
    hold what its headers declare, or whose arrays do not fit these features."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: info for info in archive.infolist()}  # the last of a name, as np.load reads
        missing = [f"{name}.npy" for name in MEMBERS if f"{name}.npy" not in members]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        limit = max(MEMORY_FLOOR, MEMORY_RATIO * len(data))
        inflated = sum(members[f"{name}.npy"].file_size for name in MEMBERS)  # the zip's own word, from its directory
        if inflated > limit:
            raise ValueError(
                f"its arrays would inflate to {_size(inflated)}, over the {_size(limit)} allowed for a file of "
                f"{_size(len(data))}"
            )
        out = {}
        for name in MEMBERS:
            info = members[f"{name}.npy"]
            with archive.open(info) as member:  # a zip member is read (inflated) no further than asked
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{name}.npy is .npy format {version}")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
                header = member.tell()
            if dtype.hasobject or not all(isinstance(size, int) and size >= 0 for size in shape):
                raise ValueError(f"{name}.npy holds objects or a bad shape: {dtype} {shape}")
            nbytes = dtype.itemsize * math.prod(shape)
            if header + nbytes != info.file_size:
                raise ValueError(
                    f"{name}.npy declares {dtype} {shape} ({_size(nbytes)}) but holds {_size(info.file_size - header)}"
                )
            out[name] = (dtype, shape)
    (mean, mean_shape), (basis, basis_shape), (vectors, vectors_shape), (texts, texts_shape) = out.values()
    d = basis_shape[1] if len(basis_shape) == 2 else -1
    if (
        mean_shape != (feature_dim,)
        or basis_shape != (feature_dim, d)
        or len(vectors_shape) != 2
        or vectors_shape[1] != d
        or texts_shape != vectors_shape[:1]
        or texts.kind != "U"
        or not all(dtype.kind == "f" for dtype in (mean, basis, vectors))
    ):
        raise _Unfit(f"its arrays do not fit {feature_dim} features per image")


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Prototypes:
    """A picture for words: a text query matched (by BLEU) against the memory's texts, and the vectors of
    the best-matching remembered images averaged, weighted by their BLEU. Ranking a query's BLEU pool by
    likeness to that picture finds images whose own texts missed the query's words (OpenClipart: recall@1
    0.23 -> 0.34). The vectors are the memory's centred and projected ones: uncentred, every drawing looks
    alike (recall@10 0.51, not 0.53)."""

    texts: BleuIndex  # image "i" is the memory's row i
    vectors: np.ndarray  # (n, d) float16 unit vectors: the memory's
    images: int  # how many best-matching remembered images make the picture

    @classmethod
    def of(cls, memory: Memory, images: int, max_order: int) -> Prototypes:
        texts = [[words(str(text))] for text in memory.texts]
        return cls(BleuIndex.from_texts([str(i) for i in range(len(memory))], texts, max_order), memory.vectors, images)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def picture(self, query: list[str], params: BleuParams) -> np.ndarray | None:
        """The query's picture, a float32 unit vector; None when no remembered text shares a word with it."""
        hits = self.texts.search(query, self.images, params) if self.images > 0 else []
        if not hits:
            return None
        weights = np.array([hit.score for hit in hits], np.float32)
        rows = np.array([int(hit.image_id) for hit in hits])
        return _unit((weights @ self.vectors[rows].astype(np.float32))[None])[0]


def consensus(captions: list[str]) -> str:
    """The one caption of an image that shares the most words with its others (the first among equals):
    the text most annotators agree on, when a data set has several per image."""
    bags = [set(words(caption)) for caption in captions]
    shared = [sum(len(bag & other) for j, other in enumerate(bags) if j != i) for i, bag in enumerate(bags)]
    return captions[shared.index(max(shared))]


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
