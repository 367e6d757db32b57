"""models/pth.py against crafted checkpoints: every size, stride, offset and count is checked against
the bytes really there, totals are capped, and the only failure is one BadCheckpoint naming the file."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from models.pth import LEGACY_MAGIC, BadCheckpoint, load_state_dict


class _Rebuild:  # pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, {})

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


def _rebuild_tensor_v2(*args):
    pass


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"


class _Float:  # pickles as torch.FloatStorage
    pass


_Float.__module__, _Float.__qualname__ = "torch", "FloatStorage"


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None


def _pickle(state) -> bytes:
    out = io.BytesIO()
    sys.modules.setdefault("torch", type(sys)("torch")).FloatStorage = _Float
    sys.modules.setdefault("torch._utils", type(sys)("torch._utils"))._rebuild_tensor_v2 = _rebuild_tensor_v2
    try:
        _Pickler(out, protocol=2).dump(state)
    finally:
        del sys.modules["torch"], sys.modules["torch._utils"]
    return out.getvalue()


def storage(key: str, numel: int):
    return ("storage", _Float, key, "cpu", numel)


def zip_pth(path: Path, tensors: dict, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", _pickle({k: _Rebuild(*v) for k, v in tensors.items()}))
        for key, data in storages.items():
            archive.writestr(f"m/data/{key}", data)
    return path


FOUR = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "tensor, storages, message",
    [
        ((storage("0", 4), 0, (1000,), (1,)), {"0": FOUR}, "reaches past its storage"),  # heap bytes, or a segfault
        ((storage("0", 4), 3, (2,), (1,)), {"0": FOUR}, "reaches past its storage"),  # the offset counts too
        ((storage("0", 4), 0, (2**20, 2**20), (0, 0)), {"0": FOUR}, "more than 268435456 elements"),  # stride 0: 4 TiB
        ((storage("0", 4), -1, (2,), (1,)), {"0": FOUR}, "non-negative"),
        ((storage("0", 4), 0, (2,), (-1,)), {"0": FOUR}, "non-negative"),
        ((storage("0", 4), 0, (2, 2), (2,)), {"0": FOUR}, "2 sizes and 1 strides"),
        ((storage("0", 4), 0, (4,), (1,)), {"0": FOUR[:8]}, "8 bytes in the archive, not 16"),  # a short entry
        ((storage("0", 2**40), 0, (4,), (1,)), {"0": FOUR}, "more than 1073741824 bytes"),  # a huge storage
        ((storage("../0", 4), 0, (4,), (1,)), {"0": FOUR}, "bad storage key"),
        ((storage("1", 4), 0, (4,), (1,)), {"0": FOUR}, "not a readable PyTorch file"),  # no such entry
    ],
)
def test_crafted_zip_checkpoints_are_refused(tmp_path, tensor, storages, message):
    path = zip_pth(tmp_path / "crafted.pth", {"w": tensor}, storages)
    with pytest.raises(BadCheckpoint, match=rf"^{path}: .*{message}"):
        load_state_dict(path)


def test_a_well_formed_one_still_loads(tmp_path):
    tensors = {"w": (storage("0", 4), 1, (3,), (1,)), "t": (storage("0", 4), 0, (2, 2), (1, 2))}
    path = zip_pth(tmp_path / "ok.pth", tensors, {"0": FOUR})
    loaded = load_state_dict(path)
    np.testing.assert_array_equal(loaded["w"], [1, 2, 3])
    np.testing.assert_array_equal(loaded["t"], [[0, 2], [1, 3]])


def legacy_pth(path: Path, numel_said: int, data: bytes, declared: int = 4) -> Path:
    parts = [
        pickle.dumps(LEGACY_MAGIC),
        pickle.dumps(1001),
        pickle.dumps({}),
        _pickle({"w": _Rebuild(storage("0", declared), 0, (declared,), (1,))}),
        pickle.dumps(["0"]),
    ]
    path.write_bytes(b"".join(parts) + struct.pack("<q", numel_said) + data)
    return path


@pytest.mark.parametrize(
    "numel_said, data, declared, message",
    [
        (4, FOUR[:4], 4, "needs 16 bytes, more than the file has left"),  # the file ends early
        (2**40, FOUR, 4, "says 1099511627776 elements"),
        (2**28, FOUR, 2**28, "more than the file has left"),  # counts larger than the file are refused before reading
    ],
)
def test_crafted_legacy_checkpoints_are_refused(tmp_path, numel_said, data, declared, message):
    path = legacy_pth(tmp_path / "legacy.pth", numel_said, data, declared)
    with pytest.raises(BadCheckpoint, match=message):
        load_state_dict(path)
    np.testing.assert_array_equal(load_state_dict(legacy_pth(tmp_path / "ok.pth", 4, FOUR))["w"], [0, 1, 2, 3])


def test_every_truncation_of_a_file_is_one_clear_error(tmp_path):
    """Run in a child: before, some of these crashed the process (a read outside the storage)."""
    whole = legacy_pth(tmp_path / "whole.pth", 4, FOUR).read_bytes()
    script = f"""
import sys
from models.pth import BadCheckpoint, load_state_dict
whole = open({str(tmp_path / "whole.pth")!r}, 'rb').read()
for end in range(len(whole)):
    open({str(tmp_path / "cut.pth")!r}, 'wb').write(whole[:end])
    try:
        load_state_dict({str(tmp_path / "cut.pth")!r})
        sys.exit(f'{{end}} bytes loaded')
    except BadCheckpoint:
        pass
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(whole) > 200
