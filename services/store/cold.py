"""The RocksDB tier of one store shard: fixed-width row records keyed by fid, plus named metadata blobs.

Layout on disk (one RocksDB per shard, opened in rocksdict's raw mode so keys and values are plain bytes):

- default column family, one entry per row: key = fid as 8-byte big-endian int64, so iteration order is
  fid order for the non-negative fids freshet produces (``freshet.fids``); value = little-endian packed
  ``version int64 | freq uint32 | last_seen uint32 | data float32[width]`` (``24 + 4 * width`` bytes). The
  fid is not repeated in the value: the key already carries it.
- ``meta`` column family: user blobs under ``b"m/" + name`` and the store's own format record under
  ``b"f/format"``. A separate column family means no fid key can ever collide with metadata and scans of
  rows never see it, while one WriteBatch still commits rows and metadata atomically.
- ``undo`` column family, the undo log: for a fid, the row as it was at an earlier point the owner may
  roll back to (same key and record layout; an empty value: the fid had no row then). The owner decides
  what is logged (see ``services.store.tiered``); it is written, read and cleared in the same WriteBatches
  as the rows.

Every write goes through the WAL, so an acknowledged write survives the process being killed;
``sync_writes=True`` additionally fsyncs the WAL before a write returns, so it also survives an OS crash
or power loss.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from rocksdict import Checkpoint, Options, Rdict, ReadOptions, WriteBatch, WriteOptions

_META_CF = "meta"
_UNDO_CF = "undo"
_FORMAT_KEY = b"f/format"
_FORMAT_VERSION = 1


def _record_dtype(width: int) -> np.dtype:
    # Explicit little-endian, no padding: the bytes on disk do not depend on the host.
    return np.dtype([("version", "<i8"), ("freq", "<u4"), ("last_seen", "<u4"), ("data", "<f4", (width,))])


# Column name -> (dtype, ndim). RowBatch coerces each column to it on construction.
_SCHEMA = {
    "fids": (np.int64, 1),
    "versions": (np.int64, 1),
    "freqs": (np.uint32, 1),
    "last_seen": (np.uint32, 1),
    "data": (np.float32, 2),
}


@dataclass(frozen=True)
class RowBatch:
    """Rows as parallel columns, coerced to the dtypes below on construction.

    Attributes:
        fids: int64 [n].
        versions: int64 [n], the write version that last changed the row.
        freqs: uint32 [n], how often the fid has been seen.
        last_seen: uint32 [n], seconds (epoch) of the last sighting.
        data: float32 [n, width], the value followed by optimizer state.

    Raises:
        ValueError: a column has the wrong number of dimensions or rows, or an integer column is not integer.
    """

    fids: np.ndarray
    versions: np.ndarray
    freqs: np.ndarray
    last_seen: np.ndarray
    data: np.ndarray

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in _SCHEMA.items():
            x = np.asarray(getattr(self, name))
            if x.ndim != ndim:
                raise ValueError(f"RowBatch.{name} must be {ndim}-D, got shape {x.shape}")
            # Casting floats to ints would silently truncate fids and versions.
            if np.dtype(dtype).kind in "iu" and x.size and x.dtype.kind not in "iu":
                raise ValueError(f"RowBatch.{name} must be integer, got {x.dtype}")
            object.__setattr__(self, name, np.ascontiguousarray(x, dtype=dtype))
            if len(x) != len(self.fids):
                raise ValueError(f"RowBatch.{name} has {len(x)} rows, fids has {len(self.fids)}")

    def __len__(self) -> int:
        return len(self.fids)

    @property
    def width(self) -> int:
        """Floats per row."""
        return self.data.shape[1]

    @classmethod
    def zeros(cls, fids: np.ndarray, width: int) -> RowBatch:
        """All-zero rows for fids int64 [n]."""
        n = len(fids)
        zero = np.zeros(n, np.uint32)
        return cls(fids, np.zeros(n, np.int64), zero, zero.copy(), np.zeros((n, width), np.float32))

    def take(self, index: np.ndarray | slice) -> RowBatch:
        """The rows at index (int positions, a bool mask over [n], or a slice)."""
        return RowBatch(*(getattr(self, name)[index] for name in _SCHEMA))

    @classmethod
    def concat(cls, batches: list[RowBatch]) -> RowBatch:
        """The rows of batches, in order (at least one batch)."""
        return cls(*(np.concatenate([getattr(b, name) for b in batches]) for name in _SCHEMA))


class ColdStore:
    """One shard's RocksDB tier. Writes are atomic per call; reads and scans are vectorised with numpy.

    Args:
        path: the RocksDB directory.
        width: float32s per row (value plus optimizer state); must match what the store was created with.
        create: create the store if it does not exist; otherwise a missing store raises FileNotFoundError.
        sync_writes: fsync the WAL on every write (survives power loss, not only a killed process).

    Raises:
        ValueError: width is not positive, or the store was created with another width or is not a
            freshet cold store.
        FileNotFoundError: create is False and there is no store at path.
    """

    def __init__(self, path: str, width: int, *, create: bool = True, sync_writes: bool = False) -> None:
        if int(width) <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if not create and not os.path.exists(os.path.join(path, "CURRENT")):
            raise FileNotFoundError(f"no RocksDB store at {path}")
        self.path = path
        self.width = int(width)
        self._dtype = _record_dtype(self.width)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync_writes
        # Open scans hold RocksDB iterators, which keep the DB (and its LOCK file) alive; close() ends them.
        self._scans: weakref.WeakSet[Iterator[RowBatch]] = weakref.WeakSet()
        opts = Options(raw_mode=True)
        opts.create_if_missing(create)
        opts.create_missing_column_families(True)
        self._db: Rdict | None = Rdict(
            path, opts, column_families={_META_CF: Options(raw_mode=True), _UNDO_CF: Options(raw_mode=True)}
        )
        self._meta: Rdict | None = self._db.get_column_family(_META_CF)
        self._meta_cf = self._db.get_column_family_handle(_META_CF)
        self._undo: Rdict | None = self._db.get_column_family(_UNDO_CF)
        self._undo_cf = self._db.get_column_family_handle(_UNDO_CF)
        try:
            self._check_format()
        except BaseException:
            self.close()
            raise

    def _check_format(self) -> None:
        raw = self._meta.get(_FORMAT_KEY)
        if raw is None:
            if next(iter(self._db.keys()), None) is not None:
                raise ValueError(f"{self.path} holds rows but no freshet format record")
            fmt = {"format": _FORMAT_VERSION, "width": self.width}
            self._meta.put(_FORMAT_KEY, json.dumps(fmt).encode(), write_opt=self._write_opts)
            return
        fmt = json.loads(raw)
        if fmt.get("format") != _FORMAT_VERSION or fmt.get("width") != self.width:
            raise ValueError(f"{self.path} was created with {fmt}, opened with width {self.width}")

    @classmethod
    def open_checkpoint(cls, path: str, width: int) -> ColdStore:
        """Open a checkpoint made by ``checkpoint``. It is a full store: writes to it leave the source alone."""
        return cls(path, width, create=False)

    def write(
        self,
        rows: RowBatch | None = None,
        delete_fids: np.ndarray | None = None,
        meta: dict[str, bytes] | None = None,
        *,
        undo: RowBatch | None = None,
        undo_absent: np.ndarray | None = None,
        clear_undo: bool = False,
    ) -> None:
        """Commit puts, deletes, metadata and undo-log changes in ONE WriteBatch: readers see all of it or none of it.

        Within the batch puts come first, then deletes, so a fid in both ends up deleted; among duplicate
        fids in rows the last one wins. The undo log is cleared before ``undo`` and ``undo_absent`` are added.

        Args:
            rows: rows to insert or overwrite; data must be float32 [n, width].
            delete_fids: int64 [m] fids to delete (missing ones are ignored).
            meta: metadata blobs by name.
            undo: rows to record in the undo log (replacing entries of the same fids).
            undo_absent: int64 [k] fids to record in the undo log as having no row.
            clear_undo: empty the undo log first.

        Raises:
            ValueError: rows.data is not [n, width], a fid array is not 1-D integer, or a name is empty.
        """
        db = self._open_db()
        batch = WriteBatch(raw_mode=True)
        if clear_undo:
            # Keys are 8 bytes: every one sorts between these two.
            batch.delete_range(b"\x00", b"\xff" * 9, self._undo_cf)
        if undo is not None and len(undo):
            for key, value in zip(_keys(undo.fids), self._pack(undo, "undo"), strict=True):
                batch.put(key, value, self._undo_cf)
        if undo_absent is not None:
            for key in _keys(_fid_array(undo_absent)):
                batch.put(key, b"", self._undo_cf)
        if rows is not None and len(rows):
            for key, value in zip(_keys(rows.fids), self._pack(rows), strict=True):
                batch.put(key, value)
        if delete_fids is not None:
            for key in _keys(_fid_array(delete_fids)):
                batch.delete(key)
        for name, blob in (meta or {}).items():
            batch.put(_meta_key(name), bytes(blob), self._meta_cf)
        if len(batch):
            db.write(batch, self._write_opts)

    def put(self, rows: RowBatch) -> None:
        """Insert or overwrite rows atomically (see ``write``)."""
        self.write(rows=rows)

    def delete(self, fids: np.ndarray) -> None:
        """Delete rows of fids int64 [n] atomically; missing fids are ignored."""
        self.write(delete_fids=fids)

    def put_meta(self, name: str, data: bytes) -> None:
        """Store a metadata blob under name (replacing any previous one)."""
        self.write(meta={name: data})

    def get(self, fids: np.ndarray) -> tuple[np.ndarray, RowBatch]:
        """Look up fids int64 [n] with one RocksDB multi-get.

        Returns:
            found: bool [n].
            rows: n rows aligned with fids (``rows.fids`` equals the input); rows of missing fids are
                all zeros, so callers can scatter ``rows.take(found)`` or fill the gaps in place.

        Raises:
            ValueError: fids is not 1-D integer, or a stored value has the wrong length (names the fid).
        """
        db = self._open_db()
        fids = _fid_array(fids)
        out = RowBatch.zeros(fids, self.width)
        if not len(fids):
            return np.zeros(0, bool), out
        values = db[_keys(fids)]
        found = np.fromiter((v is not None for v in values), bool, len(fids))
        self._fill(out, found, [v for v in values if v is not None], fids[found])
        return found, out

    def get_undo(self, fids: np.ndarray) -> tuple[np.ndarray, np.ndarray, RowBatch]:
        """Undo-log entries of fids int64 [n], with one multi-get.

        Returns:
            logged: bool [n], the fid has an entry.
            present: bool [n], its entry is a row (logged and not absent).
            rows: n rows aligned with fids; all zeros where not present.
        """
        self._open_db()
        fids = _fid_array(fids)
        out = RowBatch.zeros(fids, self.width)
        if not len(fids):
            return np.zeros(0, bool), np.zeros(0, bool), out
        values = self._undo[_keys(fids)]
        logged = np.fromiter((v is not None for v in values), bool, len(fids))
        present = np.fromiter((v is not None and len(v) > 0 for v in values), bool, len(fids))
        self._fill(out, present, [v for v in values if v], fids[present])
        return logged, present, out

    def undo_log(self) -> tuple[np.ndarray, RowBatch]:
        """Every undo-log entry in fid order: (present bool [n], rows with all-zero rows where absent)."""
        self._open_db()
        items = list(self._undo.items())
        fids = np.frombuffer(b"".join(k for k, _ in items), ">i8").astype(np.int64)
        out = RowBatch.zeros(fids, self.width)
        present = np.fromiter((len(v) > 0 for _, v in items), bool, len(items))
        self._fill(out, present, [v for _, v in items if v], fids[present])
        return present, out

    def _fill(self, out: RowBatch, where: np.ndarray, values: list[bytes], fids: np.ndarray) -> None:
        if not values:
            return
        rec = self._unpack(values, fids)
        for name, field in (("versions", "version"), ("freqs", "freq"), ("last_seen", "last_seen")):
            getattr(out, name)[where] = rec[field]
        out.data[where] = rec["data"]

    def get_meta(self, name: str) -> bytes | None:
        """The metadata blob stored under name, or None."""
        self._open_db()
        return self._meta.get(_meta_key(name))

    def scan(self, batch_rows: int = 65536) -> Iterator[RowBatch]:
        """All rows in fid order, batch_rows at a time (the last batch may be shorter).

        The scan reads one RocksDB iterator, i.e. one implicit snapshot: writes made while it runs are not
        seen. Metadata lives in its own column family and never appears.
        """
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        db = self._open_db()
        read_opts = ReadOptions()
        read_opts.fill_cache(False)  # a full scan would otherwise evict the hot blocks point lookups need
        read_opts.set_readahead_size(2 << 20)
        gen = self._scan(db.items(read_opt=read_opts), batch_rows)
        self._scans.add(gen)
        return gen

    def _scan(self, items: Iterator[tuple[bytes, bytes]], batch_rows: int) -> Iterator[RowBatch]:
        while chunk := list(itertools.islice(items, batch_rows)):
            keys, values = zip(*chunk, strict=True)
            fids = np.frombuffer(b"".join(keys), ">i8").astype(np.int64)
            rec = self._unpack(list(values), fids)
            yield RowBatch(fids, rec["version"], rec["freq"], rec["last_seen"], rec["data"])

    def scan_changed(self, since_version: int, batch_rows: int = 65536) -> Iterator[RowBatch]:
        """Rows with version > since_version, in fid order, batches of at most batch_rows.

        A filtered full scan: RocksDB has no index on version. Same snapshot semantics as ``scan``.
        """
        pending: list[RowBatch] = []
        held = 0
        for batch in self.scan(batch_rows):
            kept = batch.take(batch.versions > since_version)
            if len(kept):
                pending.append(kept)
                held += len(kept)
            if held >= batch_rows:
                merged = RowBatch.concat(pending)
                yield merged.take(slice(0, batch_rows))
                pending, held = [merged.take(slice(batch_rows, None))], held - batch_rows
        if held:
            yield RowBatch.concat(pending)

    def __len__(self) -> int:
        """Exact number of rows, by counting keys: O(rows). See ``approx_len`` for a constant-time estimate."""
        return sum(1 for _ in self._open_db().keys())

    def approx_len(self) -> int:
        """RocksDB's estimate of the row count (rocksdb.estimate-num-keys): cheap, off after overwrites/deletes."""
        return int(self._open_db().property_int_value("rocksdb.estimate-num-keys") or 0)

    def flush(self) -> None:
        """Flush both column families' memtables to SST files and fsync the WAL."""
        db = self._open_db()
        db.flush(wait=True)
        self._meta.flush(wait=True)
        self._undo.flush(wait=True)
        db.flush_wal(sync=True)

    def checkpoint(self, dest: str) -> None:
        """Write a consistent copy of the whole store (rows and metadata) to dest.

        Uses RocksDB's checkpoint API (SST files hard-linked where possible, the rest copied) into
        ``dest + ".tmp"``, then renames it to dest, so dest either does not exist or is complete.

        Raises:
            FileExistsError: dest already exists.
        """
        db = self._open_db()
        if os.path.lexists(dest):
            raise FileExistsError(f"checkpoint destination {dest} already exists")
        tmp = dest + ".tmp"
        if os.path.lexists(tmp):
            # Left by a checkpoint that died before its rename; never visible as a checkpoint, safe to drop.
            shutil.rmtree(tmp)
        Checkpoint(db).create_checkpoint(tmp)
        os.rename(tmp, dest)
        # The rename is only durable once the parent directory's entry is on disk.
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Close the store (open scans end). Safe to call more than once."""
        if self._db is None:
            return
        for gen in list(self._scans):
            gen.close()
        self._meta.close()
        self._undo.close()
        self._db.close()
        # Handles keep the underlying DB and its LOCK alive until they are dropped.
        self._db = self._meta = self._meta_cf = self._undo = self._undo_cf = None

    def __enter__(self) -> ColdStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_db(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"ColdStore {self.path} is closed")
        return self._db

    def _pack(self, rows: RowBatch, what: str = "rows") -> list[bytes]:
        if rows.width != self.width:
            raise ValueError(f"{what} have width {rows.width}, store width is {self.width}")
        rec = np.empty(len(rows), self._dtype)
        for field, column in (("version", rows.versions), ("freq", rows.freqs), ("last_seen", rows.last_seen)):
            rec[field] = column
        rec["data"] = rows.data
        buf, size = rec.tobytes(), self._dtype.itemsize
        return [buf[i : i + size] for i in range(0, len(buf), size)]

    def _unpack(self, values: list[bytes], fids: np.ndarray) -> np.ndarray:
        size = self._dtype.itemsize
        lengths = np.fromiter(map(len, values), np.int64, len(values))
        bad = np.flatnonzero(lengths != size)
        if len(bad):
            raise ValueError(
                f"corrupt row for fid {int(fids[bad[0]])}: {lengths[bad[0]]} bytes, expected {size} "
                f"(width {self.width}); {len(bad)} bad rows in this batch"
            )
        return np.frombuffer(b"".join(values), self._dtype, len(values))


def _fid_array(fids: np.ndarray) -> np.ndarray:
    fids = np.asarray(fids)
    if fids.ndim != 1 or (fids.size and fids.dtype.kind not in "iu"):
        raise ValueError(f"fids must be a 1-D integer array, got {fids.dtype} {fids.shape}")
    return fids.astype(np.int64, copy=False)


def _keys(fids: np.ndarray) -> list[bytes]:
    buf = fids.astype(">i8").tobytes()
    return [buf[i : i + 8] for i in range(0, len(buf), 8)]


def _meta_key(name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise ValueError(f"metadata name must be a non-empty str, got {name!r}")
    return b"m/" + name.encode()
