"""Read a PyTorch state dict (.pth, legacy or zip format) into numpy arrays, without PyTorch.

A .pth file is a pickle whose tensors point at storages by key: the zip format keeps each storage
in an entry `<archive>/data/<key>`; the legacy format appends them, in the order of a pickled key
list, after the main pickle, each as an 8-byte element count and its raw little-endian bytes.
Only state-dict objects are accepted: any other class in the pickle is an error, not code run.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
          "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
          "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    def __init__(self, dtype: type, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype).newbyteorder("<"), numel, None


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2; storages may be filled later, so the array is made after loading."""
    return lambda: np.lib.stride_tricks.as_strided(
        storage.data[offset:], tuple(size), tuple(s * storage.dtype.itemsize for s in stride)).astype(
        storage.dtype.newbyteorder("="))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, read_storage=None):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}
        self.read_storage = read_storage  # zip format: key -> bytes

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in DTYPES:
            return name
        raise pickle.UnpicklingError(f"not a plain state dict: {module}.{name}")

    def persistent_load(self, pid):
        _, kind, key, _location, numel = pid[:5]  # ('storage', type, key, location, numel[, view])
        if key not in self.storages:
            self.storages[key] = storage = _Storage(DTYPES[kind], numel)
            if self.read_storage:
                storage.data = np.frombuffer(self.read_storage(key), storage.dtype)
        return self.storages[key]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array (a copy, in native byte order), in the file's order."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pkl = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            with archive.open(pkl) as handle:
                read = lambda key: archive.read(f"{pkl[:-len('data.pkl')]}data/{key}")  # noqa: E731
                state = _Unpickler(handle, read).load()
    else:
        with open(path, "rb") as handle:
            if _Unpickler(handle).load() != LEGACY_MAGIC:
                raise pickle.UnpicklingError(f"{path} is not a PyTorch file")
            _Unpickler(handle).load(), _Unpickler(handle).load()  # protocol version, system info
            unpickler = _Unpickler(handle)
            state = unpickler.load()
            for key in _Unpickler(handle).load():  # then each storage: its length, its bytes
                storage = unpickler.storages[key]
                (numel,) = struct.unpack("<q", handle.read(8))
                storage.data = np.frombuffer(handle.read(numel * storage.dtype.itemsize), storage.dtype)
    return collections.OrderedDict((name, make()) for name, make in state.items())
