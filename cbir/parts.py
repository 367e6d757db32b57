"""A run's Parquet parts as the Delta tables store them: the storage types (Delta has no float16 and no
fixed-size lists), per-file statistics for the add actions, and the writer Spark tasks use."""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cbir.errors import CbirError
from cbir.storage import fsync_file, is_local

STRING_STATS_MAX = 256  # longer strings get no min/max statistics (a bound must never be wrong)


def storage_type(type_: pa.DataType) -> pa.DataType:
    """Vectors: float32 as a Delta array<float>; float16 as binary (dim little-endian halves, half the bytes)."""
    if pa.types.is_fixed_size_list(type_):
        if pa.types.is_float16(type_.value_type):
            return pa.binary()
        return pa.list_(type_.value_type)
    return type_


def storage_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(storage_type(f.type)) for f in schema], metadata=schema.metadata)


def to_storage(data: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.RecordBatch | pa.Table:
    """cbir's rows (schema) -> the stored form (storage_schema(schema))."""
    columns = []
    for f in schema:
        column = data.column(f.name)
        if pa.types.is_fixed_size_list(f.type):
            column = _vectors_to_storage(column, f.type)
        columns.append(column)
    make = pa.RecordBatch if isinstance(data, pa.RecordBatch) else pa.Table
    return make.from_arrays(columns, schema=storage_schema(schema))


def _vectors_to_storage(column, type_: pa.FixedSizeListType):
    if isinstance(column, pa.ChunkedArray):
        return pa.chunked_array([_vectors_to_storage(c, type_) for c in column.chunks], storage_type(type_))
    values = column.flatten().cast(type_.value_type)  # a fixed-size list, or a list<float> from Spark
    if pa.types.is_float16(type_.value_type):
        raw = np.ascontiguousarray(values.to_numpy(zero_copy_only=False).astype("<f2")).view(np.uint8)
        width = type_.list_size * 2
        offsets = pa.array(np.arange(0, len(column) * width + 1, width, dtype=np.int32))
        return pa.BinaryArray.from_buffers(pa.binary(), len(column), [None, offsets.buffers()[1], pa.py_buffer(raw)])
    offsets = pa.array(np.arange(0, len(column) * type_.list_size + 1, type_.list_size, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(type_.value_type))


def from_storage(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """Stored rows -> cbir's types, for the columns present."""
    for i, name in enumerate(data.column_names):
        if name in schema.names and pa.types.is_fixed_size_list(schema.field(name).type):
            field_ = schema.field(name)
            data = data.set_column(i, field_, _vectors_from_storage(data.column(i), field_.type))
    return data


def _vectors_from_storage(column: pa.ChunkedArray, type_: pa.FixedSizeListType) -> pa.ChunkedArray:
    chunks = []
    for chunk in column.chunks:
        if pa.types.is_fixed_size_list(chunk.type):
            chunks.append(chunk.cast(type_))
        elif pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
            width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            offsets = np.frombuffer(
                chunk.buffers()[1], dtype=width, count=len(chunk) + 1, offset=chunk.offset * width(0).itemsize
            )
            start, end = int(offsets[0]), int(offsets[-1])
            if end - start != len(chunk) * type_.list_size * 2:
                raise CbirError(f"stored vectors are not {type_.list_size} float16 values each")
            raw = np.frombuffer(chunk.buffers()[2], dtype="<f2", count=(end - start) // 2, offset=start)
            chunks.append(pa.FixedSizeListArray.from_arrays(pa.array(raw, type_.value_type), type_.list_size))
        else:
            chunks.append(pa.FixedSizeListArray.from_arrays(chunk.flatten().cast(type_.value_type), type_.list_size))
    return pa.chunked_array(chunks, type_)


class Part(NamedTuple):
    """One Parquet part of a run: its path within the table (run-<id>/part-*.parquet), rows, bytes, Delta stats."""

    name: str | None
    rows: int
    size: int = 0
    stats: str = ""


def _stats(columns: dict[str, tuple], rows: int) -> str:
    """Delta per-file statistics from the running (min, max, nulls) of each flat column."""
    mins, maxes, nulls = {}, {}, {}
    for name, (low, high, null_count, ok) in columns.items():
        nulls[name] = null_count
        if ok and low is not None:
            mins[name], maxes[name] = low, high
    return json.dumps({"numRecords": rows, "minValues": mins, "maxValues": maxes, "nullCount": nulls})


def _observe(columns: dict[str, tuple], batch: pa.RecordBatch) -> None:
    """Fold a batch into the running (min, max, nulls, min/max usable) of each column."""
    for f, column in zip(batch.schema, batch.columns, strict=True):
        low, high, nulls, ok = columns.get(f.name, (None, None, 0, True))
        nulls += column.null_count
        flat = pa.types.is_string(f.type) or pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        if ok and flat and column.null_count < len(column):
            found = pc.min_max(column).as_py()
            if pa.types.is_string(f.type) and (pc.max(pc.utf8_length(column)).as_py() or 0) > STRING_STATS_MAX:
                ok = False
            elif pa.types.is_floating(f.type) and not all(math.isfinite(v) for v in found.values()):
                ok = False
            else:
                low = found["min"] if low is None else min(low, found["min"])
                high = found["max"] if high is None else max(high, found["max"])
        elif not flat:
            ok = False
        columns[f.name] = (low, high, nulls, ok)


class PartWriter:
    """Rows of one table into one Parquet part of a run's folder, opened on the first rows (used in executors)."""

    def __init__(self, table, run_id: str, name: str):  # a cbir.lake.Table
        self.table, self.run_id, self.name = table, run_id, f"run-{run_id}/{name}"
        self.rows, self._writer, self._sink = 0, None, None
        self._schema = storage_schema(table.schema)
        self._columns: dict[str, tuple] = {}

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._writer is None:
            folder = self.table.run_folder(self.run_id)
            if is_local(self.table.fs):
                self.table.fs.create_dir(folder, recursive=True)
            self._sink = self.table.fs.open_output_stream(f"{self.table.path}/{self.name}")
            self._writer = pq.ParquetWriter(self._sink, self._schema, compression="zstd")
        batch = to_storage(batch.select(self.table.schema.names).cast(self.table.schema), self.table.schema)
        self._writer.write_batch(batch)
        self._observe(batch)
        self.rows += batch.num_rows

    def _observe(self, batch: pa.RecordBatch) -> None:
        _observe(self._columns, batch)

    def close(self) -> Part:
        """The part written; no file (name None) when no rows came."""
        if self._writer is None:
            return Part(None, 0)
        self._writer.close()
        size = self._sink.tell()
        self._sink.close()
        if is_local(self.table.fs):  # on disk before a commit names it
            fsync_file(f"{self.table.path}/{self.name}")
        return Part(self.name, self.rows, size, _stats(self._columns, self.rows))


def part_of(table, name: str, data: pa.Table) -> Part:
    """A Part for a file written in the driver (its rows already in stored form)."""
    columns: dict[str, tuple] = {}
    for batch in data.to_batches():
        _observe(columns, batch)
    size = table.fs.get_file_info(f"{table.path}/{name}").size
    return Part(name, data.num_rows, size, _stats(columns, data.num_rows))
