"""The lake: content-addressed images and Parquet tables that commit a whole run at a time.

Layout under the lake root (a local folder or s3://bucket/prefix):

    images/<id[:2]>/<id>.<ext>            image bytes; id = sha256 of the bytes
    <table>/run=<run_id>/part-*.parquet   a table's rows, one folder per committed run
    <table>/_commits/<run_id>.json        the commit record: run id, time, files, rows
    <table>/_staging/<run_id>/            a run in flight; readers skip names starting with '_'
    models/  queries/                     model versions and query runs

Executors write a run's parts into _staging; the driver commits them. On a local folder the
commit is one directory rename (after the files are fsynced), so any reader sees all of a run or
none of it, after a power cut too. Object stores
have no rename: parts are copied into run=<id>/ and the commit record is written last, so
readers that follow _commits (cbir itself, or DuckDB over the listed files) never see half a
run; a crash mid-commit is rolled forward by the next writer. While a run is alive its driver
touches `_staging/<run_id>/_heartbeat`; staging idle for a day is abandoned and removed.

Names read back from the lake (run ids, part files, versions) are checked against the formats
cbir writes before any path is built from them or anything is deleted.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cbir import uris
from cbir.errors import CbirError, UsageError
from cbir.schemas import ERRORS, RESULTS, SCHEMAS, features_schema
from cbir.settings import S3, Settings

TABLES = ("manifest", "features", "captions")
ROOTS = ("images", "models", "queries")
STALE_STAGING_S = 24 * 3600
HEARTBEAT_S = 600
READY = "_ready.json"
HEARTBEAT = "_heartbeat"
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")  # new_run_id()'s; captioner versions are run ids too
PART = re.compile(r"part-[0-9A-Za-z_-]{1,80}\.parquet")


def checked_run_id(value, what: str = "run id") -> str:
    """value, when it is a run id as new_run_id() makes them; never a path."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise CbirError(f"{what} {str(value)[:80]!r} is not a run id (like 20250101T000000Z-0123abcd)")
    return value


def new_run_id() -> str:
    """Sortable by time, unique across machines, never parsed as a number."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def open_filesystem(uri: str, s3: S3) -> tuple[pafs.FileSystem, str]:
    """A URI (local path, file:// or s3://) -> (filesystem, path within it)."""
    if uris.is_s3(uri):
        return pafs.S3FileSystem(**_s3_options(s3)), uri.removeprefix(uris.S3).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def _s3_options(s3: S3) -> dict:
    # Delayed open lets a small write be one PutObject instead of a three-request multipart upload.
    options: dict = {"allow_delayed_open": True}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.rstrip("/").partition("://")
        options.update(endpoint_override=host, scheme=scheme)
    if s3.region:
        options["region"] = s3.region
    if s3.access_key and s3.secret_key:
        options.update(access_key=s3.access_key.get_secret_value(), secret_key=s3.secret_key.get_secret_value())
    return options


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in this folder durable (the folder's entry, not just the data)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes, overwrite: bool = False) -> bool:
    """Write atomically; without overwrite, False when the path exists (content-addressed reuse)."""
    if not overwrite and fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    if is_local(fs):  # a reader must never see a half-written file, nor an empty one after a power cut
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)
    else:  # an object PUT is atomic already, and S3 has no folders to create
        with fs.open_output_stream(path) as out:
            out.write(data)
    return True


@dataclass
class Lake:
    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, settings: Settings) -> Lake:
        fs, root = open_filesystem(settings.lake, settings.s3)
        return cls(settings.lake, fs, root)

    def check(self) -> None:
        """Fail early, in one line, when the lake cannot be reached or created."""
        try:
            if is_local(self.fs):
                self.fs.create_dir(self.root, recursive=True)
            else:
                bucket = self.root.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type != pafs.FileType.Directory:
                    raise UsageError(f"lake {self.uri}: bucket '{bucket}' does not exist")
        except OSError as exc:
            raise UsageError(f"lake {self.uri} is not reachable: {str(exc).splitlines()[0]}") from None

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, path: str) -> str:
        return path if is_local(self.fs) else f"s3://{path}"

    def table(self, name: str) -> Table:
        return Table(name, self.fs, self.path(name), SCHEMAS[name])

    def features_table(self, encoder_key: str, dim: int, dtype: str) -> Table:
        """Features are cached per encoder (and storage type): features/<encoder key>-<dtype>/."""
        name = f"{encoder_key}-{dtype}"
        return Table(f"features/{name}", self.fs, self.path("features", name), features_schema(dim, dtype))

    def query_tables(self, run_id: str) -> tuple[Table, Table]:
        """A query run's results and errors: queries/<run_id>/{results,errors}/."""
        folder = self.path("queries", checked_run_id(run_id))
        return (
            Table("results", self.fs, f"{folder}/results", RESULTS),
            Table("errors", self.fs, f"{folder}/errors", ERRORS),
        )

    def table_uris(self) -> dict[str, str]:
        return {name: self.uri_of(self.path(name)) for name in (*TABLES, *ROOTS)}

    # Content-addressed images.
    def image_path(self, image_id: str, image_format: str) -> str:
        ext = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}.get(image_format, image_format.lower())
        return self.path("images", image_id[:2], f"{image_id}.{ext}")

    def put_image(self, image_id: str, image_format: str, data: bytes) -> bool:
        return put_bytes(self.fs, self.image_path(image_id, image_format), data)


@dataclass
class Table:
    name: str
    fs: pafs.FileSystem
    path: str
    schema: pa.Schema

    # Reading: committed runs only.
    def committed_runs(self) -> set[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.path}/_commits", allow_not_found=True))
        names = (i.base_name[: -len(".json")] for i in infos if i.is_file and i.base_name.endswith(".json"))
        return {name for name in names if RUN_ID.fullmatch(name)}

    def files(self) -> list[str]:
        committed = self.committed_runs()
        if not committed:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        files = []
        for info in infos:
            run_dir, _, name = info.path[len(self.path) + 1 :].partition("/")
            if info.is_file and name.endswith(".parquet") and run_dir.removeprefix("run=") in committed:
                files.append(info.path)
        return sorted(files)

    def dataset(self, files: list[str] | None = None) -> ds.Dataset:
        files = self.files() if files is None else files
        return ds.dataset(files, schema=self.schema, format="parquet", filesystem=self.fs)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return self.dataset().to_table(columns=columns)

    # Writing: parts into _staging, then one commit.
    def staging(self, run_id: str) -> str:
        return f"{self.path}/_staging/{checked_run_id(run_id)}"

    def part_writer(self, run_id: str, tag: str = "") -> PartWriter:
        """A writer for one part file of a run (used in executors); the file appears on the first rows."""
        return PartWriter(self, checked_run_id(run_id), f"part-{tag}{uuid.uuid4().hex[:12]}.parquet")

    def commit(self, run_id: str, parts: list[tuple[str, int]], **meta) -> dict | None:
        """Publish the named parts of a run (other files in its staging folder are failed attempts).
        Idempotent: committing a committed run returns its record.

        `meta` (for example the model version) is kept in the commit record.
        """
        self.recover()
        if run_id in self.committed_runs():  # a retry after the commit went through (or was rolled forward)
            return self._read_json(f"{self.path}/_commits/{run_id}.json")
        parts = [(name, rows) for name, rows in parts if rows]
        if not parts:
            self.abort(run_id)
            return None
        record = {
            "run_id": run_id,
            "committed_at": datetime.now(UTC).isoformat(),
            "files": [name for name, _ in parts],
            "rows": sum(rows for _, rows in parts),
            **meta,
        }
        # From here on the run is decided: a crash before the end is rolled forward by recover().
        self._write_json(f"{self.staging(run_id)}/{READY}", record)
        self._publish(record)
        return record

    def commits(self) -> list[dict]:
        """The commit records, oldest first."""
        records = [self._read_json(f"{self.path}/_commits/{run_id}.json") for run_id in self.committed_runs()]
        return sorted(records, key=lambda record: record["committed_at"])

    def drop_runs(self, run_ids: Iterable[str]) -> None:
        """Remove committed runs: the record goes first, so readers stop seeing the run at once."""
        for run_id in map(checked_run_id, run_ids):
            record = f"{self.path}/_commits/{run_id}.json"
            if self.fs.get_file_info(record).is_file:
                self.fs.delete_file(record)
            if self.fs.get_file_info(f"{self.path}/run={run_id}").type == pafs.FileType.Directory:
                self.fs.delete_dir(f"{self.path}/run={run_id}")

    def abort(self, run_id: str) -> None:
        if self.fs.get_file_info(self.staging(run_id)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.staging(run_id))

    def recover(self) -> None:
        """Finish commits that a crash interrupted; drop abandoned staging older than a day."""
        staged = self.fs.get_file_info(pafs.FileSelector(f"{self.path}/_staging", allow_not_found=True))
        for info in staged:
            if not RUN_ID.fullmatch(info.base_name):
                continue  # not cbir's: left alone
            ready = f"{info.path}/{READY}"
            if self.fs.get_file_info(ready).is_file:
                self._publish(self._read_json(ready))
            elif self._newest_mtime(info.path) < time.time() - STALE_STAGING_S:
                self.abort(info.base_name)
        committed = self.committed_runs()
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            run_id = info.base_name.removeprefix("run=")
            ready = f"{info.path}/{READY}"  # renamed into place, record not yet written
            if (
                info.base_name.startswith("run=")
                and RUN_ID.fullmatch(run_id)
                and run_id not in committed
                and self.fs.get_file_info(ready).is_file
            ):
                self._publish(self._read_json(ready))

    def _publish(self, record: dict) -> None:
        run_id = checked_run_id(record.get("run_id") if isinstance(record, dict) else None, f"{self.name}'s commit of")
        files = record.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and PART.fullmatch(f) for f in files):
            raise CbirError(f"{self.name} run {run_id}: its commit names files that are not part files")
        staging, run_dir = self.staging(run_id), f"{self.path}/run={run_id}"
        staged = self.fs.get_file_info(staging).type == pafs.FileType.Directory
        if staged and is_local(self.fs):
            keep = {*files, READY}
            for info in self.fs.get_file_info(pafs.FileSelector(staging)):
                if info.base_name not in keep:
                    self.fs.delete_file(info.path)
                else:
                    fsync_file(info.path)  # the data is on disk before the rename publishes it
            fsync_dir(staging)
            self.fs.move(staging, run_dir)  # one rename: the whole run appears at once
            fsync_dir(self.path)
        elif staged:

            def copy(name: str) -> None:
                if self.fs.get_file_info(f"{run_dir}/{name}").type == pafs.FileType.NotFound:
                    self.fs.copy_file(f"{staging}/{name}", f"{run_dir}/{name}")

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(copy, files))
        self._write_json(f"{self.path}/_commits/{run_id}.json", record)
        self.abort(run_id)
        if self.fs.get_file_info(f"{run_dir}/{READY}").is_file:
            self.fs.delete_file(f"{run_dir}/{READY}")

    def _newest_mtime(self, path: str) -> float:
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=0.0)

    def _write_json(self, path: str, data: dict) -> None:
        put_bytes(self.fs, path, json.dumps(data, indent=1).encode(), overwrite=True)

    def _read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())


@contextmanager
def heartbeat(tables: Iterable[Table], run_id: str, every_s: float = HEARTBEAT_S):
    """While the block runs, touch the run's staging heartbeat in each table, so that another writer's
    recover() does not take a long run's staging for abandoned."""
    tables, stop = list(tables), threading.Event()

    def beat():
        while not stop.wait(every_s):  # the run's first files are fresh: no beat needed before
            for table in tables:
                staging = table.staging(run_id)
                if is_local(table.fs):
                    table.fs.create_dir(staging, recursive=True)
                with table.fs.open_output_stream(f"{staging}/{HEARTBEAT}") as out:
                    out.write(datetime.now(UTC).isoformat().encode())

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class PartWriter:
    """Rows of one table into one Parquet part in a run's staging folder, opened on the first rows."""

    def __init__(self, table: Table, run_id: str, name: str):
        self.table, self.run_id, self.name = table, run_id, name
        self.rows, self._writer = 0, None

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._writer is None:
            staging = self.table.staging(self.run_id)
            if is_local(self.table.fs):
                self.table.fs.create_dir(staging, recursive=True)
            self._writer = pq.ParquetWriter(
                f"{staging}/{self.name}", self.table.schema, filesystem=self.table.fs, compression="zstd"
            )
        self._writer.write_batch(batch.select(self.table.schema.names).cast(self.table.schema))
        self.rows += batch.num_rows

    def close(self) -> tuple[str | None, int]:
        """(file name, rows); no file when no rows came."""
        if self._writer is not None:
            self._writer.close()
        return (self.name if self.rows else None), self.rows
