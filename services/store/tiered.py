"""The store's table: host tier in front of RocksDB, with admission, TTL, demotion and checkpoints.

Where a row lives:
- host (``HostTier``): every row that was written since it was last loaded, plus promoted rows;
- RocksDB (``ColdStore``): the durable copy of every row as of the last checkpoint, and the only
  copy of rows demoted from the host. A row is demoted only when clean (unchanged since the last
  checkpoint), so RocksDB always holds exactly the state of the last checkpoint;
- device cache (optional): a mirror of the hottest host rows for pulls.

A checkpoint writes the host rows changed since the previous one, the fids evicted since then,
the version counter and the admission state in one RocksDB WriteBatch: after ``kill -9`` the
table reopens at exactly its last checkpoint, and reports that checkpoint's id and tag.

Rollback points: a checkpoint with a tag (``checkpoint(tag)``, the Checkpoint RPC) is the point
``rollback`` returns to. Checkpoints the table takes on its own (``checkpoint()``: periodic, before
demotion, on stop) keep the tag and the rollback point; before one overwrites or deletes a RocksDB
row for the first time since the rollback point, it records the row's old value (or its absence)
in the undo log (``ColdStore``, same WriteBatch), so ``rollback`` can still restore the point, even
after a restart. The next tagged checkpoint clears the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numba
import numpy as np

from freshet.fids import slot_of
from services.store.admission import Admission, make_admission
from services.store.cold import ColdStore, RowBatch
from services.store.device_cache import DeviceCache
from services.store.host import HostTier
from services.store.optimizers import make_optimizer
from services.store.table import EmbeddingTable, ExportPage, initial_values
from services.store.tables import TableSpec

logger = logging.getLogger(__name__)

META_CHECKPOINT = "checkpoint"
META_POINT = "rollback_point"
META_LAST_ID = "last_checkpoint_id"  # written by rollback: ids stay unique after going back to an older one
# Admission state of the rollback point, copied here by the first automatic checkpoint after it
# (which overwrites the live ``admission:*`` blobs).
POINT_PREFIX = "rollback/"


class RollbackError(RuntimeError):
    """A rollback cannot be done: no data dir, or the rollback point is not the one expected."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint captured: its id, the table version, the caller's tag (e.g. a stream position)."""

    checkpoint_id: int
    version: int
    tag: str
    created_s: float


@numba.njit(cache=True, nogil=True)
def _segment_sum(inverse, grads, out):
    for i in range(inverse.shape[0]):
        r = inverse[i]
        for j in range(grads.shape[1]):
            out[r, j] += grads[i, j]


class TieredTable(EmbeddingTable):
    """One table of one shard.

    Args:
        spec: the table's configuration.
        data_dir: RocksDB directory for cold rows and checkpoints; ``None`` keeps rows in memory
            only (no demotion, no checkpoints).
        clock: seconds since the epoch; injectable for TTL tests.
        device: torch device of the device cache (default: CUDA when available, else CPU).
    """

    def __init__(
        self, spec: TableSpec, data_dir: str | None = None, clock=time.time, device: str | None = None
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.optimizer = make_optimizer(spec.optimizer)
        self.state_width = self.optimizer.state_width(spec.dim)
        self.width = spec.dim + self.state_width
        self.host = HostTier(self.width, capacity=spec.initial_rows)
        if spec.host_capacity is not None and data_dir is None:
            raise ValueError(f"table {spec.name!r}: host_capacity needs a data dir to demote rows to")
        self.cold = ColdStore(data_dir, self.width) if data_dir else None
        self._admission: dict[int, Admission] = {}
        self._version = 0
        self._checkpoint = CheckpointInfo(0, 0, "", 0.0)
        self._last_id = 0  # the highest checkpoint id given out, the next one is above it
        # The last tagged checkpoint (what ``rollback`` restores); None before any: then the last
        # checkpoint of any kind is restored, and automatic checkpoints keep no undo log.
        self._point: CheckpointInfo | None = None
        # Fids whose rows a rollback removed (created after the rollback point), with the version of
        # their removal: exported with their initial value until they get a row again.
        self._dropped_fids = np.zeros(0, np.int64)
        self._dropped_versions = np.zeros(0, np.int64)
        # Fids evicted since the last checkpoint: RocksDB still holds them until then, so reads
        # of RocksDB treat them as absent, and the next checkpoint deletes them.
        self._evicted: set[int] = set()
        self._cold_max_version = 0
        self.stats: Counter = Counter()
        self.cache = DeviceCache(spec.device_cache_rows, spec.dim, device) if spec.device_cache_rows else None
        if self.cold is not None:
            self._restore()

    # -- reads -------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def checkpoint_info(self) -> CheckpointInfo:
        """The last checkpoint (tagged or automatic); its tag is the rollback point's."""
        return self._checkpoint

    @property
    def rollback_point(self) -> CheckpointInfo:
        """What ``rollback`` restores: the last tagged checkpoint, else the last checkpoint."""
        return self._point or self._checkpoint

    def __len__(self) -> int:
        return len(self.host)

    def pull(self, fids: np.ndarray) -> np.ndarray:
        """Values float32 [n, dim]: device cache, host, RocksDB, then the initial value (not inserted)."""
        dim = self.spec.dim
        out = np.empty((len(fids), dim), np.float32)
        cache = self.cache
        n = len(fids)
        if cache is not None and cache.on_cpu:
            rows, n_cache, n_miss = cache.gather_with_host(self.host, fids, out)
        else:
            if cache is None:
                rows = self.host.find_gather(fids, out)
                n_cache = 0
            else:
                rows, n_cache = self._pull_through_device_cache(fids, out)
            n_miss = int(np.count_nonzero(rows == -1))
        stats = self.stats
        stats["pull_keys"] += n
        stats["cache_hits"] += n_cache
        stats["host_hits"] += n - n_cache - n_miss
        miss = np.flatnonzero(rows == -1) if n_miss else ()
        if n_miss:
            self._fill_misses(fids[miss], out, miss)
        return out

    def _pull_through_device_cache(self, fids: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, int]:
        """CUDA path: hits gathered on the device in one transfer, the rest from the host tier."""
        slots = self.cache.find(fids)
        cached = slots >= 0
        out[cached] = self.cache.gather(slots[cached])
        rows = np.full(len(fids), -2, np.int64)
        rest = np.flatnonzero(~cached)
        sub = np.empty((len(rest), self.spec.dim), np.float32)
        rows[rest] = self.host.find_gather(fids[rest], sub)
        out[rest] = sub
        return rows, int(cached.sum())

    def _fill_misses(self, fids: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        dim = self.spec.dim
        left = np.ones(len(fids), bool)
        if self.cold is not None:
            found, rows = self._cold_get(fids)
            if found.any():
                out[positions[found]] = rows.data[found, :dim]
                self.stats["cold_hits"] += int(found.sum())
                self._promote_if_room(rows.take(found))
            left = ~found
        if left.any():
            out[positions[left]] = initial_values(fids[left], dim, self.spec.init_scale, self.spec.seed)
            self.stats["initial_reads"] += int(left.sum())

    def _cold_get(self, fids: np.ndarray) -> tuple[np.ndarray, RowBatch]:
        """RocksDB rows of fids, treating fids evicted since the last checkpoint as absent."""
        found, rows = self.cold.get(fids)
        if self._evicted and found.any():
            found &= np.fromiter((f not in self._evicted for f in fids.tolist()), bool, len(fids))
        return found, rows

    def _promote_if_room(self, rows: RowBatch) -> None:
        # Pulled cold rows are hot again: load them into the host now if it has room (a later
        # push promotes them in any case).
        if self.spec.host_capacity is None or len(self.host) + len(rows) <= self.spec.host_capacity:
            self._load_rows(rows)
            self.stats["promoted"] += len(rows)

    def _load_rows(self, rows: RowBatch) -> np.ndarray:
        host_rows = self.host.insert(rows.fids)
        self.host.floats[host_rows, 2:] = rows.data
        self.host.versions[host_rows] = rows.versions
        self.host.freqs[host_rows] = rows.freqs
        self.host.last_seen[host_rows] = rows.last_seen
        return host_rows

    # -- writes ------------------------------------------------------------------------------------

    def push(self, fids: np.ndarray, grads: np.ndarray, counts: np.ndarray | None = None) -> int:
        """Sums duplicate fids, admits new ones, applies the optimizer; returns rows updated.

        ``counts`` (int [n]): how many samples each gradient sums over (default 1 each); the rows'
        frequencies grow by them.
        """
        if len(fids) < 2 or bool((fids[1:] > fids[:-1]).all()):
            # Already sorted and distinct (what the trainer sends): no unique, no segment sum.
            unique, summed = fids, np.array(grads, np.float32, copy=True)
            counts = np.ones(len(fids), np.int64) if counts is None else np.asarray(counts, np.int64)
        else:
            unique, inverse, occurrences = np.unique(fids, return_inverse=True, return_counts=True)
            counts = occurrences if counts is None else np.bincount(inverse, weights=counts, minlength=len(unique))
            summed = np.zeros((len(unique), self.spec.dim), np.float32)
            _segment_sum(inverse.astype(np.int64), np.ascontiguousarray(grads, np.float32), summed)
        rows = self.host.find(unique)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            rows[missing] = self._materialise(unique[missing])
        keep = rows >= 0
        if not keep.all():
            self.stats["dropped_grads"] += int((~keep).sum())
            rows, summed, counts, unique = rows[keep], summed[keep], counts[keep], unique[keep]
        if not len(rows):
            return 0
        block = self.host.floats[rows, 2:]
        values, state = block[:, : self.spec.dim], block[:, self.spec.dim :]
        self.optimizer.apply(values, state, summed)
        block[:, : self.spec.dim], block[:, self.spec.dim :] = values, state
        self.host.floats[rows, 2:] = block
        if self.cache is not None:
            self.cache.write_through(unique, values)
        # One version per row keeps export pages exact: a page never splits a version.
        self.host.versions[rows] = self._version + 1 + np.arange(len(rows))
        self._version += len(rows)
        self.host.freqs[rows] += counts.astype(np.uint32)
        self.host.last_seen[rows] = np.uint32(self.clock())
        self.stats["pushed_rows"] += len(rows)
        if self.spec.host_capacity is not None and len(self.host) > self.spec.host_capacity:
            # Demote down to 95 % so that a full host tier does not demote on every push.
            self.demote(len(self.host) - int(self.spec.host_capacity * 0.95))
        return len(rows)

    def _materialise(self, fids: np.ndarray) -> np.ndarray:
        """Host rows for fids not in the host: loaded from RocksDB, or created if admitted; -1 if not."""
        out = np.full(len(fids), -1, np.int64)
        new = np.ones(len(fids), bool)
        if self.cold is not None:
            found, rows = self._cold_get(fids)
            if found.any():
                out[found] = self._load_rows(rows.take(found))
                self.stats["promoted"] += int(found.sum())
            new = ~found
        if new.any():
            candidates = fids[new]
            admitted = self._admit(candidates)
            fresh = candidates[admitted]
            if len(fresh) and self._evicted:
                self._evicted.difference_update(
                    fresh.tolist()
                )  # a new life: written, not deleted, next checkpoint
            if len(fresh):
                host_rows = self.host.insert(fresh)
                dim = self.spec.dim
                self.host.floats[host_rows, 2 : 2 + dim] = initial_values(
                    fresh, dim, self.spec.init_scale, self.spec.seed
                )
                self.host.floats[host_rows, 2 + dim :] = self.optimizer.init_state(len(fresh), dim)
                self.host.freqs[host_rows] = 0
                idx = np.flatnonzero(new)[admitted]
                out[idx] = host_rows
                self.stats["admitted"] += len(fresh)
        return out

    def _admit(self, fids: np.ndarray) -> np.ndarray:
        admitted = np.ones(len(fids), bool)
        slots = slot_of(fids)
        for slot in np.unique(slots).tolist():
            policy = self.spec.policy(int(slot))
            if policy.admission is None:
                continue
            sel = slots == slot
            admitted[sel] = self._admission_for(int(slot)).admit(fids[sel])
        return admitted

    def _admission_for(self, slot: int) -> Admission:
        if slot not in self._admission:
            self._admission[slot] = make_admission(self.spec.policy(slot).admission)
        return self._admission[slot]

    # -- background work ---------------------------------------------------------------------------

    def refresh_cache(self) -> int:
        """Fills the device cache with the most frequently used host rows; returns rows cached."""
        if self.cache is None:
            return 0
        cached_fids, reads = self.cache.take_hits()
        if len(cached_fids):
            rows = self.host.find(cached_fids)
            ok = rows >= 0
            self.host.freqs[rows[ok]] += reads[ok]
        live = self.host.live_rows()
        k = min(self.cache.capacity, len(live))
        if k == 0:
            self.cache.refresh(np.zeros(0, np.int64), np.zeros((0, self.spec.dim), np.float32))
            return 0
        hottest = live[np.argpartition(-self.host.freqs[live].astype(np.int64), k - 1)[:k]]
        self.cache.refresh(self.host.fids_of(hottest), self.host.floats[hottest, 2 : 2 + self.spec.dim])
        self.stats["cache_refreshes"] += 1
        return k

    def maintain(self, now: float | None = None) -> None:
        """Periodic work: TTL eviction, demotion to capacity, device cache refresh."""
        self.evict_expired(now)
        if self.spec.host_capacity is not None and len(self.host) > self.spec.host_capacity:
            self.demote(len(self.host) - self.spec.host_capacity)
        self.refresh_cache()

    # -- eviction and demotion ---------------------------------------------------------------------

    def evict_expired(self, now: float | None = None, include_cold: bool = False) -> int:
        """Erases rows whose slot has a TTL and that were not seen within it; returns rows evicted.

        Host rows go at once. With ``include_cold`` RocksDB is scanned too (a full scan: run it
        rarely); expired cold rows are deleted at the next checkpoint, which keeps RocksDB equal
        to the last checkpoint in between.
        """
        now = self.clock() if now is None else now
        policies = [self.spec.default_policy, *self.spec.slots.values()]
        if all(p.ttl_s is None for p in policies):
            return 0
        live = self.host.live_rows()
        fids = self.host.fids_of(live)
        expired = fids[self.host.last_seen[live] + self._ttls(fids) < now]
        if len(expired):
            self.host.erase(expired)
            self.refresh_cache()  # an evicted row must not stay readable from the cache
            if self.cold is not None:
                self._evicted.update(expired.tolist())
        total = len(expired)
        if include_cold and self.cold is not None:
            for batch in self.cold.scan():
                old = batch.fids[
                    (batch.last_seen + self._ttls(batch.fids) < now) & (self.host.find(batch.fids) < 0)
                ]
                fresh = [f for f in old.tolist() if f not in self._evicted]
                self._evicted.update(fresh)
                total += len(fresh)
        self.stats["evicted_ttl"] += total
        return total

    def _ttls(self, fids: np.ndarray) -> np.ndarray:
        """TTL in seconds of each fid's slot (inf: never expires), float64 [n]."""
        slots = slot_of(fids)
        default = self.spec.default_policy.ttl_s
        out = np.full(len(fids), np.inf if default is None else float(default), np.float64)
        for slot in self.spec.slots:
            out[slots == slot] = self._ttl(slot)
        return out

    def _ttl(self, slot: int) -> float:
        ttl = self.spec.policy(slot).ttl_s
        return np.inf if ttl is None else ttl

    def demote(self, n: int) -> int:
        """Moves ``n`` of the least valuable host rows (LFU or LRU) to RocksDB; returns rows demoted."""
        if self.cold is None or n <= 0:
            return 0
        if self.host.changed_rows(self._checkpoint.version).size:
            self.checkpoint()  # only clean rows may leave the host
        live = self.host.live_rows()
        score = self.host.freqs[live] if self.spec.demotion == "lfu" else self.host.last_seen[live]
        victims = live[np.argsort(score, kind="stable")[:n]]
        self.host.erase(self.host.fids_of(victims))
        self.stats["demoted"] += len(victims)
        self.refresh_cache()  # a demoted row must not stay readable from the cache
        return len(victims)

    # -- export ------------------------------------------------------------------------------------

    def export(self, since_version: int, limit: int) -> ExportPage:
        """Rows changed after ``since_version`` in version order (see ``EmbeddingTable.export``).

        Fids whose rows a ``rollback`` removed come with their initial value (what a Pull returns
        for them) and the version of the rollback, until they get a row again.
        """
        dim = self.spec.dim
        rows = self.host.changed_rows(since_version)
        fids = self.host.fids_of(rows)
        values = self.host.floats[rows, 2 : 2 + dim]
        versions = self.host.versions[rows]
        if self.cold is not None and self._cold_max_version > since_version:
            # Rows demoted or restored since then live only in RocksDB.
            in_host = set(fids.tolist()) | self._evicted
            parts = [b for b in self.cold.scan_changed(since_version) if len(b)]
            if parts:
                cold = RowBatch.concat(parts)
                keep = np.fromiter((f not in in_host for f in cold.fids.tolist()), bool, len(cold))
                fids = np.concatenate([fids, cold.fids[keep]])
                values = np.concatenate([values, cold.data[keep, :dim]])
                versions = np.concatenate([versions, cold.versions[keep]])
        gone, gone_versions = self._dropped_since(since_version)
        if len(gone):
            fids = np.concatenate([fids, gone])
            values = np.concatenate([values, initial_values(gone, dim, self.spec.init_scale, self.spec.seed)])
            versions = np.concatenate([versions, gone_versions])
        order = np.argsort(versions, kind="stable")
        has_more = len(order) > limit
        page = order[:limit]
        if not len(page):
            next_version = since_version if has_more else self._version
        else:
            next_version = int(versions[page[-1]]) if has_more else self._version
        return ExportPage(
            fids=fids[page],
            values=np.ascontiguousarray(values[page]),
            versions=versions[page],
            next_version=next_version,
            has_more=has_more,
        )

    def _dropped_since(self, since_version: int) -> tuple[np.ndarray, np.ndarray]:
        """Fids a rollback removed after ``since_version`` that still have no row: (fids, versions)."""
        sel = self._dropped_versions > since_version
        fids, versions = self._dropped_fids[sel], self._dropped_versions[sel]
        if len(fids):
            absent = self.host.find(fids) < 0
            if absent.any():
                absent[absent] = ~self._cold_get(fids[absent])[0]
            fids, versions = fids[absent], versions[absent]
        return fids, versions

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, tag: str | None = None) -> CheckpointInfo:
        """Makes the current state durable in one atomic RocksDB write; returns what it captured.

        Only what changed since the previous checkpoint is written (incremental); RocksDB then
        holds the complete table as of this checkpoint.

        Args:
            tag: the caller's tag (e.g. the trainer's stream position): this checkpoint becomes the
                rollback point, and the undo log is cleared. ``None``: an automatic checkpoint; it
                keeps the current tag and rollback point, and logs the RocksDB rows it overwrites or
                deletes for the first time since that point.

        Raises:
            RuntimeError: the table has no data dir.
        """
        if self.cold is None:
            raise RuntimeError(f"table {self.spec.name!r} has no data dir: checkpoints need one")
        rows = self.host.changed_rows(self._checkpoint.version)
        batch = RowBatch(
            fids=self.host.fids_of(rows),
            versions=self.host.versions[rows],
            freqs=self.host.freqs[rows],
            last_seen=self.host.last_seen[rows],
            data=self.host.floats[rows, 2:],
        )
        evicted = np.fromiter(self._evicted, np.int64, len(self._evicted))
        info = CheckpointInfo(
            self._last_id + 1,
            self._version,
            self._checkpoint.tag if tag is None else tag,
            time.time(),
        )
        meta = {META_CHECKPOINT: _info_bytes(info), **self._admission_meta()}
        undo = undo_absent = None
        if tag is not None:
            meta[META_POINT] = meta[META_CHECKPOINT]
        elif self._point is not None:
            undo, undo_absent = self._pre_images(np.concatenate([batch.fids, evicted]))
            self.stats["undo_rows"] += len(undo) + len(undo_absent)
            if self._checkpoint.checkpoint_id == self._point.checkpoint_id:
                meta.update(self._copy_point_admission())  # the live blobs are about to be overwritten
        self.cold.write(
            rows=batch,
            delete_fids=evicted if len(evicted) else None,
            meta=meta,
            undo=undo,
            undo_absent=undo_absent,
            clear_undo=tag is not None,
        )
        self.cold.flush()
        self._evicted.clear()
        self._checkpoint = info
        self._last_id = info.checkpoint_id
        if tag is not None:
            self._point = info
        self._cold_max_version = max(self._cold_max_version, self._version)
        self.stats["checkpoint_rows"] += len(batch)
        if len(self._dropped_fids):  # fids with a row again are exported as rows
            alive = self.host.find(self._dropped_fids) >= 0
            self._dropped_fids, self._dropped_versions = self._dropped_fids[~alive], self._dropped_versions[~alive]
        return info

    def _admission_meta(self) -> dict[str, bytes]:
        meta = {f"admission:{slot}": admission.state_bytes() for slot, admission in self._admission.items()}
        meta["admission_slots"] = json.dumps([f"admission:{slot}" for slot in self._admission]).encode()
        return meta

    def _pre_images(self, fids: np.ndarray) -> tuple[RowBatch, np.ndarray]:
        """Rows of fids at the rollback point, for fids not in the undo log yet: (rows, fids without one).

        A fid without an entry was not overwritten since the point, so RocksDB still holds its row
        as of the point (or none).
        """
        fids = np.unique(fids)
        logged = self.cold.get_undo(fids)[0]
        fresh = fids[~logged]
        found, rows = self.cold.get(fresh)
        return rows.take(found), fresh[~found]

    def _copy_point_admission(self) -> dict[str, bytes]:
        names = self._meta_admission_names()
        copy = {POINT_PREFIX + "admission_slots": json.dumps(names).encode()}
        copy.update({POINT_PREFIX + name: self.cold.get_meta(name) for name in names})
        return copy

    def _point_admission(self, point: CheckpointInfo) -> dict[str, bytes] | None:
        """Admission blobs of the rollback point by name; None when the live ones are the point's."""
        if point.checkpoint_id == 0:
            return {}
        if self._checkpoint.checkpoint_id == point.checkpoint_id:
            return None
        names = json.loads(self.cold.get_meta(POINT_PREFIX + "admission_slots") or b"[]")
        return {name: self.cold.get_meta(POINT_PREFIX + name) for name in names}

    def snapshot(self, dest: str, tag: str = "") -> CheckpointInfo:
        """A full, self-contained copy of the table at a new (tagged) checkpoint, in directory ``dest``."""
        info = self.checkpoint(tag)
        self.cold.checkpoint(dest)
        return info

    # -- rollback ----------------------------------------------------------------------------------

    def check_rollback(self, expected_tag: str | None = None) -> CheckpointInfo:
        """The checkpoint ``rollback`` would return to.

        Raises:
            RollbackError: the table has no data dir, or ``expected_tag`` is not None and differs
                from that checkpoint's tag.
        """
        if self.cold is None:
            raise RollbackError(
                f"table {self.spec.name!r} has no data dir: rollback needs checkpoints, and they need one"
            )
        point = self.rollback_point
        if expected_tag is not None and expected_tag != point.tag:
            raise RollbackError(
                f"table {self.spec.name!r}: expected checkpoint tag {expected_tag!r}, but the last checkpoint's "
                f"tag is {point.tag!r} (checkpoint id {point.checkpoint_id}); nothing was rolled back"
            )
        return point

    def rollback(self, expected_tag: str | None = None) -> CheckpointInfo:
        """Returns the table to its rollback point (the last tagged checkpoint); returns that checkpoint.

        Afterwards every read returns what it returned right after that checkpoint: rows changed
        since then have their values and optimizer state back, rows evicted or demoted since are
        readable again, rows created since read their initial value again, admission resumes from
        the checkpoint's state, and the device cache holds no stale row. So further pushes give
        exactly what they give on a table reopened from that checkpoint.

        Versions only grow: each restored row gets a new version, and so does each removed row,
        which ``export`` reports with its initial value until the fid gets a row again.

        Args:
            expected_tag: when not None, the rollback point's tag must equal it.

        Raises:
            RollbackError: see ``check_rollback``; nothing is changed then.
        """
        point = self.check_rollback(expected_tag)
        # Every fid changed since the point: rows written since the last checkpoint, fids evicted
        # since it, and what automatic checkpoints since the point overwrote (the undo log).
        undo_present, undo = self.cold.undo_log()
        changed = self.host.fids_of(self.host.changed_rows(point.version))
        evicted = np.fromiter(self._evicted, np.int64, len(self._evicted))
        fids = np.unique(np.concatenate([changed, evicted, undo.fids]))
        # Their state at the point: the undo log's entry, else RocksDB's row (not overwritten since).
        found, rows = self.cold.get(fids)
        at = np.searchsorted(fids, undo.fids)
        found[at] = undo_present
        for name in ("versions", "freqs", "last_seen", "data"):
            getattr(rows, name)[at] = getattr(undo, name)

        # RocksDB back to the point, in one write: logged rows restored, rows created since deleted,
        # the log cleared, the point's checkpoint record and admission state live again.
        admission = self._point_admission(point)
        meta = {META_LAST_ID: str(self._last_id).encode()}
        if point.checkpoint_id:
            meta[META_CHECKPOINT] = _info_bytes(point)
        if admission:
            meta["admission_slots"] = json.dumps(list(admission)).encode()
            meta.update(admission)
        self.cold.write(
            rows=undo.take(undo_present), delete_fids=undo.fids[~undo_present], meta=meta, clear_undo=True
        )
        self.cold.flush()
        self._admission = {}
        for name in self._meta_admission_names() if admission is None else admission:
            self._admission_for(int(name.split(":", 1)[1])).load_state(self.cold.get_meta(name))

        # The host: changed rows replaced by their state at the point, under new versions so that
        # exporters pick them up; rows created since removed.
        self.host.erase(fids)
        back = rows.take(found)
        host_rows = self._load_rows(back)
        self.host.versions[host_rows] = self._version + 1 + np.arange(len(back))
        self._version += len(back)
        gone = fids[~found]
        old = ~np.isin(self._dropped_fids, gone)
        self._dropped_fids = np.concatenate([self._dropped_fids[old], gone])
        self._dropped_versions = np.concatenate(
            [self._dropped_versions[old], self._version + 1 + np.arange(len(gone), dtype=np.int64)]
        )
        self._version += len(gone)
        self._evicted.clear()
        self._checkpoint = point
        self.refresh_cache()  # a changed or removed row must not stay readable from the cache
        self.stats["rollbacks"] += 1
        self.stats["rollback_restored"] += len(back)
        self.stats["rollback_removed"] += len(gone)
        logger.info(
            "table rolled back",
            extra={
                "table": self.spec.name,
                "checkpoint_id": point.checkpoint_id,
                "tag": point.tag,
                "restored": len(back),
                "removed": len(gone),
                "version": self._version,
            },
        )
        return point

    def _restore(self) -> None:
        raw = self.cold.get_meta(META_CHECKPOINT)
        if raw is None:
            return
        self._checkpoint = CheckpointInfo(**json.loads(raw))
        self._last_id = max(self._checkpoint.checkpoint_id, int(self.cold.get_meta(META_LAST_ID) or 0))
        point = self.cold.get_meta(META_POINT)
        self._point = CheckpointInfo(**json.loads(point)) if point is not None else None
        self._version = self._checkpoint.version
        self._cold_max_version = self._version
        for name in self._meta_admission_names():
            slot = int(name.split(":", 1)[1])
            self._admission_for(slot).load_state(self.cold.get_meta(name))
        logger.info(
            "table restored",
            extra={
                "table": self.spec.name,
                "checkpoint_id": self._checkpoint.checkpoint_id,
                "version": self._version,
            },
        )

    def _meta_admission_names(self) -> list[str]:
        raw = self.cold.get_meta("admission_slots")
        return json.loads(raw) if raw else []

    def close(self) -> None:
        if self.cold is not None:
            self.cold.close()

    def bytes_per_row(self) -> float:
        """Host memory per stored row (index, slab and headers)."""
        return self.host.nbytes() / max(len(self.host), 1)


def _info_bytes(info: CheckpointInfo) -> bytes:
    return json.dumps(asdict(info)).encode()
