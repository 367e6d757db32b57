"""Read a PyTorch state dict (.pth, legacy or zip format) into numpy arrays, without PyTorch.

A .pth file is a pickle whose tensors point at storages by key: the zip format keeps each storage
in an entry `<archive>/data/<key>`; the legacy format appends them, in the order of a pickled key
list, after the main pickle, each as an 8-byte element count and its raw little-endian bytes.
Only state-dict objects are accepted: any other class in the pickle is an error, not code run.
Nothing in the file is trusted: every size, stride, offset and count is checked against the bytes
that are really there before an array is made, and the total is capped.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_ELEMENTS = 2**28  # all tensors together (1 GiB of float32); EfficientNet-Lite0 has 4.7 million
MAX_BYTES = 2**30  # all storages together
MAX_PICKLE = 64 * 2**20  # bytes of the pickle itself (names and shapes, not numbers)


class BadCheckpoint(pickle.UnpicklingError):
    """A file that is not a well-formed state dict; the message names what is wrong."""


class _Storage:
    def __init__(self, key: str, dtype: type, numel: int):
        self.key, self.dtype, self.numel, self.data = key, np.dtype(dtype).newbyteorder("<"), numel, None


def _count(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise BadCheckpoint(f"{what} must be a non-negative integer, not {value!r:.40}")
    return value


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2, checked; storages may be filled later, so the array is made after loading.
    (The unpickler caps the elements of all tensors together: stride 0 could repeat one number 2**40 times.)"""
    if not isinstance(storage, _Storage) or not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise BadCheckpoint("a tensor is not (storage, offset, size, stride)")
    offset = _count(offset, "a tensor's offset")
    size = tuple(_count(n, "a tensor's size") for n in size)
    stride = tuple(_count(n, "a tensor's stride") for n in stride)
    if len(size) != len(stride):
        raise BadCheckpoint(f"a tensor has {len(size)} sizes and {len(stride)} strides")
    numel = math.prod(size)
    if numel > MAX_ELEMENTS:
        raise BadCheckpoint(f"a tensor of {numel} elements is over the limit of {MAX_ELEMENTS}")
    # The last element read must lie inside the storage: no bytes from outside it.
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise BadCheckpoint(
            f"a tensor of size {size}, stride {stride} and offset {offset} reaches past its "
            f"storage of {storage.numel} elements"
        )

    def make() -> np.ndarray:
        if storage.data is None or len(storage.data) != storage.numel:
            raise BadCheckpoint(f"storage {storage.key!r} is missing or not {storage.numel} elements long")
        if not numel:
            return np.zeros(size, storage.dtype.newbyteorder("="))
        itemsize = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            storage.data[offset:], size, tuple(s * itemsize for s in stride), writeable=False
        ).astype(storage.dtype.newbyteorder("="))

    return make


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, read_storage=None):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}
        self.read_storage = read_storage  # zip format: (key, bytes wanted) -> bytes
        self.elements = self.bytes = 0

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch" and name in DTYPES:
            return name
        raise BadCheckpoint(f"not a plain state dict: {module}.{name}")

    def _rebuild_tensor(self, storage, offset, size, *args):
        self.elements += math.prod(size) if isinstance(size, tuple) and all(type(n) is int for n in size) else 0
        if self.elements > MAX_ELEMENTS:
            raise BadCheckpoint(f"the tensors hold more than {MAX_ELEMENTS} elements")
        return _rebuild_tensor(storage, offset, size, *args)

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and pid[1] in DTYPES
            and isinstance(pid[2], str)
        ):
            raise BadCheckpoint(f"not a storage reference: {pid!r:.80}")
        _, kind, key, _location, numel = pid[:5]  # ('storage', type, key, location, numel[, view])
        if key not in self.storages:
            self.bytes += _count(numel, f"storage {key!r}'s length") * np.dtype(DTYPES[kind]).itemsize
            if self.bytes > MAX_BYTES:
                raise BadCheckpoint(f"the storages hold more than {MAX_BYTES} bytes")
            self.storages[key] = storage = _Storage(key, DTYPES[kind], numel)
            if self.read_storage:
                storage.data = np.frombuffer(self.read_storage(key, numel * storage.dtype.itemsize), storage.dtype)
        return self.storages[key]


def _read_exactly(handle, size: int, what: str, whole: bool = False) -> bytes:
    data = handle.read(size + whole)  # a whole entry: one more, as one longer than it says is as wrong
    if len(data) != size:
        raise BadCheckpoint(f"{what} holds {'more' if len(data) > size else len(data)} bytes, not {size}")
    return data


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array (a copy, in native byte order), in the file's order; BadCheckpoint
    (a pickle.UnpicklingError) naming the file and the problem when it is not a well-formed one."""
    try:
        state = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
        if not isinstance(state, dict) or not all(isinstance(k, str) and callable(v) for k, v in state.items()):
            raise BadCheckpoint("not a state dict of tensors")
        return collections.OrderedDict((name, make()) for name, make in state.items())
    except BadCheckpoint as exc:
        raise BadCheckpoint(f"{path}: {exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        struct.error,
        zipfile.BadZipFile,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        MemoryError,
        RecursionError,
    ) as exc:
        raise BadCheckpoint(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _load_zip(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        pkl = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        if pkl is None:
            raise BadCheckpoint("no data.pkl in the archive")
        folder = pkl[: -len("data.pkl")]

        def read(key: str, size: int) -> bytes:
            if "/" in key or key in ("", ".", ".."):
                raise BadCheckpoint(f"bad storage key {key!r:.40}")
            info = archive.getinfo(f"{folder}data/{key}")
            # torch stores entries uncompressed; deflate cannot expand more than about 1,032 times.
            inflated = info.compress_type != zipfile.ZIP_STORED and size > 1032 * info.compress_size
            if info.file_size != size or inflated:
                raise BadCheckpoint(f"storage {key!r} is {info.file_size} bytes in the archive, not {size}")
            with archive.open(info) as handle:
                return _read_exactly(handle, size, f"storage {key!r}", whole=True)

        with archive.open(pkl) as handle:
            data = handle.read(MAX_PICKLE + 1)
        if len(data) > MAX_PICKLE:
            raise BadCheckpoint(f"data.pkl is over {MAX_PICKLE} bytes")
        return _Unpickler(io.BytesIO(data), read).load()


def _load_legacy(path) -> dict:
    with open(path, "rb") as handle:
        if _Unpickler(handle).load() != LEGACY_MAGIC:
            raise BadCheckpoint("not a PyTorch file")
        _Unpickler(handle).load(), _Unpickler(handle).load()  # protocol version, system info
        unpickler = _Unpickler(handle)
        state = unpickler.load()
        keys = _Unpickler(handle).load()
        if not isinstance(keys, list):
            raise BadCheckpoint("no list of storages after the state dict")
        for key in keys:  # then each storage: its length, its bytes
            storage = unpickler.storages.get(key)
            if storage is None or storage.data is not None:
                raise BadCheckpoint(f"storage {key!r:.40} is not referenced once by the state dict")
            (numel,) = struct.unpack("<q", _read_exactly(handle, 8, f"storage {key!r}'s length"))
            if numel != storage.numel:
                raise BadCheckpoint(f"storage {key!r} says {numel} elements, the state dict {storage.numel}")
            size = numel * storage.dtype.itemsize
            if size > os.fstat(handle.fileno()).st_size - handle.tell():  # before reading: the file must hold it
                raise BadCheckpoint(f"storage {key!r} needs {size} bytes, more than the file has left")
            storage.data = np.frombuffer(_read_exactly(handle, size, f"storage {key!r}"), storage.dtype)
        return state
