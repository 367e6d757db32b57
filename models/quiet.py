"""TF_CPP_MIN_LOG_LEVEL applied to what TensorFlow prints while it is imported.

TensorFlow 2.19+ logs its start-up notices through absl before it reads TF_CPP_MIN_LOG_LEVEL
(tensorflow/tensorflow#100442): "oneDNN custom operations are on ..." and absl's "All log
messages before absl::InitializeLog() ...", once per process, Spark's Python workers included.
No setting stops them (TF_ENABLE_ONEDNN_OPTS=0 would, but halves bfloat16 encoding), so the
import runs with stderr read line by line: the lines below that level are dropped, every other
line is passed on as it comes (cbir.stderr).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys

from cbir.stderr import lines_dropped

ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")  # I0000 00:00:1796.1  4565 port.cc:153] ...
ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITY = {b"I": 0, b"W": 1, b"E": 2}  # F(atal) is never dropped


def install() -> None:
    """Drop the notices of the first `import tensorflow` (keras' included) from here on."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def below_min_level(line: bytes, min_level: int) -> bool:
    if line.startswith(ABSL_PREAMBLE):
        return min_level > 0
    match = ABSL_LINE.match(line)
    return bool(match) and SEVERITY.get(match.group(1), 3) < min_level


def min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL") or 0)
    except ValueError:
        return 0


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and not for the search below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and min_log_level() > 0:
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # everything else is the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        level = min_log_level()
        with lines_dropped(lambda line: below_min_level(line, level)):
            self._loader.exec_module(module)
