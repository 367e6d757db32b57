"""The lake: content-addressed images, and Delta Lake tables (delta-rs, no JVM) that commit a run at a time.

Layout under the lake root (a local folder or s3://bucket/prefix):

    images/<id[:2]>/<id>.<ext>               image bytes; id = sha256 of the bytes
    <table>/_delta_log/                      the Delta log: one JSON commit per table version
    <table>/run-<run_id>/part-*.parquet      a run's rows, written by Spark tasks with pyarrow
    features/<encoder>-<dtype>/              one Delta table per encoder
    models/  queries/<run_id>/{results,errors}/   model versions; query runs (Delta tables too)

Executors write a run's parts into its folder; the driver commits them as ONE Delta transaction
(add actions with statistics; the commit info names the run, the job and the model version). Until
then no reader sees them: readers read a table version's files from the log, never a folder
listing, so Spark, Polars, DuckDB and Trino read the same rows as cbir. A run that dies leaves only
unreferenced files, which `vacuum` removes once they are 7 days old (IN_FLIGHT_HOURS, whatever the retention:
they may be a live run's), and a commit checks that every part it adds is still there.

Concurrency is optimistic (conflict detection, no lease): a Table handle pins the version it first
reads; its commit is attempted at exactly the next version (delta-rs writes the log entry with a
conditional PUT, If-None-Match on S3, never an unsafe rename). When another writer committed in
between, the rows it committed whose key (`KEYS`) this run also wrote are dropped from this run's
parts (rewritten without them) and the commit is tried again at the new version. So two runs over
the same pending images leave each (image_id, model_version) once, and two ingests each uri once.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cbir import uris
from cbir.errors import CbirError, UsageError
from cbir.parts import Part, PartWriter, from_storage, part_of, storage_schema
from cbir.schemas import ADDED_LATER, ERRORS, RESULTS, SCHEMAS, features_schema
from cbir.settings import IMAGE_FORMATS, Settings
from cbir.storage import delta_storage_options, is_local, open_filesystem, put_bytes

TABLES = ("manifest", "features", "captions")
ROOTS = ("images", "models", "queries")
# A commit drops the rows of its run whose key another run committed since this run read the table.
KEYS = {"manifest": ("uri",), "captions": ("image_id", "model_version"), "features": ("image_id",)}
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")  # new_run_id()'s; captioner versions are run ids too
PART = re.compile(r"part-[0-9A-Za-z_-]{1,80}\.parquet")
RUN_PART = re.compile(rf"run-({RUN_ID.pattern})/({PART.pattern})")
# The Delta protocol cbir reads and writes: no reader features (cbir reads the files a version lists,
# so deletion vectors or column mapping would make it read wrong rows), writer features up to 7.
READER_VERSION, WRITER_VERSION = 1, 7
COMMIT_ATTEMPTS = 100
RETENTION_HOURS = 168  # vacuum keeps what the versions of the last 7 days need (Delta's default)
# Files that no version names (parts of runs in flight, or of runs that died) are kept this long after they
# were written, whatever the retention: the longest a run may take from its first part to its commit.
IN_FLIGHT_HOURS = RETENTION_HOURS
IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # cbir.images.image_id(): the sha256 of the bytes, hex
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # the others: the format's name, lower case


def checked_run_id(value, what: str = "run id") -> str:
    """value, when it is a run id as new_run_id() makes them; never a path."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise CbirError(f"{what} {str(value)[:80]!r} is not a run id (like 20250101T000000Z-0123abcd)")
    return value


def checked_image_id(value) -> str:
    """value, when it is an image id as ingest makes them (a sha256 hex digest); never a path."""
    if not isinstance(value, str) or not IMAGE_ID.fullmatch(value):
        raise CbirError(f"image id {str(value)[:80]!r} is not a sha256 hex digest")
    return value


def checked_image_format(value) -> str:
    """value, when it is one of the formats images are stored in (settings.IMAGE_FORMATS); never a path."""
    if not isinstance(value, str) or value not in IMAGE_FORMATS:
        raise CbirError(f"image format {str(value)[:80]!r} is not a stored image format ({', '.join(IMAGE_FORMATS)})")
    return value


def new_run_id() -> str:
    """Sortable by time, unique across machines, never parsed as a number."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _delta_fields(schema) -> list[tuple[str, str]]:
    """(name, Delta type as JSON) of a schema, nullability and metadata aside: what must agree to append."""
    from deltalake import Schema as DeltaSchema

    if not isinstance(schema, DeltaSchema):
        schema = DeltaSchema.from_arrow(schema)

    def strip(node):
        if isinstance(node, dict):
            return {
                k: strip(v)
                for k, v in node.items()
                if k not in ("nullable", "metadata", "containsNull", "valueContainsNull")
            }
        return node

    return [(f["name"], json.dumps(strip(f["type"]), sort_keys=True)) for f in json.loads(schema.to_json())["fields"]]


@dataclass
class Lake:
    uri: str
    fs: pafs.FileSystem
    root: str
    storage_options: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, settings: Settings) -> Lake:
        fs, root = open_filesystem(settings.lake, settings.s3)
        options = delta_storage_options(settings.s3) if uris.is_s3(settings.lake) else {}
        return cls(settings.lake, fs, root, options)

    def check(self) -> None:
        """Fail early, in one line, when the lake cannot be reached or created, or is not a lake cbir can use."""
        try:
            if is_local(self.fs):
                self.fs.create_dir(self.root, recursive=True)
            else:
                bucket = self.root.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type != pafs.FileType.Directory:
                    raise UsageError(f"lake {self.uri}: bucket '{bucket}' does not exist")
            self.check_layout()
        except OSError as exc:
            raise UsageError(f"lake {self.uri} is not reachable: {str(exc).splitlines()[0]}") from None

    def check_layout(self) -> None:
        """Refuse, in one line and changing nothing, a folder of Parquet files or tables cbir cannot use."""
        entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        if any(e.is_file and e.base_name.endswith(".parquet") for e in entries):
            raise UsageError(
                f"lake {self.uri} is a folder of Parquet files, not a cbir lake: point `lake` at "
                "an empty folder or an existing cbir lake"
            )
        for table in self.all_tables():  # a foreign folder or schema, a newer protocol: refused before any work
            table.delta()

    def all_tables(self, include_queries: bool = False) -> list[Table]:
        """Every table folder in the lake: manifest, captions, each encoder's features (and the query runs')."""
        tables = [self.table("manifest"), self.table("captions")]
        for info in self.fs.get_file_info(pafs.FileSelector(self.path("features"), allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                tables.append(self._features_by_name(info.base_name))
        if include_queries:
            for info in self.fs.get_file_info(pafs.FileSelector(self.path("queries"), allow_not_found=True)):
                if info.type == pafs.FileType.Directory and RUN_ID.fullmatch(info.base_name):
                    tables += self.query_tables(info.base_name)
        return tables

    def _features_by_name(self, name: str) -> Table:
        """A features table found in the lake, by its folder's name (<encoder key>-<dtype>). Its dimension is left
        at 1: a vector's stored type (cbir.parts.storage_type) has none, so history, optimize and vacuum need none."""
        key, _, dtype = name.rpartition("-")
        return self.features_table(key, 1, dtype if dtype in ("float16", "float32") else "float32")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, path: str) -> str:
        return path if is_local(self.fs) else f"s3://{path}"

    def _table(self, name: str, path: str, schema: pa.Schema, key: tuple[str, ...] = ()) -> Table:
        return Table(name, self.fs, path, schema, self.uri_of(path), self.storage_options, key)

    def table(self, name: str) -> Table:
        return self._table(name, self.path(name), SCHEMAS[name], KEYS.get(name, ()))

    def features_table(self, encoder_key: str, dim: int, dtype: str) -> Table:
        """Features are cached per encoder (and storage type): features/<encoder key>-<dtype>/."""
        name = f"{encoder_key}-{dtype}"
        return self._table(
            f"features/{name}", self.path("features", name), features_schema(dim, dtype), KEYS["features"]
        )

    def query_tables(self, run_id: str) -> tuple[Table, Table]:
        """A query run's results and errors: queries/<run_id>/{results,errors}/."""
        folder = self.path("queries", checked_run_id(run_id))
        return (self._table("results", f"{folder}/results", RESULTS), self._table("errors", f"{folder}/errors", ERRORS))

    def table_uris(self) -> dict[str, str]:
        """Each table's Delta table URI (features/<encoder>-<dtype> for each encoder's table), and the roots."""
        uris = {name: self.uri_of(self.path(name)) for name in (*TABLES, *ROOTS)}
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.path("features"), allow_not_found=True))
        except OSError:  # the lake is not reachable from here: the fixed names still hold
            found = []
        for info in found:
            if info.type == pafs.FileType.Directory:
                uris[f"features/{info.base_name}"] = self.uri_of(info.path)
        return uris

    # Content-addressed images.
    def image_path(self, image_id: str, image_format: str) -> str:
        """Where an image is stored; both values (read back from the manifest) are checked first, so the path
        is always a file of the images folder (a CbirError names the bad value)."""
        image_id, image_format = checked_image_id(image_id), checked_image_format(image_format)
        ext = EXTENSIONS.get(image_format, image_format.lower())
        return self.path("images", image_id[:2], f"{image_id}.{ext}")

    def put_image(self, image_id: str, image_format: str, data: bytes) -> bool:
        return put_bytes(self.fs, self.image_path(image_id, image_format), data)


@dataclass
class Table:
    """A handle on one Delta table. Its first read pins the version it reads (`version`); its commit drops the
    rows whose key others committed after that version. A new handle (Lake.table()) reads the latest version;
    -1 pins the version before the table existed (every row committed since is new to the handle)."""

    name: str
    fs: pafs.FileSystem
    path: str
    schema: pa.Schema
    uri: str = ""
    storage_options: dict = field(default_factory=dict, repr=False)
    key: tuple[str, ...] = ()
    version: int | None = None
    committed: dict[str, dict] = field(default_factory=dict, repr=False)  # this handle's commits, by run id

    # Opening.
    def delta(self, version: int | None = None, *, checked: bool = True):
        """The DeltaTable at a version (default: latest), or None while the table has no commit yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if not self.uri:
            raise CbirError(f"table {self.name} has no URI")
        if self.fs.get_file_info(f"{self.path}/_delta_log").type == pafs.FileType.NotFound:
            self._refuse_foreign_folder()
            return None
        try:
            table = DeltaTable(self.uri, version=version, storage_options=self.storage_options or None)
        except TableNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - delta-rs raises plain Exceptions for protocol errors
            raise UsageError(
                f"table {self.name} at {self.uri} cannot be read as a Delta table: {_first_line(exc)}"
            ) from None
        if checked:
            self._check(table)
        return table

    def _refuse_foreign_folder(self) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = {i.base_name for i in infos}
        if any(n.endswith(".parquet") for n in names) or any(n.startswith("run=") for n in names):
            raise UsageError(
                f"table {self.name} at {self.uri} is a folder of Parquet files, not a Delta table: "
                "move it away (cbir changes nothing there)"
            )

    def _check(self, table) -> None:
        protocol = table.protocol()
        if (
            protocol.min_reader_version > READER_VERSION
            or protocol.min_writer_version > WRITER_VERSION
            or protocol.reader_features
        ):
            features = ", ".join(protocol.reader_features or [])
            raise UsageError(
                f"table {self.name} at {self.uri} needs a newer Delta protocol (reader {protocol.min_reader_version}, "
                f"writer {protocol.min_writer_version}{', reader features ' + features if features else ''}) than "
                f"cbir reads (reader {READER_VERSION}, writer {WRITER_VERSION}); nothing was changed"
            )
        want, have = dict(_delta_fields(storage_schema(self.schema))), dict(_delta_fields(table.schema()))
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        differ = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        if extra or differ or set(missing) - ADDED_LATER:  # the newer ones read as nulls; the next write adds them
            detail = "; ".join(
                x
                for x in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                    f"other types for {', '.join(differ)}" if differ else "",
                )
                if x
            )
            raise UsageError(
                f"table {self.name} at {self.uri} has a foreign schema ({detail}): not cbir's "
                f"{self.name} table; nothing was changed"
            )

    def state(self) -> str | None:
        """The table's id and newest version (None while it has no commit): it changes with every commit."""
        table = self.delta()
        return None if table is None else f"{table.metadata().id}@{table.version()}"

    def pinned_state(self) -> str | None:
        """state() of the version this handle reads (pinned by files()); None before anything is pinned."""
        table = None if self.version in (None, -1) else self.delta(self.version)
        return None if table is None else f"{table.metadata().id}@{self.version}"

    # Reading: one version's files.
    def files(self) -> list[str]:
        """The Parquet files of the pinned version (the latest, pinned on first read), as filesystem paths."""
        if self.version == -1:  # pinned before the table existed
            return []
        table = self.delta(self.version)
        if table is None:
            if self.version is None:
                self.version = -1  # a commit of this handle then treats every row in the table as new
            return []
        if self.version is None:
            self.version = table.version()
        return sorted(self._fs_path(uri) for uri in table.file_uris())

    def _fs_path(self, uri: str) -> str:
        if uris.is_s3(uri) or uri.startswith("s3a://"):
            return uri.split("://", 1)[1]
        return uri.removeprefix("file://")

    def dataset(self, files: list[str] | None = None) -> ds.Dataset:
        """The stored rows (vectors stored: decode() them) of these files, default the pinned version's."""
        files = self.files() if files is None else files
        return ds.dataset(files, schema=storage_schema(self.schema), format="parquet", filesystem=self.fs)

    def decode(self, data: pa.Table) -> pa.Table:
        return from_storage(data, self.schema)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return self.decode(self.dataset().to_table(columns=columns))

    # Writing: parts into the run's folder, then one Delta transaction.
    def run_folder(self, run_id: str) -> str:
        return f"{self.path}/run-{checked_run_id(run_id)}"

    def part_writer(self, run_id: str, tag: str = "") -> PartWriter:
        """A writer for one part file of a run (used in executors); the file appears on the first rows."""
        return PartWriter(self, checked_run_id(run_id), f"part-{tag}{uuid.uuid4().hex[:12]}.parquet")

    def commit(self, run_id: str, parts: Iterable[Part | tuple], **meta) -> dict | None:
        """Publish the named parts of a run as one Delta transaction; other files in its folder (failed
        task attempts) are removed. `meta` (job, model_version, ...) goes into the commit info.

        Rows whose key another run committed after this handle's pinned version are dropped (see the
        module notes). Returns the commit record, or None when nothing was left to commit.
        """
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties

        if checked_run_id(run_id) in self.committed:  # a retry of a commit that went through
            return self.committed[run_id]
        parts = [self._checked_part(run_id, Part(*p) if not isinstance(p, Part) else p) for p in parts]
        parts = [p for p in parts if p.rows]
        if not parts:  # nothing to add: a retry whose first try went through finds its record
            committed = [r for r in self.commits() if r["run_id"] == run_id]
            if not committed:
                self.abort(run_id)
            return committed[0] if committed else None
        parts = self._with_stats(run_id, parts)
        table = self._create()
        since = self.version if self.version is not None else table.version()
        dropped = 0
        for _ in range(COMMIT_ATTEMPTS):
            latest = table.version()
            if latest > since and (done := _committed_since(table, since, run_id)):
                return done  # a retry after the commit went through (its error came after the log entry)
            if self.key and latest > since:
                parts, gone = self._without_committed_keys(table, since, run_id, parts)
                dropped, since = dropped + gone, latest
            if not parts:
                break
            self._check_present(run_id, parts)
            record = {
                "run_id": run_id,
                "rows": sum(p.rows for p in parts),
                "files": len(parts),
                **({"dropped_rows": dropped} if dropped else {}),
                **meta,
            }
            properties = CommitProperties(
                custom_metadata={**record, "userMetadata": f"cbir {meta.get('job', 'run')} {run_id}"},
                max_commit_retries=0,
            )
            version = latest + 1  # no retries inside delta-rs: this version, or a conflict
            try:
                table.create_write_transaction(
                    self._actions(parts), "append", storage_schema(self.schema), commit_properties=properties
                )
            except CommitFailedError:  # another writer took that version: see what it committed, try the next
                table.update_incremental()
                continue
            table.update_incremental()
            self.version = None
            self._remove_uncommitted(run_id, {p.name for p in parts})
            self.committed[run_id] = {
                **record,
                "version": version,
                "committed_at": datetime.now(UTC).isoformat(),
                "files": [p.name for p in parts],
            }
            return self.committed[run_id]
        else:
            raise CbirError(
                f"{self.name}: run {run_id} could not commit after {COMMIT_ATTEMPTS} tries "
                "(other writers kept committing first)"
            )
        self.abort(run_id)
        return None

    def _checked_part(self, run_id: str, part: Part) -> Part:
        if part.name is None:
            return part
        match = RUN_PART.fullmatch(part.name)
        if not match or match.group(1) != run_id:
            raise CbirError(f"{self.name} run {run_id}: {str(part.name)[:80]!r} is not one of its part files")
        return part

    def _check_present(self, run_id: str, parts: list[Part]) -> None:
        """Every part a commit is about to add is there, at the size it was written: a commit never names a file
        that is gone (deleted by hand, or by a vacuum that found it older than IN_FLIGHT_HOURS, so took its run
        for dead), which would leave the table unreadable. One listing per run folder, just before the commit."""
        found: dict[str, int] = {}
        for folder in sorted({p.name.rpartition("/")[0] for p in parts}):
            for info in self.fs.get_file_info(pafs.FileSelector(f"{self.path}/{folder}", allow_not_found=True)):
                if info.is_file:
                    found[f"{folder}/{info.base_name}"] = info.size
        for part in parts:
            if part.name not in found or (part.size and found[part.name] != part.size):
                raise self._gone(run_id, part.name, len(parts))

    def _gone(self, run_id: str, name: str, count: int) -> CbirError:
        return CbirError(
            f"{self.name}: run {run_id} cannot commit: its part {name} is gone or changed (one of {count}; a vacuum "
            f"removes parts no version names once they are {IN_FLIGHT_HOURS} hours old); nothing was committed, "
            "run it again"
        )

    def _with_stats(self, run_id: str, parts: list[Part]) -> list[Part]:
        """Parts that came without size or statistics (from tests, or older callers) get them from the file."""

        def fill(part: Part) -> Part:
            if part.size and part.stats:
                return part
            try:
                data = pq.read_table(f"{self.path}/{part.name}", filesystem=self.fs)
            except FileNotFoundError:
                raise self._gone(run_id, part.name, len(parts)) from None
            return part_of(self, part.name, data)

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(fill, parts))

    def _actions(self, parts: list[Part]) -> list:
        from deltalake.transaction import AddAction

        now = int(time.time() * 1000)
        return [AddAction(p.name, p.size, {}, now, True, p.stats) for p in parts]

    def _create(self):
        """The DeltaTable at its latest version, created (version 0, empty) if it does not exist yet."""
        from deltalake import DeltaTable

        table = self.delta()
        if table is not None:
            return self._with_new_columns(table)
        from deltalake.transaction import CommitProperties

        try:  # version 0 or nothing: a creator that loses the race must not commit a second CREATE
            DeltaTable.create(
                self.uri,
                storage_schema(self.schema),
                mode="error",
                name=self.name.replace("/", "_"),
                storage_options=self.storage_options or None,
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except Exception:  # noqa: BLE001 - another writer created it at the same moment
            pass
        table = self.delta()
        if table is None:
            raise CbirError(f"table {self.name} at {self.uri} could not be created")
        return table

    def _with_new_columns(self, table):
        """The table, with the (nullable) columns cbir's schema added since it was created: one schema change,
        which a writer racing to make the same one makes no different."""
        from deltalake.schema import Field

        have = set(table.schema().to_arrow().names)
        new = [Field.from_arrow(f) for f in storage_schema(self.schema) if f.name not in have]
        if new:
            table.alter.add_columns(new)
            table.update_incremental()
        return table

    def _without_committed_keys(self, table, since: int, run_id: str, parts: list[Part]) -> tuple[list[Part], int]:
        """Drop from the parts the rows whose key was committed by other writers after version `since`."""
        before = set(self._files_at(since))
        added = [self._fs_path(u) for u in table.file_uris() if self._fs_path(u) not in before]
        if not added:
            return parts, 0
        taken = ds.dataset(added, schema=storage_schema(self.schema), format="parquet", filesystem=self.fs).to_table(
            columns=list(self.key)
        )
        if not taken.num_rows:
            return parts, 0
        taken_keys = _key_strings(taken, self.key)
        kept, dropped = [], 0

        def rewrite(part: Part) -> tuple[Part | None, int]:
            path = f"{self.path}/{part.name}"
            keys = pq.read_table(path, columns=list(self.key), filesystem=self.fs)  # most parts keep every row
            mask = pc.invert(pc.is_in(_key_strings(keys, self.key), value_set=taken_keys))
            if pc.all(mask).as_py():
                return part, 0
            if not pc.any(mask).as_py():
                self.fs.delete_file(path)
                return None, keys.num_rows
            data = pq.read_table(path, filesystem=self.fs)
            keep = data.filter(mask)
            self.fs.delete_file(f"{self.path}/{part.name}")
            if not keep.num_rows:
                return None, data.num_rows
            name = f"run-{run_id}/part-{uuid.uuid4().hex[:12]}-kept.parquet"
            pq.write_table(keep, f"{self.path}/{name}", filesystem=self.fs, compression="zstd")
            return part_of(self, name, keep), data.num_rows - keep.num_rows

        with ThreadPoolExecutor(32) as pool:
            for part, gone in pool.map(rewrite, parts):
                dropped += gone
                if part is not None:
                    kept.append(part)
        return kept, dropped

    def _files_at(self, version: int) -> list[str]:
        if version < 0:
            return []
        old = self.delta(version, checked=False)
        return [self._fs_path(u) for u in old.file_uris()] if old is not None else []

    def _remove_uncommitted(self, run_id: str, keep: set[str]) -> None:
        folder = self.run_folder(run_id)
        for info in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.is_file and f"run-{run_id}/{info.base_name}" not in keep:
                self.fs.delete_file(info.path)

    def abort(self, run_id: str) -> None:
        """Remove a failed run's files that no version of the table references (a committed part stays)."""
        folder = self.run_folder(run_id)
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        if not infos:
            if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
                self.fs.delete_dir(folder)
            return
        table = self.delta(checked=False)
        referenced = {self._fs_path(u) for u in table.file_uris()} if table is not None else set()
        for info in infos:
            if info.is_file and info.path not in referenced:
                self.fs.delete_file(info.path)
        if not referenced.intersection(i.path for i in infos) and is_local(self.fs):
            self.fs.delete_dir(folder)

    # History.
    def history(self) -> list[dict]:
        """Every version, oldest first: version, when, operation, and cbir's run id, job, rows, model version."""
        table = self.delta()
        if table is None:
            return []
        out = []
        for entry in reversed(table.history()):
            out.append(
                {
                    "version": entry["version"],
                    "at": _iso(entry.get("timestamp")),
                    "operation": entry.get("operation"),
                    **{
                        k: v
                        for k, v in entry.items()
                        if k
                        in (
                            "run_id",
                            "job",
                            "rows",
                            "files",
                            "model_version",
                            "dropped_rows",
                            "dropped_runs",
                            "deleted_rows",
                            "operationMetrics",
                        )
                    },
                }
            )
        return out

    def commits(self) -> list[dict]:
        """The runs committed and not dropped since, oldest first: run_id, committed_at, rows, version, meta."""
        records, dropped = [], set()
        for entry in self._raw_history():
            if entry.get("operation") == "WRITE" and isinstance(entry.get("run_id"), str):
                record = {
                    k: v
                    for k, v in entry.items()
                    if k
                    not in (
                        "operation",
                        "operationParameters",
                        "engineInfo",
                        "clientVersion",
                        "timestamp",
                        "userMetadata",
                        "readVersion",
                        "isBlindAppend",
                        "operationMetrics",
                    )
                }
                record["committed_at"] = _iso(entry.get("timestamp"))
                records.append(record)
            dropped.update(r for r in entry.get("dropped_runs") or [] if isinstance(r, str))
        return [r for r in records if r["run_id"] not in dropped]

    def _raw_history(self) -> list[dict]:
        table = self.delta()
        return [] if table is None else list(reversed(table.history()))

    # Changes other than appends: each one Delta transaction, named in the history.
    def delete(self, predicate: str, **meta) -> int:
        """Delete the rows matching a SQL predicate (built by cbir from checked values); returns the rows deleted."""
        from deltalake.transaction import CommitProperties

        table = self.delta()
        if table is None:
            return 0
        metrics = table.delete(predicate, commit_properties=CommitProperties(custom_metadata=meta))
        return int(metrics.get("num_deleted_rows", 0))

    def optimize(self, target_size: int | None = None) -> dict:
        """Compact small files into bigger ones (a Delta OPTIMIZE; rows do not change)."""
        from deltalake.transaction import CommitProperties

        table = self.delta()
        if table is None:
            return {"numFilesAdded": 0, "numFilesRemoved": 0}
        return table.optimize.compact(
            target_size=target_size, commit_properties=CommitProperties(custom_metadata={"job": "optimize"})
        )

    def vacuum(
        self, retention_hours: int = RETENTION_HOURS, dry_run: bool = False, *, in_flight_hours: int = IN_FLIGHT_HOURS
    ) -> list[str]:
        """Remove files that no version within the retention needs, and files no version ever named (parts of
        runs that died) once older than in_flight_hours. Returns what was (or would be) removed.

        A run in flight is known only by its parts in run-<id>/ that no version names yet, and nothing tells them
        from the parts of a run that died (no lease: see the module notes). So the two kinds of file get two
        rules, in two delta-rs vacuums: files that versions named and a later version removed (a compaction's
        inputs, dropped runs) go once older than `retention_hours` (maintenance.retention_hours, which only
        shortens time travel); files no version names go only once older than in_flight_hours (7 days, whatever
        the retention), the bound on a run from its first part to its commit. A run over that bound may have
        lost parts: its commit checks every part is there (_check_present) and fails it, in one line, rather
        than commit a file that is gone. in_flight_hours=0 is for tests, which know no run is in flight."""
        table = self.delta()
        if table is None:
            return []
        replaced = table.vacuum(
            retention_hours=retention_hours, dry_run=dry_run, full=False, enforce_retention_duration=False
        )
        unnamed_hours = max(retention_hours, in_flight_hours)
        unnamed = table.vacuum(
            retention_hours=unnamed_hours,
            dry_run=dry_run,
            full=True,
            enforce_retention_duration=unnamed_hours >= RETENTION_HOURS,
        )
        return list(dict.fromkeys(self._relative(f) for f in replaced + unnamed))  # some come as full paths

    def _relative(self, path: str) -> str:
        """A file of the table by its path within the table, however it is named."""
        return self._fs_path(path).removeprefix(f"{self.path}/")


def _committed_since(table, since: int, run_id: str) -> dict | None:
    """This run's commit record among the versions after `since`, or None."""
    for entry in table.history(limit=table.version() - since):
        if entry.get("run_id") == run_id and entry.get("operation") == "WRITE":
            return {
                "run_id": run_id,
                "version": entry["version"],
                "rows": entry.get("rows"),
                "files": entry.get("files"),
            }
    return None


def _key_strings(data: pa.Table, key: tuple[str, ...]) -> pa.Array:
    """One string per row for a (possibly composite) key: the columns joined by a unit separator."""
    if len(key) == 1:
        return pc.cast(data.column(key[0]), pa.string()).combine_chunks()
    columns = [pc.fill_null(pc.cast(data.column(k), pa.string()), "\x00") for k in key]
    return pc.binary_join_element_wise(*columns, "\x1f").combine_chunks()


def _iso(milliseconds) -> str | None:
    if not isinstance(milliseconds, (int, float)):
        return None
    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
